"""Train the demo patch CNN on SynthSlide patches, supervised by the per-pixel tissue-class label maps.

Patches are cut exactly as feature extraction cuts them (tissue mask -> tile grid at the target mpp ->
block reads), so the CNN sees at training time what it will embed later. Each patch's label is the majority
class of the label map under its footprint (vectorised with one integral image per class); patches with no
class over ``min_purity`` are dropped. The classification head makes the embedding discriminative; only the
embedding is used downstream. Weights + config are saved to one ``.safetensors`` file (``save_demo_cnn``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidechat.slide.config import DEFAULT_PATCH_SIZE, DEFAULT_TARGET_MPP
from slidechat.training.trainer import (GeneratorStage, StepOutput, Trainer, TrainContext, TrainerSettings,
                                        epoch_order)
from slidechat.utils.io import read_jsonl

log = logging.getLogger("training")


@dataclass
class PatchCNNTrainConfig:
    patches_per_slide: int = 64
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    input_size: int = 112       # CNN input (patches are resized once when collected)
    embed_dim: int = 64
    channels: tuple[int, ...] = (24, 48, 96, 128)
    target_mpp: float = DEFAULT_TARGET_MPP
    patch_size: int = DEFAULT_PATCH_SIZE
    min_purity: float = 0.6
    val_fraction: float = 0.1
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.15  # one-cycle schedule: the rising fraction

    def trainer_settings(self) -> TrainerSettings:
        return TrainerSettings.from_config(self, scheduler="one_cycle", max_grad_norm=None, log_every=10**9)


def class_fractions(label_map: np.ndarray, downsample: float, coords: np.ndarray, size_level0: float,
                    num_labels: int) -> np.ndarray:
    """[N, num_labels] fraction of each label under each level-0 square patch (integral images, no patch loop)."""
    h, w = label_map.shape
    x0 = np.clip(np.floor(coords[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + size_level0) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size_level0) / downsample).astype(np.int64), 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    out = np.zeros((len(coords), num_labels), dtype=np.float32)
    for c in range(num_labels):
        ii = np.pad((label_map == c).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        out[:, c] = (ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]) / area
    return out


def collect_patches(synth_dir: str | Path, cfg: PatchCNNTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """uint8 patches [M, S, S, 3] (S = cfg.input_size) and labels [M] sampled from every slide of a SynthSlide folder."""
    from PIL import Image

    from slidechat.slide.reader import SlideReader
    from slidechat.slide.tiling import PatchBlockDataset, make_tile_grid
    from slidechat.slide.tissue import detect_tissue
    from slidechat.synth.classes import LABEL_NAMES

    synth_dir = Path(synth_dir)
    rng = np.random.default_rng(cfg.seed)
    xs, ys = [], []
    for t in read_jsonl(synth_dir / "truth.jsonl"):
        with SlideReader(synth_dir / t["path"]) as reader:
            grid = make_tile_grid(reader, detect_tissue(reader), cfg.target_mpp, cfg.patch_size)
        labels = np.asarray(Image.open(synth_dir / t["label_map_path"]))
        frac = class_fractions(labels, float(t["mask_downsample"]), grid.coords, grid.patch_size_level0,
                               len(LABEL_NAMES))
        lab = frac.argmax(1)
        ok = np.flatnonzero(frac.max(1) >= cfg.min_purity)
        if ok.size == 0:
            continue
        # balance classes within the slide: sample patches inversely to their class frequency
        counts = np.bincount(lab[ok], minlength=len(LABEL_NAMES)).astype(np.float64)
        p = 1.0 / counts[lab[ok]]
        take = rng.choice(ok, size=min(cfg.patches_per_slide, ok.size), replace=False, p=p / p.sum())
        wanted = np.zeros(len(grid), dtype=bool)
        wanted[take] = True
        ds = PatchBlockDataset(synth_dir / t["path"], grid)
        for b in range(len(ds)):
            if not wanted[ds.blocks[b]].any():
                continue
            idx, patches = ds[b]
            idx = np.asarray(idx, dtype=np.int64)
            sel = wanted[idx]
            x = torch.as_tensor(np.asarray(patches)[sel]).permute(0, 3, 1, 2).float()
            if cfg.input_size != cfg.patch_size:
                x = F.interpolate(x, size=(cfg.input_size, cfg.input_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            xs.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
            ys.append(lab[idx[sel]])
        if ds._reader is not None:
            ds._reader.close()
    if not xs:
        from slidechat.errors import DataError

        raise DataError(f"no labelled patches found in {synth_dir}")
    return np.concatenate(xs), np.concatenate(ys)


class _Classifier(nn.Module):
    """DemoCNN with its classification head as ``forward`` (what the stage trains)."""

    def __init__(self, cnn) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn.classify(x)


class PatchCNNStage(GeneratorStage):
    """DemoCNN classifying SynthSlide patches (flip / rotation augmentation); saves one ``.safetensors`` file."""

    name = "patch-cnn"
    stage_id = "patch_cnn"

    def __init__(self, synth_dir: str | Path, out_path: str | Path, cfg: PatchCNNTrainConfig) -> None:
        self.synth_dir, self.out_path, self.cfg = Path(synth_dir), Path(out_path), cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def build(self, ctx: TrainContext) -> nn.Module:
        from slidechat.encoders.demo_cnn import DemoCNN, DemoCNNConfig
        from slidechat.synth.classes import LABEL_NAMES

        cfg = self.cfg
        t0 = time.perf_counter()
        self.x, self.y = collect_patches(self.synth_dir, cfg)
        self.collect_s = time.perf_counter() - t0
        torch.manual_seed(cfg.seed)
        model = DemoCNN(DemoCNNConfig(channels=tuple(cfg.channels), embed_dim=cfg.embed_dim,
                                      input_size=cfg.input_size, num_classes=len(LABEL_NAMES)))
        self.mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(model.config.std).view(1, 3, 1, 1)
        order = np.random.default_rng(cfg.seed).permutation(len(self.y))
        n_val = max(1, int(len(self.y) * cfg.val_fraction))
        self.val_idx, self.train_idx = order[:n_val], order[n_val:]
        return _Classifier(model)

    def _prep(self, batch: np.ndarray, augment: bool) -> torch.Tensor:
        t = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        if augment:  # flips / 90-degree rotations: tissue has no orientation
            if torch.rand(1, generator=self.gen).item() < 0.5:
                t = t.flip(3)
            t = torch.rot90(t, int(torch.randint(0, 4, (1,), generator=self.gen)), dims=(2, 3))
        return (t - self.mean) / self.std

    def batches_per_epoch(self) -> int:
        return -(-len(self.train_idx) // self.cfg.batch_size)

    def epoch_batches(self, epoch: int, start: int, ctx: TrainContext):
        perm = epoch_order(self.cfg.seed, len(self.y), self.train_idx, epoch)
        bs = self.cfg.batch_size
        for s in range(start * bs, len(perm), bs):
            idx = perm[s:s + bs]
            yield idx if len(idx) >= 2 else None

    def loss(self, module, batch, ctx: TrainContext) -> StepOutput:
        logits = module(self._prep(self.x[batch], True).to(ctx.device))
        return StepOutput(F.cross_entropy(logits, torch.from_numpy(self.y[batch]).long().to(ctx.device)), len(batch))

    def on_epoch_end(self, module, epoch: int, mean_loss: float, ctx: TrainContext) -> None:
        log.info("[patch-cnn] epoch %d/%d  loss %.4f", epoch + 1, self.cfg.epochs, mean_loss)

    def metrics_after(self, module, ctx: TrainContext, interrupted: bool) -> dict:
        from slidechat.synth.classes import LABEL_NAMES

        cnn = ctx.unwrapped.cnn.eval()
        val = self.val_idx
        with torch.no_grad():
            pred = torch.cat([cnn.classify(self._prep(self.x[val[s:s + 256]], False).to(ctx.device)).argmax(1).cpu()
                              for s in range(0, len(val), 256)]).numpy()
        counts = np.bincount(self.y, minlength=len(LABEL_NAMES))
        return {"patches": int(len(self.y)), "val_accuracy": round(float((pred == self.y[val]).mean()), 4),
                "class_counts": {LABEL_NAMES[c]: int(k) for c, k in enumerate(counts) if k},
                "collect_s": round(self.collect_s, 1), "weights": str(self.out_path)}

    def save_final(self, module, ctx: TrainContext) -> None:
        from slidechat.encoders.demo_cnn import save_demo_cnn

        save_demo_cnn(module.cnn, self.out_path)

    def result(self, module):
        return module.cnn


def train_patch_cnn(synth_dir: str | Path, out_path: str | Path, cfg: PatchCNNTrainConfig | None = None, *,
                    output_dir: str | Path | None = None, resume: bool = False) -> dict:
    """Train DemoCNN on a SynthSlide folder and save it to ``out_path`` (.safetensors). Returns metrics.

    Checkpoints and ``log.csv`` go to ``output_dir`` (default: ``<out_path without suffix>-run/``)."""
    cfg = cfg or PatchCNNTrainConfig()
    out_path = Path(out_path)
    run_dir = Path(output_dir) if output_dir else out_path.with_name(out_path.stem + "-run")
    metrics = Trainer(PatchCNNStage(synth_dir, out_path, cfg), cfg.trainer_settings(), run_dir, resume=resume).fit()
    metrics.pop("model", None)
    log.info("[patch-cnn] %d patches, held-out patch accuracy %.3f, %.0fs", metrics["patches"],
             metrics["val_accuracy"], metrics["wall_time_s"])
    return metrics
