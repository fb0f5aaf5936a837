"""The latent statistics a VAE training run starts from: the fixed LatentNorm of the alignment heads.

Used by the alignment registry's head builders (`alignment`, `repae`) and by `builders`; kept apart from
`builders`, which reads the training config and the registry, so that the registry imports it at its top.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data import build_dataset
from .export import latent_statistics

if TYPE_CHECKING:
    from ..models.vae import AutoencoderKL
    from .vae_config import TrainVAEConfig


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (cpu for a module without any)."""
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def carries_latent_stats(vae: AutoencoderKL) -> bool:
    """Whether the VAE holds latent statistics (its buffers are no longer the identity 0 / 1 of an init)."""
    return not (bool(vae.latent_mean.eq(0).all()) and bool(vae.latent_std.eq(1).all()))


def initial_latent_stats(
    cfg: TrainVAEConfig, vae: AutoencoderKL, device: torch.device | str = "cpu", logger=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel latent mean and std (C,) of the VAE training starts from: the fixed LatentNorm's values.

    The VAE's own ``latent_mean`` / ``latent_std`` when it carries them (loaded with ``--model.vae_ckpt``:
    REPA-E's latents-stats file, a sendvae export, a training state). A VAE that carries none (a random
    init, or a checkpoint without statistics: buffers still 0 / 1) is measured the way the export measures
    it (``export.latent_statistics``: z ~ q(z|x) of the first ``run.stats_images`` training images, float64
    sums, seed ``run.seed``), on ``device``. Every rank measures the same images, so they agree; a resumed
    run measures again and then loads the checkpoint's values, which are these.
    """
    if carries_latent_stats(vae):
        mean, std, src = vae.latent_mean.detach().float().cpu(), vae.latent_std.detach().float().cpu(), "VAE"
    else:
        home = device_of(vae)
        dataset = build_dataset(cfg.data, seed=cfg.run.seed)
        n = min(cfg.run.stats_images, len(dataset))
        mean, std = latent_statistics(vae.to(device), dataset, n, device=device, seed=cfg.run.seed)
        vae.to(home)
        src = f"{n} training images"
    if logger is not None:
        logger.info(f"mapper: fixed latent normalisation, statistics from the {src}")
    return mean, std
