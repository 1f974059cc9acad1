"""``encode_slide``: a slide file -> patch features (.h5, cached by the slide's sha256), or a feature file as is.

Cache layout: ``<cache_dir>/<encoder key>/<sha256>.h5`` where the encoder key names the patch encoder, a short hash
of its weights, the target mpp and the patch size, so two checkpoints with different patch encoders never share
features. ``cache_dir`` defaults to ``$SLIDECHAT_CACHE_DIR/features`` (``~/.cache/slidechat/features``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from slidechat.errors import DataError, SlideReadError
from slidechat.inference.cache import InferenceCache, resolve
from slidechat.model.llm import cache_root
from slidechat.utils.io import sha256_file

log = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".h5", ".hdf5", ".csv")


@dataclass
class EncodedSlide:
    """A slide ready for chat: its features (+ where they came from)."""

    slide_id: str
    sha256: str
    features: "object"  # slidechat.features.store.SlideFeatures
    h5_path: Path | None
    source_path: Path | None
    ood: Any = None  # slidechat.inference.ood.OODResult; None when the checkpoint has no feature statistics

    @property
    def ood_score(self) -> float | None:
        """How unlike the training slides this slide is (``ood.score``), or None."""
        return None if self.ood is None else float(self.ood.score)

    @property
    def num_patches(self) -> int:
        return int(self.features.features.shape[0])

    @property
    def patch_size_level0(self) -> float | None:
        v = self.features.attrs.get("patch_size_level0")
        return float(v) if v else None


def default_feature_cache() -> Path:
    return cache_root() / "features"


def encoder_cache_key(assistant) -> str:
    """Folder name identifying the patch encoder + extraction settings of ``assistant``."""
    ref = assistant.config.patch_encoder
    if ref is None:
        return "no-encoder"
    wpath = assistant.patch_encoder_weights_path()
    whash = sha256_file(wpath)[:12] if wpath is not None and wpath.exists() else "noweights"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", ref.name)
    return f"{name}-{whash}-mpp{ref.target_mpp:g}-ps{ref.patch_size}"


def load_patch_encoder(assistant, cache: InferenceCache | None = None):
    """The checkpoint's patch encoder (``slidechat.encoders.load_encoder``), loaded once into the inference cache."""
    model, cache = resolve(assistant, cache)
    ref = model.config.patch_encoder
    if ref is None:
        raise DataError("this checkpoint has no patch encoder; give a feature file (.h5/.csv) instead of a slide")

    def build():
        from slidechat.encoders import load_encoder

        wpath = model.patch_encoder_weights_path()
        return load_encoder(ref.name, weights=None if wpath is None else str(wpath), device=str(model.device))

    return cache.patch_encoder(build)


def encode_slide(assistant, path_or_h5, *, mpp: float | None = None, progress: Callable | None = None,
                 cache_dir: str | Path | None = None, cache: InferenceCache | None = None,
                 sha256: str | None = None) -> EncodedSlide:
    """Features for ``path_or_h5``: a ``.h5``/``.csv`` is loaded directly; a slide is tiled + encoded once.

    ``sha256``: the slide file's hash when the caller has it already (a slide is never hashed twice)."""
    from slidechat.features.store import load_features

    if isinstance(path_or_h5, EncodedSlide):
        return path_or_h5
    path = Path(path_or_h5).expanduser()
    if not path.is_file():
        raise SlideReadError(f"slide or feature file not found: {path}")
    if path.suffix.lower() in FEATURE_SUFFIXES:
        feats = load_features(path)
        sha = str(feats.attrs.get("slide_sha256") or sha256_file(path))
        return _with_ood(assistant, EncodedSlide(slide_id=feats.slide_id or path.stem, sha256=sha, features=feats,
                                                 h5_path=path if path.suffix.lower() != ".csv" else None,
                                                 source_path=path))
    sha = sha256 or sha256_file(path)
    out = Path(cache_dir).expanduser() if cache_dir else default_feature_cache()
    model, cache = resolve(assistant, cache)
    h5 = out / encoder_cache_key(model) / f"{sha}.h5"
    feats = None
    if h5.is_file():
        try:
            feats = load_features(h5)
        except DataError:
            log.warning("cached features %s are unreadable; re-extracting", h5)
    if feats is None:
        from slidechat.features.extract import extract_slide
        from slidechat.slide.config import ExtractionConfig

        ref = model.config.patch_encoder
        config = ExtractionConfig(target_mpp=ref.target_mpp, patch_size=ref.patch_size, mpp=mpp)
        extract_slide(path, load_patch_encoder(model, cache), h5, config, sha256=sha, progress=progress)
        feats = load_features(h5)
    return _with_ood(assistant, EncodedSlide(slide_id=path.stem, sha256=sha, features=feats, h5_path=h5,
                                             source_path=path))


def _with_ood(assistant, slide: EncodedSlide) -> EncodedSlide:
    """``slide`` with its out-of-distribution result, when the checkpoint has feature statistics."""
    from slidechat.inference.ood import ood_check

    slide.ood = ood_check(assistant, slide)
    return slide


def as_encoded_slide(assistant, slide, cache: InferenceCache | None = None) -> EncodedSlide:
    """Accept an EncodedSlide, a SlideFeatures, or a path."""
    if isinstance(slide, EncodedSlide):
        return slide
    if hasattr(slide, "features") and hasattr(slide, "coords"):
        sid = getattr(slide, "slide_id", "") or "slide"
        sha = str(getattr(slide, "attrs", {}).get("slide_sha256", ""))
        if not sha:  # features made in memory: identify them by content
            h = hashlib.sha256(np.ascontiguousarray(slide.features).tobytes())
            if slide.coords is not None:
                h.update(np.ascontiguousarray(slide.coords).tobytes())
            sha = "features-" + h.hexdigest()
        return _with_ood(assistant, EncodedSlide(slide_id=sid, sha256=sha, features=slide,
                                                 h5_path=getattr(slide, "path", None),
                                                 source_path=getattr(slide, "path", None)))
    return encode_slide(assistant, slide, cache=cache)
