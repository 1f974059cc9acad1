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
  ordinal split of its share: P(share > t) = sigmoid(bin_scale * (log share - log t)) (the tumour-fraction bin);
- ``read: patch_focus`` with ``classes: [<name>, ...]`` — words: one per class, then "none" (which focal lesion).
  A focus is one compact area; a tissue that is merely part of the background forms several irregular areas. Each
  class's probability map on the patch grid gives six shape numbers (expected area, area share, how many areas
  above p = 0.5, the largest one's part of them, its compactness against an ellipse of the same second moments and
  against its convex hull), and a linear layer over all classes' numbers gives the words' logits.

``scale`` and ``offset`` are learnt per concept; the concept token is still the softmax mix of its words' input
embeddings, so an LLM trained on query-read concept tokens reads these the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidechat.errors import ConfigError

READ_MODES = ("patch_share", "patch_presence", "patch_bins", "patch_focus")
FOCUS_FEATURES = 6  # shape numbers per class of a patch_focus concept


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
        if mode == "patch_focus":
            classes = c.get("classes") or []
            if not classes or any(k not in patch_classes for k in classes):
                raise ConfigError(f"qformer concept {c['name']!r}: read patch_focus needs classes, patch classes of "
                                  f"{list(patch_classes)}, got {classes!r}")
            if len(c["words"]) != len(classes) + 1:
                raise ConfigError(f"qformer concept {c['name']!r}: {len(classes)} focus classes need "
                                  f"{len(classes) + 1} words (one per class, then none)")
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
        scalar = [n for n, c in self.concepts.items() if c["read"] != "patch_focus"]
        self.scale = nn.ParameterDict({n: nn.Parameter(torch.tensor(4.0)) for n in scalar})
        self.offset = nn.ParameterDict({n: nn.Parameter(torch.tensor(0.0)) for n in scalar})
        self.bin_scale = nn.ParameterDict({n: nn.Parameter(torch.tensor(8.0)) for n, c in self.concepts.items()
                                           if c["read"] == "patch_bins"})
        # zero: every word alike until fitted (training.patch_readout)
        self.focus = nn.ModuleDict({n: nn.Linear(FOCUS_FEATURES * len(c["classes"]), len(c["words"]))
                                    for n, c in self.concepts.items() if c["read"] == "patch_focus"})
        for layer in self.focus.values():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def needs_grid(self) -> bool:
        """Whether a concept is read from where patches lie (``patch_focus``), not only from how many there are."""
        return bool(len(self.focus))

    def patch_logits(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[N, 1 + C] logits per patch (column 0: no tissue)."""
        return self.head(patch_tokens.to(self.head[0].weight.dtype))

    @staticmethod
    def aggregate(patch_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(area share of each class [C], expected area of each class in patches [C]) of one slide."""
        p = torch.softmax(patch_logits.float(), dim=-1)
        expected = p[:, 1:].sum(0)
        return expected / expected.sum().clamp_min(1e-6), expected

    def focus_features(self, patch_logits: torch.Tensor, grid: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
        """[FOCUS_FEATURES * len(classes)] shape numbers of each class's probability map on the patch grid."""
        p = torch.softmax(patch_logits.detach().float(), dim=-1).cpu().numpy()
        return torch.from_numpy(focus_shape_features(p[:, 1:], grid.detach().cpu().numpy(),
                                                     [self.patch_classes.index(k) for k in classes]))

    def concept_logits(self, shares: torch.Tensor, expected: torch.Tensor,
                       focus: dict[str, torch.Tensor] | None = None,
                       names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Logits of every patch-read concept (or of ``names``) for one slide, in the word order of its concept
        entry; ``focus``: the shape numbers of each ``patch_focus`` concept (``focus_features``)."""
        out = {}
        for name, c in self.concepts.items():
            if names is not None and name not in names:
                continue
            if c["read"] == "patch_focus":
                if focus is None or name not in focus:
                    raise ConfigError(f"concept {name!r} is read from the patch grid; pass the slides' patch grids")
                layer = self.focus[name]
                out[name] = layer(focus[name].to(layer.weight.device, layer.weight.dtype))
                continue
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

    def forward(self, patch_tokens: Sequence[torch.Tensor],
                patch_grids: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Concept logits [B, n_words] for a batch of slides' patch tokens ([N_i, H] each) and, for ``patch_focus``
        concepts, their patch grids ([N_i, 2] (x, y))."""
        per_slide = []
        for i, t in enumerate(patch_tokens):
            logits = self.patch_logits(t)
            focus = None
            if self.needs_grid:
                if patch_grids is None:
                    raise ConfigError("concepts read with patch_focus need the slides' patch grids")
                focus = {n: self.focus_features(logits, patch_grids[i], self.concepts[n]["classes"])
                         for n in self.focus}
            per_slide.append(self.concept_logits(*self.aggregate(logits), focus))
        return {name: torch.stack([s[name] for s in per_slide]) for name in self.concepts}


def focus_shape_features(probs: np.ndarray, grid: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
    """Shape numbers of each class's area on the patch grid (``probs`` [N, C] class probabilities of the tissue
    classes, ``grid`` [N, 2] (x, y)): log expected area in patches, log area share, log(1 + number of areas above
    p = 0.5, 8-connected), the largest area's part of them, log of its compactness (its size over that of the ellipse
    with its second moments: 1 for a disc) and log of its solidity (size over convex hull). float32
    [FOCUS_FEATURES * len(class_indices)]."""
    from scipy import ndimage

    grid = np.asarray(grid, dtype=np.int64).reshape(-1, 2)
    tissue = float(probs.sum())
    out = []
    for k in class_indices:
        p = probs[:, k]
        area = float(p.sum())
        n_areas, largest_part, compact, solid = 0, 0.0, 1e-2, 1e-2
        if len(grid):
            w, h = int(grid[:, 0].max()) + 1, int(grid[:, 1].max()) + 1
            above = np.zeros((h, w), dtype=bool)
            above[grid[:, 1], grid[:, 0]] = p > 0.5
            labels, n_areas = ndimage.label(above, structure=np.ones((3, 3)))
            if n_areas:
                sizes = np.bincount(labels.ravel())[1:]
                ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
                largest_part = len(ys) / float(sizes.sum())
                compact, solid = _compactness(xs, ys)
        out += [np.log(area + 1e-3), np.log(area / max(tissue, 1e-6) + 1e-4), np.log1p(n_areas), largest_part,
                np.log(max(compact, 1e-2)), np.log(max(solid, 1e-2))]
    return np.asarray(out, dtype=np.float32)


def _compactness(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
    """(size / area of the ellipse of its second moments, size / area of its convex hull) of one area of grid
    cells; both 1 for fewer than three cells."""
    n = len(xs)
    if n < 3:
        return 1.0, 1.0
    # a cell is a unit square: its variance 1/12 per axis keeps a one-cell-wide line from a zero determinant
    cov = np.cov(np.stack([xs, ys]).astype(np.float64)) + np.eye(2) / 12
    ellipse = 4 * np.pi * np.sqrt(max(float(np.linalg.det(cov)), 1e-12))
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return n / ellipse, n / _hull_area(corners)


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (cell corners: never all on one line)."""
    from scipy.spatial import ConvexHull

    return max(float(ConvexHull(points).volume), 1.0)


def soft_patch_loss(patch_logits: torch.Tensor, target_shares: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of per-patch predictions against each patch's measured class shares ([N, 1 + C], rows sum
    to 1)."""
    return -(target_shares * F.log_softmax(patch_logits.float(), dim=-1)).sum(-1).mean()


__all__ = ["FOCUS_FEATURES", "PatchClassReadout", "READ_MODES", "check_patch_concepts", "focus_shape_features",
           "patch_read_concepts", "soft_patch_loss"]
