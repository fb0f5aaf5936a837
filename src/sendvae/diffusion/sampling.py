"""Samplers for the linear interpolant x_t = (1 - t) x + t eps, whose velocity is dx_t/dt = eps - x.

Integrating dx/dt = v(x, t) from t = 1 (pure noise) to t = 0 gives data:
  * ODE: Euler, or Heun (2nd order; its last step is plain Euler, as in the SiT / REPA samplers), over
    ``steps`` uniform steps of [1, 0].
  * SDE: Euler-Maruyama over linspace(1, last_step, steps) with diffusion w(t) = 2t and drift
    v - w/2 * score, then one noiseless step from last_step to 0 (``steps`` model evaluations in all).
    For this interpolant eps = x_t + (1 - t) v, so score(x_t) = -E[eps | x_t] / t = -(x_t + (1 - t) v) / t.
  * Time shift: a SiT trained with the dimension-dependent shift t' = alpha t / (1 + (alpha - 1) t)
    (`diffusion.transport`) is sampled on the grid warped by the same map, as RAE's samplers do: the ODE
    grid is shift(linspace(1, 0)), the SDE's noisy grid shift(linspace(1, last_step)) (its last noisy time
    becomes shift(last_step)), then the step to 0. alpha is the SiT's recorded `time_shift` unless the
    sampler's `time_shift` overrides it; 1 leaves the grids as above.
Classifier-free guidance acts on all latent channels (DiT/SiT guide only the first 3: a bug not repeated
here), only for t inside [guidance_low, guidance_high]. As in REPA's samplers.py, a step's start time
decides for the whole step: Heun's corrector, evaluated at the step's end, is guided when the step
started inside the interval.

The model runs in eval mode whatever mode the caller left it in (a SiT in training mode would drop labels
to the null class at random), and gets its own modes back afterwards.

One seed per image: each image's initial noise and SDE noise come from its own generator, so image i is
the same whatever the batch size, the batch it lands in or the process that makes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import option, positive
from .transport import shift_time

if TYPE_CHECKING:
    from ..models.sit import SiT

# SDE noise is drawn per image in blocks of this many steps (fewer generator calls); part of the definition
# of an image's noise stream, so changing it changes SDE samples.
NOISE_BLOCK = 32


@dataclass
class SamplerConfig:
    mode: str = option("ode", "ode (deterministic) or sde (Euler-Maruyama)", choices=("ode", "sde"))
    method: str = option("euler", "ODE solver (the SDE is always Euler-Maruyama)", choices=("euler", "heun"))
    steps: int = option(
        50, "solver steps (ODE) or grid points (SDE); the SDE makes `steps` model calls", min=1
    )
    cfg_scale: float = option(1.0, "classifier-free guidance scale (1 = none, no unconditional pass)")
    guidance_low: float = option(0.0, "guidance only for t >= this", min=0, max=1)
    guidance_high: float = option(1.0, "guidance only for t <= this", min=0, max=1)
    last_step: float = option(0.04, "SDE: the last noisy time; one noiseless step follows to 0")
    precision: str = option("fp32", "model compute: fp32, or bf16 autocast", choices=("fp32", "bf16"))
    time_shift: float | None = option(
        None,
        "warp the time grid by the time shift alpha (1 = none; default: the one the SiT was trained with)",
        check=positive,
    )

    def __post_init__(self) -> None:
        if self.mode not in ("ode", "sde") or self.method not in ("euler", "heun"):
            raise ValueError(f"mode must be ode|sde and method euler|heun, got {self.mode}/{self.method}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.steps < (2 if self.mode == "sde" else 1):
            raise ValueError(f"steps must be >= {2 if self.mode == 'sde' else 1}, got {self.steps}")
        if not 0.0 < self.last_step < 1.0:
            raise ValueError(f"last_step must be in (0, 1), got {self.last_step}")
        if self.guidance_low > self.guidance_high:
            raise ValueError(f"guidance interval [{self.guidance_low}, {self.guidance_high}] is empty")
        if self.time_shift is not None and not (math.isfinite(self.time_shift) and self.time_shift > 0):
            raise ValueError(f"time_shift must be a number > 0, got {self.time_shift}")

    def tag(self) -> str:
        """Short description for file names, e.g. '250sde_euler_cfg2.5_0.0-0.75'."""
        shift = "" if self.time_shift is None else f"_shift{self.time_shift:g}"
        return (
            f"{self.steps}{self.mode}_{self.method if self.mode == 'ode' else 'em'}_cfg{self.cfg_scale:g}_"
            f"{self.guidance_low:g}-{self.guidance_high:g}{shift}"
        )

    def shift_for(self, model: object) -> float:
        """The time shift alpha to sample `model` with: this config's, else the one its config records."""
        if self.time_shift is not None:
            return self.time_shift
        return trained_shift(model)


