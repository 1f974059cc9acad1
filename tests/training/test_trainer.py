"""The one trainer on a toy stage: exact resume (weights, schedule, the stage's own generator), epoch-based stop with
skipped batches, the one-cycle schedule, checkpoint pruning, and the log."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slidechat.errors import DataError
from slidechat.training.trainer import StepOutput, Stage, Trainer, TrainerSettings


class ToyStage(Stage):
    """Linear regression on 10 fixed points; batch 3 of every epoch is skipped; noise from the stage's generator."""

    name = "toy"
    stage_id = "toy"

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(5)
        self.x = torch.linspace(-1, 1, 20).view(10, 2)
        self.y = self.x @ torch.tensor([[2.0], [-1.0]])
        self.saved = None

    def build(self, ctx):
        return nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.2), nn.Linear(4, 1))

    def batches_per_epoch(self) -> int:
        return 5

    def epoch_batches(self, epoch, start, ctx):
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(epoch))
        for b in range(start, 5):
            yield None if b == 3 else perm[2 * b:2 * b + 2]

    def loss(self, module, batch, ctx):
        noise = 0.01 * torch.randn(len(batch), 1, generator=self.gen)
        return StepOutput(nn.functional.mse_loss(module(self.x[batch]), self.y[batch] + noise), len(batch))

    def save_final(self, module, ctx):
        self.saved = {k: v.clone() for k, v in module.state_dict().items()}

    def state_dict(self):
        return {"generator": self.gen.get_state().tolist()}

    def load_state_dict(self, state):
        self.gen.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


def settings(**kw) -> TrainerSettings:
    return TrainerSettings(**{"epochs": 3, "lr": 0.05, "scheduler": "one_cycle", "warmup_ratio": 0.2, "save_every": 2,
                              "keep_last": 2, "log_every": 1, **kw})


def test_resume_is_exact_and_epochs_end_with_skipped_batches(tmp_path):
    full_stage = ToyStage()
    full = Trainer(full_stage, settings(), tmp_path / "full").fit()
    assert full["steps"] == 12 and full["total_steps"] == 15 and not full["interrupted"]  # 4 of 5 batches train
    assert full["final_loss"] < full["first_loss"]
    part_stage = ToyStage()
    stopped = Trainer(part_stage, settings(), tmp_path / "part", stop_after=5).fit()
    assert stopped["interrupted"] and part_stage.saved is None
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert ckpts == ["step-000004", "step-000005"]  # keep_last=2: step-000002 pruned
    resumed_stage = ToyStage()  # a fresh process: the generator state comes from the checkpoint
    resumed = Trainer(resumed_stage, settings(), tmp_path / "part", resume=True).fit()
    assert resumed["steps"] == 12
    for k, v in full_stage.saved.items():
        torch.testing.assert_close(resumed_stage.saved[k], v, rtol=0, atol=0, msg=k)
    steps = [int(r.split(",")[0]) for r in (tmp_path / "part" / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 13))
    assert json.loads((tmp_path / "part" / "metrics.json").read_text())["steps"] == 12


def test_max_steps_overrides_epochs_and_lr_follows_the_schedule(tmp_path):
    stage = ToyStage()
    m = Trainer(stage, settings(max_steps=6, scheduler="linear", warmup_ratio=0.0, save_every=0), tmp_path).fit()
    assert m["steps"] == 6
    lrs = [float(r.split(",")[3]) for r in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0


def test_an_epoch_without_a_usable_batch_is_an_error(tmp_path):
    class Empty(ToyStage):
        def epoch_batches(self, epoch, start, ctx):
            yield from [None] * (5 - start)

    with pytest.raises(DataError, match="no usable batch"):
        Trainer(Empty(), settings(max_steps=3), tmp_path).fit()
