"""Tissue detection on a slide thumbnail.

The default ("combined") takes a pixel as tissue when its colour saturation is above a per-slide Otsu
threshold (grown by hysteresis into fainter saturated tissue) or its optical density relative to the
glass is above the glass's noise (grown from a per-slide Otsu level), minus blue/green/black marker ink;
then closing, debris (small objects) dropped and small holes filled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from slidechat.errors import NoTissueError, SlideReadError
from slidechat.slide.config import TissueConfig

# Glass has saturation ~0.0-0.05; below this floor nothing counts as tissue even if Otsu says so.
MIN_SATURATION = 0.07
MAX_OTSU_SATURATION = 0.15
# Glass has optical density ~0 +- 0.01 relative to itself; faint stains reach 0.05-0.15, H&E 0.3-1.
MIN_DENSITY = 0.02
MAX_OTSU_DENSITY = 0.25
# A stained piece whose density outline saturation covers this much in H&E hues is already found
# (H&E: 0.7-0.98 covered, hue 260-360 or below 10 degrees; DAB is brown, 15-40 degrees).
SATURATION_COVERED = 0.5
HE_HUE_RANGE = (260.0, 10.0)


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


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of an RGB uint8 image (0 where the pixel is grey)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    delta = np.maximum(mx - mn, 1e-6)
    hue = np.where(mx == r, (g - b) / delta % 6, np.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return np.where(mx - mn > 0, hue * 60.0, 0.0)


def glass_colour(rgb: np.ndarray) -> np.ndarray:
    """The background (empty glass) RGB: the median of the brightest, least saturated pixels."""
    flat = rgb.reshape(-1, 3).astype(np.float32)
    bright = flat.sum(1) >= np.percentile(flat.sum(1), 90)
    glass = np.median(flat[bright], axis=0)
    return np.clip(glass, 180.0, 255.0)  # a slide that is all tissue still has glass-like white near 240


def optical_density(rgb: np.ndarray, glass: np.ndarray | None = None) -> np.ndarray:
    """Mean optical density over the channels relative to the glass colour (0 on glass, ~0.1 on faint stain)."""
    glass = glass_colour(rgb) if glass is None else glass
    ratio = np.clip(rgb.astype(np.float32) / glass, 1.0 / 255.0, 1.0)
    return -np.log(ratio).mean(axis=-1)


def pen_mask(rgb: np.ndarray, sat: np.ndarray | None = None, min_stroke_fraction: float = 0.0005) -> np.ndarray:
    """Pixels of blue, green or black marker ink.

    No histology stain is green, and neither haematoxylin (blue-violet, saturation < 0.4 at thumbnail
    scale) nor eosin or DAB reach the saturated blue of marker ink; black ink is darker than any stain.
    """
    sat = saturation(rgb) if sat is None else sat
    hue = hue_degrees(rgb)
    value = rgb.max(axis=-1)
    blue = (hue >= 195) & (hue <= 250) & (sat > 0.42)
    green = (hue >= 70) & (hue < 190) & (sat > 0.2)
    black = ((value < 80) & (sat < 0.2)) | (value < 60)  # black ink over stain stays darker than any stain
    # strokes are long: isolated ink-coloured pixels (dense nuclei, dust) are not pen
    pen = _drop_small(blue | green | black, max(16, int(min_stroke_fraction * value.size)))
    return ndimage.binary_dilation(pen, iterations=2) if pen.any() else pen  # ink edges blend into the glass


def _otsu(values: np.ndarray, fallback: float) -> float:
    from skimage import filters

    try:
        return float(filters.threshold_otsu(values))
    except ValueError:  # constant image
        return fallback


def _saturation_candidates(thumb: np.ndarray, threshold: float | None) -> tuple[np.ndarray, float]:
    """Saturation above a per-slide Otsu threshold, grown by hysteresis into fainter saturated tissue."""
    sat = saturation(thumb)
    not_black = thumb.max(axis=-1) > 30  # drop black (pen marks, scanner edge)
    if threshold is None:
        # Otsu splits glass from tissue; on a field that is nearly all tissue it would split tissue
        # classes instead, so cap it at a saturation that H&E-stained tissue always exceeds.
        t = min(max(_otsu(sat, 1.0), MIN_SATURATION), MAX_OTSU_SATURATION)
    else:
        t = float(threshold)
    if threshold is None and t > MIN_SATURATION:
        # hysteresis: faint tissue (fat, oedema) counts when it touches clearly stained tissue
        return _hysteresis((sat > MIN_SATURATION) & not_black, (sat > t) & not_black), t
    return (sat > t) & not_black, t


def _hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Connected components of ``weak`` that contain a pixel of ``strong``."""
    labels, _ = ndimage.label(weak)
    ids = np.unique(labels[strong & weak])
    return np.isin(labels, ids[ids > 0])


def _density_candidates(thumb: np.ndarray, pen: np.ndarray) -> np.ndarray:
    """Stain by optical density: above the glass's noise, grown by hysteresis from a per-slide Otsu level.

    Catches faint and weakly saturated stains (pale H&E, haematoxylin-only or light DAB IHC) that
    saturation alone misses."""
    od = ndimage.uniform_filter(optical_density(thumb), 3)  # average out stain grain and JPEG noise
    background = od[od <= np.percentile(od, 50)]
    noise = 1.4826 * float(np.median(np.abs(background - np.median(background))))
    low = max(MIN_DENSITY, float(np.median(background)) + 6.0 * noise)
    # Otsu separates glass from stain, but ink edges and debris can pull it far above a faint stain
    high = min(max(_otsu(od[~pen], 1.0), 1.5 * low), 3.0 * low, MAX_OTSU_DENSITY)
    return _hysteresis((od > low) & ~pen, (od > high) & ~pen)


