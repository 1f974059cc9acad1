"""Length-grouped batch sampler with exact, resumable state.

Each epoch: a seeded permutation, cut into mega-batches of ``batch_size * group_factor`` samples, each sorted
by length (so a batch pads little), cut into batches, and the batch order shuffled. The order is a pure
function of (seed, epoch), so resuming only needs ``{"epoch", "batches_done"}``. With several processes,
process ``rank`` takes every ``world_size``-th batch (the list is padded so every rank gets as many).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch


class LengthGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, group_by_length: bool = True,
                 group_factor: int = 50, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_factor = group_factor
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.batches_done = 0  # where the next iteration starts (batches of this rank already consumed)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_done = 0

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of this rank for an epoch, in order."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        if n == 0:
            return []
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        batches: list[list[int]] = []
        if self.group_by_length:
            mega = self.batch_size * self.group_factor
            for s in range(0, n, mega):
                chunk = sorted(perm[s:s + mega], key=lambda i: -self.lengths[i])
                batches.extend(chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
            order = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in order]
        else:
            batches = [perm[j:j + self.batch_size] for j in range(0, n, self.batch_size)]
        if self.world_size > 1:
            while len(batches) % self.world_size:
                batches.append(batches[len(batches) % max(1, len(batches))])
            batches = batches[self.rank::self.world_size]
        return batches

    def __len__(self) -> int:
        n_batches = -(-len(self.lengths) // self.batch_size)
        return -(-n_batches // self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        # Starts at ``batches_done`` but does not advance it: DataLoader workers prefetch ahead of what
        # the training loop has consumed, so the loop records consumption itself (see training.loop).
        yield from self.all_batches()[self.batches_done:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self.seed = int(state.get("seed", self.seed))
