"""InferenceCache: what inference keeps between calls for one model, outside the model itself.

- slide states (slide encoder + projector output per slide, keyed by the slide's sha256 and the weights' version;
  the last ``max_slides``);
- the checkpoint's patch encoder (loaded once);
- an eager-attention view of the LLM (``slidechat.model.llm.eager_attention_view``) for attention maps.

Thread-safe: one cache serves every session of an app. ``SlideChat`` holds one; functions given a bare
``SlideAssistant`` use ``cache_for(model)`` (one per model object, dropped with it).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable

from torch import nn

from slidechat.model.llm import eager_attention_view


class InferenceCache:
    """Slide states (LRU), the patch encoder and the LLM's eager-attention view of one model."""

    def __init__(self, max_slides: int = 8) -> None:
        self.max_slides = max_slides
        self._lock = threading.Lock()
        self._slides: OrderedDict[Hashable, Any] = OrderedDict()
        self._patch_encoder: Any = None
        self._attention_view: tuple[int, nn.Module] | None = None

    def slide_state(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The state cached under ``key``, or ``build()`` (run outside the lock) stored as the newest entry."""
        with self._lock:
            if key in self._slides:
                self._slides.move_to_end(key)
                return self._slides[key]
        state = build()
        with self._lock:
            self._slides[key] = state
            while len(self._slides) > self.max_slides:
                self._slides.popitem(last=False)
        return state

    def patch_encoder(self, build: Callable[[], Any]) -> Any:
        with self._lock:
            if self._patch_encoder is None:
                self._patch_encoder = build()
            return self._patch_encoder

    def attention_view(self, llm: nn.Module) -> nn.Module:
        """``llm`` computing attention eagerly, sharing its weights (built once per LLM object)."""
        with self._lock:
            if self._attention_view is None or self._attention_view[0] != id(llm):
                self._attention_view = (id(llm), eager_attention_view(llm))
            return self._attention_view[1]

    def clear(self) -> None:
        with self._lock:
            self._slides.clear()
            self._patch_encoder = None
            self._attention_view = None

    def __len__(self) -> int:
        return len(self._slides)


_CACHES: "weakref.WeakKeyDictionary[nn.Module, InferenceCache]" = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def cache_for(model: nn.Module) -> InferenceCache:
    """The inference cache of ``model`` (created on first use; lives as long as the model object)."""
    with _CACHES_LOCK:
        cache = _CACHES.get(model)
        if cache is None:
            cache = _CACHES[model] = InferenceCache()
        return cache


def resolve(assistant, cache: InferenceCache | None = None):
    """``(model, cache)`` from a ``SlideChat`` or a bare ``SlideAssistant``."""
    if isinstance(assistant, nn.Module):
        return assistant, cache or cache_for(assistant)
    return assistant.model, cache or assistant.cache


__all__ = ["InferenceCache", "cache_for", "resolve"]
