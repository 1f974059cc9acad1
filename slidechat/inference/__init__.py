"""Inference: ``load`` -> ``SlideChat`` (``encode_slide``, multi-turn ``Conversation`` with streaming + KV reuse,
heatmaps, evidence, region questions, reports) over a ``SlideAssistant`` and an ``InferenceCache``."""

from slidechat.inference.api import load
from slidechat.inference.cache import InferenceCache
from slidechat.inference.conversation import Conversation
from slidechat.inference.encode import EncodedSlide
from slidechat.inference.heatmap import Heatmap
from slidechat.inference.pipeline import SlideChat
from slidechat.inference.report import Report

__all__ = ["load", "SlideChat", "Conversation", "EncodedSlide", "Heatmap", "Report", "InferenceCache"]
