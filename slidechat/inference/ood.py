"""Out-of-distribution warning: is this slide like the slides the checkpoint was trained on?

    result = ood_check(model, slide)     # OODResult, or None when the checkpoint has no feature statistics
    if result and result.flagged:
        print(result.message)

The statistics (``slidechat.model.feature_stats``) are written into the checkpoint folder by training; they are
loaded once per model and each slide's result is cached by its sha256.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from slidechat.errors import SlideChatError
from slidechat.model.feature_stats import FeatureStats, stain_descriptor

log = logging.getLogger(__name__)

MAX_CACHED_SLIDES = 256


@dataclass(frozen=True)
class OODResult:
    """How unlike the training slides a slide is. ``flagged`` when ``score > threshold``."""

    score: float
    threshold: float
    flagged: bool
    message: str
    threshold_rule: str = ""
    mean_distance: float | None = None  # Mahalanobis distance of the slide's mean patch feature
    outlier_fraction: float | None = None  # fraction of its patches beyond the training patches' 99th percentile
    stain_distance: float | None = None  # Mahalanobis distance of its tissue colour (None: slide file not at hand)

    def to_dict(self) -> dict:
        return asdict(self)


def ood_message(score: float, threshold: float, rule: str) -> str:
    """The notice shown with a slide; ``rule`` says how the threshold was set."""
    how = f" The threshold is {rule}." if rule else ""
    if score > threshold:
        return (f"This slide is unlike the slides this model was trained on (score {score:.1f}, threshold "
                f"{threshold:.1f}): answers may be wrong.{how}")
    return (f"This slide resembles the slides this model was trained on (score {score:.1f}, threshold "
            f"{threshold:.1f}).{how}")


class _ModelStats:
    """One model's statistics (None: the checkpoint has none) and its recent slides' results."""

    def __init__(self, stats: FeatureStats | None) -> None:
        self.stats = stats
        self.results: OrderedDict[str, OODResult | None] = OrderedDict()


_STATS: "weakref.WeakKeyDictionary[nn.Module, _ModelStats]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _model_of(model) -> nn.Module:
    return model if isinstance(model, nn.Module) else model.model


def _model_stats(module: nn.Module) -> _ModelStats:
    with _LOCK:
        entry = _STATS.get(module)
    if entry is not None:
        return entry
    folder = getattr(module, "checkpoint_dir", None)
    stats = None
    if folder is not None:
        try:
            stats = FeatureStats.load(folder)
        except SlideChatError as exc:
            log.warning("out-of-distribution check off: %s", exc)
    with _LOCK:
        return _STATS.setdefault(module, _ModelStats(stats))


def feature_stats(model) -> FeatureStats | None:
    """The training feature statistics of ``model``'s checkpoint (a SlideChat or SlideAssistant), or None."""
    return _model_stats(_model_of(model)).stats


def score_features(stats: FeatureStats, features, stain=None) -> OODResult:
    """The OOD result of patch features [N, D] (+ the slide's stain descriptor) under ``stats`` (no caching)."""
    s = stats.score(features, stain)
    rule = stats.describe_threshold()
    return OODResult(score=round(s.score, 3), threshold=round(stats.threshold, 3), flagged=s.score > stats.threshold,
                     message=ood_message(s.score, stats.threshold, rule), threshold_rule=rule,
                     mean_distance=round(s.mean_distance, 3), outlier_fraction=round(s.outlier_fraction, 4),
                     stain_distance=None if s.stain_distance is None else round(s.stain_distance, 3))


def _slide_file(slide) -> Path | None:
    """The slide file behind an EncodedSlide (itself, or the one its feature file was extracted from)."""
    from slidechat.inference.encode import FEATURE_SUFFIXES

    src = slide.source_path
    if src is not None and Path(src).suffix.lower() not in FEATURE_SUFFIXES:
        return Path(src)
    recorded = getattr(slide.features, "attrs", {}).get("slide_path")
    return Path(recorded) if recorded and Path(recorded).is_file() else None


def ood_check(model, slide) -> OODResult | None:
    """The OOD result of ``slide`` (an EncodedSlide, SlideFeatures or path) for ``model``; None when the
    checkpoint has no feature statistics or the slide's features do not match them. Cached per slide."""
    from slidechat.inference.encode import EncodedSlide, as_encoded_slide

    entry = _model_stats(_model_of(model))
    if entry.stats is None:
        return None
    if not isinstance(slide, EncodedSlide):
        slide = as_encoded_slide(model, slide)
    with _LOCK:
        if slide.sha256 in entry.results:
            entry.results.move_to_end(slide.sha256)
            return entry.results[slide.sha256]
    feats = slide.features.features
    if feats.ndim != 2 or feats.shape[1] != entry.stats.dim or len(feats) == 0:
        log.info("no out-of-distribution score for %s: features of shape %s, statistics of dimension %d",
                 slide.slide_id, tuple(feats.shape), entry.stats.dim)
        result = None
    else:
        stain = None
        if entry.stats.stain is not None and (path := _slide_file(slide)) is not None:
            stain = stain_descriptor(path)
        result = score_features(entry.stats, feats, stain)
    with _LOCK:
        entry.results[slide.sha256] = result
        while len(entry.results) > MAX_CACHED_SLIDES:
            entry.results.popitem(last=False)
    return result


__all__ = ["OODResult", "feature_stats", "ood_check", "ood_message", "score_features"]
