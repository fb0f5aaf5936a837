"""Latent statistics: the one (de)normalisation of VAE latents, and the record of which ones a model uses.

A latent diffusion model learns z_n = (z - mean) / std (per channel, z (B, C, h, w)) and its samples go
back to the decoder as z = z_n * std + mean. Decoding with statistics other than the ones the model was
trained with shifts every sample (the field's classic latent-normalisation bug, worth a FID of 100+), so:

* `normalize` / `denormalize` here are the only implementation (the VAE, the latent store, the SiT
  trainer, the sampler and the proxy FD call them);
* a SiT run records its `LatentStats` in its config from step 0 (``--latents.*`` of train-sit, filled
  from the latent store when not given), hence in every checkpoint and in its export's
  ``latents.json``; `sendvae sample` uses exactly those and refuses to guess when they are missing.

The VAE's own statistics (its ``latent_mean`` / ``latent_std`` buffers, diffusers' ``latents_mean`` /
``latents_std``) stay in its export as information for third-party users.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

LATENTS_FILE = "latents.json"  # a SiT export's record of the statistics the SiT was trained with


def normalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(z - mean) / std per channel; z (B, C, ...), mean and std (C,)."""
    shape = (1, -1) + (1,) * (z.ndim - 2)
    return (z - mean.to(z.dtype).view(shape)) / std.to(z.dtype).view(shape)


def denormalize(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The inverse of `normalize`: z * std + mean."""
    shape = (1, -1) + (1,) * (z.ndim - 2)
    return z * std.to(z.dtype).view(shape) + mean.to(z.dtype).view(shape)


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of a VAE's latents, and the VAE they belong to (its weights' fingerprint)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    vae_fingerprint: str | None = None
    _cache: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"latent statistics need one mean and one std per channel, got "
                             f"{len(self.mean)} and {len(self.std)}")  # fmt: skip
        if not all(math.isfinite(v) for v in self.mean + self.std) or min(self.std) <= 0:
            raise ValueError("latent statistics must be finite with std > 0")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def from_tensors(cls, mean: Any, std: Any, vae_fingerprint: str | None = None) -> LatentStats:
        m = torch.as_tensor(mean, dtype=torch.float32).flatten().tolist()
        s = torch.as_tensor(std, dtype=torch.float32).flatten().tolist()
        return cls(tuple(m), tuple(s), vae_fingerprint)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float32 (C,) tensors on ``device``, made once per device (no copy per call)."""
        key = str(torch.device(device))
        if key not in self._cache:
            self._cache[key] = (
                torch.tensor(self.mean, dtype=torch.float32, device=device),
                torch.tensor(self.std, dtype=torch.float32, device=device),
            )
        return self._cache[key]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return normalize(z, *self.tensors(z.device))

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return denormalize(z, *self.tensors(z.device))

    def to_dict(self) -> dict[str, Any]:
        return {
            "latent_mean": list(self.mean),
            "latent_std": list(self.std),
            "vae_fingerprint": self.vae_fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentStats:
        """From ``{latent_mean, latent_std[, vae_fingerprint]}`` or ``{mean, std[, vae_fingerprint]}``."""
        mean = d.get("latent_mean", d.get("mean"))
        std = d.get("latent_std", d.get("std"))
        if mean is None or std is None:
            raise ValueError(f"no latent statistics (latent_mean / latent_std) among the keys {sorted(d)}")
        return cls(tuple(mean), tuple(std), d.get("vae_fingerprint"))

    def same_values(self, other: LatentStats, rtol: float = 1e-6) -> bool:
        """Equal means and stds (to float32 rounding); the fingerprint is compared separately."""
        pairs = list(zip(self.mean + self.std, other.mean + other.std))
        return self.channels == other.channels and all(
            math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12) for a, b in pairs
        )
