"""The flow-matching training objective of SiT (linear interpolant, velocity prediction) and REPA's term.

    x_t = (1 - t) x + t eps,   eps ~ N(0, I),   t ~ p(t)          (x: normalised latents, t = 1 is noise)
    v*  = d x_t / dt = eps - x
    L_denoise = E_t,eps || v_theta(x_t, t, y) - v* ||^2   (mean over C, H, W per sample, then over the batch)
    L_proj    = -(1 / N) sum_n cos(h_k(tokens after block `encoder_depth`)[n], f(x)[n])   (REPA)
    L = L_denoise + proj_coeff * L_proj

Label dropout for classifier-free guidance is the model's (`SiTConfig.class_dropout_prob`). Everything
stays on the device: no `.item()` or other host syncs, so the step can run asynchronously or compiled.

Dimension-dependent time shift (SD3, Esser et al. 2024; RAE, Zheng et al. 2025),
`--transport.time_shift`: t drawn by the t sampler is mapped to

    t' = alpha t / (1 + (alpha - 1) t),   alpha = sqrt(m / n),   m = C h w of the latent, n = shift_base

Derivation, in our convention (t = 1 is noise). x_t = (1 - t) x + t eps has noise-to-signal ratio
t / (1 - t) per dimension. A latent of m dimensions averages its noise over more coordinates than one of n,
so the same t destroys less of it; SD3 asks that the m-dimensional latent at t' be as uncertain as the
n-dimensional one at t, which scales the noise-to-signal ratio by sqrt(m / n):

    t' / (1 - t') = alpha t / (1 - t)   <=>   t' = alpha t / (1 - t + alpha t) = alpha t / (1 + (alpha - 1) t)

So alpha > 1 (m > n) moves mass toward t = 1, more noise; t' = t at t = 0 and 1; alpha = 1 is the
identity, and the map is increasing (dt'/dt = alpha / (1 + (alpha - 1) t)^2 > 0). SD3 and RAE write the
interpolant with t = 1 as noise too (RAE's linear path is alpha_t = 1 - t on the data, sigma_t = t on the
noise), so their formula holds here as written. In SiT's convention (s = 1 - t, s = 0 noise) the same
map reads s' = (s / alpha) / (1 + (1 / alpha - 1) s): the formula with 1 / alpha. The samplers warp their
time grid with the same map (`diffusion.sampling`), read from `SiTConfig.time_shift`, where the trainer
records the alpha it used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import option, positive
from ..losses.cosine import mean_token_cosine

# the t sampler lives with the networks (the mapper draws t too); re-exported here
from ..models.timesteps import T_SAMPLERS, draw_t

PATHS = ("linear",)
PREDICTIONS = ("v",)
SHIFT_BASE = 4096  # n of the dimension shift: 4 x 32 x 32, the SD-VAE latent at 256 px (SD3's and RAE's)


def _shift_spec(value: str) -> str | None:
    """A `check` for --transport.time_shift: none, auto, or a number alpha > 0."""
    if value in ("none", "auto"):
        return None
    try:
        alpha = float(value)
    except ValueError:
        alpha = float("nan")
    return None if math.isfinite(alpha) and alpha > 0 else "must be none, auto or a number > 0"


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
    time_shift: str = option(
        "none",
        "dimension-dependent time shift t' = alpha t / (1 + (alpha - 1) t) of training and sampling "
        "(SD3, RAE): none | auto (alpha = sqrt(C*h*w / shift_base)) | a number alpha > 0",
        check=_shift_spec,
    )
    shift_base: int = option(SHIFT_BASE, "time_shift auto: the base dimension n", min=1)

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
        problem = _shift_spec(self.time_shift)
        if problem:
            raise ValueError(f"TransportConfig.time_shift {problem}, got {self.time_shift!r}")
        if self.shift_base < 1:
            raise ValueError(f"TransportConfig.shift_base must be >= 1, got {self.shift_base}")

    def shift_alpha(self, latent_shape: Sequence[int]) -> float:
        """alpha of `time_shift` for latents (C, h, w): 1 for none, sqrt(C h w / shift_base) for auto."""
        return time_shift_alpha(self.time_shift, latent_shape, self.shift_base)


def time_shift_alpha(spec: str, latent_shape: Sequence[int], base: int = SHIFT_BASE) -> float:
    """alpha = 1 (none), sqrt(prod(latent_shape) / base) (auto), or the number `spec`."""
    if spec == "none":
        return 1.0
    if spec == "auto":
        return math.sqrt(math.prod(latent_shape) / base)
    return float(spec)


def shift_time(t: Any, alpha: float) -> Any:
    """t' = alpha t / (1 + (alpha - 1) t) (module docstring) for a tensor or a float; alpha = 1 returns t."""
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


def sample_t(
    batch: int,
    cfg: TransportConfig,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    *,
    shift: float = 1.0,
) -> torch.Tensor:
    """t (B,) drawn as `cfg` says (`draw_t` with its t_sampler, logit_mean and logit_std), then moved by
    the time shift `shift` (alpha, `cfg.shift_alpha(latent_shape)`; 1 = none)."""
    t = draw_t(batch, cfg.t_sampler, device, generator, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
    return shift_time(t, shift)


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
    loss's (`losses.cosine.mean_token_cosine`): fp32, autocast off, the frozen teacher side detached.
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
    drawn with `generator` (else the global RNG) unless given; a drawn t is shifted by `cfg.time_shift`
    for x's (C, H, W) (a given t is used as it is). Returns scalars `loss`, `denoise`, `proj`
    (0 without teacher tokens) and per-sample `denoise_per_sample` (B,) and `t` (B,), for logging by t.
    """
    cfg = cfg or TransportConfig()
    x = x.float()
    b = x.shape[0]
    if t is None:
        t = sample_t(b, cfg, x.device, generator, shift=cfg.shift_alpha(x.shape[1:]))
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
