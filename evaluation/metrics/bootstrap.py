"""Seeded percentile-bootstrap confidence intervals for means of per-item scores."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(
    values, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Return (mean, low, high): the mean of ``values`` and its percentile-bootstrap CI.

    Items are resampled with replacement ``n_resamples`` times using ``np.random.default_rng(seed)``,
    so the interval is reproducible. An empty input gives (nan, nan, nan); one item gives a
    zero-width interval.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, 20_000_000 // x.size)  # bound memory for large benchmarks
    means = np.concatenate([
        x[rng.integers(0, x.size, size=(min(chunk, n_resamples - start), x.size))].mean(axis=1)
        for start in range(0, n_resamples, chunk)
    ])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(x.mean()), float(low), float(high)
