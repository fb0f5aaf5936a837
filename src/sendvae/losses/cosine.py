"""The token cosine between predicted tokens and frozen teacher (VFM) patch tokens: one implementation.

- `mean_token_cosine`: (1/BN) sum_{b,n} cos(pred[b, n], target[b, n]), what every alignment is built on:
  REPA's projection loss in SiT training (`diffusion.transport.repa_loss`) and the VAE alignment variants
  (align/: Send-VAE and REPA-style 1 - cos, ReaLS's patch and global terms, REPA-E's -cos; VA-VAE's VF
  loss normalises with the same `unit`).
- `cosine_alignment_loss`: L_align = 1 - (1/N) sum_n cos(h_phi(z_t)[n], f(x)[n]), averaged over the batch.

All cast to fp32 and run with autocast off: in fp16 a squared norm overflows past 65504 (a vector
of norm 256) and the cosine turns into NaN, and a bf16 Gram matrix is too coarse for the margins.
The target is a constant (the teacher is frozen); it is detached here so no gradient can reach it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LossAndLogs = tuple[torch.Tensor, dict[str, torch.Tensor]]
NORM_EPS = 1e-6  # a zero vector normalises to zero and gets cos = 0 with a finite gradient


def check_tokens(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            f"alignment expects predicted and teacher tokens of the same shape (B, N, D), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}; if the token grids differ, resample the "
            "teacher tokens to the mapper's token_grid first"
        )


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=NORM_EPS)


def mean_token_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1/BN) sum_{b,n} cos(pred[b, n], target[b, n]) for pred, target (B, N, D): an fp32 scalar.

    The one token cosine: Send-VAE's alignment loss below and REPA's projection loss
    (`diffusion.transport.repa_loss`) are built on it. Gradients reach `pred` only.
    """
    check_tokens(pred, target)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        cos = (unit(pred) * unit(target.detach())).sum(-1)  # (B, N)
        return cos.mean()


def cosine_alignment_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise cosine alignment: pred, target (B, N, D) -> (1 - mean cos, mean cos detached), fp32."""
    mean_cos = mean_token_cosine(pred, target)
    return 1.0 - mean_cos, mean_cos.detach()
