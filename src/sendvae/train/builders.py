"""Build the networks of VAE training from a ``TrainVAEConfig``, with the checks users need.

Kept apart from the loop so ``sendvae bench train-vae`` and the tests build exactly what training builds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..align import HeadContext, alignment_for, head_summary
from ..losses.lpips import (
    TORCHVISION_FILES,
    LPIPSWeightsError,
    build_lpips,
    find_standard_files,
    lin_package_path,
    trunk_cache_path,
)
from ..models.discriminator import NLayerDiscriminator, load_discriminator
from ..models.rae import RAE
from ..models.rae_decoder import RAE_DECODERS
from ..models.vae import VAE_CONFIGS, AutoencoderKL
from ..models.vae_io import load_vae
from ..teachers.config import build_from_config
from .latent_init import device_of, initial_latent_stats
from .rae import build_rae_for, is_rae

if TYPE_CHECKING:
    from ..teachers import Teacher
    from .vae_config import TrainVAEConfig


def build_vae_for(
    cfg: TrainVAEConfig, logger=None, device: torch.device | str = "cpu"
) -> AutoencoderKL | RAE:
    """The VAE preset, initialised from ``--model.vae_ckpt`` when given (strict: same architecture); or an
    RAE (``--model.vae rae-*``: the ``--teacher.*`` encoder, frozen, on ``device``, and a ViT decoder)."""
    m = cfg.model
    if is_rae(m.vae):
        return build_rae_for(cfg, build_teacher_for(cfg, torch.device(device)), device, logger)
    if m.vae not in VAE_CONFIGS:
        names = ", ".join([*VAE_CONFIGS, *RAE_DECODERS])
        raise ValueError(f"unknown VAE preset {m.vae!r}; choose one of: {names}")
    res, f = cfg.data.resolution, None
    vae = load_vae(m.vae_ckpt, config=m.vae) if m.vae_ckpt else load_vae(m.vae)
    f = vae.downsample_factor
    if res % f:
        raise ValueError(
            f"resolution {res} is not divisible by the VAE's downsampling factor {f} "
            f"({m.vae}); use a multiple of {f}"
        )
    if logger is not None:
        n = sum(p.numel() for p in vae.parameters())
        src = m.vae_ckpt or "random init"
        logger.info(f"VAE {m.vae}: {n / 1e6:.2f}M params, from {src}")
    return vae


def build_teacher_for(cfg: TrainVAEConfig, device: torch.device) -> Teacher:
    """The ``--teacher.*`` teacher for ``--data.resolution`` images, on ``device``."""
    return build_from_config(cfg.teacher, cfg.data.resolution, device)


def build_head(
    cfg: TrainVAEConfig, vae: AutoencoderKL, teacher: Teacher | None, logger=None
) -> nn.Module | None:
    """The alignment head of ``--loss.align``, built by its registry entry (align/), or None.

    None for a variant without a head, or without a teacher to size it. The starting VAE's latent
    statistics are measured only when the head asks for them (``--mapper.latent_norm fixed``, repae's BN).
    """
    entry = alignment_for(cfg)
    if entry.build_head is None or teacher is None:
        return None

    def latent_stats() -> tuple[torch.Tensor, torch.Tensor]:
        return initial_latent_stats(cfg, vae, device_of(teacher), logger)

    ctx = HeadContext(cfg.loss, cfg.mapper, cfg.data.resolution, vae, teacher, latent_stats, cfg, logger)
    head = entry.build_head(ctx)
    if logger is not None:
        logger.info(head_summary(entry, cfg, head))
    return head


def build_disc(cfg: TrainVAEConfig) -> nn.Module:
    m = cfg.model
    if m.disc_ckpt:
        return load_discriminator(m.disc_ckpt).train()  # loaders return eval mode; training needs train
    return NLayerDiscriminator(input_nc=3, ndf=m.disc_ndf, n_layers=m.disc_layers)


def _lpips_files_error(
    net: str, weights: str | None, trunk_weights: str | None, found: tuple[Path | None, Path | None]
) -> LPIPSWeightsError:
    """One line naming both files standard LPIPS needs, where each comes from, and which one is missing."""
    trunk_file, lin_file = TORCHVISION_FILES[net], f"{net}.pth"
    trunk, lins = found
    if trunk is not None:
        trunk_state = f"found at {trunk}"
    elif trunk_weights is not None:
        trunk_state = f"missing (--loss.lpips_trunk_weights {trunk_weights}: no such file)"
    else:
        trunk_state = f"missing (not in {trunk_cache_path(net).parent}), pass --loss.lpips_trunk_weights PATH"
    if lins is not None:
        lin_state = f"found at {lins}"
    elif weights is not None:
        lin_state = f"missing (--loss.lpips_weights {weights}: no such file)"
    elif lin_package_path(net) is None:
        lin_state = "missing (lpips is not installed), `pip install lpips` or pass --loss.lpips_weights PATH"
    else:
        lin_state = "missing (not in the installed lpips package), pass --loss.lpips_weights PATH"
    trunk_name, net_name = {"vgg": ("VGG16", "VGG"), "alex": ("AlexNet", "AlexNet")}[net]
    return LPIPSWeightsError(
        f"standard LPIPS-{net_name} (--loss.lpips_variant lpips) needs two weight files, never downloaded "
        f"here: (1) the torchvision {trunk_name} ImageNet trunk {trunk_file}, from "
        f"https://download.pytorch.org/models/{trunk_file} (torchvision keeps it in its hub cache): "
        f"{trunk_state}; (2) the LPIPS v0.1 lin heads {lin_file}, shipped in the lpips pip package as "
        f"lpips/weights/v0.1/{lin_file} and found automatically when it is installed: {lin_state}. "
        "Or train with the bundled shift-tolerant ST-LPIPS: --loss.lpips_variant stlpips"
    )


def check_lpips_for(cfg: TrainVAEConfig) -> None:
    """Standard LPIPS whose files are not on disk: one line that names both files and their options.

    Cheap (it only looks for the files), so a trainer can call it before building anything else.
    """
    lc = cfg.loss
    if lc.lpips_weight > 0 and lc.lpips_variant == "lpips" and not lc.lpips_random_init:
        found = find_standard_files(lc.lpips_net, lc.lpips_weights, lc.lpips_trunk_weights)
        if None in found:
            raise _lpips_files_error(lc.lpips_net, lc.lpips_weights, lc.lpips_trunk_weights, found)


def build_lpips_for(cfg: TrainVAEConfig) -> nn.Module | None:
    """The perceptual loss network of ``--loss.lpips_*``, or None when its weight is 0.

    Standard LPIPS whose files are missing stops here, before any training (`check_lpips_for`).
    """
    lc = cfg.loss
    if lc.lpips_weight <= 0:
        return None
    check_lpips_for(cfg)
    return build_lpips(
        variant=lc.lpips_variant,
        net=lc.lpips_net,
        weights=lc.lpips_weights,
        trunk_weights=lc.lpips_trunk_weights,
        pretrained=not lc.lpips_random_init,
    )
