"""Where tissue, tissue classes and the lesion lie on a synthetic slide, at label-map resolution.

Everything here works on a small grid (1 cell = ``downsample`` level-0 pixels); the truth (area
fractions, lesion bounding box and quadrant) is measured from the final label map, so it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from slidechat.synth.classes import BASE_CLASSES, CLASS_INDEX, LESION_CLASSES, QUADRANTS, TISSUE_CLASSES

MIN_CLASS_FRACTION = 0.04


@dataclass
class SlideLayout:
    """Label map (0 = glass, i = TISSUE_CLASSES[i-1]) and lesion mask at ``downsample`` level-0 px per cell."""

    labels: np.ndarray
    lesion_mask: np.ndarray
    downsample: int
    width: int
    height: int
    n_fragments: int
    lesion_class: str | None
    truth: dict = field(default_factory=dict)


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth unit-variance noise; made on a coarse grid and upsampled, so large sigmas stay cheap."""
    step = max(1, int(sigma / 3))
    coarse = (shape[0] // step + 3, shape[1] // step + 3)
    f = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma / step, mode="reflect")
    if step > 1:
        f = ndimage.zoom(f, step, order=1)
    f = f[: shape[0], : shape[1]]
    return (f - f.mean()) / (f.std() + 1e-8)


def _piece_grid(n: int, landscape: bool) -> tuple[int, int]:
    if n == 1:
        return 1, 1
    if n == 4:
        return 2, 2
    return (1, n) if landscape else (n, 1)


def _tissue_pieces(rng: np.random.Generator, lh: int, lw: int, n: int, scale: tuple[float, float]) -> np.ndarray:
    rows, cols = _piece_grid(n, lw >= lh)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    tissue = np.zeros((lh, lw), dtype=bool)
    noise = _smooth(rng, (lh, lw), sigma=max(2.0, min(lh, lw) / 25))
    for r in range(rows):
        for c in range(cols):
            cell_h, cell_w = lh / rows, lw / cols
            cy = (r + 0.5 + rng.uniform(-0.05, 0.05)) * cell_h
            cx = (c + 0.5 + rng.uniform(-0.05, 0.05)) * cell_w
            a, b = cell_w * rng.uniform(*scale), cell_h * rng.uniform(*scale)
            th = rng.uniform(-0.3, 0.3)
            u = (np.cos(th) * (xx - cx) + np.sin(th) * (yy - cy)) / a
            v = (-np.sin(th) * (xx - cx) + np.cos(th) * (yy - cy)) / b
            piece = np.sqrt(u**2 + v**2) < 1.0 + 0.12 * noise
            lab, k = ndimage.label(piece)
            if k > 1:  # keep the largest blob so every piece is one fragment
                sizes = ndimage.sum(piece, lab, index=np.arange(1, k + 1))
                piece = lab == (1 + int(np.argmax(sizes)))
            tissue |= ndimage.binary_fill_holes(piece)
    return tissue


def _quadrant_of(cy: float, cx: float, bbox: tuple[int, int, int, int]) -> str:
    y0, x0, y1, x1 = bbox
    upper = cy < (y0 + y1) / 2
    left = cx < (x0 + x1) / 2
    return QUADRANTS[(0 if upper else 2) + (0 if left else 1)]


