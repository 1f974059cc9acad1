"""Stages 1 and 2 (alignment, instruction tuning): the LLM loss on slide conversations, run by the one trainer.

    metrics = train_stage(recipe, resume=True)      # any stage recipe (stage 0 goes to training.contrastive)

Batches are sharded by :class:`LengthGroupedBatchSampler` itself (each rank takes every world_size-th batch), so
the data order — and therefore a resume — is exact.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from slidechat.errors import ConfigError, DataError
from slidechat.training import model_hooks
from slidechat.training.checkpoint import write_feature_stats
from slidechat.training.data import Collator, FeatureResolver, SkipCounter, SlideConversationDataset, load_samples
from slidechat.training.forward import fast_forward
from slidechat.training.grounding import forward_with_grounding, has_own_relevance
from slidechat.training.recipe import StageRecipe, recipe_to_dict
from slidechat.training.sampler import LengthGroupedBatchSampler
from slidechat.training.trainer import StepOutput, Stage, Trainer, TrainContext, TrainerSettings

log = logging.getLogger("training")


def build_dataset(recipe: StageRecipe, model, skips: SkipCounter) -> SlideConversationDataset:
    """Samples from every source of the recipe, tokenized by the model; bad ones counted in ``skips``."""
    cfg = recipe.data
    if not cfg.sources:
        raise ConfigError(f"recipe {recipe.name}: data.sources is empty")
    if not cfg.features_dir:
        raise ConfigError(f"recipe {recipe.name}: data.features_dir is not set")
    samples = []
    for src in cfg.sources:
        loaded = load_samples(src.path, src.kind, skips, require_image_tag=cfg.require_image_tag,
                              multi_turn=cfg.multi_turn)
        samples.extend(loaded * src.repeat)
    dataset = SlideConversationDataset(
        samples, lambda msgs, num_slides=1: model_hooks.tokenize(model, msgs, num_slides),
        FeatureResolver(cfg.features_dir),
        max_length=cfg.max_length, extra_tokens=model_hooks.extra_slide_tokens(model),
        max_patches=cfg.max_patches, seed=recipe.train.seed, skips=skips, grounding_dir=cfg.grounding_dir)
    if len(dataset) == 0:
        raise DataError(f"recipe {recipe.name}: no usable training samples ({skips.summary()})")
    return dataset


def _param_groups(model, cfg) -> list[dict]:
    llm_names = model_hooks.llm_param_prefixes(model)
    groups: dict[str, list] = {"other": [], "llm": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(name.startswith(pfx) for pfx in llm_names):
            groups["llm"].append(p)
        elif p.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["other"].append(p)
    lr_llm = cfg.lr_llm if cfg.lr_llm is not None else cfg.lr
    out = [
        {"params": groups["other"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": groups["no_decay"], "lr": cfg.lr, "weight_decay": 0.0},
        {"params": groups["llm"], "lr": lr_llm, "weight_decay": cfg.weight_decay},
    ]
    return [g for g in out if g["params"]]


def _move(x, device: torch.device):
    """A tensor, None, or a case's list of them, on ``device``."""
    if isinstance(x, (list, tuple)):
        return [_move(t, device) for t in x]
    return None if x is None else x.to(device)


def _to_device(batch: dict, device: torch.device, with_targets: bool = False) -> dict:
    out = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "labels": batch["labels"].to(device),
        "slide_features": [_move(f, device) for f in batch["slide_features"]],
        "slide_coords": [_move(c, device) for c in batch["slide_coords"]],
    }
    if with_targets:
        out["patch_targets"] = [_move(t, device) for t in batch.get("patch_targets", [])]
    return out


@torch.no_grad()
def fixed_batches_loss(model, dataset, collator, n_batches: int, batch_size: int, device) -> float:
    """Mean loss over the first ``n_batches`` batches of the dataset in index order (a fixed yardstick)."""
    was_training = model.training
    model.eval()
    losses = []
    for b in range(n_batches):
        idx = list(range(b * batch_size, min(len(dataset), (b + 1) * batch_size)))
        if not idx:
            break
        batch = collator([dataset[i] for i in idx])
        if batch is not None:
            losses.append(float(model(**_to_device(batch, device)).loss))
    model.train(was_training)
    return float(np.mean(losses)) if losses else float("nan")


