"""The model: HierarchicalSlideEncoder -> a registered projector (Q-Former, linear) -> causal LM (SlideAssistant)."""

from slidechat.model.assistant import SlideAssistant
from slidechat.model.config import (LinearProjectorConfig, LLMConfig, PatchEncoderRef, QFormerConfig,
                                    SlideAssistantConfig, SlideEncoderConfig)
from slidechat.model.linear_projector import LinearProjector
from slidechat.model.llm import base_model
from slidechat.model.processor import IGNORE_INDEX, SLIDE_TOKEN_ID, SlideChatProcessor, normalise_messages
from slidechat.model.projector import (ProjectorOutput, SlideProjector, create_projector, list_projectors,
                                       register_projector)
from slidechat.model.qformer import QFormerProjector
from slidechat.model.slide_encoder import HierarchicalSlideEncoder, SlideEncoderOutput, collate_levels

__all__ = [
    "SlideAssistant", "SlideAssistantConfig", "SlideEncoderConfig", "QFormerConfig", "LinearProjectorConfig",
    "LLMConfig", "PatchEncoderRef", "HierarchicalSlideEncoder", "SlideEncoderOutput", "QFormerProjector",
    "LinearProjector", "SlideProjector", "ProjectorOutput", "register_projector", "create_projector",
    "list_projectors", "SlideChatProcessor", "collate_levels", "normalise_messages", "base_model",
    "SLIDE_TOKEN_ID", "IGNORE_INDEX",
]
