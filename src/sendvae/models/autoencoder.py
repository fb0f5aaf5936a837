"""What every autoencoder of the pipeline shares: a reconstruction through a posterior, latent statistics.

`AutoencoderKL` (models/vae.py: a trained encoder, a Gaussian posterior) and `RAE` (models/rae.py: a frozen
teacher's tokens, a posterior whose sample is RAE's noise augmentation) subclass `Autoencoder`; cache-latents,
train-sit, sample, evaluate and probe read either through it: encode(x) -> posterior (sample / mode / kl),
decode(z), latent_channels, and the per-channel statistics of z the diffusion stage normalises with
(``latent_mean`` / ``latent_std`` buffers, saved with the weights; `models/latent_stats.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .latent_stats import denormalize, normalize


def channel_stats(mean: Any, std: Any, channels: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) float32 mean and std from (C,), (1, C, 1, 1) or lists; ValueError unless finite with std > 0."""
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(std, dtype=torch.float32).flatten()
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(
            f"{what} need {channels} values per tensor (one per latent channel), got mean {mean.numel()} "
            f"and std {std.numel()}"
        )
    if not torch.isfinite(mean).all() or not (std > 0).all():
        raise ValueError(f"{what} must be finite with std > 0")
    return mean, std


class Autoencoder(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) <-> latents (B, C, h, w); a subclass defines encode, decode and
    latent_channels, and registers the statistics with `_init_latent_stats`."""

    latent_mean: torch.Tensor  # buffers (C,)
    latent_std: torch.Tensor

    def _init_latent_stats(self, channels: int) -> None:
        self.register_buffer("latent_mean", torch.zeros(channels))
        self.register_buffer("latent_std", torch.ones(channels))

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Reconstruct x from a posterior sample (or its mode); returns (recon, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / std per channel with the autoencoder's own statistics (`models/latent_stats.py`)."""
        return normalize(z, self.latent_mean, self.latent_std)

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_latents`: z * std + mean."""
        return denormalize(z, self.latent_mean, self.latent_std)

    @torch.no_grad()
    def set_latent_stats(self, mean: torch.Tensor | Any, std: torch.Tensor | Any) -> None:
        """Store per-channel latent mean / std; accepts (C,), (1, C, 1, 1) or lists."""
        mean, std = channel_stats(mean, std, self.latent_channels, "latent stats")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
