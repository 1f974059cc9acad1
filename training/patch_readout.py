"""Teach a checkpoint to read concepts from patch-level class probabilities (``slidechat.model.patch_readout``).

The slide encoder, the Q-Former and the LLM (with its adapter) stay as they are; only the readout learns:

1. the patch head, on every patch of the training slides against the class shares measured inside the patch from
   the SynthSlide label map (cross-entropy with soft targets; tens of thousands of patches, so it generalises
   where a slide-level head of a few hundred slides does not);
2. each read concept's ``scale`` / ``offset``, on the slide truth (the concept's cross-entropy), the head fixed;
   a ``patch_focus`` concept's linear layer over its shape numbers (standardised on the training slides, then
   folded into the layer) likewise.

A checkpoint that already reads concepts from patches keeps its patch head and those concepts: with
``head_steps: 0`` a stage only adds and fits the new ones.

Concept tokens stay the softmax mix of the same words' embeddings, so the LLM keeps reading them as before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from slidechat.errors import ConfigError
from slidechat.synth.classes import LABEL_NAMES, TISSUE_CLASSES
from slidechat.utils.io import read_jsonl, write_json_atomic
from slidechat.training.slide_pretrain import SYNTH_CONCEPT_TARGETS, synth_attributes
from slidechat.model.patch_readout import soft_patch_loss

log = logging.getLogger("training")


@dataclass
class PatchReadoutConfig:
    """``read``: concept name -> ``patch_share`` or ``patch_presence`` (the presence concept's class is the tissue
    class in its name: ``present_necrosis`` -> ``necrosis``), or the concept entry's fields, e.g. ``{read:
    patch_bins, class: tumor, edges: [0.1, 0.3]}`` or ``{read: patch_focus, classes: [tumor, necrosis]}``."""

    read: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None        # the checkpoint to extend (default: the pipeline's latest)
    synth_dir: str | None = None        # training slides with label maps (default: the pipeline's)
    features_dir: str | None = None     # their features (default: the pipeline's)
    more_slides: list[dict] = field(default_factory=list)  # more training slides: [{synth_dir:, features_dir:}]
    val_synth_dir: str | None = None    # held-out slides for the report (default: val_fraction of the training ones)
    val_features_dir: str | None = None
    val_seed: int | None = None         # the pipeline makes val_n fresh SynthSlides of this seed (and their features)
    val_n: int = 96
    val_lesion_probability: float = 0.75
    val_fraction: float = 0.1
    head_steps: int = 600              # full-batch steps over every training patch (0: keep the checkpoint's head)
    head_lr: float = 3.0e-3
    calibration_epochs: int = 300
    calibration_lr: float = 5.0e-2
    weight_decay: float = 1.0e-4
    samples: int = 16                   # label-map points per patch side for the patch shares
    seed: int = 0


def read_spec(read: dict[str, Any]) -> dict[str, dict]:
    """``{"dominant": "patch_share", "present_necrosis": "patch_presence"}`` -> concept entries' ``read`` / ``class``."""
    spec = {}
    for name, mode in read.items():
        if isinstance(mode, dict):
            spec[name] = dict(mode)
            continue
        entry = {"read": mode}
        if mode == "patch_presence":
            cls = name.removeprefix("present_")
            entry["class"] = cls
        spec[name] = entry
    return spec


def load_readout_slides(model, synth_dir: str | Path, features_dir: str | Path, samples: int = 16) -> list[dict]:
    """Per slide: the frozen encoder's patch tokens, each patch's class shares, the slide's concept targets and the
    concept logits of the model as it is (``query_logits``, for the before/after comparison)."""
    from slidechat.features.store import load_features
    from slidechat.synth.patch_labels import load_label_map, patch_class_shares

    slides = []
    model.eval()
    for t in read_jsonl(Path(synth_dir) / "truth.jsonl"):
        p = Path(features_dir) / f"{t['slide_id']}.h5"
        if not p.exists():
            continue
        sf = load_features(p)
        ps = float(sf.attrs.get("patch_size_level0") or 0) or None
        with torch.no_grad():
            (enc,), proj = model.encode_features([torch.from_numpy(sf.features.astype(np.float32))],
                                                 [torch.from_numpy(sf.coords)], [ps])
        shares = patch_class_shares(load_label_map(synth_dir, t), int(t["mask_downsample"]), sf.coords,
                                    ps or 224.0, len(LABEL_NAMES), samples)
        attrs = synth_attributes(t)
        slides.append({"slide_id": t["slide_id"], "tokens": enc.patch_tokens.detach().float().cpu(),
                       "grid": enc.patch_grid.detach().cpu(),
                       "shares": torch.from_numpy(shares),
                       "targets": {n: f(attrs) for n, f in SYNTH_CONCEPT_TARGETS.items()},
                       "query_logits": {k: v[0].float().cpu() for k, v in (proj.concept_logits or {}).items()}})
    return slides


def concept_accuracy(projector, slides: list[dict], names: list[str], patch: bool) -> dict[str, float]:
    """Share of ``slides`` whose concept argmax is the truth, read from the patches (``patch``) or from the
    queries (needs ``"query_logits"`` stored per slide)."""
    out = {}
    with torch.no_grad():
        for name in names:
            hits = []
            for s in slides:
                if patch:
                    lg = projector.patch_readout([s["tokens"]], [s["grid"]])[name][0]
                else:
                    lg = s["query_logits"][name]
                hits.append(int(lg.argmax()) == s["targets"][name])
            out[name] = round(float(np.mean(hits)), 4) if hits else None
    return out


