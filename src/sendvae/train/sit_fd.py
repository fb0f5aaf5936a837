"""A cheap generation metric inside `train-sit`: FD_<teacher> of EMA samples every N steps.

gFID needs 50k samples and the Inception weights; while training, a trend is enough. Every
`--eval.fd_every` steps the EMA SiT draws `--eval.fd_samples` latents (Euler ODE, fixed noise and
labels, so successive values differ only by the model), the VAE decodes them, and their Frechet
distance in a teacher's pooled features (default: the embedded EfficientNet-Lite0) is taken against
the VAE's decodings of as many posterior means from the latent store: the reference is what the
diffusion model can at best reproduce through this VAE, so the value isolates the diffusion model.
It is logged as `FD_<teacher>` in stats.jsonl, never as FID.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from ..data.transforms import to_uint8
from ..diffusion.sampling import euler_sample
from ..metrics.features import FeatureExtractor
from ..metrics.frechet import frechet_distance
from ..models.latent_stats import LatentStats

if TYPE_CHECKING:
    from ..models.vae import AutoencoderKL
    from ..teachers.config import TeacherConfig


class ProxyFD:
    """FD_<teacher> between decoded EMA samples and decoded store latents (see the module docstring)."""

    def __init__(
        self,
        store,
        stats: LatentStats,
        vae: AutoencoderKL,
        num_samples: int,
        teacher: TeacherConfig,
        device: torch.device,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        if num_samples < 2:
            raise ValueError(f"--eval.fd_samples must be >= 2, got {num_samples}")
        self.store, self.stats, self.vae, self.device, self.batch_size = store, stats, vae, device, batch_size
        self.n = min(num_samples, len(store))
        res = store.manifest["dataset"]["resolution"]
        self.fx = FeatureExtractor.from_config(teacher, res, device, batch_size)  # --eval.fd_teacher.*
        self.metric_name = self.fx.metric_name
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(self.n, *store.latent_shape, generator=g)  # fixed across evaluations
        self.labels = torch.randint(0, max(store.num_classes, 1), (self.n,), generator=g)
        self.ref = self.fx.statistics(self._decoded(self._store_latents()))

    def _store_latents(self) -> Iterator[torch.Tensor]:
        for s in range(0, self.n, self.batch_size):
            m = self.store.gather(np.arange(s, min(s + self.batch_size, self.n)))  # (B, 2, 2, C, h, w)
            yield self.stats.normalize(m[:, 0, 0].float().to(self.device))  # un-flipped posterior means

    @torch.no_grad()
    def _decoded(self, latents: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for z in latents:  # normalised latents -> uint8 images (B, 3, H, W)
            yield to_uint8(self.vae.decode(self.stats.denormalize(z)).float().clamp(-1, 1)).cpu()

    @torch.no_grad()
    def __call__(self, sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        """sample(noise (B, C, h, w), labels (B,)) -> normalised latents; returns FD_<teacher>."""

        def generated() -> Iterator[torch.Tensor]:
            for s in range(0, self.n, self.batch_size):
                sl = slice(s, s + self.batch_size)
                yield sample(self.noise[sl].to(self.device), self.labels[sl].to(self.device))

        return frechet_distance(*self.fx.statistics(self._decoded(generated())), *self.ref)


def ema_sampler(model: nn.Module, null_class: int, steps: int, cfg_scale: float):
    """The sampler ProxyFD calls: Euler ODE with `steps` steps and optional guidance."""

    def sample(noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return euler_sample(model, noise, y, null_class=null_class, steps=steps, cfg_scale=cfg_scale)

    return sample
