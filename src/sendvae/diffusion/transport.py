"""The flow-matching training objective of SiT (linear interpolant, velocity prediction) and REPA's term.

    x_t = (1 - t) x + t eps,   eps ~ N(0, I),   t ~ p(t)          (x: normalised latents, t = 1 is noise)
    v*  = d x_t / dt = eps - x
    L_denoise = E_t,eps || v_theta(x_t, t, y) - v* ||^2   (mean over C, H, W per sample, then over the batch)
    L_proj    = -(1 / N) sum_n cos(h_k(tokens after block `encoder_depth`)[n], f(x)[n])   (REPA)
    L = L_denoise + proj_coeff * L_proj

Label dropout for classifier-free guidance is the model's (`SiTConfig.class_dropout_prob`). Everything
stays on the device: no `.item()` or other host syncs, so the step can run asynchronously or compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import option, positive
from ..losses.align import mean_token_cosine

# the t sampler lives with the networks (the mapper draws t too); re-exported here
from ..models.timesteps import T_SAMPLERS, draw_t

PATHS = ("linear",)
PREDICTIONS = ("v",)


@dataclass
class TransportConfig:
    path: str = option("linear", "interpolant: linear, x_t = (1 - t) x + t eps", choices=PATHS)
    prediction: str = option("v", "model target: v (velocity eps - x)", choices=PREDICTIONS)
    t_sampler: str = option(
        "uniform",
        "t distribution: uniform U(0, 1) | logit_normal (sigmoid of N(mean, std))",
        choices=T_SAMPLERS,
    )
    logit_mean: float = option(0.0, "logit_normal: mean of logit(t)")
    logit_std: float = option(1.0, "logit_normal: std of logit(t)", check=positive)
    proj_coeff: float = option(0.5, "REPA: weight of the alignment term", min=0)

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("path", self.path, PATHS),
            ("prediction", self.prediction, PREDICTIONS),
            ("t_sampler", self.t_sampler, T_SAMPLERS),
        ):
            if value not in allowed:
                raise ValueError(f"TransportConfig.{name} must be one of {allowed}, got {value!r}")
        if self.logit_std <= 0:
            raise ValueError(f"TransportConfig.logit_std must be > 0, got {self.logit_std}")


def sample_t(
    batch: int,
    cfg: TransportConfig,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """t (B,) drawn as `cfg` says (`draw_t` with its t_sampler, logit_mean and logit_std)."""
    return draw_t(batch, cfg.t_sampler, device, generator, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = (1 - t) x + t eps and the velocity target eps - x; t (B,) broadcasts over (C, H, W)."""
    tb = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)  # (B, 1, 1, 1)
    return (1 - tb) * x + tb * eps, eps - x


def repa_loss(
    projected: list[torch.Tensor] | torch.Tensor, teacher: list[torch.Tensor] | torch.Tensor
) -> torch.Tensor:
    """-mean over teachers, samples and tokens of cos(projected, teacher), in fp32.

    projected[k], teacher[k]: (B, N, D_k); one pair per teacher. Teacher tokens must already be on the
    model's token grid (resample them beforehand if the grids differ). The cosine is the alignment
    loss's (`losses.align.mean_token_cosine`): fp32, autocast off, the frozen teacher side detached.
    """
    projected = [projected] if torch.is_tensor(projected) else list(projected)
    teacher = [teacher] if torch.is_tensor(teacher) else list(teacher)
    if len(projected) != len(teacher) or not projected:
        raise ValueError(
            f"REPA needs one teacher per projector: {len(projected)} projectors, {len(teacher)} teachers "
            "(set SiTConfig.z_dims to the teachers' widths)"
        )
    total = projected[0].new_zeros((), dtype=torch.float32)
    for k, (p, f) in enumerate(zip(projected, teacher)):
        if p.shape != f.shape:
            raise ValueError(
                f"REPA projector {k} gives {tuple(p.shape)} tokens but teacher {k} has {tuple(f.shape)}; "
                "grids and widths must match (resample the teacher tokens or change patch_size / z_dims)"
            )
        total = total - mean_token_cosine(p, f)
    return total / len(projected)


def training_losses(
    model: Callable[..., Any],
    x: torch.Tensor,
    y: torch.Tensor,
    teacher_tokens: list[torch.Tensor] | torch.Tensor | None = None,
    cfg: TransportConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One flow-matching (+ REPA) loss on a batch of normalised latents x (B, C, H, W) with labels y (B,).

    `model(x_t, t, y, return_features=...)` is a SiT (or a DDP / compiled wrapper of one). t and eps are
    drawn with `generator` (else the global RNG) unless given. Returns scalars `loss`, `denoise`, `proj`
    (0 without teacher tokens) and per-sample `denoise_per_sample` (B,) and `t` (B,), for logging by t.
    """
    cfg = cfg or TransportConfig()
    x = x.float()
    b = x.shape[0]
    if t is None:
        t = sample_t(b, cfg, x.device, generator)
    eps = torch.randn(x.shape, device=x.device, generator=generator) if noise is None else noise.float()
    x_t, target = interpolate(x, eps, t.float())
    if teacher_tokens is None:
        v = model(x_t, t, y)
        proj = x.new_zeros(())
    else:
        v, projected = model(x_t, t, y, return_features=True)
        proj = repa_loss(projected, teacher_tokens)
    per_sample = (v.float() - target).square().flatten(1).mean(1)  # (B,), mean over C, H, W in fp32
    denoise = per_sample.mean()
    return {
        "loss": denoise + cfg.proj_coeff * proj,
        "denoise": denoise,
        "proj": proj,
        "denoise_per_sample": per_sample,
        "t": t,
    }
