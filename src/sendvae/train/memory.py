"""Memory per process of a training run, estimated before it starts (``train-vae|train-sit --dry-run``).

  per process = resting state + the step's peak above it (+ DDP's gradient buckets with several processes)

* Resting state: what stays allocated between steps, counted from the trainer itself, built with the run's
  config on this device (random weights: the bytes do not depend on the values): the trained weights, the
  frozen networks (teacher, LPIPS, a co-trained model's copies), EMA copies, buffers, and AdamW's two fp32
  moments per trained parameter (counted after a first step has made them).
* The step's peak above the resting state: gradients, activations kept for the backward pass, and
  temporaries. Measured: a warm-up step (it allocates the optimizer states), then steps at micro-batches
  1, 2, 4, ...; activations grow linearly with the micro-batch, so peak(m) = fixed + per_image x m,
  extrapolated to the run's micro-batch m from the first two sizes on that line (see `measure`). On a
  GPU the peak is ``torch.cuda.max_memory_allocated``; on a CPU it is the peak of the bytes of live tensor
  storages, followed through every ATen op by a TorchDispatchMode (`LiveTensorBytes`: a storage counts
  from the op that made it until Python frees it).
* DDP: each process also holds gradient buckets as large as the trained weights' gradients.

What the estimate leaves out: the CUDA context and the cuBLAS / cuDNN workspaces and NCCL buffers (about
0.5-2 GiB, outside the allocator's count), allocator fragmentation, the data loader's host memory, and the
savings of ``--run.compile`` (measured eager: an upper bound for a compiled run). `describe` therefore asks a
GPU to keep `HEADROOM` of its memory free. The measurement uses the run's ``--run.precision`` on this device:
``auto`` is bf16 autocast on a GPU but fp32 on a CPU, so to plan a GPU run on a CPU pass
``--run.precision bf16``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import default_collate

from ..config import apply_overrides
from ..runtime.distributed import DistInfo, resolve_device
from ..runtime.log import RunLogger
from .loop import TrainerBase
from .sit import SiTTrainer
from .sit_config import TrainSiTConfig
from .vae import VAETrainer
from .vae_config import TrainVAEConfig

GIB = 2**30
SLOPE_AGREES = 0.1  # `measure`: two successive slopes this close (relative) are the linear part
HEADROOM = 0.10  # the share of a GPU's memory a plan keeps free (context, workspaces, fragmentation)
PLAN_PROCESSES = (1, 2, 4, 8)
PLAN_GPU_GIB = (24, 40, 80)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages made inside the mode and still alive: ``now`` and the ``peak``.

    The outputs of every ATen op that makes new tensors (not views, in-place or out= ops, which return
    storage that exists already) are counted until freed (a weak reference to the storage's Python object,
    which lives exactly as long as the storage). Storages made before the mode (the resting state) are not
    counted, so ``peak`` is the peak above them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.now -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view, an in-place or an out= op: no new storage
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided:
                continue
            st = t.untyped_storage()
            key, size = st.data_ptr(), st.nbytes()  # two live storages never share a (non-empty) address
            if size and key not in self._live:
                self._live[key] = size
                self.now += size
                self.peak = max(self.peak, self.now)
                weakref.finalize(st, self._free, key)
        return out


class Allocated:
    """Bytes allocated on ``device`` inside ``with Allocated(device) as a:`` above what was allocated at
    its start: ``a.now()`` and ``a.peak()`` (CUDA's allocator statistics on a GPU, else `LiveTensorBytes`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._live: LiveTensorBytes | None = None
        self._base = 0

    def __enter__(self) -> Allocated:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._live = LiveTensorBytes().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
        else:
            torch.cuda.synchronize(self.device)

    def now(self) -> int:
        if self._live is not None:
            return self._live.now
        return torch.cuda.memory_allocated(self.device) - self._base

    def peak(self) -> int:
        if self._live is not None:
            return self._live.peak
        return torch.cuda.max_memory_allocated(self.device) - self._base


# -- the resting state --------------------------------------------------------------------------------------


def _holders(
    obj: Any, prefix: str = "", depth: int = 0
) -> Iterator[tuple[str, nn.Module | torch.optim.Optimizer]]:
    """(attribute path, module or optimizer) reachable from a trainer through plain attributes (two levels:
    a co-trained model's own modules and optimizer are found through it)."""
    for name, value in vars(obj).items():
        path = f"{prefix}{name}"
        if isinstance(value, (nn.Module, torch.optim.Optimizer)):
            yield path, value
        elif depth < 1 and hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, type)):
            if isinstance(value, torch.utils.data.Dataset) or dataclasses.is_dataclass(value):
                continue
            yield from _holders(value, f"{path}.", depth + 1)


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """A module's parameters and buffers, and those of networks it keeps out of its state dict in a dict
    attribute (VAELoss keeps LPIPS so)."""
    yield from module.parameters()
    yield from module.buffers()
    for m in module.modules():
        for v in vars(m).values():
            if isinstance(v, dict):
                for hidden in v.values():
                    if isinstance(hidden, nn.Module):
                        yield from hidden.parameters()
                        yield from hidden.buffers()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in opt.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


