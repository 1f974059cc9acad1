"""The model: HierarchicalSlideEncoder -> QFormerProjector (or linear baseline) -> causal LM (SlideAssistant)."""

from slidechat.model.assistant import IGNORE_INDEX, SLIDE_TOKEN_ID, SlideAssistant, normalise_messages
from slidechat.model.config import (LinearProjectorConfig, LLMConfig, PatchEncoderRef, QFormerConfig,
                                    SlideAssistantConfig, SlideEncoderConfig)
from slidechat.model.qformer import LinearProjector, QFormerProjector
from slidechat.model.slide_encoder import HierarchicalSlideEncoder, SlideEncoderOutput, collate_levels

__all__ = [
    "SlideAssistant", "SlideAssistantConfig", "SlideEncoderConfig", "QFormerConfig", "LinearProjectorConfig",
    "LLMConfig", "PatchEncoderRef", "HierarchicalSlideEncoder", "SlideEncoderOutput", "QFormerProjector",
    "LinearProjector", "collate_levels", "normalise_messages", "SLIDE_TOKEN_ID", "IGNORE_INDEX",
]
