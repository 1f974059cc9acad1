"""Concepts read from patch-level class probabilities: "which tissue covers most area", "is there any necrosis".

A small MLP gives every patch token the probability of each class (index 0: no tissue, then
``QFormerConfig.patch_classes``); the slide's area share of a class is the area-weighted mean of those probabilities
(sum of p_c over the sum of the tissue probability), and its expected area in patches is the plain sum of p_c. Both
are exact aggregations, so a small necrotic area a few patches wide still counts, and two near-equal areas are
compared by their measured size instead of by a slide-level head's guess.

A concept may then be read from these numbers instead of the Q-Former queries (``read`` in its concept entry):

- ``read: patch_share`` — its words are the patch classes in order; logits = ``scale * log(share)`` (the dominant
  tissue);
- ``read: patch_presence`` with ``class: <name>`` — words [present, absent]; the presence logit is
  ``scale * (log(expected patches of the class) - offset)``, the absent one 0 (a tissue's presence);
- ``read: patch_bins`` with ``class: <name>`` and ``edges: [t1, t2, ...]`` (shares, increasing) — words [none, up to
  t1, t1 to t2, ..., over the last]; "none" is the class's absence (as in ``patch_presence``), the other words an
  ordinal split of its share: P(share > t) = sigmoid(bin_scale * (log share - log t)) (the tumour-fraction bin).

``scale`` and ``offset`` are learnt per concept; the concept token is still the softmax mix of its words' input
embeddings, so an LLM trained on query-read concept tokens reads these the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slidechat.errors import ConfigError

READ_MODES = ("patch_share", "patch_presence", "patch_bins")


def patch_read_concepts(concepts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The concepts that are read from the patch classes (those with a ``read`` entry)."""
    return [c for c in concepts if c.get("read")]


def check_patch_concepts(concepts: Sequence[dict[str, Any]], patch_classes: Sequence[str]) -> None:
    """Raise ``ConfigError`` for a ``read`` concept that its patch classes cannot answer."""
    for c in patch_read_concepts(concepts):
        mode = c["read"]
        if mode not in READ_MODES:
            raise ConfigError(f"qformer concept {c['name']!r}: read {mode!r} is not one of {READ_MODES}")
        if not patch_classes:
            raise ConfigError(f"qformer concept {c['name']!r} is read from patches but qformer.patch_classes is empty")
        if mode == "patch_share" and len(c["words"]) != len(patch_classes):
            raise ConfigError(f"qformer concept {c['name']!r}: read patch_share needs one word per patch class "
                              f"({len(patch_classes)}), got {len(c['words'])}")
        if mode in ("patch_presence", "patch_bins"):
            if c.get("class") not in patch_classes:
                raise ConfigError(f"qformer concept {c['name']!r}: class {c.get('class')!r} is not one of the patch "
                                  f"classes {list(patch_classes)}")
        if mode == "patch_presence" and len(c["words"]) != 2:
            raise ConfigError(f"qformer concept {c['name']!r}: read patch_presence needs two words (present, absent)")
        if mode == "patch_bins":
            edges = c.get("edges") or []
            if not edges or any(not 0 < t < 1 for t in edges) or list(edges) != sorted(set(edges)):
                raise ConfigError(f"qformer concept {c['name']!r}: read patch_bins needs edges, increasing shares "
                                  f"in (0, 1), got {edges!r}")
            if len(c["words"]) != len(edges) + 2:
                raise ConfigError(f"qformer concept {c['name']!r}: {len(edges)} edges need {len(edges) + 2} words "
                                  "(none, then one per bin)")


class PatchClassReadout(nn.Module):
    """Per-patch class probabilities from the slide encoder's patch tokens, and the concepts read from them."""

    def __init__(self, hidden_size: int, patch_classes: Sequence[str], concepts: Sequence[dict[str, Any]]) -> None:
        super().__init__()
        check_patch_concepts(concepts, patch_classes)
        self.patch_classes = list(patch_classes)
        self.concepts = {c["name"]: dict(c) for c in patch_read_concepts(concepts)}
        # 0: no tissue. An MLP, not a linear probe: the share errors that decide near-equal areas halve
        self.head = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(),
                                  nn.Linear(2 * hidden_size, len(self.patch_classes) + 1))
        self.scale = nn.ParameterDict({n: nn.Parameter(torch.tensor(4.0)) for n in self.concepts})
        self.offset = nn.ParameterDict({n: nn.Parameter(torch.tensor(0.0)) for n in self.concepts})
        self.bin_scale = nn.ParameterDict({n: nn.Parameter(torch.tensor(8.0)) for n, c in self.concepts.items()
                                           if c["read"] == "patch_bins"})

    def patch_logits(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[N, 1 + C] logits per patch (column 0: no tissue)."""
        return self.head(patch_tokens.to(self.head[0].weight.dtype))

    @staticmethod
    def aggregate(patch_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(area share of each class [C], expected area of each class in patches [C]) of one slide."""
        p = torch.softmax(patch_logits.float(), dim=-1)
        expected = p[:, 1:].sum(0)
        return expected / expected.sum().clamp_min(1e-6), expected

    def concept_logits(self, shares: torch.Tensor, expected: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every patch-read concept for one slide (word order of its concept entry)."""
        out = {}
        for name, c in self.concepts.items():
            scale = self.scale[name]
            if c["read"] == "patch_share":
                out[name] = scale * torch.log(shares.clamp_min(1e-6))
                continue
            k = self.patch_classes.index(c["class"])
            present = scale * (torch.log(expected[k].clamp_min(1e-4)) - self.offset[name])
            if c["read"] == "patch_presence":
                out[name] = torch.stack([present, torch.zeros_like(present)])
                continue
            edges = torch.tensor(c["edges"], dtype=shares.dtype, device=shares.device)
            above = torch.sigmoid(self.bin_scale[name] * (torch.log(shares[k].clamp_min(1e-6)) - torch.log(edges)))
            cum = torch.cat([above.new_ones(1), above, above.new_zeros(1)])
            bins = (cum[:-1] - cum[1:]).clamp_min(1e-6)  # P(bin) = P(> lower edge) - P(> upper edge)
            p_present = torch.sigmoid(present)
            probs = torch.cat([(1 - p_present).reshape(1), p_present * bins])
            out[name] = torch.log(probs.clamp_min(1e-6))
        return out

    def forward(self, patch_tokens: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Concept logits [B, n_words] for a batch of slides' patch tokens ([N_i, H] each)."""
        per_slide = [self.concept_logits(*self.aggregate(self.patch_logits(t))) for t in patch_tokens]
        return {name: torch.stack([s[name] for s in per_slide]) for name in self.concepts}


def soft_patch_loss(patch_logits: torch.Tensor, target_shares: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of per-patch predictions against each patch's measured class shares ([N, 1 + C], rows sum
    to 1)."""
    return -(target_shares * F.log_softmax(patch_logits.float(), dim=-1)).sum(-1).mean()


__all__ = ["PatchClassReadout", "READ_MODES", "check_patch_concepts", "patch_read_concepts", "soft_patch_loss"]
