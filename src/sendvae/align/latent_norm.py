"""The per-channel latent normalisation the alignment heads read (the mapper's, ReaLS's, REPA-E's BatchNorm).

z (B, C, h, w) -> (z - mean_c) / sqrt(var_c + eps), in fp32, with mean / var
  'running'  the batch's (pooled over every DDP rank, gradients through them as BatchNorm's), an EMA of
             them in eval;
  'fixed'    the VAE's latent statistics, set before the first step and never updated;
  'none'     identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

LATENT_NORMS = ("running", "fixed", "none")


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: d(sum_r x_r)/dx_r = I, so the backward is an all_reduce too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class LatentNorm(nn.Module):
    """Per-channel latent standardisation (z - mean) / sqrt(var + eps), computed in fp32.

    'running': BatchNorm without affine. Training uses the batch statistics (pooled over all DDP ranks,
      gradients flow through them as in BatchNorm / SyncBatchNorm) and updates an EMA used in eval.
    'fixed': the VAE's latent statistics, loaded with `set_stats` before the first step, in training and
      eval alike; never updated (training sets them in `train.builders.build_head`).
    'none': identity (cast to fp32).
    """

    running_mean: torch.Tensor  # buffers (C,), and a bool scalar
    running_var: torch.Tensor
    stats_set: torch.Tensor

    def __init__(self, channels: int, mode: str = "running", momentum: float = 0.1, eps: float = 1e-4):
        super().__init__()
        if mode not in LATENT_NORMS:
            raise ValueError(f"latent_norm must be one of {LATENT_NORMS}, got {mode!r}")
        self.mode, self.momentum, self.eps = mode, momentum, eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("stats_set", torch.tensor(False))
        self._stats_checked = False

    @torch.no_grad()
    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel latent mean and std (C,) (e.g. the VAE's latent_mean / latent_std); stored as var."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        c = self.running_mean.numel()
        if mean.numel() != c or std.numel() != c:
            raise ValueError(
                f"latent stats need {c} values each, got mean {mean.numel()} and std {std.numel()}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("latent stats must be finite with std > 0")
        self.running_mean.copy_(mean)
        self.running_var.copy_(std**2)
        self.stats_set.fill_(True)

    def batch_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-channel mean, biased and unbiased variance of z (B, C, h, w), pooled over every rank."""
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)  # (C,), (C,)
        n = z.numel() // z.shape[1]
        if not _is_distributed():
            return mean, var, var * (n / max(n - 1, 1))
        # Pool exactly: sum_r n_r, sum_r n_r mean_r, sum_r n_r (var_r + mean_r^2); float64 avoids the
        # cancellation in E[z^2] - E[z]^2, and ranks may hold different batch sizes. No host sync.
        ones = torch.ones_like(mean, dtype=torch.float64)
        local = torch.stack([n * ones, n * mean.double(), n * (var.double() + mean.double() ** 2)])
        total = _AllReduceSum.apply(local)  # (3, C)
        count, pooled_mean = total[0], total[1] / total[0]
        pooled_var = (total[2] / count - pooled_mean**2).clamp_min(0)
        unbiased = pooled_var * count / (count - 1).clamp_min(1)
        return pooled_mean.float(), pooled_var.float(), unbiased.float()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        if self.mode == "none":
            return z
        if self.mode == "fixed" and not self._stats_checked:
            if not bool(self.stats_set):  # one host sync, the first time only
                raise RuntimeError(
                    "latent_norm='fixed' needs the VAE's latent statistics: call set_latent_stats(mean, std) "
                    "(or use latent_norm='running')"
                )
            self._stats_checked = True
        if self.mode == "running" and self.training:
            mean, var, unbiased = self.batch_stats(z)
            with torch.no_grad():  # EMA of the unbiased variance, as BatchNorm keeps
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (z - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
