"""The one trainer of every stage: accelerate set-up, seeding, optimiser and schedule, checkpoint/resume, logging.

    metrics = Trainer(stage, settings, output_dir, resume=True).fit()

A :class:`Stage` supplies what differs between stages: the module to train, its parameter groups, the batches of
each epoch (in a fixed order, so a resume is exact), the loss of one batch, what to measure and what to save at
the end. Stages: ``training.lm_stage.LMStage`` (stages 1/2), ``training.contrastive.ContrastiveStage`` (stage 0),
``training.slide_pretrain.SlidePretrainStage`` and ``training.patch_cnn.PatchCNNStage``.

Runs unchanged on CPU (fp32), one GPU (bf16/fp16), or many GPUs/nodes under ``accelerate launch`` with the
DeepSpeed / FSDP configs in ``training/configs/``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from slidechat.errors import ConfigError, DataError
from slidechat.training.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from slidechat.training.logger import TrainLogger
from slidechat.utils.io import write_json_atomic

log = logging.getLogger("training")

SCHEDULERS_OWN = ("one_cycle",)  # besides every transformers ``get_scheduler`` name


@dataclass
class TrainerSettings:
    """What the trainer itself reads (a stage recipe's ``train`` section carries the same names)."""

    epochs: float = 1.0
    max_steps: int | None = None            # optimizer steps; overrides epochs when set
    batch_size: int = 4                     # per device
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03              # one_cycle: the rising fraction (pct_start)
    scheduler: str = "cosine"               # a transformers get_scheduler name, or one_cycle
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str = "auto"           # auto: bf16 on GPUs that support it, else fp16 on GPU, no on CPU
    save_every: int = 0                     # optimizer steps; 0 = only at the end (and when interrupted)
    keep_last: int = 2
    log_every: int = 10
    threads: int | None = None              # torch.set_num_threads on CPU

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "TrainerSettings":
        """The trainer's fields picked from any config object with (some of) the same attribute names."""
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)}
        return cls(**{**values, **overrides})


@dataclass
class StepOutput:
    """The loss of one batch and how much data it covered (for throughput and the log)."""

    loss: torch.Tensor
    samples: int
    tokens: int = 0


@dataclass
class TrainContext:
    """What a stage may read while training: the accelerator, the device and the run's folder."""

    accelerator: Any
    output_dir: Path
    settings: TrainerSettings
    sharded: bool = False
    unwrapped: nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


class Stage:
    """One stage's loss and data. Override ``build``, ``batches_per_epoch``, ``epoch_batches`` and ``loss``."""

    name: str = "stage"
    stage_id: int | str = "stage"

    def build(self, ctx: TrainContext) -> nn.Module:
        """The module to train (requires_grad set); everything trainable in it is optimised and checkpointed."""
        raise NotImplementedError

    def param_groups(self, module: nn.Module, settings: TrainerSettings) -> list[dict]:
        params = [p for p in module.parameters() if p.requires_grad]
        return [{"params": params, "lr": settings.lr, "weight_decay": settings.weight_decay}]

    def clip_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters whose gradient norm ``max_grad_norm`` caps (their order fixes the float summation)."""
        return [p for p in module.parameters() if p.requires_grad]

    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def epoch_batches(self, epoch: int, start: int, ctx: TrainContext) -> Iterable:
        """The batches of ``epoch`` from batch ``start`` on, in an order fixed by (seed, epoch); None = skip."""
        raise NotImplementedError

    def loss(self, module: nn.Module, batch: Any, ctx: TrainContext) -> StepOutput:
        raise NotImplementedError

    def metrics_before(self, module: nn.Module, ctx: TrainContext, resumed: bool) -> dict:
        return {}

    def on_epoch_end(self, module: nn.Module, epoch: int, mean_loss: float, ctx: TrainContext) -> None:
        """After each full epoch (e.g. a held-out score in the log)."""

    def metrics_after(self, module: nn.Module, ctx: TrainContext, interrupted: bool) -> dict:
        return {}

    def save_final(self, module: nn.Module, ctx: TrainContext) -> None:
        """Write the trained model (main process only)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON state the stage needs for an exact resume (e.g. an augmentation generator)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""

    def result(self, module: nn.Module) -> Any:
        """The trained object handed back to Python callers as ``metrics["model"]``."""
        return module


