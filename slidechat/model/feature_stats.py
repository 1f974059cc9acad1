"""Statistics of the slides a checkpoint was trained on, for an out-of-distribution score.

Up to three Gaussians, each a regularised mean + covariance kept as its eigen-decomposition (top ``rank`` axes +
one residual variance, so a 1024-d encoder stays small):

* **patches**: every training patch feature; a patch's distance is its Mahalanobis distance, RMS per dimension;
* **slides**: each training slide's mean patch feature;
* **stain** (when the training slide files were at hand): each slide's colour descriptor, the optical density of
  its tissue in a thumbnail (:func:`stain_descriptor`), because a patch encoder may be nearly blind to a change
  of stain that the rest of the model was never shown.

A slide's score is the largest of three ratios: the Mahalanobis distance of its mean patch feature (a shift of the
whole slide: scanner, encoder input), the fraction of its patches farther than the training patches'
99th-percentile distance (tissue the model never saw) and the distance of its stain descriptor, each divided by
its ``quantile`` over held-out training slides. Held out by cross-fitting: every training slide is scored by
statistics fitted without its fold. So a score of 1 is as unusual as the 99th-percentile training slide; the
threshold is ``margin`` x the ``quantile`` of the held-out scores.

Files in a checkpoint folder: ``feature_stats.safetensors`` (arrays) and ``feature_stats.json`` (threshold, how it
was set, sizes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from slidechat.errors import CheckpointError, DataError, SlideChatError
from slidechat.utils.io import atomic_path, write_json_atomic

STATS_ARRAYS = "feature_stats.safetensors"
STATS_META = "feature_stats.json"
FORMAT_VERSION = 1


@dataclass
class Gaussian:
    """Mean, top eigen-axes (rows of ``axes``) with their variances, and one variance for the rest."""

    mean: np.ndarray
    axes: np.ndarray
    variances: np.ndarray
    residual_variance: float

    @classmethod
    def fit(cls, x: np.ndarray, rank: int = 64, shrinkage: float = 0.05) -> "Gaussian":
        """Fit to rows of ``x``; ``shrinkage`` (a fraction of the mean variance added to every axis) keeps
        directions the training data barely spans from dominating a distance."""
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        centred = x - mean
        cov = centred.T @ centred / max(len(x) - 1, 1)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
        floor = shrinkage * float(eigval.mean()) + 1e-12
        k = min(rank, x.shape[1])
        rest = eigval[k:]
        residual = float(rest.mean()) + floor if rest.size else floor
        return cls(mean=mean.astype(np.float32), axes=eigvec[:, :k].T.astype(np.float32),
                   variances=(eigval[:k] + floor).astype(np.float32), residual_variance=residual)

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``x``, RMS per dimension (about 1 for a typical training row)."""
        centred = np.asarray(x, dtype=np.float64) - self.mean
        proj = centred @ self.axes.T.astype(np.float64)
        d2 = (proj ** 2 / self.variances).sum(axis=1)
        if self.axes.shape[0] < self.mean.shape[0]:
            rest = np.maximum((centred ** 2).sum(axis=1) - (proj ** 2).sum(axis=1), 0.0)
            d2 = d2 + rest / self.residual_variance
        return np.sqrt(d2 / self.mean.shape[0])

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.axes": self.axes, f"{prefix}.variances": self.variances,
                f"{prefix}.residual_variance": np.asarray([self.residual_variance], dtype=np.float64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "Gaussian":
        return cls(mean=arrays[f"{prefix}.mean"], axes=arrays[f"{prefix}.axes"],
                   variances=arrays[f"{prefix}.variances"],
                   residual_variance=float(arrays[f"{prefix}.residual_variance"][0]))


@dataclass
class SlideScore:
    """One slide's score and what it is made of."""

    score: float
    mean_distance: float  # Mahalanobis distance of the slide's mean patch feature
    outlier_fraction: float  # fraction of patches beyond the training patches' quantile distance
    num_patches: int
    stain_distance: float | None = None  # Mahalanobis distance of the slide's stain descriptor


@dataclass
class FeatureStats:
    """What a checkpoint knows about its training features, and the calibrated OOD threshold."""

    patches: Gaussian
    slides: Gaussian
    patch_limit: float  # patch distance at ``patch_quantile`` of the training patches
    mean_distance_scale: float  # held-out quantile of SlideScore.mean_distance
    outlier_fraction_scale: float  # held-out quantile of SlideScore.outlier_fraction
    threshold: float  # on SlideScore.score
    calibration: dict = field(default_factory=dict)
    stain: Gaussian | None = None
    stain_scale: float | None = None  # held-out quantile of SlideScore.stain_distance

    @property
    def dim(self) -> int:
        return int(self.patches.mean.shape[0])

    def score(self, features: np.ndarray, stain: np.ndarray | None = None, max_patches: int = 4096) -> SlideScore:
        """Score one slide's patch features [N, D] (+ its stain descriptor, when known); at most ``max_patches``
        evenly spaced patches are measured."""
        feats = np.asarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.dim or len(feats) == 0:
            raise DataError(f"features of shape {tuple(feats.shape)} do not match the training statistics "
                            f"(dimension {self.dim})")
        mean_d = float(self.slides.distance(feats.mean(axis=0, keepdims=True))[0])
        sample = feats if len(feats) <= max_patches else feats[np.linspace(0, len(feats) - 1, max_patches).astype(int)]
        outliers = float((self.patches.distance(sample) > self.patch_limit).mean())
        score = max(mean_d / self.mean_distance_scale, outliers / self.outlier_fraction_scale)
        stain_d = None
        if stain is not None and self.stain is not None:
            stain_d = float(self.stain.distance(np.asarray(stain, dtype=np.float64)[None])[0])
            score = max(score, stain_d / self.stain_scale)
        return SlideScore(score=float(score), mean_distance=mean_d, outlier_fraction=outliers,
                          num_patches=int(len(feats)), stain_distance=stain_d)

    def describe_threshold(self) -> str:
        c = self.calibration
        if not c:
            return "threshold set by hand"
        return (f"{c['margin']:g} x the {100 * c['quantile']:g}th percentile of the held-out scores of "
                f"{c['slides']} training slides")

    # ---------------------------------------------------------------- files
    def save(self, folder: str | Path) -> Path:
        """Write ``feature_stats.safetensors`` + ``feature_stats.json`` into ``folder`` (atomically, each)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {**self.patches.arrays("patches"), **self.slides.arrays("slides"),
                  **(self.stain.arrays("stain") if self.stain is not None else {})}
        with atomic_path(folder / STATS_ARRAYS) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        write_json_atomic(folder / STATS_META, {
            "format_version": FORMAT_VERSION, "dim": self.dim, "threshold": self.threshold,
            "patch_limit": self.patch_limit, "mean_distance_scale": self.mean_distance_scale,
            "outlier_fraction_scale": self.outlier_fraction_scale, "stain_scale": self.stain_scale,
            "threshold_rule": self.describe_threshold(), "calibration": self.calibration})
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "FeatureStats | None":
        """The statistics saved in ``folder``, or None when it has none. Raises CheckpointError when corrupt."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        meta_path, arrays_path = folder / STATS_META, folder / STATS_ARRAYS
        if not meta_path.is_file() or not arrays_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            arrays = load_file(str(arrays_path))
            stats = cls(patches=Gaussian.from_arrays(arrays, "patches"), slides=Gaussian.from_arrays(arrays, "slides"),
                        patch_limit=float(meta["patch_limit"]), mean_distance_scale=float(meta["mean_distance_scale"]),
                        outlier_fraction_scale=float(meta["outlier_fraction_scale"]),
                        threshold=float(meta["threshold"]), calibration=dict(meta.get("calibration") or {}))
            if meta.get("stain_scale") is not None:
                stats.stain, stats.stain_scale = Gaussian.from_arrays(arrays, "stain"), float(meta["stain_scale"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder}: unreadable feature statistics ({exc}); delete {STATS_META} and "
                                  f"{STATS_ARRAYS} or recompute them") from exc
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(f"{meta_path} is a newer format ({meta['format_version']}); upgrade slidechat")
        return stats


def _subsample(features: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(features) <= n:
        return features
    return features[np.sort(rng.choice(len(features), n, replace=False))]


def _fit(slides: list[np.ndarray], rank: int, patch_quantile: float) -> tuple[Gaussian, Gaussian, float]:
    patches = np.concatenate(slides)
    patch_gauss = Gaussian.fit(patches, rank=rank)
    slide_gauss = Gaussian.fit(np.stack([s.mean(axis=0) for s in slides]), rank=rank)
    limit = float(np.quantile(patch_gauss.distance(patches), patch_quantile))
    return patch_gauss, slide_gauss, limit


def compute_feature_stats(slides: Sequence[np.ndarray], stains: Sequence[np.ndarray | None] | None = None, *,
                          rank: int = 64, folds: int = 5, quantile: float = 0.99, margin: float = 1.5,
                          patch_quantile: float = 0.99, max_patches_per_slide: int = 512,
                          seed: int = 0) -> FeatureStats:
    """Statistics of training slides' patch features (one [N_i, D] array per slide) and, when every slide has
    one, their stain descriptors; with a cross-fitted threshold: each fold's slides are scored by statistics
    fitted on the other folds."""
    rng = np.random.default_rng(seed)
    if stains is not None and (len(stains) != len(slides) or any(s is None for s in stains)):
        stains = None
    if stains is not None:
        stains = [st for st, s in zip(stains, slides) if len(s)]
    arrays = [np.asarray(s, dtype=np.float32) for s in slides if len(s)]
    if len(arrays) < 2 * folds:
        raise DataError(f"feature statistics need at least {2 * folds} slides with patches, got {len(arrays)}")
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise DataError(f"training slides have features of different dimensions: {sorted(dims)}")
    sampled = [_subsample(a, max_patches_per_slide, rng) for a in arrays]
    fold_of = rng.permutation(len(sampled)) % folds
    stain_arr = None if stains is None else np.stack([np.asarray(s, dtype=np.float64) for s in stains])
    held_mean, held_frac, held_stain = (np.empty(len(sampled)) for _ in range(3))
    for f in range(folds):
        patch_g, slide_g, limit = _fit([s for s, k in zip(sampled, fold_of) if k != f], rank, patch_quantile)
        stain_g = None if stain_arr is None else Gaussian.fit(stain_arr[fold_of != f], rank=rank)
        for i in np.flatnonzero(fold_of == f):
            held_mean[i] = slide_g.distance(arrays[i].mean(axis=0, keepdims=True))[0]
            held_frac[i] = (patch_g.distance(sampled[i]) > limit).mean()
            if stain_g is not None:
                held_stain[i] = stain_g.distance(stain_arr[i : i + 1])[0]
    patch_g, slide_g, limit = _fit(sampled, rank, patch_quantile)
    mean_scale = float(np.quantile(held_mean, quantile))
    # never below the patch tail itself: a slide's own 1% tail is not drift
    frac_scale = max(float(np.quantile(held_frac, quantile)), 1 - patch_quantile)
    held_scores = np.maximum(held_mean / mean_scale, held_frac / frac_scale)
    stain_g = stain_scale = None
    if stain_arr is not None:
        stain_g, stain_scale = Gaussian.fit(stain_arr, rank=rank), float(np.quantile(held_stain, quantile))
        held_scores = np.maximum(held_scores, held_stain / stain_scale)
    threshold = margin * float(np.quantile(held_scores, quantile))
    calibration = {
        "slides": len(arrays), "folds": folds, "quantile": quantile, "margin": margin,
        "patch_quantile": patch_quantile, "patches_per_slide": max_patches_per_slide, "rank": rank, "seed": seed,
        "stain": stain_arr is not None, "heldout_score_quantile": round(float(np.quantile(held_scores, quantile)), 4),
        "heldout_score_median": round(float(np.median(held_scores)), 4),
        "heldout_score_max": round(float(held_scores.max()), 4),
    }
    return FeatureStats(patches=patch_g, slides=slide_g, patch_limit=limit, mean_distance_scale=mean_scale,
                        outlier_fraction_scale=frac_scale, threshold=threshold, calibration=calibration,
                        stain=stain_g, stain_scale=stain_scale)


def stats_from_feature_files(paths: Sequence[str | Path], *, max_slides: int = 256, seed: int = 0,
                             with_stain: bool = True, **kwargs) -> FeatureStats:
    """:func:`compute_feature_stats` over feature files (.h5 / .csv); at most ``max_slides`` of them, drawn at
    random, are read. Stain statistics are added when every file's ``slide_path`` is still readable."""
    from slidechat.features.store import load_features

    paths = sorted(Path(p) for p in paths)
    if len(paths) > max_slides:
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), max_slides, replace=False))]
    loaded = [load_features(p) for p in paths]
    stains = None
    if with_stain:
        stains = []
        for f in loaded:
            src = f.attrs.get("slide_path")
            stains.append(stain_descriptor(src) if src and Path(src).is_file() else None)
            if stains[-1] is None:
                stains = None
                break
    return compute_feature_stats([f.features for f in loaded], stains, seed=seed, **kwargs)


