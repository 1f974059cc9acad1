"""Slide<->text retrieval recall@K and zero-shot classification accuracy from similarity matrices."""

from __future__ import annotations

import numpy as np


def _ranks(sim: np.ndarray, target: np.ndarray) -> np.ndarray:
    """0-based rank of the target column in each row; ties count against the target."""
    correct = sim[np.arange(sim.shape[0]), target][:, None]
    return (sim >= correct).sum(axis=1) - 1


def recall_at_k(sim, target=None, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K for queries as rows of ``sim`` [Q, C]; ``target[q]`` is the right column (default q).

    A query counts as found at K when fewer than K other candidates score >= its target
    (ties are resolved pessimistically). Also returns the median rank (1-based).
    """
    sim = np.asarray(sim, dtype=np.float64)
    target = np.arange(sim.shape[0]) if target is None else np.asarray(target, dtype=np.int64)
    ranks = _ranks(sim, target)
    out = {f"R@{k}": float((ranks < k).mean()) for k in ks}
    out["median_rank"] = float(np.median(ranks) + 1)
    return out


def retrieval_metrics(sim, ks=(1, 5, 10)) -> dict:
    """Both directions for a paired similarity matrix ``sim[i, j]`` = slide i vs text j (pairs on the diagonal)."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"expected a square slide x text similarity matrix, got {sim.shape}")
    return {
        "slide_to_text": recall_at_k(sim, ks=ks),
        "text_to_slide": recall_at_k(sim.T, ks=ks),
        "n": int(sim.shape[0]),
    }


def zero_shot_accuracy(sim, labels) -> float:
    """Accuracy of ``argmax`` over class columns of ``sim`` [N, n_classes] against integer ``labels``."""
    sim = np.asarray(sim, dtype=np.float64)
    return float((sim.argmax(axis=1) == np.asarray(labels)).mean())
