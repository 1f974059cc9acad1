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

from slidechat.utils.io import read_jsonl
from training.grounding import grounding_loss, patch_relevance

log = logging.getLogger("training")


def synth_attributes(truth: dict) -> dict[str, int | list[int]]:
    """Class targets of one SynthSlide truth record (one per closed-VQA category, plus presence)."""
    from slidechat.synth.classes import LESION_CLASSES, QUADRANTS, TISSUE_CLASSES, TUMOR_FRACTION_BINS, tumor_fraction_bin

    les = truth.get("lesion")
    bins = [b[2] for b in TUMOR_FRACTION_BINS]
    return {
        "presence": [int(c in truth["classes_present"]) for c in TISSUE_CLASSES],
        "dominant": TISSUE_CLASSES.index(truth["dominant_class"]) if truth.get("dominant_class") else 0,
        "fragments": int(min(max(truth["n_fragments"], 1), 4) - 1),
        "lesion_type": 0 if not les else 1 + LESION_CLASSES.index(les["class"]),
        "lesion_quadrant": 0 if not les else 1 + QUADRANTS.index(les["quadrant"]),
        "tumor_bin": bins.index(tumor_fraction_bin(truth["tumor_fraction"])),
    }


HEAD_SIZES = {"presence": 6, "dominant": 6, "fragments": 4, "lesion_type": 4, "lesion_quadrant": 5, "tumor_bin": 4}


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
    seed: int = 0


def _batch_loss(model, heads, items, targets, cfg, train: bool, gen: torch.Generator):
    feats, coords, gts = [], [], []
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
    logits = heads(torch.stack(proj.tokens).float())
    loss = 0.0
    correct = {}
    for k, lg in logits.items():
        t = torch.tensor([tg[k] for tg in targets])
        if k == "presence":
            loss = loss + F.binary_cross_entropy_with_logits(lg, t.float())
            correct[k] = ((lg > 0).long() == t).all(1).float()
        else:
            loss = loss + F.cross_entropy(lg, t)
            correct[k] = (lg.argmax(1) == t).float()
    g = None
    if cfg.grounding_weight > 0 and proj.cross_attentions:
        g = grounding_loss(patch_relevance(proj.cross_attentions, encodings), gts, cfg.grounding_target)
        if g is not None:
            loss = loss + cfg.grounding_weight * g
    return loss, correct, g


def pretrain_slide_encoder(model, synth_dir: str | Path, features_dir: str | Path, grounding_dir: str | Path | None,
                           cfg: SlidePretrainConfig) -> dict:
    """Train ``model.slide_encoder`` + ``model.projector`` in place on SynthSlide truth; returns metrics."""
    from slidechat.features.store import load_features

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
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
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(data))
    n_val = max(1, int(round(len(data) * cfg.val_fraction))) if len(data) > 4 else 0
    val, tr = order[:n_val], order[n_val:]
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
            log.info("[slide-pretrain] epoch %d/%d loss %.4f%s", epoch + 1, cfg.epochs, tot / max(1, n),
                     f" grounding {float(g):.3f}" if g is not None else "")
    model.eval()
    heads.eval()
    val_acc = {}
    if len(val):
        with torch.no_grad():
            _, correct, _ = _batch_loss(model, heads, [data[i][0] for i in val], [data[i][1] for i in val], cfg,
                                        False, gen)
        val_acc = {k: round(float(v.mean()), 3) for k, v in correct.items()}
    metrics = {"slides": len(data), "val_slides": int(len(val)), "epochs": cfg.epochs,
               "held_out_attribute_accuracy": val_acc, "wall_time_s": round(time.perf_counter() - t0, 1)}
    log.info("[slide-pretrain] %s", metrics)
    return metrics
