"""Alignment losses between predicted tokens and frozen teacher (VFM) patch tokens.

- `cosine_alignment_loss`: Send-VAE / REPA, L_align = 1 - (1/N) sum_n cos(h_phi(z_t)[n], f(x)[n]),
  averaged over the batch.
- `vf_loss`: VA-VAE's vision-foundation loss, a marginal cosine term plus a marginal term on the
  token-token cosine-similarity matrices within each image.
- `reals_loss`: ReaLS's patch-level token cosine plus a global cosine against the teacher's pooled
  feature, each with its weight.

All cast to fp32 and run with autocast off: in fp16 a squared norm overflows past 65504 (a vector
of norm 256) and the cosine turns into NaN, and a bf16 Gram matrix is too coarse for the margins.
The target is a constant (the teacher is frozen); it is detached here so no gradient can reach it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LossAndLogs = tuple[torch.Tensor, dict[str, torch.Tensor]]
NORM_EPS = 1e-6  # a zero vector normalises to zero and gets cos = 0 with a finite gradient


def _check_tokens(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            f"alignment expects predicted and teacher tokens of the same shape (B, N, D), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}; if the token grids differ, resample the "
            "teacher tokens to the mapper's token_grid first"
        )


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=NORM_EPS)


def mean_token_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1/BN) sum_{b,n} cos(pred[b, n], target[b, n]) for pred, target (B, N, D): an fp32 scalar.

    The one token cosine: Send-VAE's alignment loss below and REPA's projection loss
    (`diffusion.transport.repa_loss`) are built on it. Gradients reach `pred` only.
    """
    _check_tokens(pred, target)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        cos = (_unit(pred) * _unit(target.detach())).sum(-1)  # (B, N)
        return cos.mean()


def cosine_alignment_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise cosine alignment: pred, target (B, N, D) -> (1 - mean cos, mean cos detached), fp32."""
    mean_cos = mean_token_cosine(pred, target)
    return 1.0 - mean_cos, mean_cos.detach()


def vf_loss(
    z_proj: torch.Tensor,
    f: torch.Tensor,
    margin_cos: float = 0.5,
    margin_dist: float = 0.25,
    weight_cos: float = 1.0,
    weight_dist: float = 1.0,
) -> LossAndLogs:
    """VA-VAE's VF loss on projected latent tokens z_proj and teacher tokens f, both (B, N, D).

    L_mcos  = mean_{b,n} relu(1 - m_c - cos(z_n, f_n))
    L_mdms  = mean_{b,i,j} relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m_d)      (pairs within each image)
    L_vf    = weight_cos * L_mcos + weight_dist * L_mdms

    Memory: two (B, N, N) fp32 matrices, 4 B N^2 bytes each (N = 256: 256 KiB per image).
    VA-VAE's adaptive weight ||grad L_nll|| / (||grad L_vf|| + 1e-4) at the encoder's last layer is
    applied by the trainer, which owns both losses.
    """
    _check_tokens(z_proj, f)
    with torch.autocast(device_type=z_proj.device.type, enabled=False):
        zu, fu = _unit(z_proj), _unit(f.detach())  # (B, N, D)
        cos = (zu * fu).sum(-1)  # (B, N)
        l_cos = F.relu(1.0 - margin_cos - cos).mean()
        gram_z = torch.bmm(zu, zu.transpose(1, 2))  # (B, N, N)
        gram_f = torch.bmm(fu, fu.transpose(1, 2))  # (B, N, N)
        l_dist = F.relu((gram_z - gram_f).abs() - margin_dist).mean()
        loss = weight_cos * l_cos + weight_dist * l_dist
    parts = {"vf_cos": l_cos.detach(), "vf_dist": l_dist.detach(), "mean_cos": cos.mean().detach()}
    return loss, parts


def reals_loss(
    patch: torch.Tensor,
    glob: torch.Tensor,
    target: torch.Tensor,
    target_global: torch.Tensor,
    weight_patch: float = 1.0,
    weight_global: float = 1.0,
) -> LossAndLogs:
    """ReaLS's two alignment terms: patch tokens patch, target (B, N, D); global features glob,
    target_global (B, D), the teacher's pooled feature.

    L_patch  = 1 - (1/BN) sum_{b,n} cos(patch[b, n], target[b, n])
    L_global = 1 - (1/B) sum_b cos(glob[b], target_global[b])
    L        = weight_patch * L_patch + weight_global * L_global
    """
    if glob.ndim != 2 or glob.shape != target_global.shape:
        raise ValueError(
            f"the global term expects predicted and teacher global features (B, D) of one shape, got "
            f"{tuple(glob.shape)} and {tuple(target_global.shape)}"
        )
    l_patch, cos_patch = cosine_alignment_loss(patch, target)
    l_global, cos_global = cosine_alignment_loss(glob[:, None], target_global[:, None])  # (B, 1, D)
    loss = weight_patch * l_patch + weight_global * l_global
    return loss, {"cos": cos_patch, "cos_global": cos_global}
