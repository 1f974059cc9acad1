"""Stain scenes for tissue detection: faint H&E, IHC-like DAB/haematoxylin, pen marks and debris, with
known masks.

A scene is rendered at level 0 with the optical-density model of ``textures`` (RGB = glass * exp(-OD)),
so its tissue mask is exact: ``tissue`` is every stained pixel not covered by ink; ``pen`` is every
inked pixel; ``debris`` are small dark specks on the glass that are not tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from slidechat.synth.textures import EOSIN, HEMATOXYLIN, nuclei, smooth_noise

DAB = np.array([0.268, 0.570, 0.776]) / np.linalg.norm([0.268, 0.570, 0.776])
GLASS = np.array([242.0, 241.0, 238.0])

# palette -> (haematoxylin base, haematoxylin in nuclei, second stain vector, second stain mean, patchy?)
PALETTES: dict[str, tuple[float, float, np.ndarray, float, bool]] = {
    "he": (0.12, 0.85, EOSIN, 0.45, False),
    "faint_he": (0.03, 0.22, EOSIN, 0.07, False),
    "ihc_dab": (0.05, 0.40, DAB, 0.55, True),
    "faint_ihc": (0.025, 0.16, DAB, 0.10, True),
}
# pen colour -> ink optical density per RGB channel (an ink layer of density 1)
INKS: dict[str, np.ndarray] = {
    "blue": -np.log(np.array([45.0, 70.0, 165.0]) / 255.0),
    "green": -np.log(np.array([40.0, 125.0, 70.0]) / 255.0),
    "black": -np.log(np.array([38.0, 38.0, 44.0]) / 255.0),
}


@dataclass
class StainScene:
    """A rendered scene: RGB uint8 [H, W, 3] and its level-0 masks."""

    rgb: np.ndarray
    tissue: np.ndarray  # bool: stained tissue, not under ink
    pen: np.ndarray  # bool: ink
    debris: np.ndarray  # bool: specks on the glass
    palette: str


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    zoom = (shape[0] / field.shape[0], shape[1] / field.shape[1])
    return ndimage.zoom(field, zoom, order=1, mode="nearest")[: shape[0], : shape[1]]


def _tissue_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Two to four blobby tissue pieces inside the central 80% of the glass."""
    small = (max(8, h // 16), max(8, w // 16))
    field = ndimage.gaussian_filter(rng.standard_normal(small), min(small) / 14)
    field = (field - field.mean()) / (field.std() + 1e-8)
    yy, xx = np.mgrid[0 : small[0], 0 : small[1]]
    ry, rx = (yy / small[0] - 0.5) / 0.45, (xx / small[1] - 0.5) / 0.45
    envelope = 1.0 - np.sqrt(ry**2 + rx**2)
    return _upsample(field + 2.5 * envelope - 0.9, (h, w)) > 0


def _tiled(texture: np.ndarray, h: int, w: int) -> np.ndarray:
    reps = (-(-h // texture.shape[0]), -(-w // texture.shape[1]))
    return np.tile(texture, reps)[:h, :w]


def _stain_od(rng: np.random.Generator, palette: str, tissue: np.ndarray) -> np.ndarray:
    """Optical density [H, W, 3] of the stained tissue (0 on glass)."""
    h_base, h_nuc, second, second_mean, patchy = PALETTES[palette]
    hh, ww = tissue.shape
    nuc = _tiled(nuclei(rng, 512, spacing=14.0, radius=(3.0, 4.5), irregular=0.2), hh, ww)
    grain = _tiled(1.0 + 0.15 * smooth_noise(rng, 512, 3.0), hh, ww)
    low = _upsample(smooth_noise(rng, 64, 4.0), (hh, ww))
    if patchy:  # DAB marks some regions strongly, others not at all
        amount = second_mean * np.clip(1.6 * low + 0.3, 0.0, 2.0)
    else:
        amount = second_mean * np.clip(1.0 + 0.25 * low, 0.4, 1.6)
    h_conc = (h_base + h_nuc * nuc) * grain
    s_conc = amount * grain * (1.0 - 0.5 * nuc)
    od = h_conc[..., None] * HEMATOXYLIN + s_conc[..., None] * second
    return od * tissue[..., None]


def _stroke_path(rng: np.random.Generator, sh: int, sw: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) along one smooth stroke: a loop circling a region, as annotations do, or a line."""
    t = np.linspace(0, 1, 4000)
    cy, cx = rng.uniform(0.2, 0.8) * sh, rng.uniform(0.2, 0.8) * sw
    if rng.random() < 0.5:
        r = rng.uniform(0.12, 0.3) * min(sh, sw) * (1 + 0.1 * np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6)))
        return cy + r * np.sin(2 * np.pi * t), cx + r * np.cos(2 * np.pi * t)
    ang, length = rng.uniform(0, np.pi), rng.uniform(0.2, 0.45) * min(sh, sw)
    return cy + (t - 0.5) * length * np.sin(ang) + 6 * np.sin(7 * t), cx + (t - 0.5) * length * np.cos(ang)


def _pen_strokes(rng: np.random.Generator, h: int, w: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Ink coverage in [0, 1] [H, W] and ink optical density [H, W, 3] of ``n`` strokes of random colours."""
    scale = 4  # strokes are drawn at 1/4 resolution: they are smooth, the upsampling is invisible
    sh, sw = h // scale, w // scale
    coverage = np.zeros((sh, sw), dtype=np.float32)
    colour = np.zeros((sh, sw), dtype=np.int64)
    names = list(rng.permutation(list(INKS)))  # with 3 strokes every ink colour appears
    for i in range(n):
        ys, xs = _stroke_path(rng, sh, sw)
        line = np.ones((sh, sw), dtype=bool)
        line[np.clip(ys.astype(int), 0, sh - 1), np.clip(xs.astype(int), 0, sw - 1)] = False
        stroke = np.clip(rng.uniform(3.0, 7.0) + 0.5 - ndimage.distance_transform_edt(line), 0.0, 1.0)
        colour = np.where(stroke > coverage, i % len(names), colour)
        coverage = np.maximum(coverage, stroke)
    ink = np.stack([INKS[c] for c in names])[colour]
    return _upsample(coverage, (h, w)), np.stack([_upsample(ink[..., c], (h, w)) for c in range(3)], -1)


def _debris(rng: np.random.Generator, h: int, w: int, n: int = 40) -> np.ndarray:
    """Small dark specks (dust, dirt): ``n`` discs of 2-14 px radius."""
    free = np.ones((h, w), dtype=bool)
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    free[ys, xs] = False
    radius = np.zeros((h, w), dtype=np.float32)
    radius[ys, xs] = rng.uniform(2, 14, n)
    dist, (iy, ix) = ndimage.distance_transform_edt(free, return_indices=True)
    return dist <= radius[iy, ix]


def render_stain_scene(seed: int, palette: str, width: int = 4096, height: int = 3072, pen: bool = True,
                       debris: bool = True) -> StainScene:
    """Render one scene; the same (seed, palette, size, pen, debris) gives the same pixels."""
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; choose from {', '.join(PALETTES)}")
    rng = np.random.default_rng([seed, list(PALETTES).index(palette)])
    tissue = _tissue_mask(rng, height, width)
    od = _stain_od(rng, palette, tissue)
    pen_mask = np.zeros((height, width), dtype=bool)
    if pen:
        coverage, ink = _pen_strokes(rng, height, width, n=3)
        od = od + 0.9 * coverage[..., None] * ink
        pen_mask = coverage > 0.5
    specks = _debris(rng, height, width) & ~tissue & ~pen_mask if debris else np.zeros_like(tissue)
    od = od + 1.6 * specks[..., None] * np.array([1.0, 1.0, 1.0])
    glass = GLASS * (1.0 + 0.004 * rng.standard_normal((height, width, 1)))
    rgb = np.clip(glass * np.exp(-od), 0, 255).astype(np.uint8)
    return StainScene(rgb=rgb, tissue=tissue & ~pen_mask, pen=pen_mask, debris=specks, palette=palette)
