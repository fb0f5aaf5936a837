"""The loop every trainer runs: resume, step, log, checkpoint, grids, final save.

A trainer subclasses ``TrainerBase`` and provides ``train_step(batch) -> dict of device tensors`` (with
``"skipped"``: 1 when the step's update was skipped), ``state_dict()`` / ``load_state(state)`` (its
models and optimizers), ``dataset`` and ``model``, and optionally ``save_grid()`` and
``extra_log(row, img_per_s)``. The decisions every run shares are the base's: the global batch splits
evenly over the processes, the global RNG is seeded before any model is built, the length in steps
(``steps_for``) and the optimizer (``adamw``) come from the same ``--optim.*`` fields.

Resuming is exact by construction: the data position is the step (``StepBatchSampler``) and every random
draw of a step comes from a generator seeded with (seed, step, rank) (`step_seed`), so the newest
checkpoint plus the step is all a run needs to continue as if never stopped, with 1 or N processes.

Gradient accumulation (``--optim.grad_accum K``): ``--optim.batch_size`` stays the global batch of one
optimizer step; each of the W processes splits its B / W rows into K micro-batches of B / (W K) and runs
forward + backward on each, the loss scaled by 1 / K, DDP syncing the gradients only on the last
(`no_sync`); then one optimizer step, EMA, learning rate, NaN check and step count. Micro-batch j of rank r
is "virtual rank" r + W j of W K (`micro_batches`, `seed_micro`): its rows are the ones process r + W j
of a W K-process run would take, and its draws come from (seed, step, r + W j). So K = 1 is the run as
before, and W processes with K micro-batches train as W K processes would, up to the order of float sums
(and what depends on the micro-batch as a batch: BatchNorm-like statistics, see the trainers). A checkpoint
is only written between optimizer steps: a run killed between micro-batches redoes that step on resume.
A checkpoint that cannot be read is reported and the previous one is used. Nothing non-finite is ever
written, and a run whose recent steps are mostly skipped stops with an error instead of exporting.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import from_dict, to_dict
from ..data.sampler import StepBatchSampler
from ..runtime import checkpoint as ckpt
from ..runtime.distributed import DistInfo, all_reduce_mean, barrier
from ..runtime.log import RunLogger
from ..runtime.weights import WeightsError, malformed
from .common import MetricSums, fused_adamw, step_seed
from .resume import FREE_COMMON, refused_changes, refused_length

logger = logging.getLogger(__name__)

DIVERGENCE_WINDOW = 8  # recent steps looked at by the divergence check


def non_finite_tensors(obj: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating tensors in a (nested) state that hold NaN or inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix.rstrip(".")] if obj.is_floating_point() and not bool(obj.isfinite().all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in non_finite_tensors(v, f"{prefix}{k}.")]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in non_finite_tensors(v, f"{prefix}{i}.")]
    return []


class TrainerBase:
    cfg: Any
    model: torch.nn.Module
    dataset: Any
    max_steps: int
    resume_free: frozenset[str] = FREE_COMMON  # config keys a resume may change (train/resume.py)

    def __init__(self, cfg: Any, dist: DistInfo, run_dir: Path, logger: RunLogger):
        self.cfg, self.dist, self.run_dir, self.log = cfg, dist, Path(run_dir), logger
        self.device = dist.device
        self.step = 0
        self.last_logged: dict[str, Any] = {}  # the last row written to stats.jsonl by this process
        self.nan_steps = torch.zeros((), device=self.device)
        self.recent_skips: collections.deque[torch.Tensor] = collections.deque(maxlen=DIVERGENCE_WINDOW)
        self.check_batch_size()
        self.seed_initial_weights()

    # -- shared decisions -------------------------------------------------------------------------------
    def check_batch_size(self) -> None:
        """The global ``--optim.batch_size`` must split evenly: each process takes batch_size / world, in
        ``--optim.grad_accum`` micro-batches."""
        bs, world, k = self.cfg.optim.batch_size, self.dist.world_size, self.cfg.optim.grad_accum
        if bs % world:
            raise ValueError(
                f"--optim.batch_size {bs} must be divisible by the number of processes ({world})"
            )
        if bs % (world * k):
            raise ValueError(
                f"--optim.batch_size {bs} must be divisible by the number of processes x --optim.grad_accum "
                f"({world} x {k}): each process runs {k} micro-batches of batch_size / {world * k}"
            )

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step (``--optim.grad_accum``)."""
        return int(self.cfg.optim.grad_accum)

    @property
    def micro_batch(self) -> int:
        """Rows of one micro-batch on one process: batch_size / (world x grad_accum)."""
        return self.cfg.optim.batch_size // (self.dist.world_size * self.accum)

    def seed_initial_weights(self) -> None:
        """Seed the global RNG with ``--run.seed`` before any model is built: every rank draws the same
        initial weights, so they are identical whatever the number of processes."""
        torch.manual_seed(self.cfg.run.seed)

    def steps_for(self, dataset_len: int) -> int:
        """Training length: ``--optim.max_steps`` when set, else ceil(epochs * dataset_len / batch_size)."""
        o = self.cfg.optim
        if o.max_steps is not None:
            steps = o.max_steps
        elif o.epochs is not None:
            steps = math.ceil(o.epochs * dataset_len / o.batch_size)
        else:
            steps = 0
        if steps <= 0:
            raise ValueError("set --optim.max_steps or --optim.epochs")
        return steps

    def adamw(self, params, lr: float | None = None) -> torch.optim.AdamW:
        """The fused AdamW of ``--optim.lr`` (or ``lr``), ``--optim.betas`` and ``--optim.weight_decay``."""
        o = self.cfg.optim
        return fused_adamw(params, o.lr if lr is None else lr, o.betas, o.weight_decay)

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

    def virtual_rank(self, micro: int) -> int:
        """Micro-batch ``micro`` of this rank as a rank of W x K processes: rank + W micro."""
        return self.dist.rank + self.dist.world_size * micro

    def micro_rows(self, micro: int, rows_of_global: bool = False) -> slice:
        """The rows of micro-batch ``micro``: of this rank's batch (every K-th row from ``micro``), or with
        ``rows_of_global`` of the global batch (every W K-th from the virtual rank). The sampler gives rank r
        the global rows r::W, so both name the same samples: (r::W)[j::K] = (r + W j)::(W K)."""
        if rows_of_global:
            return slice(self.virtual_rank(micro), None, self.dist.world_size * self.accum)
        return slice(micro, None, self.accum)

    def micro_batches(self, batch: Any) -> list[Any]:
        """This rank's batch (a tensor, or a list / tuple of tensors) as its K micro-batches."""
        parts = []
        for j in range(self.accum):
            rows = self.micro_rows(j)
            if isinstance(batch, (list, tuple)):
                parts.append(type(batch)(b[rows] for b in batch))
            else:
                parts.append(batch[rows])
        return parts

    def seed_step(self, micro: int = 0) -> None:
        """Seed the global RNG for this step (micro-batch ``micro``) on this rank; the first thing every
        ``train_step`` (micro-batch) does, so that its draws depend on (seed, step, virtual rank) alone."""
        torch.manual_seed(step_seed(self.cfg.run.seed, self.step, self.virtual_rank(micro)))

    def no_sync(self, micro: int, *modules: torch.nn.Module | None) -> contextlib.ExitStack:
        """DDP's ``no_sync`` for the DDP-wrapped ``modules`` on every micro-batch but the last: their
        gradients are summed locally and all-reduced once, in the last micro-batch's backward."""
        stack = contextlib.ExitStack()
        if micro < self.accum - 1:
            for m in modules:
                if isinstance(m, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        return stack

    def micro_done(self, micro: int) -> None:
        """After micro-batch ``micro``'s backward (testing aid: die there, before the optimizer step)."""
        aid = self.cfg.run.fault_exit_micro
        if aid and aid[0] == self.step + 1 and aid[1] == micro + 1:
            self.log.close()
            os._exit(3)

    # -- state ------------------------------------------------------------------------------------------
    def full_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": to_dict(self.cfg),
            "nan_steps": self.nan_steps.cpu(),
            **self.state_dict(),
        }

    def resume(self) -> None:
        """Load the newest readable checkpoint of the run folder, if any: weights, optimizers, step.

        The run's config must agree with the checkpoint's except in the fields of ``resume_free``, and
        its length may not end before the checkpoint's step.
        """
        if self.dist.is_main:
            swept = ckpt.sweep_temp_files(self.run_dir, self.run_dir / ckpt.CKPT_DIR)
            if swept:
                self.log.info(f"removed {len(swept)} temp file(s) of an interrupted write")
        found = None
        for _, path in reversed(ckpt.list_checkpoints(self.run_dir)):
            try:
                found = path, ckpt.load_checkpoint(path)
                break
            except WeightsError as e:
                self.log.info(f"warning: skipping unreadable checkpoint {path.name} ({e})")
        if found is None:
            if ckpt.list_checkpoints(self.run_dir):
                raise ValueError(
                    f"no checkpoint in {self.run_dir / ckpt.CKPT_DIR} can be read; move them away to "
                    "start the run anew, or use another --exp-name"
                )
            if self.dist.is_main:  # a run killed before its first checkpoint starts over: so do its rows
                self.log.truncate_stats(0)
            return
        path, st = found
        with malformed(path, "training state"):  # a crafted or foreign file: one line naming it
            if not isinstance(st, dict):
                raise TypeError(f"holds a {type(st).__name__}, not a training state")
            # through the config class: a field added since the checkpoint was written takes its default
            saved = to_dict(from_dict(type(self.cfg), st.get("config", {}), strict=False, source=str(path)))
            step = int(st["step"])
        refused = refused_changes(saved, to_dict(self.cfg), self.resume_free)
        if refused:
            raise ValueError(
                f"run folder {self.run_dir} holds an experiment with another config "
                f"({'; '.join(refused[:8])}); pass the same options to resume it, or a new --exp-name"
            )
        shorter = refused_length(step, self.max_steps)
        if shorter:
            raise ValueError(f"run folder {self.run_dir}: {shorter}")
        with malformed(path, "training state"):
            self.load_state(st)
            self.nan_steps.fill_(float(st.get("nan_steps", 0)))
        self.step = step
        if self.dist.is_main:
            self.log.truncate_stats(self.step)  # the steps after the checkpoint are replayed
        self.log.info(f"resumed from {path} at step {self.step}")

    def check_finite(self, state: dict[str, Any] | None = None) -> None:
        """Raise FloatingPointError if any tensor of the training state is NaN or inf."""
        bad = non_finite_tensors(self.full_state() if state is None else state)
        if bad:
            raise FloatingPointError(
                f"refusing to write a checkpoint or export with non-finite values in {bad[:5]} "
                f"(step {self.step}); the newest checkpoint in {self.run_dir / ckpt.CKPT_DIR} is intact"
            )

    def save(self) -> None:
        """Write the training state atomically (rank 0); never a checkpoint with a non-finite tensor."""
        if self.dist.is_main:
            state = self.full_state()
            self.check_finite(state)
            path = ckpt.save_training_state(self.run_dir, self.step, state, keep=self.cfg.run.keep_ckpts)
            self.log.info(f"saved {path}")
        barrier()

    def check_divergence(self) -> None:
        """Stop when more than half of the recent steps (at least 2) were skipped as non-finite."""
        if not self.recent_skips:
            return
        n, k = len(self.recent_skips), int(torch.stack(list(self.recent_skips)).sum())
        if k >= 2 and k > n / 2:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise FloatingPointError(
                f"{k} of the last {n} steps (to step {self.step}) had non-finite gradients and were "
                "skipped: training has diverged (lower --optim.lr or check the data); stopped without "
                f"exporting" + (f", the newest checkpoint is {last}" if last else "")
            )

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
            terms = self.train_step(batch)
            skipped = terms.pop("skipped")
            self.nan_steps += skipped
            self.recent_skips.append(skipped.detach())
            sums.add(terms, skipped)
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
        self.last_logged = {"step": self.step, **row}  # what `run_training` returns to its caller
        self.check_divergence()