def make_layout(
    rng: np.random.Generator, width: int, height: int, downsample: int, quadrant: str | None = None,
    lesion_probability: float = 0.75, piece_scale: tuple[float, float] = (0.33, 0.42),
) -> SlideLayout:
    """Draw tissue fragments, class regions and an optional lesion for a ``width`` x ``height`` slide."""
    lh, lw = -(-height // downsample), -(-width // downsample)
    n_fragments = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
    tissue = _tissue_pieces(rng, lh, lw, n_fragments, piece_scale)

    has_lesion = rng.random() < lesion_probability
    lesion_class = str(rng.choice(LESION_CLASSES, p=[0.6, 0.2, 0.2])) if has_lesion else None
    base = [c for c in BASE_CLASSES if rng.random() < 0.5 and c != lesion_class]
    pool = [c for c in BASE_CLASSES if c != lesion_class and c not in base]
    while len(base) < 2:
        base.append(pool.pop(int(rng.integers(len(pool)))))
    base = [c for c in BASE_CLASSES if c in base]  # canonical order

    sigma = max(2.0, min(lh, lw) / 12)
    fields = np.stack([_smooth(rng, (lh, lw), sigma) + rng.normal(0, 0.3) for _ in base])
    labels = np.zeros((lh, lw), dtype=np.uint8)
    active = list(range(len(base)))
    for _ in range(len(base)):
        winner = np.array(active)[np.argmax(fields[active], axis=0)]
        counts = np.bincount(winner[tissue], minlength=len(base))
        frac = counts / max(1, tissue.sum())
        small = [i for i in active if frac[i] < MIN_CLASS_FRACTION]
        if not small or len(active) <= 1:
            break
        active.remove(min(small, key=lambda i: frac[i]))
    class_idx = np.array([CLASS_INDEX[c] for c in base], dtype=np.uint8)
    labels[tissue] = class_idx[winner[tissue]]

    lesion = np.zeros((lh, lw), dtype=bool)
    ys, xs = np.nonzero(tissue)
    bbox = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
    if lesion_class is not None:
        quadrant = quadrant or str(rng.choice(QUADRANTS))
        qi = QUADRANTS.index(quadrant)
        y0, x0, y1, x1 = bbox
        my, mx = (y0 + y1) / 2, (x0 + x1) / 2
        fy = (ys - my) / max(1, y1 - y0)
        fx = (xs - mx) / max(1, x1 - x0)
        in_q = ((fy < -0.12) if qi < 2 else (fy > 0.12)) & ((fx < -0.12) if qi % 2 == 0 else (fx > 0.12))
        # away from the tissue edge, so the lesion is mostly inside tissue
        # == binary_erosion(tissue, iterations=k) but O(pixels): taxicab distance to glass (or the border) > k
        k = max(1, min(lh, lw) // 30)
        dist = ndimage.distance_transform_cdt(np.pad(tissue, 1), metric="taxicab")[1:-1, 1:-1]
        inner = (dist > k)[ys, xs]
        cand = np.nonzero(in_q & inner)[0]
        if len(cand) == 0:
            cand = np.nonzero(in_q)[0] if in_q.any() else np.arange(len(ys))
        pick = cand[int(rng.integers(len(cand)))]
        cy, cx = ys[pick], xs[pick]
        target = rng.uniform(0.04, 0.40) * tissue.sum()
        radius = np.sqrt(target / np.pi)
        yy, xx = np.mgrid[0:lh, 0:lw]
        noise = _smooth(rng, (lh, lw), sigma=max(1.5, radius / 3))
        blob = np.hypot(yy - cy, xx - cx) / radius < 1.0 + 0.15 * noise
        lesion = blob & tissue
        if lesion.sum() < 4:
            lesion_class = None
            lesion[:] = False
        else:
            labels[lesion] = CLASS_INDEX[lesion_class]
    return SlideLayout(labels, lesion, downsample, width, height, n_fragments, lesion_class)


def measure_truth(layout: SlideLayout) -> dict:
    """Ground truth measured from the label map: classes, area fractions, tumour fraction, lesion geometry."""
    labels, ds = layout.labels, layout.downsample
    tissue = labels > 0
    n_tissue = max(1, int(tissue.sum()))
    counts = np.bincount(labels.ravel(), minlength=len(TISSUE_CLASSES) + 1)
    fractions = {c: round(float(counts[CLASS_INDEX[c]]) / n_tissue, 4) for c in TISSUE_CLASSES if counts[CLASS_INDEX[c]]}
    present = [c for c in TISSUE_CLASSES if c in fractions]
    dominant = max(present, key=lambda c: fractions[c]) if present else None
    _, n_frag = ndimage.label(tissue)
    lesion = None
    if layout.lesion_class is not None and layout.lesion_mask.any():
        ys, xs = np.nonzero(layout.lesion_mask)
        tys, txs = np.nonzero(tissue)
        tb = (int(tys.min()), int(txs.min()), int(tys.max()) + 1, int(txs.max()) + 1)
        quadrant = _quadrant_of(float(ys.mean()) + 0.5, float(xs.mean()) + 0.5, tb)
        lesion = {
            "class": layout.lesion_class,
            "bbox_level0": [
                int(xs.min()) * ds,
                int(ys.min()) * ds,
                min(layout.width, (int(xs.max()) + 1) * ds),
                min(layout.height, (int(ys.max()) + 1) * ds),
            ],
            "quadrant": quadrant,
            "side": quadrant.split("-")[1],
            "area_fraction": round(float(layout.lesion_mask.sum()) / n_tissue, 4),
        }
    return {
        "classes_present": present,
        "area_fractions": fractions,
        "dominant_class": dominant,
        "tumor_fraction": fractions.get("tumor", 0.0),
        "n_fragments": int(n_frag),
        "tissue_bbox_level0": _bbox_level0(tissue, ds, layout.width, layout.height),
        "lesion": lesion,
    }


def _bbox_level0(mask: np.ndarray, ds: int, width: int, height: int) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()) * ds, int(ys.min()) * ds, min(width, (int(xs.max()) + 1) * ds), min(height, (int(ys.max()) + 1) * ds)]
