"""What every training loop shares: the run config, precision, NaN-safe optimizer steps, EMA, metrics.

NaN safety without host syncs: the gradient norm's finiteness becomes a device tensor ``found_inf`` that
the fused AdamW kernel reads (the mechanism GradScaler uses) and skips the update with; the EMA update
is weighted by ``1 - found_inf``, and `BufferGuard` puts back the buffers the forward pass moved
(BatchNorm / LatentNorm statistics, LeCam EMAs). A skipped step leaves every piece of state as it was.
Skipped steps are counted on the device and read at log time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ..config import device_name, nonempty, option


def _step_and_micro(value: tuple[int, ...]) -> str | None:
    return None if len(value) in (0, 2) else "must be two numbers STEP,MICRO (or empty)"


def batch_size_option(default: int):
    """The trainers' --optim.batch_size: the global batch of one optimizer step."""
    return option(
        default,
        "global batch size per optimizer step (split across ranks, then into grad_accum micro-batches)",
        min=1,
    )


def grad_accum_option():
    """The trainers' --optim.grad_accum (one meaning in train-vae and train-sit)."""
    return option(
        1,
        "gradient accumulation: each process runs its share of --optim.batch_size as this many "
        "micro-batches of batch_size / (processes x grad_accum), one optimizer step after the last "
        "(the memory of one micro-batch; the update of the whole batch)",
        min=1,
    )


@dataclass
class RunConfig:
    output_dir: str = option("runs", "folder that holds the run folders", check=nonempty)
    exp_name: str | None = option(
        None, "run folder name under output_dir (default: the preset name)", check=nonempty
    )
    seed: int = option(0, "global seed: every random draw of a step comes from (seed, step, rank)", min=0)
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N", check=device_name)
    precision: str = option(
        "auto",
        "autocast dtype for the networks; auto = bf16 on GPU, fp32 on CPU",
        choices=("auto", "bf16", "fp32"),
    )
    tf32: bool = option(True, "allow TF32 matmuls/convolutions on Ampere+ GPUs")
    compile: bool = option(False, "torch.compile the trained network")
    channels_last: bool = option(True, "channels_last memory format for the conv networks on GPU")
    log_every: int = option(50, "steps between log lines / stats.jsonl rows", min=1)
    ckpt_every: int = option(1000, "steps between training-state checkpoints (0 = only at the end)", min=0)
    keep_ckpts: int = option(2, "how many training-state checkpoints to keep (0 = all)", min=0)
    sample_every: int = option(1000, "steps between image grids (0 = only at the end)", min=0)
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)")
    stats_images: int = option(
        2048, "images used to measure the per-channel latent mean/std at export", min=2
    )
    fault_nan_steps: tuple[int, ...] = option(
        (), "testing aid: steps whose input batch is made NaN", hidden=True, min=1
    )
    fault_exit_step: int | None = option(
        None, "testing aid: exit abruptly (no cleanup) after this step", hidden=True, min=1
    )
    fault_exit_micro: tuple[int, ...] = option(
        (),
        "testing aid: S,J: exit abruptly after micro-batch J (1-based) of step S, before its optimizer step",
        hidden=True,
        min=1,
        check=_step_and_micro,
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """'auto' -> bf16 on CUDA, none (fp32) on CPU, where bf16 is slow."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def setup_backends(device: torch.device, tf32: bool) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


def fused_adamw(params, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CUDA and CPU): one launch per step, and ``found_inf`` support."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of every random draw of one training step on one rank (a 63-bit hash, no collisions in
    practice): a resumed run redraws exactly what the uninterrupted run drew, for any number of ranks."""
    digest = hashlib.blake2b(f"sendvae/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def optimizer_step(
    opt: torch.optim.Optimizer, params, clip: float, skip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, then step unless the gradient norm is non-finite or ``skip`` is 1 (decided on the device).
    Zeroes the grads.

    Returns (grad norm before clipping, found_inf as a 0/1 float tensor: 1 when the step was skipped).
    """
    params = [p for p in params if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    found_inf = (~torch.isfinite(norm)).float()
    if skip is not None:
        found_inf = torch.maximum(found_inf, skip)
    # read by the fused AdamW kernel; not attributes Optimizer declares
    opt.grad_scale, opt.found_inf = None, found_inf  # type: ignore[attr-defined]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm.detach(), found_inf


def accumulate_terms(total: dict[str, torch.Tensor], terms: dict[str, torch.Tensor], k: int) -> None:
    """total[name] += terms[name] / k: a step's logged terms, averaged over its k micro-batches."""
    for name, v in terms.items():
        v = v.detach() / k if k > 1 else v.detach()
        total[name] = total[name] + v if name in total else v


EMA_CHUNK_BYTES = 1 << 28  # the EMA update's temporary (model - ema) is made this many bytes at a time


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, found_inf: torch.Tensor | None = None) -> None:
    """ema <- ema + (1 - decay) * (model - ema), skipped (weight 0) on a step the optimizer skipped.

    No host sync: the weight w = (1 - decay)(1 - found_inf) stays a device tensor. (``_foreach_lerp_``
    has no tensor-weight overload; given a tensor it reads it as a Python number, an ``.item()`` per
    step.) So the update is three fused launches, (model - ema), x w, ema +=, over chunks of
    `EMA_CHUNK_BYTES`, so that the temporary difference never holds a second copy of a large model.
    """
    ema_p: list[torch.Tensor] = list(ema.parameters())
    model_p = [p.detach().to(e.dtype) for e, p in zip(ema_p, model.parameters())]
    if found_inf is None:  # a Python weight: one fused lerp
        torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)
    else:
        w = (1.0 - decay) * (1.0 - found_inf.to(ema_p[0].dtype))  # 0-dim, on the device
        start, size = 0, 0
        for i, e in enumerate(ema_p):
            size += e.numel() * e.element_size()
            if size >= EMA_CHUNK_BYTES or i == len(ema_p) - 1:
                diff = torch._foreach_sub(model_p[start : i + 1], ema_p[start : i + 1])
                torch._foreach_mul_(diff, w)
                torch._foreach_add_(ema_p[start : i + 1], diff)
                start, size = i + 1, 0
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


