"""Slide-level supervised pre-training of the slide encoder + Q-Former (no LLM in the loop).

Where slides come with structured ground truth (SynthSlide's ``truth.jsonl``; in real data: the structured
fields of a report), the slide tokens can be taught to carry those facts directly and cheaply: linear heads
read each attribute from the K projected tokens (the exact vectors the LLM will see) and are trained with
cross-entropy, plus the optional grounding loss that pulls attention onto the lesion. It costs milliseconds per
slide instead of a forward/backward through the LLM, so stages 1-2 then only have to teach the LLM to read
the tokens out. The heads are discarded; the encoder/projector are saved as a normal checkpoint that stage 1
starts from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidechat.synth.classes import LESION_CLASSES, QUADRANTS, TISSUE_CLASSES, TUMOR_FRACTION_BINS, tumor_fraction_bin
from slidechat.utils.io import read_jsonl
from slidechat.training.grounding import grounding_loss, peak_loss, pointing_hits
from slidechat.training.trainer import (GeneratorStage, StepOutput, Trainer, TrainContext, TrainerSettings,
                                        epoch_order)

log = logging.getLogger("training")


def synth_attributes(truth: dict) -> dict[str, int | list[int]]:
    """Class targets of one SynthSlide truth record (one per closed-VQA category, plus presence)."""
    les = truth.get("lesion")
    bins = [b[2] for b in TUMOR_FRACTION_BINS]
    return {
        "presence": [int(c in truth["classes_present"]) for c in TISSUE_CLASSES],
        "dominant": TISSUE_CLASSES.index(truth["dominant_class"]) if truth.get("dominant_class") else 0,
        "fragments": int(min(max(truth["n_fragments"], 1), 4) - 1),
        "lesion_type": 0 if not les else 1 + LESION_CLASSES.index(les["class"]),
        "lesion_quadrant": 0 if not les else 1 + QUADRANTS.index(les["quadrant"]),
        "tumor_bin": bins.index(tumor_fraction_bin(truth["tumor_fraction"])),
        "fractions": [float(truth["area_fractions"].get(c, 0.0)) for c in TISSUE_CLASSES],
    }


HEAD_SIZES = {"presence": 6, "dominant": 6, "fragments": 4, "lesion_type": 4, "lesion_quadrant": 5, "tumor_bin": 4,
              "fractions": 6}


def _quadrant_part(attrs: dict, part: int) -> int:
    q = attrs["lesion_quadrant"]
    return 2 if not q else ((q - 1) // 2 if part == 0 else (q - 1) % 2)


# Targets of the SynthSlide concept tokens (``qformer.concepts`` names -> index into that concept's words; the words
# are listed in training/recipes/demo.yaml in the same order).
SYNTH_CONCEPT_TARGETS = {
    **{f"present_{c}": (lambda a, i=i: 0 if a["presence"][i] else 1) for i, c in enumerate(TISSUE_CLASSES)},
    "dominant": lambda a: a["dominant"],
    "fragments": lambda a: a["fragments"],
    "lesion": lambda a: a["lesion_type"] - 1 if a["lesion_type"] else len(LESION_CLASSES),  # last word: no lesion
    "lesion_row": lambda a: _quadrant_part(a, 0),
    "lesion_side": lambda a: _quadrant_part(a, 1),
    "tumour_fraction": lambda a: a["tumor_bin"],
}


class AttributeHeads(nn.Module):
    def __init__(self, num_tokens: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.heads = nn.ModuleDict({k: nn.Linear(num_tokens * hidden, n) for k, n in HEAD_SIZES.items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.norm(tokens).flatten(1)
        return {k: h(x) for k, h in self.heads.items()}


@dataclass
class SlidePretrainConfig:
    epochs: int = 60
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    keep_min: float = 0.85        # random patch dropout: keep this fraction or more of each slide's patches
    grounding_weight: float = 0.2
    grounding_target: float = 0.5
    peak_weight: float = 0.0      # the heatmap's peak inside the lesion (``grounding.peak_loss``)
    peak_margin: float = 1.5
    val_fraction: float = 0.1
    augment: bool = True          # random flips / transpose of the patch coords (quadrant targets follow)
    seed: int = 0
    warmup_ratio: float = 0.1     # one-cycle schedule: the rising fraction
    max_grad_norm: float | None = 1.0

    def trainer_settings(self) -> TrainerSettings:
        return TrainerSettings.from_config(self, scheduler="one_cycle", log_every=10**9)


def dihedral(coords: torch.Tensor, target: dict, flip_x: bool, flip_y: bool, transpose: bool
             ) -> tuple[torch.Tensor, dict]:
    """Mirror / transpose a slide's patch coords and move its lesion-quadrant target with them.

    Quadrant index = 2 * lower + right (``QUADRANTS`` order); every other SynthSlide fact is unchanged."""
    c = coords.clone()
    if transpose:
        c = c[:, [1, 0]]
    for axis, flip in ((0, flip_x), (1, flip_y)):
        if flip:
            c[:, axis] = c[:, axis].min() + c[:, axis].max() - c[:, axis]
    q = target["lesion_quadrant"]
    if q:
        lower, right = divmod(q - 1, 2)
        if transpose:
            lower, right = right, lower
        lower ^= int(flip_y)
        right ^= int(flip_x)
        target = {**target, "lesion_quadrant": 1 + 2 * lower + right}
    return c, target


def _batch_loss(model, heads, items, targets, cfg, train: bool, gen: torch.Generator):
    feats, coords, gts = [], [], []
    if train and cfg.augment:
        items, targets = list(items), list(targets)
        for i, (f, c, g) in enumerate(items):
            flips = torch.randint(0, 2, (3,), generator=gen).tolist()
            c, targets[i] = dihedral(c, targets[i], *map(bool, flips))
            items[i] = (f, c, g)
    for f, c, g in items:
        if train and cfg.keep_min < 1.0:
            n = f.shape[0]
            keep = torch.rand(n, generator=gen) < (cfg.keep_min + (1 - cfg.keep_min) * torch.rand(1, generator=gen))
            if keep.sum() < 4:
                keep[:] = True
            f, c, g = f[keep], c[keep], (g[keep] if g is not None else None)
        feats.append(f)
        coords.append(c)
        gts.append(g)
    attend = cfg.grounding_weight > 0 or cfg.peak_weight > 0 or not train
    encodings, proj = model.encode_features(feats, coords, output_attentions=attend)
    tokens = torch.stack(proj.tokens).float()
    logits = heads(tokens)
    loss = 0.0
    correct = {}
    for name, lg in (proj.concept_logits or {}).items():  # concept tokens: supervised with the slide's truth
        if name not in SYNTH_CONCEPT_TARGETS:
            raise ValueError(f"concept {name!r} has no SynthSlide target; known: {sorted(SYNTH_CONCEPT_TARGETS)}")
        t = torch.tensor([SYNTH_CONCEPT_TARGETS[name](tg) for tg in targets])
        loss = loss + F.cross_entropy(lg.float(), t)
        correct[f"concept_{name}"] = (lg.argmax(1) == t).float()
    for k, lg in logits.items():
        t = torch.tensor([tg[k] for tg in targets])
        if k == "presence":
            loss = loss + F.binary_cross_entropy_with_logits(lg, t.float())
            correct[k] = ((lg > 0).long() == t).all(1).float()
        elif k == "fractions":  # area of each class: soft cross-entropy against the true composition
            loss = loss - (t * F.log_softmax(lg, dim=1)).sum(1).mean()
            correct[k] = (lg.argmax(1) == t.argmax(1)).float()
        else:
            loss = loss + F.cross_entropy(lg, t)
            correct[k] = (lg.argmax(1) == t).float()
    g = None
    if proj.cross_attentions:
        relevance = model.projector.patch_relevance(encodings, proj)
        if cfg.grounding_weight > 0:
            g = grounding_loss(relevance, gts, cfg.grounding_target)
            if g is not None:
                loss = loss + cfg.grounding_weight * g
        if cfg.peak_weight > 0:
            peak = peak_loss(relevance, gts, cfg.peak_margin)
            if peak is not None:
                loss = loss + cfg.peak_weight * peak
        if not train:
            correct["pointing"] = torch.tensor(pointing_hits([r.detach() for r in relevance], gts), dtype=torch.float)
    return loss, correct, g


def load_slides(synth_dir: str | Path, features_dir: str | Path, grounding_dir: str | Path | None = None) -> list:
    """``[((features, coords, lesion targets or None), attribute targets)]`` for every slide with a feature file."""
    from slidechat.features.store import load_features

    data = []
    for t in read_jsonl(Path(synth_dir) / "truth.jsonl"):
        p = Path(features_dir) / f"{t['slide_id']}.h5"
        if not p.exists():
            continue
        sf = load_features(p)
        g = None
        if grounding_dir is not None and (Path(grounding_dir) / f"{t['slide_id']}.npy").exists():
            g = torch.from_numpy(np.load(Path(grounding_dir) / f"{t['slide_id']}.npy").astype(np.float32))
        data.append(((torch.from_numpy(sf.features.astype(np.float32)), torch.from_numpy(sf.coords), g),
                     synth_attributes(t)))
    return data


def attribute_accuracy(model, heads, data: list, cfg: SlidePretrainConfig, batch_size: int = 32) -> dict[str, float]:
    """Held-out accuracy of each attribute head (presence: all six classes right); ``pointing``: the share of slides
    with a lesion whose relevance peak is on it (the pointing game, when the projector has its own attention)."""
    model.eval()
    heads.eval()
    hits: dict[str, list] = {}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            chunk = data[s:s + batch_size]
            _, correct, _ = _batch_loss(model, heads, [d[0] for d in chunk], [d[1] for d in chunk], cfg, False, gen)
            for k, v in correct.items():
                hits.setdefault(k, []).append(v)
    return {k: round(float(torch.cat(v).mean()), 3) for k, v in hits.items() if sum(len(x) for x in v)}


class _WithHeads(nn.Module):
    """The assistant and the attribute heads as one trainable (and checkpointed) module; its forward is the loss,
    so a distributed wrapper sees the whole step."""

    def __init__(self, assistant, heads: AttributeHeads) -> None:
        super().__init__()
        self.assistant = assistant
        self.heads = heads

    def forward(self, items: list, targets: list, cfg: SlidePretrainConfig, gen: torch.Generator) -> torch.Tensor:
        return _batch_loss(self.assistant, self.heads, items, targets, cfg, True, gen)[0]


class SlidePretrainStage(GeneratorStage):
    """Slide encoder + projector taught SynthSlide facts through attribute heads; the LLM stays frozen.

    ``val_data`` (from :func:`load_slides`, e.g. a SynthSlide set with another seed) is scored at the end; without
    it ``val_fraction`` of the training slides are held out. The heads are discarded; ``final/`` is a checkpoint."""

    name = "slide-pretrain"
    stage_id = "slide_pretrain"

    def __init__(self, model, synth_dir: str | Path, features_dir: str | Path, grounding_dir: str | Path | None,
                 cfg: SlidePretrainConfig, val_data: list | None = None) -> None:
        self.model, self.cfg = model, cfg
        self.paths = (synth_dir, features_dir, grounding_dir)
        self.val_data = val_data
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def build(self, ctx: TrainContext) -> nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.data = load_slides(*self.paths)
        self.order = np.random.default_rng(cfg.seed).permutation(len(self.data))
        n = len(self.data)
        n_val = 0 if self.val_data is not None else (max(1, int(round(n * cfg.val_fraction))) if n > 4 else 0)
        self.train_idx = self.order[n_val:]
        if self.val_data is None:
            self.val_data = [self.data[i] for i in self.order[:n_val]]
        model = self.model
        heads = AttributeHeads(model.num_slide_tokens, model.llm.get_input_embeddings().weight.shape[1])
        model.slide_encoder.requires_grad_(True)
        model.projector.requires_grad_(True)
        model.llm.requires_grad_(False)
        return _WithHeads(model, heads)

    def clip_parameters(self, module) -> list:
        m = module.assistant
        return list(m.slide_encoder.parameters()) + list(m.projector.parameters()) + list(module.heads.parameters())

    def param_groups(self, module, settings: TrainerSettings) -> list[dict]:
        return [{"params": self.clip_parameters(module), "lr": settings.lr, "weight_decay": settings.weight_decay}]

    def batches_per_epoch(self) -> int:
        return -(-len(self.train_idx) // self.cfg.batch_size)

    def epoch_batches(self, epoch: int, start: int, ctx: TrainContext):
        perm = epoch_order(self.cfg.seed, len(self.data), self.train_idx, epoch)
        bs = self.cfg.batch_size
        for s in range(start * bs, len(perm), bs):
            yield perm[s:s + bs]

    def loss(self, module, batch, ctx: TrainContext) -> StepOutput:
        loss = module([self.data[i][0] for i in batch], [self.data[i][1] for i in batch], self.cfg, self.gen)
        return StepOutput(loss, len(batch))

    def on_epoch_end(self, module, epoch: int, mean_loss: float, ctx: TrainContext) -> None:
        epochs = self.cfg.epochs
        if (epoch + 1) % max(1, epochs // 8) == 0 or epoch == epochs - 1:
            m = ctx.unwrapped
            acc = attribute_accuracy(m.assistant, m.heads, self.val_data, self.cfg) if self.val_data else {}
            log.info("[slide-pretrain] epoch %d/%d loss %.4f %s", epoch + 1, epochs, mean_loss,
                     f"held-out {acc}" if acc else "")

    def metrics_after(self, module, ctx: TrainContext, interrupted: bool) -> dict:
        m = ctx.unwrapped
        acc = attribute_accuracy(m.assistant, m.heads, self.val_data, self.cfg) if self.val_data else {}
        m.assistant.eval()
        return {"slides": len(self.data), "val_slides": len(self.val_data), "held_out_attribute_accuracy": acc}

    def save_final(self, module, ctx: TrainContext) -> None:
        module.assistant.save_pretrained(ctx.output_dir / "final")

    def result(self, module):
        return module.assistant


def pretrain_slide_encoder(model, synth_dir: str | Path, features_dir: str | Path, grounding_dir: str | Path | None,
                           cfg: SlidePretrainConfig, val_data: list | None = None, *, output_dir: str | Path,
                           resume: bool = False) -> dict:
    """Train ``model.slide_encoder`` + ``model.projector`` in place on SynthSlide truth; ``output_dir/final`` gets
    the checkpoint. Returns the trainer's metrics (``model``: the assistant)."""
    stage = SlidePretrainStage(model, synth_dir, features_dir, grounding_dir, cfg, val_data)
    metrics = Trainer(stage, cfg.trainer_settings(), output_dir, resume=resume).fit()
    log.info("[slide-pretrain] %s", {k: v for k, v in metrics.items() if k != "model"})
    return metrics