def stain_descriptor(slide_path: str | Path, thumbnail_size: int = 512) -> np.ndarray | None:
    """The colour of a slide's tissue: per-channel optical density (mean and 90th percentile) of the tissue
    pixels of a thumbnail, and their mean OD direction (9 numbers); None when it has no tissue or cannot be read."""
    from slidechat.slide.reader import SlideReader
    from slidechat.slide.tissue import glass_colour, tissue_mask_from_rgb

    try:
        with SlideReader(slide_path) as reader:
            thumb = np.asarray(reader.thumbnail(thumbnail_size).convert("RGB"))
    except (SlideChatError, OSError, ValueError):
        return None
    mask, _ = tissue_mask_from_rgb(thumb)
    if mask.sum() < 32:
        return None
    ratio = np.clip(thumb[mask].astype(np.float64) / glass_colour(thumb), 1.0 / 255.0, 1.0)
    od = -np.log(ratio)  # [M, 3]
    direction = od / (np.linalg.norm(od, axis=1, keepdims=True) + 1e-6)
    return np.concatenate([od.mean(axis=0), np.percentile(od, 90, axis=0), direction.mean(axis=0)])


__all__ = ["FeatureStats", "Gaussian", "SlideScore", "STATS_ARRAYS", "STATS_META", "compute_feature_stats",
           "stain_descriptor", "stats_from_feature_files"]
