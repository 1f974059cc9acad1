"""Transparent PNG layers the viewer lays over the slide: tissue outline, attention heatmap, patch grid.

A layer is placed by its top-left (``x_fraction``, ``y_fraction``) and size (``width_fraction``,
``height_fraction``), all as fractions of the slide's level-0 width (the viewer's own unit). The patch layers start
at the patch grid's origin, so their cells fall on the patches; the heatmap is one pixel per patch, which the viewer
scales up without smoothing: each patch shows as a crisp square.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

OUTLINE_SIDE = 2048
OUTLINE_RGBA = (0, 200, 90, 255)
GRID_RGBA = (40, 40, 40, 170)


@dataclass
class Layer:
    png: bytes
    width_fraction: float  # the layer's width / the slide's level-0 width
    height_fraction: float | None = None  # the layer's height / the slide's level-0 width (None: from the image)
    x_fraction: float = 0.0  # the layer's left / the slide's level-0 width
    y_fraction: float = 0.0  # the layer's top / the slide's level-0 width


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def tissue_outline_layer(contours, level0_size: tuple[int, int]) -> Layer:
    """The tissue contours (level-0 (x, y) point arrays) as green closed lines on a transparent image."""
    w0, h0 = level0_size
    scale = OUTLINE_SIDE / max(w0, h0, 1)
    size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for contour in contours or []:
        pts = [tuple(p) for p in (np.asarray(contour, dtype=np.float64) * scale).tolist()]
        if len(pts) >= 2:
            draw.line(pts + [pts[0]], fill=OUTLINE_RGBA, width=3, joint="curve")
    return Layer(_png(image), 1.0, h0 / max(1, w0))


def _patch_cells(coords: np.ndarray, patch_size: float) -> tuple[np.ndarray, int, int, np.ndarray]:
    """(cells [N, 2] (col, row), cols, rows, origin (x, y) level-0 px): the grid the patches lie on, anchored
    at the first patch (a feature file's grid need not start at the slide's corner)."""
    ps = max(1.0, float(patch_size))
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    origin = np.mod(xy[0], ps) if len(xy) else np.zeros(2)
    cells = np.clip(np.rint((xy - origin) / ps).astype(np.int64), 0, None)
    cols = int(cells[:, 0].max()) + 1 if len(cells) else 1
    rows = int(cells[:, 1].max()) + 1 if len(cells) else 1
    return cells, cols, rows, origin


def _grid_layer(image: Image.Image, cols: int, rows: int, origin: np.ndarray, patch_size: float,
                level0_width: int) -> Layer:
    unit = max(1, level0_width)
    return Layer(_png(image), cols * float(patch_size) / unit, rows * float(patch_size) / unit,
                 float(origin[0]) / unit, float(origin[1]) / unit)


def heatmap_layer(scores: np.ndarray, coords: np.ndarray, patch_size: float, level0_width: int) -> Layer:
    """One pixel per patch, coloured by score (turbo), transparent where there is no patch."""
    from matplotlib import colormaps

    cells, cols, rows, origin = _patch_cells(coords, patch_size)
    rgba = np.zeros((rows, cols, 4), dtype=np.uint8)
    colours = (colormaps["turbo"](np.clip(np.asarray(scores, dtype=np.float64), 0, 1)) * 255).astype(np.uint8)
    rgba[cells[:, 1], cells[:, 0]] = colours
    rgba[cells[:, 1], cells[:, 0], 3] = 255
    return _grid_layer(Image.fromarray(rgba, "RGBA"), cols, rows, origin, patch_size, level0_width)


def patch_grid_layer(coords: np.ndarray, patch_size: float, level0_width: int) -> Layer:
    """Each patch's outline (the squares the model saw), drawn at a few pixels per patch."""
    cells, cols, rows, origin = _patch_cells(coords, patch_size)
    px = int(max(2, min(8, 4096 // max(cols, rows, 1))))
    mask = np.zeros((rows * px, cols * px), dtype=bool)
    ys, xs = cells[:, 1] * px, cells[:, 0] * px
    for d in range(px):  # the px x px square's border; d loops over at most 8 offsets, not patches
        mask[ys, xs + d] = True
        mask[ys + d, xs] = True
    rgba = np.zeros(mask.shape + (4,), dtype=np.uint8)
    rgba[mask] = GRID_RGBA
    return _grid_layer(Image.fromarray(rgba, "RGBA"), cols, rows, origin, patch_size, level0_width)