def _add_density(sat_mask: np.ndarray, thumb: np.ndarray, pen: np.ndarray, min_object_fraction: float) -> np.ndarray:
    """``sat_mask`` plus the stained pieces that saturation alone outlines poorly.

    A density component that saturation covers for the most part with H&E colours (pink to purple) keeps
    saturation's outline; any other (faint H&E, DAB/haematoxylin IHC) is added whole, when larger than debris.
    """
    density = _density_candidates(thumb, pen)
    labels, n = ndimage.label(density)
    if n == 0:
        return sat_mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    inside = sat_mask & density
    covered = np.bincount(labels[inside], minlength=n + 1)
    hue = hue_degrees(thumb[inside])
    eosin_like = (hue >= HE_HUE_RANGE[0]) | (hue < HE_HUE_RANGE[1])
    he_share = np.bincount(labels[inside], weights=eosin_like, minlength=n + 1) / np.maximum(covered, 1)
    saturation_found = (covered >= SATURATION_COVERED * sizes) & (he_share >= 0.5)
    add = ~saturation_found & (sizes >= max(4, int(4 * min_object_fraction * labels.size)))
    add[0] = False
    return sat_mask | add[labels]


def _otsu_grey_candidates(thumb: np.ndarray) -> tuple[np.ndarray, float]:
    """Otsu on the median-filtered grey level (darker than the threshold = tissue), the classic baseline."""
    grey = ndimage.median_filter(thumb.astype(np.float32).mean(axis=-1), size=7)
    t = _otsu(grey, 0.0)
    return grey < t, t / 255.0


def tissue_mask_from_rgb(thumb: np.ndarray, config: TissueConfig | None = None, min_object_fraction: float = 0.0005,
                         closing_radius: int = 2) -> tuple[np.ndarray, float]:
    """(tissue mask, saturation threshold used) of an RGB thumbnail, by ``config.method``.

    "combined": saturation (as "saturation") or optical density, without pen ink; then closing, objects
    smaller than ``min_object_fraction`` of the image (debris) dropped, small holes filled.
    """
    from skimage import morphology

    config = config or TissueConfig()
    pen = pen_mask(thumb) if config.exclude_pen and config.method == "combined" else np.zeros(thumb.shape[:2], bool)
    if config.method == "otsu":
        mask, t = _otsu_grey_candidates(thumb)
    else:
        mask, t = _saturation_candidates(thumb, config.threshold)
        if config.method == "combined" and config.threshold is None:  # a fixed threshold means saturation alone
            mask = _add_density(mask & ~pen, thumb, pen, min_object_fraction)
    if closing_radius > 0:
        mask = ndimage.binary_closing(np.pad(mask, closing_radius), morphology.disk(closing_radius))
        mask = mask[closing_radius:-closing_radius, closing_radius:-closing_radius]
    min_size = max(4, int(min_object_fraction * mask.size))
    mask = _drop_small(mask & ~pen, min_size)
    mask = ~_drop_small(~mask, min_size) & ~pen  # fill small holes (never with ink)
    return mask, t


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
    from skimage import measure

    config = config or TissueConfig()
    if threshold is not None:
        config = dataclasses.replace(config, threshold=threshold)
    size = thumbnail_size or config.thumbnail_size
    check_thumbnail_memory(reader, size)
    thumb = np.asarray(reader.thumbnail(size).convert("RGB"))
    mask, t = tissue_mask_from_rgb(thumb, config, min_object_fraction, closing_radius)
    w0, h0 = reader.dimensions
    downsample = (w0 / mask.shape[1] + h0 / mask.shape[0]) / 2
    if not mask.any():
        raise NoTissueError(
            f"{reader.path}: no tissue found ({config.method} detector, saturation threshold {t:.3f}); "
            "if the slide is faint, pass a lower --tissue-threshold (e.g. 0.03)"
        )
    contours = [
        np.stack([c[:, 1] * downsample, c[:, 0] * downsample], axis=1)
        for c in measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    ]
    contours = [c - downsample for c in contours]  # undo the pad
    return TissueMask(mask=mask, downsample=float(downsample), contours=contours, threshold=t, thumbnail=thumb)


def check_thumbnail_memory(reader, size: int) -> None:
    """SlideReadError before decoding when the slide's thumbnail would need more memory than the decode bound
    (a slide without a pyramid is reduced from its full-size level)."""
    from slidechat.slide.memory import check_decode, thumbnail_bytes

    w, h = reader.dimensions
    check_decode(f"{reader.path}: the {size}-px thumbnail of this {w} x {h} px slide "
                 f"({reader.level_count} level{'s' if reader.level_count != 1 else ''})", thumbnail_bytes(reader, size),
                 "convert it to a tiled pyramid (e.g. `vips tiffsave in out.tiff --tile --pyramid "
                 "--compression jpeg`)", error=SlideReadError)


def _drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Remove connected components smaller than ``min_size`` pixels."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]
