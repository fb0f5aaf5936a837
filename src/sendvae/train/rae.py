"""The RAE tokenizer in ``sendvae train-vae`` (``--model.vae rae-*``): the frozen ``--teacher.*`` encoder and
a ViT decoder (models/rae.py), trained by the VAE trainer with the VAE's loss.

What differs from a VAE run is decided here, once, when the model is built:
  * the encoder's per-channel token statistics (what z is normalised by) are measured before training, over
    the first ``--run.stats_images`` training images (`export.latent_statistics`, the one measurement of
    latent statistics: float64 sums, eval mode, so without noise), and recorded in the model's buffers,
    hence in every checkpoint and the export; ``--model.vae_ckpt`` (an RAE export or checkpoint) brings its
    own, with its decoder, and must have been trained for the same encoder;
  * the trainer's optimizer sees only the decoder's parameters (the encoder's have requires_grad False);
  * the posterior sample is RAE's noise augmentation, ``--model.rae_noise_tau`` / ``--model.rae_noise``;
  * no alignment (``--loss.align none``: the latent *is* the teacher's representation), no KL (it is 0).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..align import alignment_for
from ..data import build_dataset
from ..models.rae import RAE, RAEConfig
from ..models.rae_decoder import RAE_DECODERS
from ..models.vae_io import load_vae
from .export import latent_statistics

if TYPE_CHECKING:
    from ..teachers import Teacher
    from .vae_config import TrainVAEConfig


def is_rae(arch: str) -> bool:
    """Whether ``--model.vae`` names an RAE decoder (`models.rae_decoder.RAE_DECODERS`)."""
    return arch in RAE_DECODERS


def rae_config_for(cfg: TrainVAEConfig) -> RAEConfig:
    """The RAE of a train-vae config: encoder ``--teacher.*``, decoder ``--model.vae``, noise
    ``--model.rae_*``."""
    m = cfg.model
    if cfg.teacher.enc_type is None:
        raise ValueError(f"--model.vae {m.vae} is an RAE: name its frozen encoder with --teacher.enc_type")
    return RAEConfig(
        encoder=cfg.teacher.enc_type,
        encoder_input_size=cfg.teacher.input_size,
        resolution=cfg.data.resolution,
        decoder=replace(RAE_DECODERS[m.vae]),
        noise_tau=m.rae_noise_tau,
        noise=m.rae_noise,
    )


def check_rae_run(cfg: TrainVAEConfig) -> None:
    """The options an RAE run cannot take: one line naming each."""
    problems = []
    if alignment_for(cfg).loss is not None:  # any variant but none
        problems.append(
            f"--loss.align {cfg.loss.align}: an RAE's latent is the frozen teacher's representation, there "
            "is nothing to align; use --loss.align none"
        )
    if cfg.optim.freeze_decoder:
        problems.append("--optim.freeze_decoder: an RAE trains only its decoder, freezing it leaves nothing")
    if problems:
        raise ValueError(f"--model.vae {cfg.model.vae} is an RAE: " + "; ".join(problems))


def build_rae_for(
    cfg: TrainVAEConfig, teacher: Teacher, device: torch.device | str = "cpu", logger=None
) -> RAE:
    """The RAE of ``cfg`` on ``teacher`` (built from ``--teacher.*``), on ``device``, ready to train: the
    decoder and statistics of ``--model.vae_ckpt``, else a fresh decoder and statistics measured now."""
    check_rae_run(cfg)
    rae = RAE(rae_config_for(cfg), teacher).to(device)
    m = cfg.model
    if m.vae_ckpt:
        take_decoder(rae, load_vae(m.vae_ckpt), m.vae_ckpt)
        src = f"decoder and statistics from {m.vae_ckpt}"
    else:
        dataset = build_dataset(cfg.data, seed=cfg.run.seed)
        n = min(cfg.run.stats_images, len(dataset))
        # With the identity normalisation (0 / 1 at init) and no noise (eval), z is the encoder's tokens.
        mean, std = latent_statistics(rae, dataset, n, device=device, seed=cfg.run.seed)  # type: ignore[arg-type]
        rae.set_feature_stats(mean, std)
        src = f"fresh decoder; token statistics of {n} training images"
    if logger is not None:
        dec = sum(p.numel() for p in rae.decoder.parameters())
        enc = sum(p.numel() for p in rae.encoder.parameters())
        c, (gh, gw) = rae.latent_channels, rae.grid
        logger.info(
            f"RAE {m.vae}: frozen {cfg.teacher.enc_type} ({enc / 1e6:.2f}M params) -> {c} x {gh} x {gw} "
            f"latents, ViT decoder {dec / 1e6:.2f}M params ({rae.patch}-px patches); {src}; token mean "
            f"{rae.feature_mean.mean():.3g}, std {rae.feature_std.mean():.3g} (channel averages)"
        )
    return rae


def take_decoder(rae: RAE, src: torch.nn.Module, source: str) -> None:
    """Copy the decoder and statistics of a trained RAE ``src`` into ``rae``: only for the same encoder (its
    weights' fingerprint, input grid and resolution) and the same decoder sizes; else a ValueError."""
    if not isinstance(src, RAE):
        raise ValueError(
            f"--model.vae_ckpt {source} is a VAE, not an RAE: an RAE run starts from an RAE decoder (the "
            "export/vae or a checkpoint of a train-vae --model.vae rae-* run), or from scratch without it"
        )
    mine = (rae.config.encoder, rae.config.resolution, rae.grid, rae.encoder_fingerprint())
    theirs = (src.config.encoder, src.config.resolution, src.grid, src.encoder_fingerprint())
    if mine != theirs:

        def show(enc: str, res: int, grid: tuple[int, int], fp: str) -> str:
            return f"{enc} at {res} px, {grid[0]}x{grid[1]} tokens, weights {fp[:12]}"

        raise ValueError(
            f"--model.vae_ckpt {source} holds a decoder trained for another encoder ({show(*theirs)}) than "
            f"this run's ({show(*mine)}); a decoder reads only its own encoder's latents: give the "
            "--teacher.* options (and --resolution) it was trained with, or train a new decoder"
        )
    if src.config.decoder != rae.config.decoder:
        raise ValueError(
            f"--model.vae_ckpt {source} holds a decoder of other sizes ({src.config.decoder}) than "
            f"--model.vae {rae.config.decoder}; choose the matching --model.vae"
        )
    with torch.no_grad():
        rae.decoder.load_state_dict(src.decoder.state_dict())
        rae.set_feature_stats(src.feature_mean, src.feature_std)
        rae.set_latent_stats(src.latent_mean, src.latent_std)
