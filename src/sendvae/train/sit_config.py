"""Config of ``sendvae train-sit``: SiT + REPA flow matching on a latent store, and its presets.

Presets (``--preset``):
  sit-xl2-repa   the paper's stage 2 (the SiT + REPA recipe of Yu et al., as Send-VAE trains it): SiT-XL/2,
                 REPA after block 8 with proj_coeff 0.5, AdamW lr 1e-4 wd 0, batch 256, grad clip 1,
                 EMA 0.9999, 80 epochs of ImageNet (~400k steps), label dropout 0.1.
  sit-b2-repa    the same at SiT-B/2 (REPA after block 4), the size of the paper's ablations.
  shapes-tiny    the embedded example: a 4-block, 128-wide SiT/2 on a shapes latent store, CPU minutes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..config import PresetRegistry, option, positive, unit_interval
from ..diffusion.transport import TransportConfig
from ..models.sit import SIT_MODELS
from ..teachers.config import TeacherConfig, embedded_teacher
from .common import RunConfig, batch_size_option, grad_accum_option


@dataclass
class SiTDataConfig:
    store: str | None = option(None, "latent store folder written by `sendvae cache-latents`")
    num_workers: int = option(4, "DataLoader worker processes per rank", min=0)
    hflip: bool = option(True, "draw the latent of the image or of its mirror at random (both are cached)")
    sample_posterior: bool = option(True, "z = mean + std * eps (True) or the posterior mean (False)")


@dataclass
class SiTModelConfig:
    model: str = option("SiT-XL/2", "SiT size and patch (REPA's --model)", choices=tuple(SIT_MODELS))
    depth: int | None = option(None, "override the preset's depth (small experiments)", min=1)
    hidden_size: int | None = option(None, "override the preset's width", min=1)
    num_heads: int | None = option(None, "override the preset's number of heads", min=1)
    encoder_depth: int = option(8, "REPA: the projector reads the tokens after this block (1..depth)", min=1)
    head_depth: int = option(
        0,
        "DiT^DH (RAE): blocks of a wide head after the backbone, reading x_t conditioned per token on the "
        "backbone's output (0 = none; RAE uses 2)",
        min=0,
    )
    head_width: int = option(2048, "DiT^DH: width of the head (RAE's XL: 2048)", min=1)
    head_num_heads: int = option(16, "DiT^DH: attention heads of the head", min=1)
    projector_dim: int = option(2048, "REPA: projector MLP width", min=1)
    qk_norm: bool = option(False, "normalise queries and keys per head")
    class_dropout: float = option(
        0.1, "label dropout to the null class (for classifier-free guidance)", min=0, max=1
    )
    unconditional: bool = option(False, "ignore the labels (one class)")
    grad_checkpointing: bool = option(
        False, "activation checkpointing: recompute the SiT's block activations in the backward pass"
    )
    ema_decay: float = option(0.9999, "EMA decay per step", min=0, max=1)
    vae: str | None = option(
        None, "the VAE the store must come from (path or preset); checked, and used to decode sample grids"
    )
    vae_config: str | None = option(None, "VAE preset for a checkpoint that carries no config")


@dataclass
class SiTOptimConfig:
    batch_size: int = batch_size_option(256)
    grad_accum: int = grad_accum_option()
    lr: float = option(1e-4, "AdamW learning rate", check=positive)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", check=unit_interval)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", min=0)
    grad_clip: float = option(1.0, "max gradient norm (0 disables clipping)", min=0)
    epochs: float | None = option(
        80.0, "training length in epochs of the store (if max_steps is unset)", check=positive
    )
    max_steps: int | None = option(None, "training length in steps (overrides epochs)", min=1)


@dataclass
class SiTEvalConfig:
    fd_every: int = option(
        0,
        "steps between proxy FD evaluations: FD_<teacher> of EMA samples vs the VAE's decodings of store "
        "latents, in stats.jsonl (0 = off; needs --vae)",
        min=0,
    )
    fd_samples: int = option(1000, "samples (and reference latents) per proxy FD", min=2)
    fd_teacher: TeacherConfig = option(
        embedded_teacher(), "the teacher whose pooled features give the proxy FD (--eval.fd_teacher.*)"
    )
    fd_steps: int = option(32, "Euler ODE steps of the proxy FD samples", min=1)
    fd_cfg_scale: float = option(1.0, "guidance scale of the proxy FD samples")


@dataclass
class SiTLatentsConfig:
    mean: tuple[float, ...] | None = option(
        None, "per-channel latent mean the SiT models (z - mean) / std with (default: the store's, at step 0)"
    )
    std: tuple[float, ...] | None = option(
        None, "per-channel latent std (default: the store's, at step 0)", check=positive
    )
    vae_fingerprint: str | None = option(None, "weights fingerprint of the VAE the latents come from (set)")


@dataclass
class TrainSiTConfig:
    preset: str = option("custom", "name of the preset this config started from")
    run: RunConfig = option(RunConfig(), "run")
    data: SiTDataConfig = option(SiTDataConfig(), "data")
    teacher: TeacherConfig = option(
        TeacherConfig(enc_type=None),
        "REPA's teacher run online on the store's source images (--teacher.enc_type NAME; none: the teacher "
        "features cached in the store)",
    )
    model: SiTModelConfig = option(SiTModelConfig(), "model")
    transport: TransportConfig = option(TransportConfig(), "transport")
    optim: SiTOptimConfig = option(SiTOptimConfig(), "optim")
    eval: SiTEvalConfig = option(SiTEvalConfig(), "eval")
    latents: SiTLatentsConfig = option(SiTLatentsConfig(), "latent statistics (recorded at step 0)")

    @staticmethod
    def upgrade(data: dict[str, Any], fmt: int) -> dict[str, Any]:
        """A config saved in layout ``fmt`` -> the current one. Layout 1 spelled the teachers as
        data.teacher / teacher_weights / teacher_random_init and eval.fd_teacher / fd_teacher_weights."""
        if fmt >= 2:
            return data
        data = copy.deepcopy(data)
        d, e = data.get("data"), data.get("eval")
        if isinstance(d, dict) and "teacher" in d:
            data["teacher"] = {"enc_type": d.pop("teacher"), "weights": d.pop("teacher_weights", None),
                               "random_init": d.pop("teacher_random_init", False)}  # fmt: skip
        if isinstance(e, dict) and isinstance(e.get("fd_teacher"), (str, type(None))):
            e["fd_teacher"] = {"enc_type": e.pop("fd_teacher"), "weights": e.pop("fd_teacher_weights", None)}
        return data


PRESETS = PresetRegistry("train-sit")


@PRESETS.register("sit-xl2-repa")
def _xl2() -> TrainSiTConfig:
    cfg = TrainSiTConfig(preset="sit-xl2-repa")
    cfg.run.ckpt_every, cfg.run.sample_every = 10_000, 10_000
    return cfg


@PRESETS.register("sit-b2-repa")
def _b2() -> TrainSiTConfig:
    cfg = _xl2()
    cfg.preset = "sit-b2-repa"
    cfg.model.model, cfg.model.encoder_depth = "SiT-B/2", 4
    return cfg


@PRESETS.register("shapes-tiny")
def _shapes_tiny() -> TrainSiTConfig:
    cfg = TrainSiTConfig(preset="shapes-tiny")
    cfg.run.exp_name = "shapes-tiny-sit"  # beside train-vae's runs/shapes-tiny
    cfg.run.log_every, cfg.run.ckpt_every, cfg.run.sample_every = 25, 250, 250
    cfg.data.num_workers = 0
    cfg.model.model = "SiT-S/2"
    cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads = 4, 128, 4
    cfg.model.encoder_depth, cfg.model.projector_dim = 2, 256
    cfg.optim.batch_size, cfg.optim.lr = 32, 3e-4
    cfg.optim.epochs, cfg.optim.max_steps = None, 500
    cfg.model.ema_decay = 0.99
    return cfg
