"""Everything the training loop needs from the model, through its public API.

The model package (``slidechat.model``) owns the network; training uses its public API (``tokenize_conversation``,
``forward(...).loss``, ``encode_features``, ``projector.patch_relevance``, ``save_pretrained`` / ``from_pretrained``)
plus the config (``llm.mode`` frozen / lora / full). Which modules train is decided here, per recipe.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from slidechat.errors import ConfigError
from slidechat.training.recipe import StageRecipe

log = logging.getLogger("training")

TRAINABLE_MODULES = ("slide_encoder", "projector", "case_slide_embedding")
# LLMConfig options a stage may set on a previous stage's checkpoint (``init_from``): how the LLM trains
LLM_TRAINING_OPTIONS = ("mode", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
# SlideAssistantConfig options a stage may add to a previous stage's checkpoint (new parts, untrained at first)
ADDABLE_OPTIONS = ("case_slide_embeddings",)


def llm_mode(recipe: StageRecipe) -> str:
    """How this stage trains the LLM: ``model.llm.mode`` (frozen when the recipe does not say)."""
    return (recipe.model.get("llm") or {}).get("mode", "frozen")


def _llm_overrides(recipe: StageRecipe) -> dict:
    llm = recipe.model.get("llm") or {}
    return {**{k: llm[k] for k in LLM_TRAINING_OPTIONS if k in llm}, "mode": llm_mode(recipe),
            "gradient_checkpointing": recipe.train.gradient_checkpointing}


def build_model(recipe: StageRecipe, device: str | torch.device = "cpu"):
    """A fresh assistant from ``recipe.model`` or the previous stage's checkpoint (``init_from``), with the LLM in
    the mode this stage trains it (frozen / lora / full). Built on CPU; accelerate moves it to the device."""
    from slidechat.model.assistant import SlideAssistant
    from slidechat.model.config import SlideAssistantConfig

    overrides = _llm_overrides(recipe)
    if recipe.init_from:
        extra = sorted(set(recipe.model) - {"llm", *ADDABLE_OPTIONS}) + sorted(
            f"llm.{k}" for k in set(recipe.model.get("llm") or {}) - set(LLM_TRAINING_OPTIONS))
        if extra:
            raise ConfigError(f"recipe {recipe.name}: with init_from, model may only set llm.{{{', '.join(LLM_TRAINING_OPTIONS)}}}"
                              f" and add {', '.join(ADDABLE_OPTIONS)} (the architecture comes from the previous stage's"
                              f" checkpoint); remove model.{extra[0]}")
        path = Path(recipe.init_from)
        if (path / "adapter" / "adapter_config.json").is_file() and overrides["mode"] == "lora":
            overrides = {"mode": "lora", "gradient_checkpointing": overrides["gradient_checkpointing"]}
        model = SlideAssistant.from_pretrained(path, device=device, llm_overrides=overrides)
        add_parts(model, recipe)
        return model
    data = copy.deepcopy(recipe.model)
    data.setdefault("llm", {}).update(overrides)  # mode defaults to frozen; gradient checkpointing from train
    return SlideAssistant(SlideAssistantConfig.from_dict(data), device=device)


def add_parts(model, recipe: StageRecipe) -> None:
    """Add the parts ``recipe.model`` asks for that the previous stage's checkpoint lacks (a table of another size
    than the checkpoint's own is refused: the architecture comes from the checkpoint)."""
    n = recipe.model.get("case_slide_embeddings")
    if n is None or n == model.config.case_slide_embeddings:
        return
    if model.case_slide_embedding is not None:
        raise ConfigError(f"recipe {recipe.name}: the checkpoint {recipe.init_from} already has "
                          f"{model.config.case_slide_embeddings} case slide embeddings; remove "
                          "model.case_slide_embeddings (the architecture comes from the checkpoint)")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"recipe {recipe.name}: model.case_slide_embeddings must be an integer >= 1, got {n!r}")
    model.add_case_slide_embeddings(n)
    log.info("added %d case slide embeddings (zero: the checkpoint answers as before until they train)", n)


def configure_trainable(model, recipe: StageRecipe) -> None:
    """requires_grad on the recipe's ``train_modules``; the LLM per ``model.llm.mode`` (LoRA weights / all / none)."""
    wanted = set(recipe.train.train_modules)
    unknown = wanted - set(TRAINABLE_MODULES)
    if unknown:
        raise ConfigError(f"train.train_modules {sorted(unknown)}: choose from {list(TRAINABLE_MODULES)}")
    missing = [name for name in wanted if getattr(model, name) is None]
    if missing:
        raise ConfigError(f"recipe {recipe.name}: train_modules names {missing[0]} but the model has none "
                          "(set model.case_slide_embeddings)")
    for name in TRAINABLE_MODULES:
        module = getattr(model, name)
        if module is not None:
            module.requires_grad_(name in wanted)
    readout = getattr(model.projector, "patch_readout", None)
    if readout is not None:  # fit to the patches' measured classes: the language-model loss must not move it
        readout.requires_grad_(False)
    mode = llm_mode(recipe)
    for n, p in model.llm.named_parameters():
        p.requires_grad_(mode == "full" or (mode == "lora" and "lora_" in n))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"recipe {recipe.name}: nothing to train (train_modules empty and LLM frozen)")


def llm_param_prefixes(model) -> list[str]:
    """Parameters trained at the LLM's learning rate: the LLM's, and the case slide vectors, which live in the
    LLM's input-embedding space."""
    return ["llm.", "case_slide_embedding."]


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing in the LLM; inputs need grads so a frozen/LoRA LLM still backpropagates."""
    from slidechat.model.llm import base_model

    base = base_model(model.llm)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def tokenize(model, messages: list[dict[str, str]], num_slides: int = 1) -> dict:
    return model.tokenize_conversation(messages, num_slides=num_slides)


def extra_slide_tokens(model) -> int:
    """Positions the slide placeholder grows by: K - 1 for the Q-Former. The linear projector adds one token per
    patch (capped by ``linear.max_tokens``): counted as that cap, so ``max_length`` is an upper bound."""
    k = model.num_slide_tokens
    if k is None:
        cap = model.config.linear.max_tokens or 0
        return max(0, cap + model.config.encoder.num_output_slide_tokens - 1)
    return k - 1


def pad_token_id(model) -> int:
    tok = model.tokenizer
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pid if pid is not None else 0)


def save_model(model, out_dir: Path, accelerator=None) -> None:
    model.save_pretrained(out_dir)
