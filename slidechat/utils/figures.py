"""Slide thumbnails and heatmap overlays for batch-report pages and evaluation folders.

Overlays are drawn with ``slidechat.viz`` (the app's renderer), so the browser app, the grounding
figures and the batch report look the same. Images are written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from slidechat.utils.io import atomic_path


def save_image_atomic(image: Image.Image, path: str | Path, **save_kw) -> Path:
    """Save a PIL image via temp file + rename (format from the final suffix)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "PNG")
    with atomic_path(path, suffix=path.suffix) as tmp:
        image.convert("RGB").save(tmp, format=fmt, **save_kw)
    return path


def slide_thumbnail(slide_path: str | Path, max_size: int = 512) -> tuple[Image.Image, tuple[int, int]]:
    """(thumbnail, level-0 (w, h)) of a slide file."""
    from slidechat.slide.reader import SlideReader

    with SlideReader(slide_path) as reader:
        return reader.thumbnail(max_size).convert("RGB"), tuple(int(v) for v in reader.dimensions)


def heatmap_overlay(thumbnail: Image.Image, level0_size: tuple[int, int], heatmap, *,
                    boxes_level0=None, alpha: float = 0.5) -> Image.Image:
    """The heatmap (``.scores``, ``.coords``, ``.patch_size_level0``) blended over a thumbnail (+ optional boxes)."""
    from slidechat import viz

    img = viz.overlay_heatmap(thumbnail, np.asarray(heatmap.scores), np.asarray(heatmap.coords),
                              float(heatmap.patch_size_level0), level0_size, alpha=alpha)
    if boxes_level0:
        img = viz.draw_boxes(img, boxes_level0, level0_size)
    return img