class LMStage(Stage):
    """Stage 1/2: next-token loss on the assistant's answers (plus the optional grounding loss)."""

    def __init__(self, recipe: StageRecipe) -> None:
        self.recipe = recipe
        self.name = recipe.name
        self.stage_id = recipe.stage
        self.skips = SkipCounter()

    def build(self, ctx: TrainContext):
        recipe, cfg = self.recipe, self.recipe.train
        model = model_hooks.build_model(recipe)
        model_hooks.configure_trainable(model, recipe)
        if cfg.gradient_checkpointing:
            model_hooks.enable_gradient_checkpointing(model)
        self.dataset = build_dataset(recipe, model, self.skips)
        if ctx.is_main:
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            log.info("[%s] %d training samples; %s; trainable params %.2fM of %.1fM", recipe.name, len(self.dataset),
                     self.skips.summary(), n_train / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)
        self.sampler = LengthGroupedBatchSampler(self.dataset.lengths, cfg.batch_size, seed=cfg.seed,
                                                 group_by_length=cfg.group_by_length,
                                                 rank=ctx.accelerator.process_index,
                                                 world_size=ctx.accelerator.num_processes)
        self.collator = Collator(model_hooks.pad_token_id(model))
        self.slide_tokens = model_hooks.extra_slide_tokens(model) + 1
        self.grounding = cfg.grounding_weight > 0 and recipe.data.grounding_dir is not None
        if self.grounding and not has_own_relevance(model):
            log.warning("[%s] grounding loss needs a projector with its own relevance (qformer); ignored", recipe.name)
            self.grounding = False
        self.fast = cfg.fast_forward and ctx.accelerator.num_processes == 1 and not ctx.sharded
        return model

    def param_groups(self, module, settings: TrainerSettings) -> list[dict]:
        return _param_groups(module, self.recipe.train)

    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def epoch_batches(self, epoch: int, start: int, ctx: TrainContext):
        self.sampler.set_epoch(epoch)
        self.sampler.batches_done = start
        self.dataset.set_epoch(epoch)
        cfg = self.recipe.train
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collator,
                                           num_workers=cfg.num_workers,
                                           generator=torch.Generator().manual_seed(cfg.seed + epoch))

    def loss(self, module, batch, ctx: TrainContext) -> StepOutput:
        cfg = self.recipe.train
        inputs = _to_device(batch, ctx.device, self.grounding)
        if self.fast:
            out = fast_forward(module, inputs, cfg.grounding_weight if self.grounding else 0.0, cfg.grounding_target)
        elif self.grounding:
            out = forward_with_grounding(module, inputs, cfg.grounding_weight, cfg.grounding_target)
        else:
            out = module(**inputs)
        n = len(batch["ids"])
        return StepOutput(out.loss, n, int(batch["attention_mask"].sum()) + self.slide_tokens * n)

    def _fixed_loss(self, module, ctx: TrainContext) -> float:
        cfg = self.recipe.train
        return fixed_batches_loss(module, self.dataset, self.collator, cfg.eval_batches, cfg.batch_size, ctx.device)

    def metrics_before(self, module, ctx: TrainContext, resumed: bool) -> dict:
        use = self.recipe.train.eval_batches and not resumed
        return {"fixed_batches_loss_before": self._fixed_loss(module, ctx) if use else None}

    def metrics_after(self, module, ctx: TrainContext, interrupted: bool) -> dict:
        use = self.recipe.train.eval_batches and not interrupted
        return {"fixed_batches_loss_after": self._fixed_loss(module, ctx) if use else None,
                "train_samples": len(self.dataset), "skipped": self.skips.as_dict()}

    def save_final(self, module, ctx: TrainContext) -> None:
        model_hooks.save_model(module, ctx.output_dir / "final", accelerator=ctx.accelerator)
        write_feature_stats(ctx.output_dir / "final", self.recipe.data.features_dir)  # for the OOD warning
        log.info("[%s] %s; model in %s", self.name, self.skips.summary(), ctx.output_dir / "final")

    def state_dict(self) -> dict:
        return {"skipped": self.skips.as_dict()}


def train_stage(recipe: StageRecipe, *, resume: bool = False, stop_after: int | None = None,
                accelerator=None) -> dict[str, Any]:
    """Train one stage recipe; writes checkpoints, ``log.csv``, ``final/`` (the model) and ``metrics.json``.

    ``stop_after`` ends the run after that many optimizer steps as if it were interrupted (tests, smoke runs).
    """
    if recipe.stage == 0:
        from slidechat.training.contrastive import ContrastiveStage

        stage: Stage = ContrastiveStage(recipe)
    else:
        stage = LMStage(recipe)
    trainer = Trainer(stage, TrainerSettings.from_config(recipe.train), recipe.output_dir, resume=resume,
                      stop_after=stop_after, accelerator=accelerator, run_config=recipe_to_dict(recipe))
    return trainer.fit()
