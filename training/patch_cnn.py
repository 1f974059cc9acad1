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
    target_mpp: float = 0.5
    patch_size: int = 224
    min_purity: float = 0.6
    val_fraction: float = 0.1


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


def train_patch_cnn(synth_dir: str | Path, out_path: str | Path, cfg: PatchCNNTrainConfig | None = None) -> dict:
    """Train DemoCNN on a SynthSlide folder and save it to ``out_path`` (.safetensors). Returns metrics."""
    from slidechat.encoders.demo_cnn import DemoCNN, DemoCNNConfig, save_demo_cnn
    from slidechat.synth.classes import LABEL_NAMES

    cfg = cfg or PatchCNNTrainConfig()
    t0 = time.perf_counter()
    x, y = collect_patches(synth_dir, cfg)
    t_collect = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    model = DemoCNN(DemoCNNConfig(channels=tuple(cfg.channels), embed_dim=cfg.embed_dim, input_size=cfg.input_size,
                                  num_classes=len(LABEL_NAMES)))
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)

    def prep(batch: np.ndarray, augment: bool, g: torch.Generator | None = None) -> torch.Tensor:
        t = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        if augment:  # flips / 90-degree rotations: tissue has no orientation
            if torch.rand(1, generator=g).item() < 0.5:
                t = t.flip(3)
            t = torch.rot90(t, int(torch.randint(0, 4, (1,), generator=g)), dims=(2, 3))
        return (t - mean) / std

    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(y))
    n_val = max(1, int(len(y) * cfg.val_fraction))
    val, tr = order[:n_val], order[n_val:]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * -(-len(tr) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps), pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for epoch in range(cfg.epochs):
        perm = tr[rng.permutation(len(tr))]
        total, n = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            if len(idx) < 2:
                continue
            logits = model.classify(prep(x[idx], True, g))
            loss = F.cross_entropy(logits, torch.from_numpy(y[idx]).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
            n += len(idx)
        log.info("[patch-cnn] epoch %d/%d  loss %.4f", epoch + 1, cfg.epochs, total / max(1, n))
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model.classify(prep(x[val[s:s + 256]], False)).argmax(1)
                          for s in range(0, len(val), 256)]).numpy()
    acc = float((pred == y[val]).mean())
    save_demo_cnn(model, out_path)
    metrics = {"patches": int(len(y)), "class_counts": {LABEL_NAMES[c]: int(k) for c, k in
                                                        enumerate(np.bincount(y, minlength=len(LABEL_NAMES))) if k},
               "val_accuracy": round(acc, 4), "epochs": cfg.epochs, "collect_s": round(t_collect, 1),
               "wall_time_s": round(time.perf_counter() - t0, 1), "weights": str(out_path)}
    log.info("[patch-cnn] %d patches, held-out patch accuracy %.3f, %.0fs", len(y), acc, metrics["wall_time_s"])
    return metrics
