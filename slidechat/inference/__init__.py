"""Inference: ``load``, ``encode_slide``, multi-turn ``Conversation`` (streaming + KV reuse), heatmaps, reports."""

from slidechat.inference.api import load
from slidechat.inference.conversation import Conversation
from slidechat.inference.encode import EncodedSlide
from slidechat.inference.heatmap import Heatmap
from slidechat.inference.report import Report

__all__ = ["load", "Conversation", "EncodedSlide", "Heatmap", "Report"]
