"""Grounding metrics: does a patch heatmap fall on the known lesion (SynthSlide masks)?

Inputs are the heatmap of ``conv.heatmap()`` (``scores`` [N] >= 0, ``coords`` [N, 2] level-0
top-left x, y, ``patch_size_level0``) and a binary lesion mask stored at ``mask_downsample``
level-0 pixels per mask pixel (``masks/<slide_id>.png`` in SynthSlide's ``truth.jsonl``).

- **pointing game**: hit when the centre of the highest-scoring patch lies inside the mask
  (ties: the first patch in input order).
- **mass in lesion**: sum over patches of score x (fraction of the patch's footprint inside the
  mask), divided by the total score: the share of the heatmap's mass on the lesion.
- **lesion patch fraction** (the chance level of both): the share of patches whose centre is in
  the lesion, and the mean footprint fraction.

A mask pixel counts towards a patch when its centre lies in the patch (footprints are quantised to
mask pixels; with SynthSlide's patch grid they align exactly). Footprint fractions use a summed-area table, so the cost is O(N) with no per-patch Python loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_mask(path: str | Path) -> np.ndarray:
    """Read a lesion mask PNG as a bool array (any non-zero pixel is lesion)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    return arr > 0


def _mask_coordinates(coords: np.ndarray, patch_size_level0: float, downsample: float):
    """Patch footprints in mask pixels (x0, y0, x1, y1), end-exclusive, not clipped.

    A mask pixel belongs to a patch when its centre lies inside the patch's level-0 square.
    """
    def first(v):
        return np.ceil(v / downsample - 0.5).astype(np.int64)

    return (first(coords[:, 0]), first(coords[:, 1]), first(coords[:, 0] + patch_size_level0),
            first(coords[:, 1] + patch_size_level0))


def patch_lesion_fraction(mask: np.ndarray, coords, patch_size_level0: float, downsample: float) -> np.ndarray:
    """Fraction of each patch's footprint inside ``mask`` (float64 [N]); 0 for patches off the mask."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    x0, y0, x1, y1 = _mask_coordinates(coords, patch_size_level0, downsample)
    # the full (unclipped) footprint is the denominator, so patches hanging off the mask edge are diluted
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    h, w = mask.shape
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return np.clip(inside / area, 0.0, 1.0)


def centre_in_mask(mask: np.ndarray, coords, patch_size_level0: float, downsample: float) -> np.ndarray:
    """Bool [N]: whether each patch centre falls on a lesion pixel."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    cx = np.floor((coords[:, 0] + patch_size_level0 / 2) / downsample).astype(np.int64)
    cy = np.floor((coords[:, 1] + patch_size_level0 / 2) / downsample).astype(np.int64)
    valid = (cx >= 0) & (cy >= 0) & (cx < mask.shape[1]) & (cy < mask.shape[0])
    out = np.zeros(len(coords), dtype=bool)
    out[valid] = mask[cy[valid], cx[valid]]
    return out


def grounding_metrics(scores, coords, patch_size_level0: float, mask: np.ndarray, downsample: float) -> dict:
    """Pointing-game hit, heatmap mass inside the lesion, and their chance levels for one slide."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if scores.size == 0 or scores.size != len(coords):
        raise ValueError(f"heatmap has {scores.size} scores for {len(coords)} coords")
    scores = np.clip(np.nan_to_num(scores, nan=0.0), 0.0, None)
    frac = patch_lesion_fraction(mask, coords, patch_size_level0, downsample)
    centres = centre_in_mask(mask, coords, patch_size_level0, downsample)
    total = scores.sum()
    mass = float((scores * frac).sum() / total) if total > 0 else float(frac.mean())
    top = int(np.argmax(scores))
    return {
        "pointing_hit": bool(centres[top]),
        "mass_in_lesion": mass,
        "chance_pointing": float(centres.mean()),
        "chance_mass": float(frac.mean()),
        "n_patches": int(scores.size),
        "n_lesion_patches": int(centres.sum()),
    }


def summarize_grounding(per_slide: list[dict]) -> dict:
    """Mean pointing-game accuracy and lesion mass over slides (with their chance levels)."""
    if not per_slide:
        return {"n": 0}
    return {
        "n": len(per_slide),
        "pointing_game": float(np.mean([r["pointing_hit"] for r in per_slide])),
        "mass_in_lesion": float(np.mean([r["mass_in_lesion"] for r in per_slide])),
        "chance_pointing": float(np.mean([r["chance_pointing"] for r in per_slide])),
        "chance_mass": float(np.mean([r["chance_mass"] for r in per_slide])),
    }
