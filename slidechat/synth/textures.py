"""Periodic H&E-like texture tiles, one per tissue class (vectorised numpy, no per-pixel loops).

Colours come from a two-stain optical-density model (Ruifrok & Johnston): a pixel with haematoxylin
concentration h and eosin concentration e has RGB = 255 * exp(-(h * H + e * E + grey)). Every texture
is periodic with period ``size`` so a slide of any size is rendered by indexing into it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from slidechat.synth.classes import LABEL_NAMES

HEMATOXYLIN = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
EOSIN = np.array([0.2159, 0.8012, 0.5581]) / np.linalg.norm([0.2159, 0.8012, 0.5581])
GLASS_RGB = np.array([243.0, 242.0, 240.0])


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Periodic Gaussian-filtered noise with zero mean and unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def nearest_seed(size: int, points: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Periodic distance to and index of the nearest of ``points`` (K x 2, row/col) for every pixel."""
    offsets = np.array([(dy, dx) for dy in (-size, 0, size) for dx in (-size, 0, size)])
    rep = (points[None, :, :] + offsets[:, None, :]).reshape(-1, 2)
    ids = np.tile(np.arange(len(points)), len(offsets))
    rep = rep + pad
    keep = (rep >= 0).all(1) & (rep < size + 2 * pad).all(1)
    rep, ids = rep[keep].astype(int), ids[keep]
    canvas = np.ones((size + 2 * pad, size + 2 * pad), dtype=bool)
    seed_id = np.full(canvas.shape, -1, dtype=np.int64)
    canvas[rep[:, 0], rep[:, 1]] = False
    seed_id[rep[:, 0], rep[:, 1]] = ids
    dist, (iy, ix) = ndimage.distance_transform_edt(canvas, return_indices=True)
    crop = (slice(pad, pad + size), slice(pad, pad + size))
    return dist[crop], seed_id[iy[crop], ix[crop]]


def poisson_points(rng: np.random.Generator, size: int, spacing: float) -> np.ndarray:
    """Jittered-grid points with mean spacing ``spacing`` px (periodic domain)."""
    n = max(1, int(round(size / spacing)))
    step = size / n
    gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    jitter = rng.uniform(0.1, 0.9, size=(n * n, 2))
    pts = (np.stack([gy.ravel(), gx.ravel()], 1) + jitter) * step
    return np.mod(pts, size)


def nuclei(
    rng: np.random.Generator, size: int, spacing: float, radius: tuple[float, float], aspect: float = 1.0,
    angle: float = 0.0, irregular: float = 0.0,
) -> np.ndarray:
    """Soft nucleus mask in [0, 1]: discs (or ellipses with ``aspect``) at jittered-grid positions."""
    pts = poisson_points(rng, size, spacing)
    r = rng.uniform(*radius, size=len(pts))
    if aspect != 1.0:
        # anisotropic: compute in a stretched frame by scaling rows, then rotate via coordinate transform
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        c, s = np.cos(angle), np.sin(angle)
        best = np.full((size, size), np.inf, dtype=np.float32)
        for dy in (-size, 0, size):  # 9 periodic copies, vectorised over all points per copy
            for dx in (-size, 0, size):
                py, px = pts[:, 0] + dy, pts[:, 1] + dx
                near = (py > -3 * radius[1] * aspect) & (py < size + 3 * radius[1] * aspect)
                near &= (px > -3 * radius[1] * aspect) & (px < size + 3 * radius[1] * aspect)
                for p_y, p_x, p_r in zip(py[near], px[near], r[near]):
                    y0, y1 = int(max(0, p_y - aspect * p_r - 2)), int(min(size, p_y + aspect * p_r + 3))
                    x0, x1 = int(max(0, p_x - aspect * p_r - 2)), int(min(size, p_x + aspect * p_r + 3))
                    if y0 >= y1 or x0 >= x1:
                        continue
                    ly, lx = yy[y0:y1, x0:x1] - p_y, xx[y0:y1, x0:x1] - p_x
                    u, v = c * lx + s * ly, -s * lx + c * ly
                    d = np.sqrt((u / aspect) ** 2 + v**2) / p_r
                    np.minimum(best[y0:y1, x0:x1], d, out=best[y0:y1, x0:x1])
        rel = best
    else:
        dist, idx = nearest_seed(size, pts, pad=int(np.ceil(radius[1])) + 2)
        rel = dist / r[idx]
    if irregular:
        rel = rel * (1.0 + irregular * smooth_noise(rng, size, 2.0))
    return np.clip(1.5 - rel, 0.0, 1.0) ** 0.7  # soft edge


def stains_to_rgb(h: np.ndarray, e: np.ndarray, grey: float | np.ndarray = 0.0) -> np.ndarray:
    od = h[..., None] * HEMATOXYLIN + e[..., None] * EOSIN + np.asarray(grey)[..., None] * 0.6
    return np.clip(255.0 * np.exp(-od), 0, 255)


def _grain(rng: np.random.Generator, size: int) -> np.ndarray:
    return 1.0 + 0.06 * ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.7, mode="wrap")


