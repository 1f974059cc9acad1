"""SlideChat: the user-facing object returned by ``slidechat.load`` (model + processor + inference cache).

``SlideChat`` turns slide files into features (``encode_slide``), starts conversations (``chat``) and writes
reports (``report``). The model (``SlideAssistant``, an ``nn.Module``) stays a plain model; every other attribute
(``config``, ``llm``, ``tokenizer``, ``projector``, ``save_pretrained``, ...) is the model's, like peft's
``PeftModel`` forwards to its base model. One ``SlideChat`` can serve many threads (e.g. app sessions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from slidechat.inference.cache import InferenceCache, cache_for
from slidechat.inference.conversation import Conversation, prepare_slide
from slidechat.inference.encode import EncodedSlide, encode_slide
from slidechat.inference.report import Report, generate_report


class SlideChat:
    """``encode_slide`` / ``chat`` / ``report`` on one model, with one inference cache."""

    def __init__(self, model, cache: InferenceCache | None = None) -> None:
        if isinstance(model, SlideChat):
            model = model.model
        self.model = model
        self.processor = model.processor
        self.cache = cache or cache_for(model)

    def encode_slide(self, path_or_h5, *, mpp: float | None = None, progress: Callable | None = None,
                     cache_dir: str | Path | None = None, sha256: str | None = None) -> EncodedSlide:
        """Features of a slide file (tiled + encoded once, cached by sha256) or a ``.h5`` / SlideChat ``.csv``."""
        return encode_slide(self.model, path_or_h5, mpp=mpp, progress=progress, cache_dir=cache_dir, cache=self.cache,
                            sha256=sha256)

    def chat(self, slide, **kwargs) -> Conversation:
        """A multi-turn ``Conversation`` about ``slide`` (an EncodedSlide, SlideFeatures, or a path), or about a
        case: a list of slides or a ``Case`` (``labels=[...]`` names its slides)."""
        return Conversation(self.model, slide, cache=self.cache, **kwargs)

    def report(self, slide, **kwargs) -> Report:
        """A structured report (``.fields``, ``.text``, ``.evidence``, ``.to_markdown()``) from targeted questions,
        about one slide or a case."""
        return generate_report(self.model, slide, cache=self.cache, **kwargs)

    def prepare(self, slide):
        """The slide encoder + projector state of ``slide`` (cached)."""
        return prepare_slide(self.model, slide, self.cache)

    def __call__(self, *args, **kwargs):
        """The model's forward."""
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "processor", "cache"):  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"SlideChat({type(self.model).__name__}, projector={self.model.config.projector!r})"


__all__ = ["SlideChat"]
