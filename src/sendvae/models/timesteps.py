"""The flow time t ~ p(t), drawn by the networks and by the objective alike.

t = 0 is the clean latent, t = 1 pure noise (x_t = (1 - t) x + t eps). The Send-VAE mapper draws t for
its noise injection and SiT training (`diffusion.transport`) draws t for its loss: one sampler, kept
here with the networks so that a model never imports the training objective.
"""

from __future__ import annotations

import torch

T_SAMPLERS = ("uniform", "logit_normal")


def draw_t(
    batch: int,
    sampler: str = "uniform",
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """t (B,) in fp32 on `device`: U(0, 1), or sigmoid(N(mean, std)) (logit-normal, SD3 / SiT).

    logit_normal with mean 0, std 1 is also REPA-E's "lognormal" weighting: sigma = exp(N(0, 1)),
    t = sigma / (1 + sigma) = sigmoid(N(0, 1)). The one t sampler: SiT training
    (`diffusion.transport.sample_t`) and the Send-VAE mapper's noise injection (`align.mapper`) both
    draw here.
    """
    if sampler not in T_SAMPLERS:
        raise ValueError(f"t sampler must be one of {T_SAMPLERS}, got {sampler!r}")
    if sampler == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    u = torch.randn(batch, device=device, generator=generator)
    return torch.sigmoid(u * logit_std + logit_mean)