def _stroma(rng, size):
    warp = 6.0 * smooth_noise(rng, size, 24.0)
    yy, xx = np.mgrid[0:size, 0:size]
    k = 18  # fibre bands per period (integer so the texture stays periodic)
    fibres = 0.5 + 0.5 * np.sin(2 * np.pi * (k * yy + 6 * xx) / size + warp * 0.5)
    e = (0.35 + 0.45 * fibres**2) * _grain(rng, size)
    nuc = nuclei(rng, size, spacing=46, radius=(3.0, 4.0), aspect=3.2, angle=np.arctan2(-6.0, 18.0))
    h = 0.05 + 1.05 * nuc
    return stains_to_rgb(h, e * (1 - 0.6 * nuc))


def _normal_glands(rng, size):
    pts = poisson_points(rng, size, spacing=128)
    radius = rng.uniform(40, 52, size=len(pts))
    dist, idx = nearest_seed(size, pts, pad=70)
    rel = dist - radius[idx]
    lumen = rel < -14
    epithelium = (rel >= -14) & (rel < 0)
    basal = (rel >= -5) & (rel < 0)
    nuc = nuclei(rng, size, spacing=9, radius=(2.6, 3.4))
    e = np.where(lumen, 0.03, np.where(epithelium, 0.30, 0.50 + 0.1 * smooth_noise(rng, size, 6)))
    h = np.where(lumen, 0.0, np.where(epithelium, 0.22 + 0.9 * basal * nuc, 0.05 + 0.7 * (nuc > 0.5) * (rng.random((size, size)) < 0.02)))
    return stains_to_rgb(h, e * _grain(rng, size))


def _tumor(rng, size):
    nuc = nuclei(rng, size, spacing=17, radius=(6.0, 8.5), irregular=0.18)
    chrom = 1.15 + 0.35 * smooth_noise(rng, size, 1.2)  # coarse chromatin
    h = 0.30 + nuc * chrom
    e = 0.32 + 0.08 * smooth_noise(rng, size, 8)
    return stains_to_rgb(h, e * _grain(rng, size))


def _necrosis(rng, size):
    mottle = smooth_noise(rng, size, 14)
    debris = nuclei(rng, size, spacing=21, radius=(1.2, 2.4))
    e = 0.42 + 0.12 * mottle
    h = 0.12 + 0.05 * smooth_noise(rng, size, 3) + 0.75 * debris
    return stains_to_rgb(h, e * _grain(rng, size), grey=0.18 + 0.05 * mottle)


def _lymphocytes(rng, size):
    nuc = nuclei(rng, size, spacing=10.5, radius=(3.4, 4.2))
    h = 0.12 + 1.55 * nuc
    e = 0.18 + 0.04 * smooth_noise(rng, size, 6)
    return stains_to_rgb(h, e * _grain(rng, size))


def _fat(rng, size):
    pts = poisson_points(rng, size, spacing=96)
    _, idx = nearest_seed(size, pts, pad=110)
    edge = np.zeros((size, size), dtype=bool)
    edge |= idx != np.roll(idx, 1, axis=0)
    edge |= idx != np.roll(idx, 1, axis=1)
    edge = ndimage.binary_dilation(edge, iterations=2)
    e = np.where(edge, 0.6, 0.16) * _grain(rng, size)  # faintly eosinophilic cells, pink septa
    h = np.where(edge, 0.05, 0.0)
    return stains_to_rgb(h, e)


def _glass(rng, size):
    g = GLASS_RGB[None, None, :] + 1.2 * smooth_noise(rng, size, 3.0)[..., None]
    return np.clip(g, 0, 255)


_MAKERS = {
    "background": _glass,
    "stroma": _stroma,
    "normal_glands": _normal_glands,
    "tumor": _tumor,
    "necrosis": _necrosis,
    "lymphocytes": _lymphocytes,
    "fat": _fat,
}


@lru_cache(maxsize=4)
def texture_bank(size: int = 512, seed: int = 0) -> np.ndarray:
    """uint8 array [len(LABEL_NAMES), size, size, 3]; entry 0 is glass. Cached per process."""
    bank = np.empty((len(LABEL_NAMES), size, size, 3), dtype=np.uint8)
    for i, name in enumerate(LABEL_NAMES):
        rng = np.random.default_rng([seed, i])
        bank[i] = np.round(_MAKERS[name](rng, size)).astype(np.uint8)
    bank.setflags(write=False)
    return bank


def packed_bank(size: int = 512, seed: int = 0) -> np.ndarray:
    """The texture bank as one uint32 per RGBX pixel, flattened [classes * size * size] (fast gathers)."""
    bank = texture_bank(size, seed)
    rgbx = np.concatenate([bank, np.full(bank.shape[:-1] + (1,), 255, np.uint8)], axis=-1)
    return np.ascontiguousarray(rgbx).view(np.uint32).reshape(-1)


@lru_cache(maxsize=16)
def downsampled_bank(size: int = 512, seed: int = 0, downsample: int = 1) -> np.ndarray:
    """The texture bank area-averaged by ``downsample`` (must divide ``size``); period size // downsample."""
    bank = texture_bank(size, seed)
    if downsample == 1:
        return bank
    c, t = bank.shape[0], size // downsample
    small = bank.astype(np.float32).reshape(c, t, downsample, t, downsample, 3).mean(axis=(2, 4))
    small = np.round(small).astype(np.uint8)
    small.setflags(write=False)
    return small
