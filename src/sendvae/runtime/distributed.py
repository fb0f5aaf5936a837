"""One process or many: the same entry points run on one CPU and under ``torchrun`` on many GPUs.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them we are a single process and every
collective below is a no-op. Backend: NCCL on CUDA, gloo on CPU.

A worker started by torchrun dies with its launcher: killed with SIGKILL, the launcher cannot stop its
workers, which would be reparented and train on, writing the run folder beside the next attempt. On Linux
each worker asks the kernel for SIGTERM when its parent exits (``prctl(PR_SET_PDEATHSIG)``), and exits at
once if the parent is gone already.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0, option: str = "--device") -> torch.device:
    """The one reading of a device option: 'auto' -> cuda:<local_rank> when a GPU is usable, else cpu;
    'cuda' -> cuda:<local_rank>; anything else as torch names it. `option` is the command's flag, for the
    error when a GPU is asked for and there is none."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name}: no CUDA GPU is available; use {option} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f"{option} {name}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {name}: MPS is not available; use {option} cpu")
    return dev


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_launcher() -> bool:
    """Under torchrun on Linux: SIGTERM this process when its launcher exits (even by SIGKILL), and exit now
    if it has already. Returns whether the signal was set up."""
    if not sys.platform.startswith("linux") or not (
        "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
    ):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # no prctl in this libc: nothing to set up
        return False
    if _launcher_gone():
        sys.exit("the launcher (torchrun) of this worker has exited; stopping")
    return True


def _launcher_gone() -> bool:
    """The launcher died before prctl: we were reparented to init (pid 1), and no signal will come. In a
    container torchrun may itself be pid 1, alive as our parent; when pid 1 cannot be read, assume it is."""
    if os.getppid() != 1:
        return False
    try:
        with open("/proc/1/cmdline", "rb") as f:
            init = f.read()
    except OSError:
        return False
    return b"torchrun" not in init and b"torch.distributed" not in init


def init_distributed(device: str = "auto", option: str = "--device") -> DistInfo:
    """Initialise the process group when launched by torchrun; otherwise describe a single process."""
    exit_with_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, option)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op for one process). Returns ``t``."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def broadcast_object(obj: T, src: int = 0) -> T:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()
