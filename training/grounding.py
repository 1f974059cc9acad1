"""Optional grounding supervision: pull the projector's attention onto annotated patches (e.g. a lesion mask).

The relevance is the projector's own ``patch_relevance`` (for the Q-Former: cross-attention averaged over layers,
heads and queries, mapped back to patches) — the same function the heatmap of ``slidechat.inference.heatmap``
shows. With ``p`` the map normalised to a distribution over patches and ``t`` the per-patch target (fraction of the
patch inside the annotation), ``loss = relu(log(target_mass) - log(sum p * t / max t))`` — zero once the
annotated patches hold ``target_mass`` of the attention, so the rest stays free for the other questions. Slides
without an annotation (all-zero targets) add nothing. Used by the demo recipe with SynthSlide lesion masks.

A mass target alone leaves the heatmap's peak free: half the mass can sit on a large lesion while one patch outside
it is the brightest. ``peak_loss`` asks for the peak itself (what the pointing game scores): the most relevant
patch mostly inside the annotation must outscore every patch outside it by ``margin``.
"""

from __future__ import annotations

import math

import torch

from slidechat.model.assistant import flatten_cases, group_by_case


def has_own_relevance(model) -> bool:
    """Whether the projector's relevance comes from its own attention (so it can be trained without the LLM's)."""
    return not model.projector.relevance_needs_token_weights


def grounding_loss(relevance: list[torch.Tensor], targets: list[torch.Tensor | None],
                   target_mass: float = 0.5) -> torch.Tensor | None:
    """Mean hinge loss over slides that have a non-empty target; None when no slide has one."""
    losses = []
    for rel, t in zip(relevance, targets):
        if t is None or float(t.max()) <= 0:
            continue
        t = t.to(rel.device, rel.dtype) / t.max()
        p = rel / rel.sum().clamp_min(1e-12)
        mass = (p * t).sum().clamp_min(1e-8)
        losses.append(torch.relu(math.log(target_mass) - torch.log(mass)))
    return torch.stack(losses).mean() if losses else None


def _inside(t: torch.Tensor) -> torch.Tensor:
    """Patches at least half inside the annotation (its best-covered patches when none is)."""
    return t >= min(0.5, float(t.max()))


def peak_loss(relevance: list[torch.Tensor], targets: list[torch.Tensor | None],
              margin: float = 1.5) -> torch.Tensor | None:
    """Mean of ``relu(log(max outside) - log(max inside) + log(margin))`` over slides with an annotation; inside =
    patches at least half in it (its best-covered patch when none is), outside = patches not touching it."""
    losses = []
    for rel, t in zip(relevance, targets):
        if t is None or float(t.max()) <= 0:
            continue
        t = t.to(rel.device, rel.dtype)
        inside, outside = _inside(t), t <= 0
        if not bool(outside.any()):
            continue
        p = rel / rel.sum().clamp_min(1e-12)
        top_in, top_out = p[inside].max().clamp_min(1e-12), p[outside].max().clamp_min(1e-12)
        losses.append(torch.relu(torch.log(top_out) - torch.log(top_in) + math.log(margin)))
    return torch.stack(losses).mean() if losses else None


def pointing_hits(relevance: list[torch.Tensor], targets: list[torch.Tensor | None]) -> list[bool]:
    """Per slide with an annotation: whether its most relevant patch is at least half inside it."""
    return [bool(_inside(t)[int(rel.argmax())])
            for rel, t in zip(relevance, targets) if t is not None and float(t.max()) > 0]


def forward_with_grounding(model, batch: dict, weight: float, target_mass: float = 0.5):
    """The assistant's training forward (same as ``model(**batch)``) plus ``weight * grounding_loss``.

    Returns the LLM output with ``.loss`` replaced by the sum and ``.grounding_loss`` attached.
    """
    counts, feats, coords, targets = flatten_cases(batch["slide_features"], batch["slide_coords"],
                                                   batch.get("patch_targets"))
    encodings, proj = model.encode_features(feats, coords, output_attentions=True)
    embeds, mask, labels = model.build_inputs_embeds(batch["input_ids"], group_by_case(proj.tokens, counts),
                                                     batch["attention_mask"], batch["labels"])
    out = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    g = None
    if proj.cross_attentions:
        g = grounding_loss(model.projector.patch_relevance(encodings, proj), targets, target_mass)
    if g is not None:
        out.loss = out.loss + weight * g
    out.grounding_loss = None if g is None else g.detach()
    return out
