"""The loop every trainer runs: resume, step, log, checkpoint, grids, final save.

A trainer subclasses ``TrainerBase`` and provides ``train_step(batch) -> dict of device tensors``,
``state_dict()`` / ``load_state(state)`` (its models and optimizers), ``dataset`` and ``model`` (the
module whose weights are checked before every checkpoint), and optionally ``save_grid()`` and
``extra_log(row, img_per_s)``. The data position is the step (``StepBatchSampler``), so resuming is
loading the newest checkpoint and starting the sampler there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import to_dict
from ..data.sampler import StepBatchSampler
from ..runtime import checkpoint as ckpt
from ..runtime.distributed import DistInfo, all_reduce_mean, barrier, rank_seed
from ..runtime.log import RunLogger
from .common import MetricSums


class TrainerBase:
    cfg: Any
    model: torch.nn.Module
    dataset: Any
    max_steps: int

    def __init__(self, cfg: Any, dist: DistInfo, run_dir: Path, logger: RunLogger):
        self.cfg, self.dist, self.run_dir, self.log = cfg, dist, Path(run_dir), logger
        self.device = dist.device
        self.step = 0
        self.nan_steps = torch.zeros((), device=self.device)

    # -- to provide -------------------------------------------------------------------------------------
    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def save_grid(self) -> None:
        pass

    def after_step(self) -> None:
        """Called after every step's logging, checkpoint and grid (e.g. periodic evaluations)."""

    def extra_log(self, row: dict[str, Any], img_per_s: float) -> None:
        pass

    # -- state ------------------------------------------------------------------------------------------
    def full_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": to_dict(self.cfg),
            "nan_steps": self.nan_steps.cpu(),
            "rng": ckpt.get_rng_state(),
            **self.state_dict(),
        }

    def resume(self) -> None:
        """Load the newest checkpoint of the run folder, if any: weights, optimizers, step, RNG."""
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return
        st = ckpt.load_checkpoint(path)
        self.load_state(st)
        self.nan_steps.fill_(float(st.get("nan_steps", 0)))
        self.step = int(st["step"])
        if self.dist.world_size == 1:
            ckpt.set_rng_state(st["rng"])
        else:  # only rank 0's streams are saved; reseed every rank deterministically from the step
            torch.manual_seed(rank_seed(self.cfg.run.seed, self.dist) + 7919 * self.step)
        self.log.info(f"resumed from {path} at step {self.step}")

    def save(self) -> None:
        """Write the training state atomically (rank 0); never a checkpoint with non-finite weights."""
        if self.dist.is_main:
            sd = self.model.state_dict()
            bad = [k for k, v in sd.items() if v.is_floating_point() and not v.isfinite().all()]
            if bad:
                raise FloatingPointError(f"refusing to write a checkpoint with non-finite weights: {bad[:5]}")
            path = ckpt.save_training_state(
                self.run_dir, self.step, self.full_state(), keep=self.cfg.run.keep_ckpts
            )
            self.log.info(f"saved {path}")
        barrier()

    # -- loop -------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        return o.lr * (min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0)

    def loader(self) -> DataLoader:
        o, nw = self.cfg.optim, self.cfg.data.num_workers
        sampler = StepBatchSampler(
            len(self.dataset),
            o.batch_size,
            self.dist.rank,
            self.dist.world_size,
            seed=self.cfg.run.seed,
            start_step=self.step,
            max_steps=self.max_steps,
        )
        # Its own generator: creating the iterator must not draw from the global RNG, or a resumed run's
        # random stream would be shifted by one draw relative to an uninterrupted run.
        g = torch.Generator().manual_seed(self.cfg.run.seed)
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=nw,
            generator=g,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if nw > 0 else None,
        )

    def train(self) -> None:
        run = self.cfg.run
        sums, t0, start = MetricSums(), time.perf_counter(), self.step
        self.model.train()
        # A progress bar on an interactive terminal; log lines (every log_every steps) everywhere.
        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.dist.is_main and sys.stderr.isatty()),
        )
        for batch in self.loader():
            sums.add(self.train_step(batch))
            self.step += 1
            bar.update(1)
            if self.step % run.log_every == 0 or self.step == self.max_steps:
                self._log(sums, time.perf_counter() - t0)
                sums.reset()
                t0 = time.perf_counter()
            if run.ckpt_every and self.step % run.ckpt_every == 0 and self.step < self.max_steps:
                self.save()
            if run.sample_every and self.step % run.sample_every == 0:
                self.save_grid()
            self.after_step()
            if run.fault_exit_step == self.step:  # testing aid: die like a killed job
                self.log.close()
                os._exit(3)
        bar.close()
        if self.step > start or ckpt.latest_checkpoint(self.run_dir) is None:
            self.save()
            self.save_grid()

    def _log(self, sums: MetricSums, dt: float) -> None:
        row: dict[str, Any] = {k: all_reduce_mean(v) for k, v in sums.mean().items()}
        img_s = sums.n * self.cfg.optim.batch_size / max(dt, 1e-9)
        row["img_per_s"] = img_s
        row["lr"] = self.lr_at(self.step - 1)
        row["epoch"] = self.step * self.cfg.optim.batch_size / len(self.dataset)
        row["nan_steps"] = self.nan_steps
        if self.device.type == "cuda":
            row["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.extra_log(row, img_s)
        self.log.stats(self.step, row)
