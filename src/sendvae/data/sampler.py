"""A resumable, distributed batch sampler whose position is the training step.

Global batch ``k`` is a pure function of (seed, k): the dataset is shuffled once per epoch with a
generator seeded by (seed, epoch), and batch k takes ``global_batch`` consecutive indices of that
order (wrapping into the next epoch). Rank r of W takes every W-th index of the global batch, so
W processes with B/W samples each see exactly the samples one process sees with B. Resuming at step
k is starting the sampler at k: no state beyond the step is needed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        dataset_len: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
        shuffle: bool = True,
        max_steps: int | None = None,
    ):
        if global_batch % world_size != 0:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world_size}")
        if dataset_len <= 0:
            raise ValueError("the dataset is empty")
        self.n = dataset_len
        self.global_batch = global_batch
        self.rank, self.world = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.start_step = start_step
        self.max_steps = max_steps
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.n, generator=g)
            else:
                self._perm = torch.arange(self.n)
            self._perm_epoch = epoch
        assert self._perm is not None  # set with _perm_epoch
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        """The global batch of ``step`` (all ranks)."""
        start = step * self.global_batch
        out: list[int] = []
        while len(out) < self.global_batch:
            epoch, offset = divmod(start + len(out), self.n)
            take = min(self.global_batch - len(out), self.n - offset)
            out.extend(self._order(epoch)[offset : offset + take].tolist())
        return out

    def batch(self, step: int) -> list[int]:
        return self.global_indices(step)[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.max_steps is None or step < self.max_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("an unbounded StepBatchSampler has no length")
        return max(0, self.max_steps - self.start_step)
