"""Everything the training loop needs from the model, through its public training hooks.

The model package (``slidechat.model``) owns the network; training only calls the contract in
docs/TEAM.md: ``tokenize_conversation``, ``forward(...)`` with ``.loss``, ``save_pretrained`` /
``from_pretrained``. Anything else training needs (which parameters to train, LoRA on a stage-1
checkpoint) lives here as functions taking the assistant.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from slidechat.errors import ConfigError
from training.recipe import StageRecipe

log = logging.getLogger("training")


def _model_config(recipe: StageRecipe):
    from slidechat.model.config import SlideAssistantConfig

    data = copy.deepcopy(recipe.model)
    llm = data.setdefault("llm", {})
    llm["mode"] = recipe.train.train_llm
    lora = recipe.train.lora
    llm.update({"lora_r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
                "lora_target_modules": list(lora.target_modules)})
    return SlideAssistantConfig.from_dict(data)


def build_model(recipe: StageRecipe):
    """A fresh assistant from ``recipe.model`` or the previous stage's checkpoint (``init_from``),
    with the LLM in the mode this stage trains it (frozen / lora / full)."""
    raise NotImplementedError


def configure_trainable(model, recipe: StageRecipe) -> None:
    """requires_grad only on the modules the recipe trains (+ the LLM's LoRA / all LLM weights)."""
    raise NotImplementedError


def llm_param_prefixes(model) -> list[str]:
    return ["llm."]


def enable_gradient_checkpointing(model) -> None:
    raise NotImplementedError


def tokenize(model, messages: list[dict[str, str]]) -> dict:
    return model.tokenize_conversation(messages)


def extra_slide_tokens(model) -> int:
    """How many positions the slide placeholder adds (K slide tokens - 1)."""
    raise NotImplementedError


def pad_token_id(model) -> int:
    raise NotImplementedError


def save_model(model, out_dir: Path, accelerator=None) -> None:
    model.save_pretrained(out_dir)