def trained_shift(model: object) -> float:
    """alpha of the time shift a SiT (or anything with a SiTConfig `config`) was trained with; 1 if none."""
    return float(getattr(getattr(model, "config", None), "time_shift", 1.0))


def guided_velocity(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    null_class: int,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    guide_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """v = v_u + s (v_c - v_u) where `guide_t` (default t) is inside [low, high], else v_c; (B, C, H, W) fp32.

    `t` and `guide_t` are scalars (one time for the batch) or (B,). With scale 1, or a scalar `guide_t`
    outside the interval, only the conditional pass runs.
    """
    tb = t.reshape(-1).expand(x.shape[0])
    gb = tb if guide_t is None else guide_t.reshape(-1).expand(x.shape[0])
    inside = (gb >= guidance_low) & (gb <= guidance_high)
    if cfg_scale == 1.0 or not bool(inside.any()):
        return model(x, tb, y).float()
    v_both = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, torch.full_like(y, null_class)]))
    v_c, v_u = v_both.float().chunk(2)
    scale = 1.0 + inside.float().view(-1, 1, 1, 1) * (cfg_scale - 1.0)
    return v_u + scale * (v_c - v_u)


def score_from_velocity(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad log p_t(x) = -(x + (1 - t) v) / t for x_t = (1 - t) x_0 + t eps (t > 0)."""
    return -(x + (1.0 - t) * v) / t


class ImageNoise:
    """Per-image Gaussian streams: image i draws its initial noise, then its SDE noise, from
    ``torch.Generator().manual_seed(seeds[i])`` on the CPU (the same numbers on any device)."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str):
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = tuple(shape), torch.device(device)
        self._block: torch.Tensor | None = None  # (B, NOISE_BLOCK, *shape) on the device

    def _draw(self, *lead: int) -> torch.Tensor:
        return torch.stack([torch.randn((*lead, *self.shape), generator=g) for g in self.gens]).to(
            self.device
        )

    def initial(self) -> torch.Tensor:
        """x_1 ~ N(0, I): (B, *shape)."""
        return self._draw()

    def step(self, k: int) -> torch.Tensor:
        """Noise of SDE step k (0, 1, ... in order): (B, *shape)."""
        if k % NOISE_BLOCK == 0:
            self._block = self._draw(NOISE_BLOCK)
        assert self._block is not None  # steps come in order from 0
        return self._block[:, k % NOISE_BLOCK]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (no label dropout, no dropout) inside the block; every submodule's own
    training flag is restored afterwards, mixed modes included."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if modes:
        model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _velocity_fn(model: Callable[..., torch.Tensor], y: torch.Tensor, null_class: int, cfg: SamplerConfig):
    amp = torch.autocast(y.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()

    def velocity(x: torch.Tensor, t: torch.Tensor, guide_t: torch.Tensor | None = None) -> torch.Tensor:
        with amp:
            return guided_velocity(
                model, x, t, y, null_class, cfg.cfg_scale, cfg.guidance_low, cfg.guidance_high, guide_t
            )

    return velocity


def ode_solve(
    velocity, x: torch.Tensor, steps: int, method: str = "euler", shift: float = 1.0
) -> torch.Tensor:
    """dx/dt = velocity(x, t[, guide_t]) from t = 1 to 0 on a uniform grid warped by the time shift `shift`
    (alpha; 1 = none); Heun's last step is Euler.

    Heun: d = v(x, t), x' = x + dt d, x <- x + dt (d + v(x', t_next)) / 2, both evaluations guided or not
    by where t (the step's start) lies, as REPA's euler_sampler(heun=True).
    """
    grid = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()
    ts = [torch.tensor(t, device=x.device, dtype=torch.float32) for t in grid]
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        d = velocity(x, t)
        x_euler = x + dt * d
        if method == "heun" and i < steps - 1:
            x = x + dt * 0.5 * (d + velocity(x_euler, t_next, t))
        else:
            x = x_euler
    return x


def sde_solve(
    velocity,
    x: torch.Tensor,
    steps: int,
    noise: ImageNoise,
    last_step: float = 0.04,
    shift: float = 1.0,
) -> torch.Tensor:
    """Euler-Maruyama of dx = [v - w/2 score] dt + sqrt(w) dW backwards over linspace(1, last_step, steps)
    warped by the time shift `shift` (alpha; 1 = none), w(t) = 2t, then the mean step to 0."""
    noisy = torch.linspace(1.0, last_step, steps, dtype=torch.float64)
    grid = shift_time(noisy, shift).tolist() + [0.0]
    ts = [torch.tensor(t, device=x.device, dtype=torch.float32) for t in grid]
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t  # < 0
        v = velocity(x, t)
        w = 2.0 * t
        drift = v - 0.5 * w * score_from_velocity(x, v, t)
        x = x + drift * dt
        if i < steps - 1:  # the last step (to t = 0) is noiseless
            x = x + torch.sqrt(w * dt.abs()) * noise.step(i)
    return x


@torch.no_grad()
def sample(
    model: SiT,
    labels: torch.Tensor,
    seeds: Sequence[int],
    config: SamplerConfig | None = None,
    *,
    null_class: int | None = None,
    latent_shape: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Latents x_0 (B, C, H, W) fp32 for class `labels` (B,) on the model's device, image i from `seeds[i]`;
    the model runs in eval mode (`eval_mode`).

    `null_class` and `latent_shape` default to the SiT's config (num_classes, (in_channels, H, W)); the
    time shift to the SiT's recorded one unless `config.time_shift` is set.
    """
    cfg = config or SamplerConfig()
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {labels.shape[0]} labels")
    if null_class is None:
        null_class = model.config.num_classes
    if latent_shape is None:
        mc = model.config
        latent_shape = (mc.in_channels, mc.input_size, mc.input_size)
    noise = ImageNoise(seeds, latent_shape, labels.device)
    x = noise.initial()
    velocity = _velocity_fn(model, labels, null_class, cfg)
    shift = cfg.shift_for(model)
    with eval_mode(model):
        if cfg.mode == "ode":
            return ode_solve(velocity, x, cfg.steps, cfg.method, shift)
        return sde_solve(velocity, x, cfg.steps, noise, cfg.last_step, shift)


@torch.no_grad()
def euler_sample(
    model: nn.Module,
    noise: torch.Tensor,
    y: torch.Tensor,
    null_class: int,
    steps: int = 50,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    time_shift: float | None = None,
) -> torch.Tensor:
    """Euler ODE from the given noise at t = 1 to 0 in ``steps`` steps, on the grid warped by `time_shift`
    (default: the SiT's recorded one); x_0 (B, C, H, W) fp32."""
    cfg = SamplerConfig(
        steps=steps,
        cfg_scale=cfg_scale,
        guidance_low=guidance_low,
        guidance_high=guidance_high,
        time_shift=time_shift,
    )
    velocity = _velocity_fn(model, y, null_class, cfg)
    with eval_mode(model):
        return ode_solve(velocity, noise.float(), steps, "euler", cfg.shift_for(model))
