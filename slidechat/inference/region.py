"""Region questions: the patches of a slide inside a level-0 rectangle, as a slide of their own.

A patch belongs to a region when its centre lies inside it. The region slide keeps the patches' features and
level-0 coords (so the slide encoder sees their true layout) and gets its own identity (``<sha256>@x,y,w,h``), so
its slide-encoder + projector state is cached apart from the whole slide's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from slidechat.errors import SlideChatError
from slidechat.inference.encode import EncodedSlide

Region = tuple[int, int, int, int]


def parse_region(value) -> Region:
    """``(x, y, w, h)`` from a 4-sequence or an ``"x,y,w,h"`` string (level-0 pixels, w and h > 0)."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        x, y, w, h = (int(round(float(p))) for p in parts)
    except (TypeError, ValueError):
        raise SlideChatError(f"a region is x,y,w,h in level-0 pixels (four numbers), got {value!r}") from None
    if w <= 0 or h <= 0:
        raise SlideChatError(f"region {value!r}: width and height must be positive")
    return x, y, w, h


def region_patches(slide: EncodedSlide, region) -> np.ndarray:
    """Indices of the patches whose centre lies inside ``region``; a clear error when there are none."""
    x, y, w, h = parse_region(region)
    feats = slide.features
    if feats.coords is None:
        raise SlideChatError("this slide's features have no coordinates, so a region cannot be located; "
                             "open the slide file (or an .h5 with coords) instead")
    width, height = feats.attrs.get("slide_width"), feats.attrs.get("slide_height")
    if width and height and (x >= int(width) or y >= int(height) or x + w <= 0 or y + h <= 0):
        raise SlideChatError(f"region {x},{y},{w},{h} is outside the slide ({int(width)} x {int(height)} px at "
                             "level 0)")
    half = float(slide.patch_size_level0 or 0) / 2
    centre = np.asarray(feats.coords, dtype=np.float64) + half
    inside = (centre[:, 0] >= x) & (centre[:, 0] < x + w) & (centre[:, 1] >= y) & (centre[:, 1] < y + h)
    keep = np.flatnonzero(inside)
    if keep.size == 0:
        raise SlideChatError(f"region {x},{y},{w},{h} holds no tissue patches; draw it over tissue "
                             "(or make it larger)")
    return keep


def region_slide(slide: EncodedSlide, region) -> EncodedSlide:
    """The patches of ``slide`` inside ``region`` as an ``EncodedSlide`` of their own."""
    x, y, w, h = parse_region(region)
    keep = region_patches(slide, (x, y, w, h))
    feats = slide.features
    tag = f"{x},{y},{w},{h}"
    attrs = {**feats.attrs, "region": [x, y, w, h], "slide_sha256": f"{slide.sha256}@{tag}"}
    sub = replace(feats, features=feats.features[keep], coords=np.asarray(feats.coords)[keep], attrs=attrs)
    return EncodedSlide(slide_id=f"{slide.slide_id}@{tag}", sha256=f"{slide.sha256}@{tag}", features=sub,
                        h5_path=None, source_path=slide.source_path)


__all__ = ["parse_region", "region_patches", "region_slide", "Region"]
