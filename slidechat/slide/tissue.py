"""Tissue detection on a slide thumbnail: Otsu threshold on saturation, then morphology."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from slidechat.errors import NoTissueError
from slidechat.slide.config import TissueConfig

# Glass has saturation ~0.0-0.05; below this floor nothing counts as tissue even if Otsu says so.
MIN_SATURATION = 0.07
MAX_OTSU_SATURATION = 0.15


@dataclass
class TissueMask:
    """Boolean tissue mask at thumbnail scale; ``downsample`` = level-0 px per mask px."""

    mask: np.ndarray
    downsample: float
    contours: list[np.ndarray] = field(default_factory=list)
    threshold: float = 0.0
    thumbnail: np.ndarray | None = None

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction_in_boxes(self, xy: np.ndarray, size_level0: float) -> np.ndarray:
        """Fraction of tissue inside each level-0 square (x, y, size) — vectorised with an integral image."""
        m = self.mask.astype(np.int64)
        integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1), dtype=np.int64)
        integral[1:, 1:] = m.cumsum(0).cumsum(1)
        d = self.downsample
        x0 = np.clip(np.floor(xy[:, 0] / d).astype(np.int64), 0, m.shape[1])
        y0 = np.clip(np.floor(xy[:, 1] / d).astype(np.int64), 0, m.shape[0])
        x1 = np.clip(np.ceil((xy[:, 0] + size_level0) / d).astype(np.int64), 0, m.shape[1])
        y1 = np.clip(np.ceil((xy[:, 1] + size_level0) / d).astype(np.int64), 0, m.shape[0])
        area = np.maximum(1, (x1 - x0) * (y1 - y0))
        total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return total / area


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image."""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)


def detect_tissue(
    reader,
    threshold: float | None = None,
    thumbnail_size: int | None = None,
    min_object_fraction: float = 0.0005,
    closing_radius: int = 2,
    *,
    config: TissueConfig | None = None,
) -> TissueMask:
    """Find tissue on ``reader``'s thumbnail as ``config`` says; ``threshold`` / ``thumbnail_size`` given here
    override the config's. Raises NoTissueError when nothing is found.
    """
    from skimage import filters, measure, morphology

    config = config or TissueConfig()
    threshold = config.threshold if threshold is None else threshold
    thumbnail_size = thumbnail_size or config.thumbnail_size
    thumb = np.asarray(reader.thumbnail(thumbnail_size).convert("RGB"))
    sat = saturation(thumb)
    value = thumb.max(axis=-1)
    if threshold is None:
        try:
            t = float(filters.threshold_otsu(sat))
        except ValueError:  # constant image
            t = 1.0
        # Otsu splits glass from tissue; on a field that is nearly all tissue it would split tissue
        # classes instead, so cap it at a saturation that H&E-stained tissue always exceeds.
        t = min(max(t, MIN_SATURATION), MAX_OTSU_SATURATION)
    else:
        if not 0.0 <= threshold <= 1.0:
            raise NoTissueError(f"--tissue-threshold {threshold} must be a saturation between 0 and 1 (e.g. 0.08)")
        t = float(threshold)
    not_black = value > 30  # drop black (pen marks, scanner edge)
    if threshold is None and t > MIN_SATURATION:
        # hysteresis: faint tissue (fat, oedema) counts when it touches clearly stained tissue
        weak = (sat > MIN_SATURATION) & not_black
        labels, _ = ndimage.label(weak)
        strong_ids = np.unique(labels[(sat > t) & not_black])
        mask = np.isin(labels, strong_ids[strong_ids > 0])
    else:
        mask = (sat > t) & not_black
    if closing_radius > 0:
        mask = ndimage.binary_closing(np.pad(mask, closing_radius), morphology.disk(closing_radius))
        mask = mask[closing_radius:-closing_radius, closing_radius:-closing_radius]
    min_size = max(4, int(min_object_fraction * mask.size))
    mask = _drop_small(mask, min_size)
    mask = ~_drop_small(~mask, min_size)  # fill small holes
    w0, h0 = reader.dimensions
    downsample = (w0 / mask.shape[1] + h0 / mask.shape[0]) / 2
    if not mask.any():
        raise NoTissueError(
            f"{reader.path}: no tissue found (saturation threshold {t:.3f}); "
            "if the slide is faint, pass a lower --tissue-threshold (e.g. 0.03)"
        )
    contours = [
        np.stack([c[:, 1] * downsample, c[:, 0] * downsample], axis=1)
        for c in measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    ]
    contours = [c - downsample for c in contours]  # undo the pad
    return TissueMask(mask=mask, downsample=float(downsample), contours=contours, threshold=t, thumbnail=thumb)


def _drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Remove connected components smaller than ``min_size`` pixels."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]