def train_patch_readout(model, cfg: PatchReadoutConfig, synth_dir: str | Path, features_dir: str | Path,
                        output_dir: str | Path) -> dict:
    """Add the readout of ``cfg.read`` to ``model`` (in place), train it, save ``output_dir/final``; returns
    metrics: held-out accuracy of every read concept before (query heads) and after (patch readout)."""
    t0 = time.perf_counter()
    kept = getattr(model.projector, "patch_readout", None)
    if not cfg.head_steps and (kept is None or kept.patch_classes != list(TISSUE_CLASSES)):
        raise ConfigError("patch_readout.head_steps: 0 keeps the checkpoint's patch head, but the checkpoint has no "
                          f"patch readout of the classes {list(TISSUE_CLASSES)}; train one (head_steps > 0)")
    torch.manual_seed(cfg.seed)
    output_dir = Path(output_dir)
    slides = load_readout_slides(model, synth_dir, features_dir, cfg.samples)
    for more in cfg.more_slides:
        slides += load_readout_slides(model, more["synth_dir"], more["features_dir"], cfg.samples)
    if cfg.val_synth_dir:
        val = load_readout_slides(model, cfg.val_synth_dir, cfg.val_features_dir or features_dir, cfg.samples)
        train = slides
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(slides))
        n_val = max(1, int(round(len(slides) * cfg.val_fraction)))
        val, train = [slides[i] for i in order[:n_val]], [slides[i] for i in order[n_val:]]
    names = list(cfg.read)
    before = concept_accuracy(model.projector, val, names, patch=False)

    readout = model.projector.read_concepts_from_patches(TISSUE_CLASSES, read_spec(cfg.read))
    readout.train()
    tokens = torch.cat([s["tokens"] for s in train])
    shares = torch.cat([s["shares"] for s in train])
    head_loss = None
    if cfg.head_steps:
        # 1. the patch head: full-batch steps over every training patch (a few MB)
        opt = torch.optim.AdamW(readout.head.parameters(), lr=cfg.head_lr, weight_decay=cfg.weight_decay)
        for _ in range(cfg.head_steps):
            opt.zero_grad()
            loss = soft_patch_loss(readout.patch_logits(tokens), shares)
            loss.backward()
            opt.step()
        head_loss = round(float(loss.detach()), 4)
    # 2. each concept's scale / offset (or focus layer) on the slide truth, the head fixed
    readout.head.requires_grad_(False)
    scalar = [n for n in names if n in readout.scale]
    if scalar:
        _fit_scalar_concepts(readout, train, scalar, cfg)
    for n in names:
        if n in readout.focus:
            _fit_focus_concept(readout, train, n, cfg)
    readout.requires_grad_(False)
    readout.eval()
    after = concept_accuracy(model.projector, val, names, patch=True)
    with torch.no_grad():
        val_tokens = torch.cat([s["tokens"] for s in val])
        val_shares = torch.cat([s["shares"] for s in val])
        patch_acc = float((readout.patch_logits(val_tokens).argmax(1) == val_shares.argmax(1)).float().mean())
    model.save_pretrained(output_dir / "final")
    metrics = {"train_slides": len(train), "val_slides": len(val), "train_patches": int(tokens.shape[0]),
               "patch_loss": head_loss, "val_patch_accuracy": round(patch_acc, 4),
               "val_concept_accuracy_query_heads": before, "val_concept_accuracy_patch_readout": after,
               "scale": {n: round(float(readout.scale[n]), 3) for n in scalar},
               "offset": {n: round(float(readout.offset[n]), 3) for n in scalar},
               "bin_scale": {n: round(float(v), 3) for n, v in readout.bin_scale.items() if n in names},
               "wall_time_s": round(time.perf_counter() - t0, 1)}
    write_json_atomic(output_dir / "metrics.json", metrics)
    log.info("[patch-readout] %s", metrics)
    return metrics


def _fit_scalar_concepts(readout, train: list[dict], names: list[str], cfg: PatchReadoutConfig) -> None:
    """Each concept's scale / offset (and bin scale) by Adam on the concepts' cross-entropy."""
    with torch.no_grad():
        aggregates = [readout.aggregate(readout.patch_logits(s["tokens"])) for s in train]
    calib = [p for n in names for p in (readout.scale[n], readout.offset[n])]
    calib += [v for n, v in readout.bin_scale.items() if n in names]
    opt = torch.optim.Adam(calib, lr=cfg.calibration_lr)
    targets = {n: torch.tensor([s["targets"][n] for s in train]) for n in names}
    for _ in range(cfg.calibration_epochs):
        opt.zero_grad()
        per_slide = [readout.concept_logits(*a, names=names) for a in aggregates]
        loss = sum(F.cross_entropy(torch.stack([p[n] for p in per_slide]), targets[n]) for n in names)
        loss.backward()
        opt.step()


def _fit_focus_concept(readout, train: list[dict], name: str, cfg: PatchReadoutConfig) -> None:
    """A ``patch_focus`` concept's linear layer: L-BFGS on the cross-entropy of standardised shape numbers (L2
    ``weight_decay``), the standardisation folded into the layer afterwards."""
    classes = readout.concepts[name]["classes"]
    with torch.no_grad():
        x = torch.stack([readout.focus_features(readout.patch_logits(s["tokens"]), s["grid"], classes)
                         for s in train]).double()
    y = torch.tensor([s["targets"][name] for s in train])
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(readout.focus[name].weight.shape, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(w.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + cfg.weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        layer = readout.focus[name]
        layer.weight.copy_((w / sd).to(layer.weight.dtype))
        layer.bias.copy_((b - (w / sd) @ mu).to(layer.bias.dtype))
