"""Optional grounding supervision: pull the Q-Former's attention onto annotated patches (e.g. a lesion mask).

The heatmap of ``slidechat.inference.heatmap`` is the Q-Former cross-attention averaged over layers, heads and
queries, mapped back to patches (region and slide mass spread over their patches). This loss uses exactly that
map: with ``p`` the map normalised to a distribution over patches and ``t`` the per-patch target (fraction of the
patch inside the annotation), ``loss = relu(log(target_mass) - log(sum p * t / max t))`` — zero once the
annotated patches hold ``target_mass`` of the attention, so the rest stays free for the other questions. Slides
without an annotation (all-zero targets) add nothing. Used by the demo recipe with SynthSlide lesion masks.
"""

from __future__ import annotations

import math

import torch


def patch_relevance(cross_attentions: tuple[torch.Tensor, ...], encodings) -> list[torch.Tensor]:
    """Per-patch relevance [N_i] for each slide from per-layer [B, heads, K, L] cross-attention maps."""
    maps = torch.stack(cross_attentions, 0).mean(dim=(0, 2, 3))  # [B, L]: mean over layers, heads, queries
    out = []
    for b, enc in enumerate(encodings):
        n, r = enc.num_patches, enc.num_regions
        s = int(enc.slide_tokens.shape[0])
        rel = maps[b]
        region = rel[n:n + r] / enc.region_sizes.to(rel.dtype).clamp_min(1)
        out.append(rel[:n] + region[enc.region_index] + rel[n + r:n + r + s].sum() / n)
    return out


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


def forward_with_grounding(model, batch: dict, weight: float, target_mass: float = 0.5):
    """The assistant's training forward (same as ``model(**batch)``) plus ``weight * grounding_loss``.

    Returns the LLM output with ``.loss`` replaced by the sum and ``.grounding_loss`` attached.
    """
    encodings, proj = model.encode_features(batch["slide_features"], batch["slide_coords"], output_attentions=True)
    embeds, mask, labels = model.build_inputs_embeds(batch["input_ids"], proj.tokens, batch["attention_mask"],
                                                     batch["labels"])
    out = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    g = None
    if proj.cross_attentions:
        g = grounding_loss(patch_relevance(proj.cross_attentions, encodings), batch["patch_targets"], target_mass)
    if g is not None:
        out.loss = out.loss + weight * g
    out.grounding_loss = None if g is None else g.detach()
    return out
