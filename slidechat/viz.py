"""Slide visualisation: attention heatmap overlays and tissue outlines on a slide thumbnail.

Used by the browser app (``app/``) and by evaluation (grounding figures). Everything works in
*thumbnail pixels*; inputs are in *level-0 pixels* (the coordinates stored in feature .h5 files and
returned by ``Conversation.heatmap()``) and are scaled by ``thumbnail.size / level0_size``.

Typical use::

    from slidechat import viz
    with SlideReader(path) as reader:
        thumb = reader.thumbnail(1024)
        tissue = detect_tissue(reader)
        size0 = reader.dimensions
    hm = conv.heatmap()                                      # .scores [N], .coords [N,2], .patch_size_level0
    outlined = viz.draw_tissue_outline(thumb, tissue.contours, size0)
    overlay = viz.overlay_heatmap(outlined, hm.scores, hm.coords, hm.patch_size_level0, size0, alpha=0.5)
    overlay.save("heatmap.png")

All functions are pure (they return new images) and vectorised (no per-patch Python loop).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "normalize_scores",
    "heatmap_grid",
    "heatmap_to_thumbnail",
    "colorize",
    "overlay_heatmap",
    "draw_tissue_outline",
    "draw_boxes",
    "colorbar",
]


def normalize_scores(scores: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """Map scores to [0, 1].

    ``mode``: ``"minmax"`` (linear stretch; a constant vector becomes 0.5), ``"rank"`` (percentile
    rank: robust when a few patches dominate), or ``"none"`` (clip to [0, 1]). NaNs stay NaN.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    out = np.full(s.shape, np.nan)
    ok = np.isfinite(s)
    if not ok.any():
        return out
    v = s[ok]
    if mode == "none":
        out[ok] = np.clip(v, 0.0, 1.0)
    elif mode == "minmax":
        lo, hi = float(v.min()), float(v.max())
        out[ok] = 0.5 if hi - lo < 1e-12 else (v - lo) / (hi - lo)
    elif mode == "rank":
        order = np.argsort(np.argsort(v, kind="stable"), kind="stable")
        out[ok] = 0.5 if v.size == 1 else order / (v.size - 1)
    else:
        raise ValueError(f"unknown normalisation mode {mode!r}; use 'minmax', 'rank' or 'none'")
    return out