@dataclass
class RestingState:
    """Bytes between steps: measured in all (``total``), and by holder (``model``, ``teacher``, ``opt_g``,
    ...: the trainer's attributes); ``trained``: the weights the optimizers update."""

    total: int
    by_holder: dict[str, int] = field(default_factory=dict)
    trained: int = 0  # bytes of the weights the optimizers update (their gradients are as large)
    optimizers: set[str] = field(default_factory=set)  # the holders that are optimizers


def resting_state(trainer: TrainerBase, total: int) -> RestingState:
    """``total`` split over the tensors the trainer's modules and optimizers hold, each storage counted
    once, by the first attribute that reaches it (``model`` before ``ema``: the order the trainer made
    them); what no attribute reaches is ``other``."""
    seen: set[int] = set()
    rest = RestingState(total)
    for path, holder in _holders(trainer):
        if isinstance(holder, torch.optim.Optimizer):
            rest.optimizers.add(path)
            tensors = list(_optimizer_tensors(holder))
            trained = [p for g in holder.param_groups for p in g["params"]]
        else:
            tensors, trained = list(_module_tensors(holder)), []
        n = 0
        for t in tensors:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                n += st.nbytes()
        if n:
            rest.by_holder[path] = rest.by_holder.get(path, 0) + n
        rest.trained += sum(p.numel() * p.element_size() for p in trained)
    other = total - sum(rest.by_holder.values())
    if abs(other) >= max(2**24, total // 100):
        rest.by_holder["other"] = other
    return rest


# -- the estimate -------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes per process; ``total(micro, world)`` for any micro-batch and number of processes."""

    device: str
    autocast: str
    resting: RestingState
    sizes: tuple[int, int]  # the two measured micro-batches
    step_peaks: tuple[int, int]  # the step's peak above the resting state at each

    @property
    def per_image(self) -> float:
        (b1, b2), (p1, p2) = self.sizes, self.step_peaks
        return max(0.0, (p2 - p1) / (b2 - b1))

    @property
    def fixed(self) -> float:
        return self.step_peaks[0] - self.per_image * self.sizes[0]

    def step_peak(self, micro: int) -> float:
        """fixed + per_image x micro; never below the smaller measured step's peak (below it the
        optimizer's part of the step, which does not depend on the micro-batch, may be the larger)."""
        return max(float(self.step_peaks[0]), self.fixed + self.per_image * micro)

    def ddp(self, world: int) -> int:
        return self.resting.trained if world > 1 else 0

    def total(self, micro: int, world: int) -> float:
        return self.resting.total + self.ddp(world) + self.step_peak(micro)

    def largest_micro(self, gib: float, world: int) -> int:
        """The largest micro-batch whose estimate fits ``gib`` GiB less `HEADROOM` (0: none)."""
        room = gib * GIB * (1 - HEADROOM) - self.resting.total - self.ddp(world)
        if room < self.step_peaks[0]:
            return 0
        return int((room - self.fixed) // self.per_image) if self.per_image > 0 else 1 << 30


def _probe_batch(trainer: TrainerBase, n: int) -> Any:
    ds = trainer.dataset
    return default_collate([ds[i % len(ds)] for i in range(n)])


def measure(make: Callable[[], TrainerBase], device: torch.device, target: int) -> MemoryEstimate:
    """Build a trainer (``make()``, one process on ``device``) and measure what building it and a warm-up
    step at micro-batch 1 leave allocated (the resting state, optimizer states included), then the peak
    of steps at micro-batches 1, 2, 4, ... above it.

    A step's peak is the larger of the forward / backward peak (linear in the micro-batch) and the
    optimizer's (gradients and the update's temporaries, independent of it), flat in the micro-batch. So the
    sizes double until the peak rises from n/2 to n and the two successive slopes, (n/4 -> n/2) and
    (n/2 -> n), agree within `SLOPE_AGREES` (both on the line), or n reaches ``target`` (the run's
    micro-batch, then measured, not extrapolated); the estimate is the line through n/2 and n.
    """
    with Allocated(device) as built:
        trainer = make()
        _step(trainer, 1)
    resting = built.now()
    peaks: dict[int, int] = {}
    n = 1
    while True:
        with Allocated(device) as step:
            _step(trainer, n)
        peaks[n] = step.peak()
        if n >= 4:
            s1, s2 = (peaks[n // 2] - peaks[n // 4]) / (n // 4), (peaks[n] - peaks[n // 2]) / (n // 2)
            rising = peaks[n] - peaks[n // 2] > 0.01 * peaks[n // 2]  # past the optimizer's flat peak
            if (rising and abs(s2 - s1) <= SLOPE_AGREES * s2) or n >= target:
                break
        elif n >= max(target, 2):
            break
        n *= 2
    amp = getattr(trainer, "amp", None)
    return MemoryEstimate(
        device=str(device),
        autocast=str(amp).replace("torch.", "") if amp is not None else "none (fp32)",
        resting=resting_state(trainer, resting),
        sizes=(n // 2, n),
        step_peaks=(peaks[n // 2], peaks[n]),
    )


def _step(trainer: TrainerBase, n: int) -> None:
    """One training step of ``n`` images (the trainer takes its micro-batches from the batch it gets)."""
    batch = _probe_batch(trainer, n)
    with _batch_size(trainer, n):
        trainer.train_step(batch)
    trainer.step += 1


@contextmanager
def _batch_size(trainer: TrainerBase, b: int) -> Iterator[None]:
    optim = trainer.cfg.optim
    old = optim.batch_size
    optim.batch_size = b
    try:
        yield
    finally:
        optim.batch_size = old


def _existing(path: str | None) -> str | None:
    return path if path and Path(path).exists() else None


def estimate_train_vae(cfg: TrainVAEConfig) -> MemoryEstimate:
    """The estimate for a train-vae config, measured on a trainer with the config's networks and random
    weights (initial files are read when present) on the config's device, fed synthetic images (shapes)
    at its resolution, the GAN on."""
    probe = apply_overrides(
        cfg,
        {
            "teacher.random_init": True,
            "loss.lpips_random_init": True,
            "model.vae_ckpt": _existing(cfg.model.vae_ckpt),
            "model.disc_ckpt": _existing(cfg.model.disc_ckpt),
            "data.name": "shapes",
            "data.path": None,
            "data.subset": None,
            "data.num_workers": 0,
            "loss.gan_start": 0,
            "run.stats_images": 2,  # a fixed LatentNorm's statistics of a random VAE: any will do
        },
    )
    return _measured(probe, VAETrainer)


def estimate_train_sit(cfg: TrainSiTConfig) -> MemoryEstimate:
    """The estimate for a train-sit config on its latent store (``--store``: the latent shape and teacher
    tokens decide the model), an online teacher with random weights, no VAE, no proxy FD."""
    if not cfg.data.store or not Path(cfg.data.store).is_dir():
        raise ValueError("the memory estimate reads the latent store: pass --store DIR")
    probe = apply_overrides(
        cfg,
        {
            "teacher.random_init": True,
            "data.num_workers": 0,
            "model.vae": None,
            "eval.fd_every": 0,
        },
    )
    return _measured(probe, SiTTrainer)


def _measured(probe: Any, trainer_cls: Callable[..., TrainerBase]) -> MemoryEstimate:
    """`measure` a trainer of config ``probe`` (one process), up to the micro-batch the run would use with
    the processes torchrun gives (1 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = max(1, probe.optim.batch_size // (world * probe.optim.grad_accum))
    probe = apply_overrides(
        probe,
        {
            "optim.batch_size": 1,  # each step sets its own (`_batch_size`)
            "optim.grad_accum": 1,
            "optim.max_steps": 1000,
            "run.compile": False,
            "run.fault_nan_steps": (),
            "run.fault_exit_step": None,
            "run.fault_exit_micro": (),
        },
    )
    device = resolve_device(probe.run.device)
    dist = DistInfo(0, 1, 0, device)
    with tempfile.TemporaryDirectory() as tmp:
        return measure(
            lambda: trainer_cls(probe, dist, Path(tmp), RunLogger(None, is_main=False)), device, target
        )


# -- what to print ------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 8 else f"{n / 2**20:.1f} MiB"


def smallest_accum(est: MemoryEstimate, batch: int, world: int, gib: float) -> int | None:
    """The smallest ``--optim.grad_accum`` K (the batch divisible by world x K) whose micro-batch fits
    ``gib`` GiB per process; None when even the smallest micro-batch does not."""
    if batch % world:
        return None
    fit = est.largest_micro(gib, world)
    share = batch // world
    return next((k for k in range(1, share + 1) if share % k == 0 and share // k <= fit), None)


def describe(est: MemoryEstimate | None, batch: int, accum: int, world: int) -> str:
    """The dry-run's report: the split of the global batch, then (with an estimate) the memory per process
    and how it was made, and the smallest accumulation that fits a few GPU sizes."""
    if batch % (world * accum):
        return f"global batch {batch} does not split into {world} process(es) x {accum} micro-batch(es)"
    micro = batch // (world * accum)
    lines = [
        f"global batch {batch} = {world} process(es) x {accum} micro-batch(es) of {micro} "
        f"(--optim.grad_accum {accum})"
    ]
    if est is None:
        return lines[0]
    lines.append(f"memory per process (estimate, micro-batch {micro}):")
    for path, n in est.resting.by_holder.items():
        kind = "optimizer states" if path in est.resting.optimizers else "weights and buffers"
        kind = "unattributed (measured total - the above)" if path == "other" else kind
        lines.append(f"  {_gib(n):>11}  {kind}: {path}")
    lines.append(
        f"  {_gib(est.step_peak(micro)):>11}  the step's peak above them: {_gib(est.per_image)} per image x "
        f"{micro} + {_gib(est.fixed)} (gradients of the {_gib(est.resting.trained)} trained weights, "
        "activations, temporaries)"
    )
    if world > 1:
        lines.append(f"  {_gib(est.ddp(world)):>11}  DDP gradient buckets")
    lines.append(f"  {_gib(est.total(micro, world)):>11}  total")
    lines.append(
        f"how: weights, buffers and optimizer states counted from the trainer built on {est.device} "
        f"(random weights); the step's peak above them (gradients, activations, temporaries) measured at "
        f"micro-batches {est.sizes[0]} and {est.sizes[1]} (autocast {est.autocast}, eager) and extrapolated "
        f"linearly. Not included: CUDA context, library workspaces, fragmentation (a plan keeps "
        f"{HEADROOM:.0%} of a GPU free)."
    )
    lines.append("smallest --optim.grad_accum that fits (micro-batch in brackets):")
    lines.append("  processes" + "".join(f"{f'{g} GiB':>16}" for g in PLAN_GPU_GIB))
    for w in PLAN_PROCESSES:
        cells = []
        for g in PLAN_GPU_GIB:
            k = smallest_accum(est, batch, w, g)
            cells.append("-" if batch % w else f"{k} ({batch // (w * k)})" if k else "no")
        lines.append(f"  {w:>9}" + "".join(f"{c:>16}" for c in cells))
    lines.append(
        "  (no: micro-batch 1 does not fit, --model.grad_checkpointing true lowers the activations; "
        "-: the batch does not split over that many processes)"
    )
    return "\n".join(lines)
