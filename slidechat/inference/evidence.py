"""Evidence: the top-k attended regions of a heatmap as level-0 boxes, and crops of them from the slide.

Regions are picked greedily: the highest-scoring patch not yet covered seeds a region; its 8 grid neighbours join
when they score at least ``join`` x the seed's score; the region's box is the bounding box of its patches. Patches
inside a chosen box are not picked again, and a box that would overlap an earlier one shrinks to its seed patch,
so regions never overlap. Boxes are ``(x, y, w, h)`` in level-0 pixels (raster units when the features had no
coords: ``Heatmap.has_coords`` False). In a case, ``slide`` is the region's slide (0-based, in case order).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from slidechat.errors import SlideChatError

DEFAULT_K = 4


@dataclass
class EvidenceRegion:
    """One attended region: ``rank`` (1 = most attended), level-0 ``box`` (x, y, w, h), ``score`` (the seed
    patch's heatmap score in [0, 1]), ``mean_score`` over its patches, ``patches`` (indices into the features),
    ``slide`` (which slide of a case)."""

    rank: int
    box: tuple[int, int, int, int]
    score: float
    mean_score: float
    patches: list[int] = field(default_factory=list)
    slide: int = 0

    def on_slide(self, slide: int, weight: float = 1.0) -> "EvidenceRegion":
        """This region placed on ``slide``, its scores scaled by ``weight`` (a slide's share in a case ranking)."""
        return replace(self, slide=slide, score=round(self.score * weight, 5),
                       mean_score=round(self.mean_score * weight, 5))

    def ranked(self, rank: int) -> "EvidenceRegion":
        return replace(self, rank=rank)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["box"] = list(self.box)
        return d


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _box(coords: np.ndarray, ps: int) -> tuple[int, int, int, int]:
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    return int(lo[0]), int(lo[1]), int(hi[0] - lo[0] + ps), int(hi[1] - lo[1] + ps)


def top_regions(heatmap, k: int = DEFAULT_K, join: float = 0.5) -> list[EvidenceRegion]:
    """The ``k`` most attended, non-overlapping regions of ``heatmap`` (fewer when the slide has fewer patches)."""
    if k < 1:
        raise SlideChatError(f"evidence needs k >= 1 regions, got {k}")
    scores = np.asarray(heatmap.scores, dtype=np.float64)
    coords = np.asarray(heatmap.coords, dtype=np.int64)
    ps = max(1, int(round(heatmap.patch_size_level0)))
    grid = np.floor_divide(coords - coords.min(axis=0), ps) if len(coords) else coords
    cell = {(int(gx), int(gy)): i for i, (gx, gy) in enumerate(grid)}
    covered = np.zeros(len(scores), dtype=bool)
    regions: list[EvidenceRegion] = []
    for seed in np.argsort(-scores, kind="stable"):
        if len(regions) == k:
            break
        if covered[seed]:
            continue
        gx, gy = (int(v) for v in grid[seed])
        neighbours = [cell.get((gx + dx, gy + dy)) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
        members = [seed] + [j for j in neighbours
                            if j is not None and not covered[j] and 0 < scores[j] and scores[j] >= join * scores[seed]]
        box = _box(coords[members], ps)
        if any(_overlaps(box, r.box) for r in regions):
            members, box = [seed], _box(coords[[seed]], ps)
        inside = ((coords[:, 0] >= box[0]) & (coords[:, 0] < box[0] + box[2])
                  & (coords[:, 1] >= box[1]) & (coords[:, 1] < box[1] + box[3]))
        covered |= inside
        regions.append(EvidenceRegion(rank=len(regions) + 1, box=box, score=round(float(scores[seed]), 5),
                                      mean_score=round(float(scores[members].mean()), 5),
                                      patches=sorted(int(m) for m in members)))
    return regions


def crop_region(slide_path: str | Path, box: tuple[int, int, int, int], max_size: int = 512, mpp: float | None = None):
    """An RGB ``PIL.Image`` of the level-0 ``box`` (x, y, w, h) of the slide, at most ``max_size`` px on its long
    side (read from the pyramid level closest to that size)."""
    from PIL import Image

    from slidechat.slide.reader import SlideReader

    x, y, w, h = (int(v) for v in box)
    if w <= 0 or h <= 0:
        raise SlideChatError(f"a crop box needs a positive width and height, got {box}")
    with SlideReader(slide_path, mpp=mpp) as reader:
        width, height = reader.dimensions
        if x < 0 or y < 0 or x + w > width or y + h > height:
            raise SlideChatError(f"box {box} is outside the slide ({width} x {height} px at level 0)")
        downsample = max(1.0, max(w, h) / max_size)
        level = reader.best_level_for_downsample(downsample)
        d = reader.level_downsamples[level]
        size = (max(1, int(round(w / d))), max(1, int(round(h / d))))
        image = Image.fromarray(reader.read_region((x, y), level, size))
    if max(image.size) > max_size:
        image.thumbnail((max_size, max_size))
    return image


__all__ = ["EvidenceRegion", "top_regions", "crop_region", "DEFAULT_K"]
