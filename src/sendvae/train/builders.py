"""Build the networks of VAE training from a ``TrainVAEConfig``, with the checks users need.

Kept apart from the loop so ``sendvae bench train-vae`` and the tests build exactly what training builds.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.discriminator import NLayerDiscriminator, load_discriminator
from ..models.mapper import Mapper, VFProjector
from ..models.vae import VAE_CONFIGS, AutoencoderKL
from ..models.vae_io import load_vae
from .vae_config import TrainVAEConfig


def build_vae_for(cfg: TrainVAEConfig, logger=None) -> AutoencoderKL:
    """The VAE preset, initialised from ``--model.vae_ckpt`` when given (strict: same architecture)."""
    m = cfg.model
    if m.vae not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE preset {m.vae!r}; choose one of: {', '.join(VAE_CONFIGS)}")
    res, f = cfg.data.resolution, None
    vae = load_vae(m.vae_ckpt, config=m.vae) if m.vae_ckpt else load_vae(m.vae)
    f = vae.downsample_factor
    if res % f:
        raise ValueError(
            f"resolution {res} is not divisible by the VAE's downsampling factor {f} "
            f"({m.vae}); use a multiple of {f}"
        )
    if m.gradient_checkpointing and hasattr(vae, "gradient_checkpointing"):
        vae.gradient_checkpointing = True
    if logger is not None:
        n = sum(p.numel() for p in vae.parameters())
        src = m.vae_ckpt or "random init"
        logger.info(f"VAE {m.vae}: {n / 1e6:.2f}M params, from {src}")
    return vae


def build_teacher_for(cfg: TrainVAEConfig, device: torch.device) -> nn.Module:
    from ..teachers import build_teacher

    t = cfg.teacher
    opts = {"input_size": t.input_size} if t.input_size else {}
    teacher = build_teacher(
        t.enc_type,
        weights=t.weights,
        resolution=cfg.data.resolution,
        random_init=t.random_init,
        allow_download=t.allow_download,
        **opts,
    )
    return teacher.to(device)


def build_head(cfg: TrainVAEConfig, vae: AutoencoderKL, teacher: nn.Module | None) -> nn.Module | None:
    """The alignment head for ``--loss.align``: Send-VAE mapper, REPA-style MLP, VF projection, or none."""
    kind = cfg.loss.align
    if kind == "none" or teacher is None:
        return None
    res = cfg.data.resolution
    latent_grid = tuple(vae.latent_grid(res))
    teacher_grid = tuple(teacher.grid_size(res))
    if kind == "vf":
        if latent_grid != teacher_grid:
            raise ValueError(
                f"the VF loss compares latent tokens {latent_grid} with teacher tokens "
                f"{teacher_grid} one to one; they must match (VA-VAE uses f16 with a /14 teacher "
                f"at 224)"
            )
        return VFProjector(vae.latent_channels, teacher.embed_dim)
    mcfg = cfg.mapper
    if kind == "repa":
        import dataclasses

        mcfg = dataclasses.replace(mcfg, depth=0, noise=False)
    return Mapper(vae.latent_channels, latent_grid, teacher.embed_dim, teacher_grid, mcfg)


def build_disc(cfg: TrainVAEConfig) -> nn.Module:
    m = cfg.model
    if m.disc_ckpt:
        return load_discriminator(m.disc_ckpt).train()  # loaders return eval mode; training needs train
    return NLayerDiscriminator(input_nc=3, ndf=m.disc_ndf, n_layers=m.disc_layers)


def build_lpips_for(cfg: TrainVAEConfig) -> nn.Module | None:
    lc = cfg.loss
    if lc.lpips_weight <= 0:
        return None
    from ..losses.lpips import build_lpips

    return build_lpips(
        variant=lc.lpips_variant,
        net=lc.lpips_net,
        weights=lc.lpips_weights,
        trunk_weights=lc.lpips_trunk_weights,
    )
