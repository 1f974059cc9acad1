"""The training loop (one stage) on `accelerate`: grad accumulation, mixed precision, checkpoints, exact resume.

    metrics = train_stage(recipe, resume=True)

Runs unchanged on CPU (fp32), one GPU (bf16/fp16), or many GPUs/nodes under ``accelerate launch`` with the
DeepSpeed / FSDP configs in ``training/configs/``. Batches are sharded by :class:`LengthGroupedBatchSampler`
itself (each rank takes every world_size-th batch), so the data order — and therefore a resume — is exact.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidechat.errors import ConfigError, DataError
from slidechat.utils.io import write_json_atomic
from slidechat.training import model_hooks
from slidechat.training.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from slidechat.training.forward import fast_forward
from slidechat.training.grounding import forward_with_grounding
from slidechat.training.data import Collator, FeatureResolver, SkipCounter, SlideConversationDataset, load_samples
from slidechat.training.logger import TrainLogger
from slidechat.training.recipe import StageRecipe, recipe_to_dict
from slidechat.training.sampler import LengthGroupedBatchSampler

log = logging.getLogger("training")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_mixed_precision(value: str) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp16 on other GPUs, ``no`` (fp32) on CPU."""
    if value != "auto":
        if value not in ("no", "fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision {value!r}: use auto, no, fp16 or bf16")
        if value != "no" and not torch.cuda.is_available():
            log.warning("mixed precision %s needs a GPU; training in fp32 on CPU", value)
            return "no"
        return value
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _reset_accelerate_state() -> None:
    """Forget the process-wide accelerate singletons so several stages can run in one process (pipeline, tests).

    Not under ``accelerate launch`` with several processes: there the launcher's state is the one to keep.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


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
        samples, lambda msgs: model_hooks.tokenize(model, msgs), FeatureResolver(cfg.features_dir),
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


def _to_device(batch: dict, device: torch.device, with_targets: bool = False) -> dict:
    out = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "labels": batch["labels"].to(device),
        "slide_features": [f.to(device) for f in batch["slide_features"]],
        "slide_coords": [c.to(device) if c is not None else None for c in batch["slide_coords"]],
    }
    if with_targets:
        out["patch_targets"] = [t.to(device) if t is not None else None for t in batch.get("patch_targets", [])]
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


def train_stage(recipe: StageRecipe, *, resume: bool = False, stop_after: int | None = None,
                accelerator=None) -> dict[str, Any]:
    """Train one stage; writes checkpoints, ``log.csv``, ``final/`` (the model) and ``metrics.json``.

    ``stop_after`` ends the run after that many optimizer steps as if it were interrupted (tests, smoke runs).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from transformers import get_scheduler

    cfg = recipe.train
    out_dir = Path(recipe.output_dir)
    if cfg.threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.threads)
    if accelerator is None:
        _reset_accelerate_state()
        accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                  mixed_precision=resolve_mixed_precision(cfg.mixed_precision))
    sharded = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    is_main = accelerator.is_main_process
    if recipe.stage == 0:
        from slidechat.training.contrastive import train_contrastive_stage

        return train_contrastive_stage(recipe, resume=resume, stop_after=stop_after, accelerator=accelerator)

    seed_everything(cfg.seed)
    model = model_hooks.build_model(recipe)
    model_hooks.configure_trainable(model, recipe)
    if cfg.gradient_checkpointing:
        model_hooks.enable_gradient_checkpointing(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())

    skips = SkipCounter()
    dataset = build_dataset(recipe, model, skips)
    if is_main:
        log.info("[%s] %d training samples; %s; trainable params %.2fM of %.1fM", recipe.name, len(dataset),
                 skips.summary(), n_train / 1e6, n_total / 1e6)
    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.batch_size, seed=cfg.seed,
                                        group_by_length=cfg.group_by_length, rank=accelerator.process_index,
                                        world_size=accelerator.num_processes)
    batches_per_epoch = len(sampler)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    collator = Collator(model_hooks.pad_token_id(model))

    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # we shard batches ourselves (exact resume), so DeepSpeed cannot infer "auto" from a prepared loader
        ds_cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_cfg.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            ds_cfg["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    step, epoch, consumed, tokens_seen, samples_seen, elapsed_before = 0, 0, 0, 0, 0, 0.0
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None and is_main:
        log.info("[%s] --resume: no checkpoint in %s, starting from the beginning", recipe.name, out_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model=unwrapped, optimizer=optimizer, scheduler=scheduler,
                                accelerator=accelerator, use_accelerate_state=sharded)
        step, epoch, consumed = state["step"], state["epoch"], state["batches_done"]
        tokens_seen, samples_seen = state.get("tokens_seen", 0), state.get("samples_seen", 0)
        elapsed_before = state.get("elapsed_s", 0.0)
        if is_main:
            log.info("[%s] resumed from %s (step %d, epoch %d, batch %d)", recipe.name, ckpt, step, epoch, consumed)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "recipe.json", recipe_to_dict(recipe))
    logger = TrainLogger(out_dir, enabled=is_main, resume_step=step if ckpt is not None else None)

    t0 = time.perf_counter()
    window_loss, window_n, window_tokens, window_t = 0.0, 0, 0, time.perf_counter()
    last_loss = float("nan")
    first_losses: list[float] = []
    grad_norm = None
    slide_tokens = model_hooks.extra_slide_tokens(unwrapped) + 1

    def make_state() -> dict:
        return {"step": step, "epoch": epoch, "batches_done": consumed, "tokens_seen": tokens_seen,
                "samples_seen": samples_seen, "elapsed_s": elapsed_before + time.perf_counter() - t0,
                "skipped": skips.as_dict(), "recipe": recipe.name}

    grounding = cfg.grounding_weight > 0 and recipe.data.grounding_dir is not None
    if grounding and unwrapped.num_slide_tokens is None:
        log.warning("[%s] grounding loss needs the Q-Former projector; ignored", recipe.name)
        grounding = False
    fast = cfg.fast_forward and accelerator.num_processes == 1 and not sharded
    loss_before = None
    if cfg.eval_batches and ckpt is None:
        loss_before = fixed_batches_loss(model, dataset, collator, cfg.eval_batches, cfg.batch_size, accelerator.device)
    model.train()
    done = step >= total_steps
    while not done:
        sampler.set_epoch(epoch)
        sampler.batches_done = consumed
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                             num_workers=cfg.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for batch in loader:
            consumed += 1
            if batch is None:
                continue
            with accelerator.accumulate(model):
                if fast:
                    out = fast_forward(model, _to_device(batch, accelerator.device, grounding),
                                       cfg.grounding_weight if grounding else 0.0, cfg.grounding_target)
                elif grounding:
                    out = forward_with_grounding(model, _to_device(batch, accelerator.device, True),
                                                 cfg.grounding_weight, cfg.grounding_target)
                else:
                    out = model(**_to_device(batch, accelerator.device))
                loss = out.loss
                if not torch.isfinite(loss):
                    raise DataError(f"non-finite loss at step {step} (batch {batch['ids'][:3]}); lower train.lr")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            n_tok = int(batch["attention_mask"].sum()) + slide_tokens * len(batch["ids"])
            tokens_seen += n_tok
            samples_seen += len(batch["ids"])
            window_tokens += n_tok
            window_loss += float(loss.detach())
            window_n += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            last_loss = window_loss / max(1, window_n)
            if len(first_losses) < 5:
                first_losses.append(last_loss)
            if step % cfg.log_every == 0 or step == total_steps or step == 1:
                now = time.perf_counter()
                logger.log({"step": step, "epoch": round(epoch + consumed / max(1, batches_per_epoch), 4),
                            "loss": round(last_loss, 5), "lr": scheduler.get_last_lr()[0],
                            "tokens_per_s": round(window_tokens * accelerator.num_processes / max(1e-9, now - window_t), 1),
                            "samples": samples_seen, "tokens": tokens_seen,
                            "elapsed_s": round(elapsed_before + now - t0, 1),
                            "grad_norm": None if grad_norm is None else round(float(grad_norm), 4)})
                window_tokens, window_t = 0, now
            window_loss, window_n = 0.0, 0
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                accelerator.wait_for_everyone()
                if is_main or sharded:
                    save_checkpoint(out_dir / "checkpoints" / f"step-{step:06d}", model=unwrapped,
                                    optimizer=optimizer, scheduler=scheduler, state=make_state(),
                                    accelerator=accelerator, use_accelerate_state=sharded)
                    if is_main:
                        prune_checkpoints(out_dir, cfg.keep_last)
            if step >= total_steps or (stop_after is not None and step >= stop_after):
                done = True
                break
        else:
            epoch += 1
            consumed = 0
        if stop_after is not None and step >= stop_after:
            break

    interrupted = step < total_steps
    accelerator.wait_for_everyone()
    loss_after = None
    if cfg.eval_batches and not interrupted:
        loss_after = fixed_batches_loss(model, dataset, collator, cfg.eval_batches, cfg.batch_size, accelerator.device)
    metrics = {
        "recipe": recipe.name, "stage": recipe.stage, "steps": step, "total_steps": total_steps,
        "epochs": round(step / steps_per_epoch, 3), "train_samples": len(dataset),
        "first_loss": first_losses[0] if first_losses else None,
        "final_loss": last_loss, "fixed_batches_loss_before": loss_before, "fixed_batches_loss_after": loss_after,
        "samples_seen": samples_seen, "tokens_seen": tokens_seen,
        "wall_time_s": round(elapsed_before + time.perf_counter() - t0, 1),
        "tokens_per_s": round(tokens_seen / max(1e-9, elapsed_before + time.perf_counter() - t0), 1),
        "skipped": skips.as_dict(), "trainable_params": n_train, "total_params": n_total,
        "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes,
        "interrupted": interrupted,
    }
    if interrupted:
        if is_main or sharded:
            save_checkpoint(out_dir / "checkpoints" / f"step-{step:06d}", model=unwrapped, optimizer=optimizer,
                            scheduler=scheduler, state=make_state(), accelerator=accelerator,
                            use_accelerate_state=sharded)
    elif is_main:
        model_hooks.save_model(unwrapped, out_dir / "final", accelerator=accelerator)
        write_json_atomic(out_dir / "metrics.json", metrics)
        log.info("[%s] done: %d steps, loss %.4f -> %.4f, %s; model in %s", recipe.name, step,
                 metrics["first_loss"] or float("nan"), last_loss, skips.summary(), out_dir / "final")
    logger.close()
    metrics["model"] = unwrapped
    return metrics
