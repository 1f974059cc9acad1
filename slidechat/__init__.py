"""slidechat: a conversational vision-language assistant for pathology whole-slide images.

Public API (see README):

    import slidechat
    assistant = slidechat.load("demo")          # or a checkpoint folder
    slide = assistant.encode_slide("case.svs")
    conv = assistant.chat(slide)
    for text in conv.ask("Which tissue types are present?", stream=True): ...
"""

from __future__ import annotations

from slidechat.errors import SlideChatError

__version__ = "0.1.0"
__all__ = ["load", "SlideChatError", "__version__"]


def load(name_or_path: str = "demo", **kwargs):
    """Load a SlideAssistant: ``"demo"`` for the embedded checkpoint, or a checkpoint folder."""
    from slidechat.inference.api import load as _load

    return _load(name_or_path, **kwargs)
