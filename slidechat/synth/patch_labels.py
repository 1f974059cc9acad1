"""Patch-level class labels from a SynthSlide label map (for supervised training of the demo CNN)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def load_label_map(dataset_dir: str | os.PathLike, record: dict) -> np.ndarray:
    """The per-pixel class map (0 = glass) of one truth record, at ``record['mask_downsample']``."""
    return np.asarray(Image.open(Path(dataset_dir) / record["label_map_path"]))


def patch_class_shares(
    label_map: np.ndarray, downsample: int, coords: np.ndarray, patch_size_level0: float, n_classes: int,
    samples: int = 8,
) -> np.ndarray:
    """Share of each label (0 = glass, then the tissue classes) inside every patch: float32 [N, n_classes], rows
    summing to 1, from a ``samples`` x ``samples`` grid of points per patch (level-0 top-left ``coords`` [N, 2];
    vectorised)."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    offs = (np.arange(samples) + 0.5) * patch_size_level0 / samples
    xs = (coords[:, 0:1] + offs[None, :]) // downsample  # [N, s]
    ys = (coords[:, 1:2] + offs[None, :]) // downsample
    xs = np.clip(xs.astype(np.int64), 0, label_map.shape[1] - 1)
    ys = np.clip(ys.astype(np.int64), 0, label_map.shape[0] - 1)
    vals = label_map[ys[:, :, None], xs[:, None, :]].reshape(len(coords), -1).astype(np.int64)  # [N, s*s]
    n_cls = max(n_classes, int(label_map.max()) + 1)
    counts = np.zeros((len(coords), n_cls), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(len(coords)), vals.shape[1]), vals.ravel()), 1)
    return (counts[:, :n_classes] / vals.shape[1]).astype(np.float32)


def patch_labels(
    label_map: np.ndarray, downsample: int, coords: np.ndarray, patch_size_level0: int, samples: int = 8,
    min_purity: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Majority class and its share for each patch (level-0 top-left ``coords`` [N, 2]).

    Returns (labels int64 [N], purity float [N]); patches below ``min_purity`` get label -1.
    """
    shares = patch_class_shares(label_map, downsample, coords, patch_size_level0, int(label_map.max()) + 1, samples)
    labels = shares.argmax(1).astype(np.int64)
    purity = shares.max(1)
    labels = np.where(purity >= min_purity, labels, -1)
    return labels, purity