class GeneratorStage(Stage):
    """A stage that draws from its own ``torch.Generator`` (``self.gen``: augmentation, sampling); the generator's
    state goes into every checkpoint so a resumed run draws the same numbers."""

    gen: torch.Generator

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.gen.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def epoch_order(seed: int, n_items: int, train_idx: np.ndarray, epoch: int) -> np.ndarray:
    """``train_idx`` in the order of epoch ``epoch``: one generator's permutation stream (its first draw is over all
    ``n_items``), replayed from the start so a resumed run sees the same order."""
    rng = np.random.default_rng(seed)
    rng.permutation(n_items)
    for _ in range(epoch):
        rng.permutation(len(train_idx))
    return train_idx[rng.permutation(len(train_idx))]


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


def make_accelerator(settings: TrainerSettings):
    from accelerate import Accelerator

    _reset_accelerate_state()
    return Accelerator(gradient_accumulation_steps=settings.grad_accum,
                       mixed_precision=resolve_mixed_precision(settings.mixed_precision))


def make_scheduler(optimizer, settings: TrainerSettings, total_steps: int):
    warmup = int(settings.warmup_ratio * total_steps)
    if settings.scheduler == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=max(1, total_steps), pct_start=settings.warmup_ratio)
    from transformers import get_scheduler

    try:
        return get_scheduler(settings.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    except ValueError as exc:
        raise ConfigError(f"train.scheduler {settings.scheduler!r}: {exc}") from exc


@dataclass
class _Progress:
    """Counters saved in every checkpoint (``trainer_state.json``)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    elapsed_s: float = 0.0


class Trainer:
    """Runs one :class:`Stage` to the end (or to ``stop_after`` steps, leaving a checkpoint to resume from)."""

    def __init__(self, stage: Stage, settings: TrainerSettings, output_dir: str | Path, *, resume: bool = False,
                 stop_after: int | None = None, accelerator=None, run_config: dict | None = None) -> None:
        self.stage = stage
        self.settings = settings
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.stop_after = stop_after
        self.accelerator = accelerator
        self.run_config = run_config  # written as recipe.json next to the run

    # ------------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        from accelerate.utils import DistributedType

        s = self.settings
        if s.threads and not torch.cuda.is_available():
            torch.set_num_threads(s.threads)
        acc = self.accelerator or make_accelerator(s)
        self.accelerator = acc
        sharded = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        self.ctx = TrainContext(acc, self.output_dir, s, sharded=sharded)
        seed_everything(s.seed)
        module = self.stage.build(self.ctx)
        self.n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.n_total = sum(p.numel() for p in module.parameters())
        if self.n_train == 0:
            raise ConfigError(f"{self.stage.name}: nothing to train")
        self.batches_per_epoch = max(1, self.stage.batches_per_epoch())
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / s.grad_accum))
        self.total_steps = s.max_steps or max(1, math.ceil(s.epochs * self.steps_per_epoch))
        self.optimizer = torch.optim.AdamW(self.stage.param_groups(module, s), lr=s.lr, betas=(0.9, 0.999))
        self.scheduler = make_scheduler(self.optimizer, s, self.total_steps)
        if acc.distributed_type == DistributedType.DEEPSPEED:
            # batches are sharded by the stage (exact resume), so DeepSpeed cannot infer "auto" from a loader
            ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
            if ds_cfg.get("train_micro_batch_size_per_gpu") in (None, "auto"):
                ds_cfg["train_micro_batch_size_per_gpu"] = s.batch_size
        self.module, self.optimizer = acc.prepare(module, self.optimizer)
        self.unwrapped = acc.unwrap_model(self.module)
        self.ctx.unwrapped = self.unwrapped

    def _restore(self) -> bool:
        self.progress = _Progress()
        ckpt = latest_checkpoint(self.output_dir) if self.resume else None
        if self.resume and ckpt is None and self.ctx.is_main:
            log.info("[%s] --resume: no checkpoint in %s, starting from the beginning", self.stage.name, self.output_dir)
        if ckpt is None:
            return False
        state = load_checkpoint(ckpt, model=self.unwrapped, optimizer=self.optimizer, scheduler=self.scheduler,
                                accelerator=self.accelerator, use_accelerate_state=self.ctx.sharded)
        p = self.progress
        p.step, p.epoch, p.batches_done = state["step"], state["epoch"], state["batches_done"]
        p.tokens_seen, p.samples_seen = state.get("tokens_seen", 0), state.get("samples_seen", 0)
        p.elapsed_s = state.get("elapsed_s", 0.0)
        self.stage.load_state_dict(state.get("stage_state", {}))
        if self.ctx.is_main:
            log.info("[%s] resumed from %s (step %d, epoch %d, batch %d)", self.stage.name, ckpt, p.step, p.epoch,
                     p.batches_done)
        return True

    def _elapsed(self) -> float:
        return self.progress.elapsed_s + time.perf_counter() - self.t0

    def _save_checkpoint(self) -> None:
        ctx = self.ctx
        if not (ctx.is_main or ctx.sharded):
            return
        p = self.progress
        state = {**dataclasses.asdict(p), "elapsed_s": self._elapsed(), "stage_state": self.stage.state_dict(),
                 "recipe": self.stage.name}
        save_checkpoint(self.output_dir / "checkpoints" / f"step-{p.step:06d}", model=self.unwrapped,
                        optimizer=self.optimizer, scheduler=self.scheduler, state=state,
                        accelerator=self.accelerator, use_accelerate_state=ctx.sharded)
        if ctx.is_main:
            prune_checkpoints(self.output_dir, self.settings.keep_last)

    # ------------------------------------------------------------------------------ the loop
    def _optimizer_step(self, batch) -> StepOutput:
        acc, s = self.accelerator, self.settings
        with acc.accumulate(self.module):
            out = self.stage.loss(self.module, batch, self.ctx)
            if not torch.isfinite(out.loss):
                ids = f" (batch {batch['ids'][:3]})" if isinstance(batch, dict) and "ids" in batch else ""
                raise DataError(f"non-finite loss at step {self.progress.step}{ids}; lower train.lr")
            acc.backward(out.loss)
            if acc.sync_gradients and s.max_grad_norm:
                self.grad_norm = acc.clip_grad_norm_(self.stage.clip_parameters(self.module), s.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def _log_step(self) -> None:
        p, now = self.progress, time.perf_counter()
        w = self.window
        self.logger.log({"step": p.step, "epoch": round(p.epoch + p.batches_done / self.batches_per_epoch, 4),
                         "loss": round(self.last_loss, 5), "lr": self.scheduler.get_last_lr()[0],
                         "tokens_per_s": round(w["tokens"] * self.accelerator.num_processes / max(1e-9, now - w["t"]), 1),
                         "samples": p.samples_seen, "tokens": p.tokens_seen, "elapsed_s": round(self._elapsed(), 1),
                         "grad_norm": None if self.grad_norm is None else round(float(self.grad_norm), 4)})
        w["tokens"], w["t"] = 0, now

    def _after_batch(self, out: StepOutput) -> bool:
        """Bookkeeping after one batch; True when training should stop."""
        p, s, w = self.progress, self.settings, self.window
        p.tokens_seen += out.tokens
        p.samples_seen += out.samples
        w["tokens"] += out.tokens
        w["loss"] += float(out.loss.detach())
        w["n"] += 1
        self.epoch_loss[0] += float(out.loss.detach()) * out.samples
        self.epoch_loss[1] += out.samples
        if not self.accelerator.sync_gradients:
            return False
        p.step += 1
        self.last_loss = w["loss"] / max(1, w["n"])
        if len(self.first_losses) < 5:
            self.first_losses.append(self.last_loss)
        if p.step % max(1, s.log_every) == 0 or p.step == self.total_steps or p.step == 1:
            self._log_step()
        w["loss"], w["n"] = 0.0, 0
        if s.save_every and p.step % s.save_every == 0 and p.step < self.total_steps:
            self.accelerator.wait_for_everyone()
            self._save_checkpoint()
        return p.step >= self.total_steps or (self.stop_after is not None and p.step >= self.stop_after)

    def _run_epochs(self) -> None:
        p, s = self.progress, self.settings
        max_epochs = None if s.max_steps else math.ceil(s.epochs)
        done = p.step >= self.total_steps or (max_epochs is not None and p.epoch >= max_epochs)
        while not done:
            self.epoch_loss = [0.0, 0]
            finished_epoch, from_start = True, p.batches_done == 0
            for batch in self.stage.epoch_batches(p.epoch, p.batches_done, self.ctx):
                p.batches_done += 1
                if batch is None:
                    continue
                if self._after_batch(self._optimizer_step(batch)):
                    done, finished_epoch = True, p.batches_done >= self.batches_per_epoch
                    break
            if finished_epoch and from_start and self.epoch_loss[1] == 0:
                raise DataError(f"{self.stage.name}: epoch {p.epoch} had no usable batch; check the data")
            if finished_epoch:
                self.stage.on_epoch_end(self.module, p.epoch, self.epoch_loss[0] / max(1, self.epoch_loss[1]),
                                        self.ctx)
                self.module.train()
                p.epoch += 1
                p.batches_done = 0
                done = done or (max_epochs is not None and p.epoch >= max_epochs)

    def fit(self) -> dict[str, Any]:
        """Train; writes checkpoints, ``log.csv``, the stage's final model and ``metrics.json``."""
        self._setup()
        resumed = self._restore()
        ctx = self.ctx
        if ctx.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config is not None:
                write_json_atomic(self.output_dir / "recipe.json", self.run_config)
        self.logger = TrainLogger(self.output_dir, enabled=ctx.is_main,
                                  resume_step=self.progress.step if resumed else None)
        self.t0 = time.perf_counter()
        self.window = {"loss": 0.0, "n": 0, "tokens": 0, "t": time.perf_counter()}
        self.last_loss, self.first_losses, self.grad_norm = float("nan"), [], None
        before = self.stage.metrics_before(self.module, ctx, resumed)
        self.module.train()
        try:
            self._run_epochs()
        finally:
            self.logger.close()
        return self._finish(before)

    def _finish(self, before: dict) -> dict[str, Any]:
        p, ctx = self.progress, self.ctx
        interrupted = self.stop_after is not None and p.step < self.total_steps
        self.accelerator.wait_for_everyone()
        after = self.stage.metrics_after(self.module, ctx, interrupted)
        wall = self._elapsed()
        metrics = {
            "recipe": self.stage.name, "stage": self.stage.stage_id, "steps": p.step, "total_steps": self.total_steps,
            "epochs": round(p.step / self.steps_per_epoch, 3),
            "first_loss": self.first_losses[0] if self.first_losses else None, "final_loss": self.last_loss,
            **before, **after, "samples_seen": p.samples_seen, "tokens_seen": p.tokens_seen,
            "wall_time_s": round(wall, 1), "tokens_per_s": round(p.tokens_seen / max(1e-9, wall), 1),
            "trainable_params": self.n_train, "total_params": self.n_total,
            "mixed_precision": self.accelerator.mixed_precision, "num_processes": self.accelerator.num_processes,
            "interrupted": interrupted,
        }
        if interrupted:
            self._save_checkpoint()
        elif ctx.is_main:
            self.stage.save_final(self.unwrapped, ctx)
            write_json_atomic(self.output_dir / "metrics.json", metrics)
            log.info("[%s] done: %d steps, loss %.4f -> %.4f", self.stage.name, p.step,
                     metrics["first_loss"] or float("nan"), self.last_loss)
        metrics["model"] = self.stage.result(self.unwrapped)
        return metrics