class BufferGuard:
    """The buffers of some modules as they were before a step; ``restore(skipped)`` puts them back on a
    skipped step (a device-side select: no host sync)."""

    def __init__(self, modules) -> None:
        seen: set[int] = set()
        self.buffers = []
        for m in modules:
            for b in m.buffers() if m is not None else ():
                if id(b) not in seen:
                    seen.add(id(b))
                    self.buffers.append(b)
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def restore(self, skipped: torch.Tensor) -> None:
        keep = skipped.bool()
        for b, s in zip(self.buffers, self.saved):
            b.copy_(torch.where(keep, s, b))


class MetricSums:
    """Sums of per-step metric tensors on the device; ``mean()`` at log time is the only sync.

    A skipped (non-finite) step adds nothing: the means are over the steps that were applied.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count: torch.Tensor | float = 0.0  # applied steps (a device tensor once a step is added)
        self.n = 0  # all steps

    def add(self, terms: dict[str, torch.Tensor], skipped: torch.Tensor | None = None) -> None:
        ok = None if skipped is None else skipped == 0
        for k, v in terms.items():
            v = v.detach().float()
            if ok is not None:
                v = torch.where(ok, v, torch.zeros_like(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count = self.count + (1.0 if ok is None else ok.float())
        self.n += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """Per-key means over the applied steps (NaN for a window in which every step was skipped)."""
        out = {}
        for k, v in self.sums.items():
            c = torch.as_tensor(self.count, device=v.device, dtype=v.dtype)
            out[k] = torch.where(c > 0, v / c.clamp_min(1.0), torch.full_like(v, float("nan")))
        return out

    def reset(self) -> None:
        self.sums, self.count, self.n = {}, 0.0, 0