def heatmap_grid(
    scores: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: float,
    level0_size: tuple[int, int],
) -> tuple[np.ndarray, tuple[float, float]]:
    """Rasterise per-patch scores onto the patch grid.

    Returns ``(grid, origin)``: ``grid`` float [rows, cols] with NaN where there is no patch (the
    max is kept where patches share a cell), ``origin`` the level-0 (x, y) of cell (0, 0). Patch
    coordinates are the level-0 top-left corners; they are assumed to lie on one regular grid of
    pitch ``patch_size_level0`` (as produced by tiling), whose phase is taken from the first patch.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if scores.shape[0] != coords.shape[0]:
        raise ValueError(f"{scores.shape[0]} scores but {coords.shape[0]} coordinates")
    ps = float(patch_size_level0)
    if ps <= 0:
        raise ValueError("patch_size_level0 must be positive")
    w0, h0 = int(level0_size[0]), int(level0_size[1])
    if coords.shape[0] == 0:
        return np.full((max(1, int(np.ceil(h0 / ps))), max(1, int(np.ceil(w0 / ps)))), np.nan), (0.0, 0.0)
    phase = np.mod(coords[0], ps)
    origin = (float(phase[0] - ps if phase[0] > 0 else 0.0), float(phase[1] - ps if phase[1] > 0 else 0.0))
    gx = np.floor((coords[:, 0] - origin[0]) / ps + 1e-6).astype(np.int64)
    gy = np.floor((coords[:, 1] - origin[1]) / ps + 1e-6).astype(np.int64)
    keep = (gx >= 0) & (gy >= 0)
    cols = max(int(np.ceil((w0 - origin[0]) / ps)), int(gx.max()) + 1 if keep.any() else 1)
    rows = max(int(np.ceil((h0 - origin[1]) / ps)), int(gy.max()) + 1 if keep.any() else 1)
    grid = np.full((rows, cols), -np.inf)
    np.maximum.at(grid, (gy[keep], gx[keep]), np.nan_to_num(scores[keep], nan=-np.inf))
    grid[~np.isfinite(grid)] = np.nan
    return grid, origin


def heatmap_to_thumbnail(
    scores: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: float,
    level0_size: tuple[int, int],
    thumb_size: tuple[int, int],
    normalize: str = "minmax",
) -> np.ndarray:
    """Per-pixel score map at thumbnail size: float [h, w] in [0, 1], NaN outside patches."""
    norm = normalize_scores(scores, normalize)
    grid, origin = heatmap_grid(norm, coords, patch_size_level0, level0_size)
    tw, th = int(thumb_size[0]), int(thumb_size[1])
    sx, sy = level0_size[0] / tw, level0_size[1] / th  # level-0 px per thumbnail px
    ps = float(patch_size_level0)
    u = (np.arange(tw) + 0.5) * sx
    v = (np.arange(th) + 0.5) * sy
    ci = np.floor((u - origin[0]) / ps).astype(np.int64)
    ri = np.floor((v - origin[1]) / ps).astype(np.int64)
    rows, cols = grid.shape
    ci_ok = (ci >= 0) & (ci < cols)
    ri_ok = (ri >= 0) & (ri < rows)
    out = np.full((th, tw), np.nan)
    sub = grid[np.ix_(np.clip(ri, 0, rows - 1), np.clip(ci, 0, cols - 1))]
    valid = np.outer(ri_ok, ci_ok)
    out[valid] = sub[valid]
    return out


def colorize(values: np.ndarray, cmap: str = "turbo") -> np.ndarray:
    """Map a float array in [0, 1] (NaN = transparent) to RGBA uint8 with a matplotlib colormap."""
    from matplotlib import colormaps

    v = np.asarray(values, dtype=np.float64)
    rgba = colormaps[cmap](np.nan_to_num(np.clip(v, 0.0, 1.0), nan=0.0), bytes=True)
    rgba[..., 3] = np.where(np.isfinite(v), 255, 0).astype(np.uint8)
    return rgba


def overlay_heatmap(
    thumbnail: Image.Image,
    scores: np.ndarray,
    coords: np.ndarray,
    patch_size_level0: float,
    level0_size: tuple[int, int],
    *,
    alpha: float = 0.5,
    cmap: str = "turbo",
    normalize: str = "minmax",
    smooth: float = 0.0,
    alpha_floor: float = 0.3,
) -> Image.Image:
    """Blend a coloured attention heatmap over ``thumbnail``; returns an RGB image of the same size.

    ``scores`` [N] (any range; see ``normalize``), ``coords`` [N, 2] level-0 top-left (x, y) of each
    patch, ``patch_size_level0`` the patch side in level-0 pixels, ``level0_size`` the slide's (w, h)
    at level 0. ``alpha`` in [0, 1] is the heatmap opacity (0 returns the thumbnail unchanged).
    ``smooth`` > 0 applies a Gaussian blur of that sigma (in patches) for a softer look.
    ``alpha_floor`` in [0, 1]: the opacity of the lowest score relative to the highest (1 = the same opacity
    everywhere; the default 0.3 keeps low-attention tissue visible under the colour).
    Pixels not covered by any patch keep the thumbnail colour.
    """
    base = thumbnail.convert("RGB")
    alpha = float(np.clip(alpha, 0.0, 1.0))
    if alpha == 0.0 or len(np.asarray(scores).reshape(-1)) == 0:
        return base.copy()
    values = heatmap_to_thumbnail(scores, coords, patch_size_level0, level0_size, base.size, normalize)
    if smooth > 0:
        from scipy.ndimage import gaussian_filter

        sigma = smooth * patch_size_level0 * base.size[0] / level0_size[0]
        filled = np.nan_to_num(values, nan=0.0)
        weight = gaussian_filter(np.isfinite(values).astype(np.float64), sigma)
        blurred = gaussian_filter(filled, sigma) / np.maximum(weight, 1e-6)
        values = np.where(np.isfinite(values), blurred, np.nan)
    rgba = colorize(values, cmap)
    img = np.asarray(base, dtype=np.float32)
    floor = float(np.clip(alpha_floor, 0.0, 1.0))
    weight = floor + (1.0 - floor) * np.nan_to_num(values, nan=0.0)[..., None]
    a = (rgba[..., 3:4].astype(np.float32) / 255.0) * alpha * weight.astype(np.float32)
    blended = img * (1.0 - a) + rgba[..., :3].astype(np.float32) * a
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")


def _scaled_points(points: np.ndarray, level0_size: tuple[int, int], size: tuple[int, int]) -> list[tuple[float, float]]:
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    p = p * np.array([size[0] / level0_size[0], size[1] / level0_size[1]])
    return [tuple(xy) for xy in p.tolist()]


def draw_tissue_outline(
    thumbnail: Image.Image,
    contours: Sequence[np.ndarray],
    level0_size: tuple[int, int],
    *,
    color: tuple[int, int, int] = (0, 170, 80),
    width: int = 2,
) -> Image.Image:
    """Draw tissue contours (each an [K, 2] array of level-0 (x, y) points) as closed polylines.

    ``contours`` is ``TissueMask.contours`` from ``slidechat.slide.tissue.detect_tissue``.
    Returns a new RGB image; the input is not modified.
    """
    img = thumbnail.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    for contour in contours:
        pts = _scaled_points(contour, level0_size, img.size)
        if len(pts) >= 2:
            draw.line(pts + [pts[0]], fill=color, width=width, joint="curve")
    return img


def draw_boxes(
    thumbnail: Image.Image,
    boxes_level0: Sequence[Sequence[float]],
    level0_size: tuple[int, int],
    *,
    color: tuple[int, int, int] = (255, 255, 255),
    width: int = 2,
) -> Image.Image:
    """Draw level-0 boxes ``[x0, y0, x1, y1]`` (e.g. a ground-truth lesion bbox) on a thumbnail copy."""
    img = thumbnail.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    for box in boxes_level0:
        (x0, y0), (x1, y1) = _scaled_points(np.asarray(box, dtype=np.float64).reshape(2, 2), level0_size, img.size)
        draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
    return img


def colorbar(width: int = 256, height: int = 14, cmap: str = "turbo") -> Image.Image:
    """A horizontal colour bar (low attention on the left, high on the right) for legends."""
    values = np.tile(np.linspace(0.0, 1.0, width), (height, 1))
    return Image.fromarray(colorize(values, cmap)[..., :3], "RGB")
