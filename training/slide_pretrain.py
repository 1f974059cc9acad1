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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidechat.synth.classes import LESION_CLASSES, QUADRANTS, TISSUE_CLASSES, TUMOR_FRACTION_BINS, tumor_fraction_bin
from slidechat.utils.io import read_jsonl
from slidechat.training.grounding import grounding_loss, patch_relevance

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
    val_fraction: float = 0.1
    augment: bool = True          # random flips / transpose of the patch coords (quadrant targets follow)
    seed: int = 0


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
    encodings, proj = model.encode_features(feats, coords, output_attentions=cfg.grounding_weight > 0)
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
    if cfg.grounding_weight > 0 and proj.cross_attentions:
        g = grounding_loss(patch_relevance(proj.cross_attentions, encodings), gts, cfg.grounding_target)
        if g is not None:
            loss = loss + cfg.grounding_weight * g
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
    """Held-out accuracy of each attribute head (presence: all six classes right)."""
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
    return {k: round(float(torch.cat(v).mean()), 3) for k, v in hits.items()}


def pretrain_slide_encoder(model, synth_dir: str | Path, features_dir: str | Path, grounding_dir: str | Path | None,
                           cfg: SlidePretrainConfig, val_data: list | None = None) -> dict:
    """Train ``model.slide_encoder`` + ``model.projector`` in place on SynthSlide truth; returns metrics.

    ``val_data`` (from :func:`load_slides`, e.g. a SynthSlide set with another seed) is scored at the end; without
    it ``val_fraction`` of the training slides are held out."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = load_slides(synth_dir, features_dir, grounding_dir)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(data))
    n_val = 0 if val_data is not None else (max(1, int(round(len(data) * cfg.val_fraction))) if len(data) > 4 else 0)
    val, tr = order[:n_val], order[n_val:]
    if val_data is None:
        val_data = [data[i] for i in val]
    heads = AttributeHeads(model.num_slide_tokens, model.llm.get_input_embeddings().weight.shape[1])
    model.slide_encoder.requires_grad_(True)
    model.projector.requires_grad_(True)
    model.llm.requires_grad_(False)
    params = list(model.slide_encoder.parameters()) + list(model.projector.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-len(tr) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps), pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    heads.train()
    for epoch in range(cfg.epochs):
        perm = tr[rng.permutation(len(tr))]
        tot, n = 0.0, 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            loss, _, g = _batch_loss(model, heads, [data[i][0] for i in idx], [data[i][1] for i in idx], cfg, True, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            n += len(idx)
        if (epoch + 1) % max(1, cfg.epochs // 8) == 0 or epoch == cfg.epochs - 1:
            acc = attribute_accuracy(model, heads, val_data, cfg) if val_data else {}
            model.train()
            heads.train()
            log.info("[slide-pretrain] epoch %d/%d loss %.4f%s %s", epoch + 1, cfg.epochs, tot / max(1, n),
                     f" grounding {float(g.detach()):.3f}" if g is not None else "", f"held-out {acc}" if acc else "")
    val_acc = attribute_accuracy(model, heads, val_data, cfg) if val_data else {}
    model.eval()
    metrics = {"slides": len(data), "val_slides": len(val_data), "epochs": cfg.epochs,
               "held_out_attribute_accuracy": val_acc, "wall_time_s": round(time.perf_counter() - t0, 1)}
    log.info("[slide-pretrain] %s", metrics)
    return metrics
