"""REPA-E (``--loss.align repae``): the VAE aligned through a SiT's first blocks, the SiT trained beside it.

Leng et al. 2025, "REPA-E: Unlocking VAE for End-to-End Tuning with Latent Diffusion Transformers" (arXiv
2504.10483); public code End2End-Diffusion/REPA-E (train_repae.py, models/sit.py). One step of train-vae,
after the VAE's z ~ q(z|x) (B, C, h, w) and the teacher's tokens f(x) (B, N, D) on the SiT's token grid:

    t ~ p(t), eps ~ N(0, I), y     drawn once (`SiTDraws`) and used by both updates, as REPA-E reuses them
    z_hat = BN(z)                  BatchNorm without affine, eps 1e-4, momentum 0.1 (a 'running' LatentNorm)
    x_t = (1 - t) z_hat + t eps
  VAE update (L_VAE + lambda_align L_align, then the discriminator's):
    L_align = -(1/N) sum_n cos(h_k(SiT_{1..k}(x_t, t, y))[n], f(x)[n])     (REPA's projection loss)
    through the SiT's blocks 1..k = ``--sit.encoder_depth`` and its projector h_k, frozen for this loss (its
    parameters enter detached: no gradient reaches them), BN with its running statistics (REPA-E puts the
    SiT in eval mode: no statistics update, no label dropout);
  SiT update, on sg(z) (no gradient reaches the VAE): BN with the batch statistics (pooled over the ranks,
    REPA-E's SyncBatchNorm), which also move the running ones, then train-sit's objective
    L_denoise + proj_coeff L_proj with label dropout, its own AdamW, the same gradient clip, an EMA.

Coefficients (REPA-E's README training command and argument defaults): lambda_align 1.5 (its
vae_align_proj_coeff; our ``--loss.align_weight``, set by the repae presets), proj_coeff 0.5, BN momentum 0.1
(bn_momentum) and eps 1e-4 (its SiT's BatchNorm2d), learning rate 1e-4 for the SiT, the VAE and the
discriminator, encoder depth 8, uniform t (weighting "uniform"). The BN starts from the VAE's
latent statistics (REPA-E: its latents-stats file; here ``HeadContext.latent_stats``).

The BN is the SiT's latent normalisation: the SiT models (z - mu_BN) / sqrt(var_BN + eps), so its export
(export/sit: the EMA SiT and latents.json) records mean mu_BN and std sqrt(var_BN + eps) of the BN's running
statistics, with the fingerprint of the exported VAE; the training state holds the SiT under ``"sit"``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from ..config import option, positive
from ..data import build_dataset
from ..data.latent_store import vae_fingerprint
from ..diffusion.transport import (
    T_SAMPLERS,
    TransportConfig,
    interpolate,
    repa_loss,
    sample_t,
    training_losses,
)
from ..losses.cosine import LossAndLogs
from ..models.latent_stats import LATENTS_FILE, LatentStats
from ..models.sit import SIT_MODELS, SiT, SiTConfig, sit_config, sized_sit_config
from ..runtime.checkpoint import atomic_write_json
from ..train.common import (
    BufferGuard,
    accumulate_terms,
    autocast_dtype,
    ema_update,
    fused_adamw,
    optimizer_step,
)
from ..train.latent_init import device_of
from .base import NOISY_LATENT, AlignInputs, Alignment, HeadContext
from .latent_norm import LatentNorm
from .mapper import GRID_MISMATCH_MODES

if TYPE_CHECKING:
    from ..models.vae import AutoencoderKL
    from ..train.vae_config import LossConfig, TrainVAEConfig

STATE_KEY = "sit"  # the SiT's entry in the training state (diffusion/sit_source.py reads it)
JOINT_LOGGED = ("sit_loss", "denoise", "proj", "sit_grad_norm")  # what `JointSiT.step` logs


@dataclass
class JointSiTConfig:
    """The SiT ``--loss.align repae`` trains beside the VAE (train-sit's option names where they agree)."""

    model: str = option("SiT-XL/2", "repae: SiT size and patch (as train-sit's --model.model)",
                        choices=tuple(SIT_MODELS))  # fmt: skip
    depth: int | None = option(None, "repae: override the SiT preset's depth (small experiments)", min=1)
    hidden_size: int | None = option(None, "repae: override the SiT preset's width", min=1)
    num_heads: int | None = option(None, "repae: override the SiT preset's number of heads", min=1)
    encoder_depth: int = option(
        8, "repae: the VAE's alignment and the SiT's REPA read the tokens after this block", min=1
    )
    projector_dim: int = option(2048, "repae: REPA projector MLP width", min=1)
    qk_norm: bool = option(False, "repae: normalise the SiT's queries and keys per head")
    class_dropout: float = option(
        0.1, "repae: label dropout of the SiT's update (classifier-free guidance)", min=0, max=1
    )
    unconditional: bool = option(False, "repae: ignore the labels (one class)")
    ema_decay: float = option(
        0.9999, "repae: EMA decay of the SiT per step (the EMA is exported)", min=0, max=1
    )
    lr: float = option(1e-4, "repae: AdamW learning rate of the SiT, constant (REPA-E: 1e-4)", check=positive)
    proj_coeff: float = option(0.5, "repae: REPA weight in the SiT's own loss (REPA-E: 0.5)", min=0)
    t_sampler: str = option("uniform", "repae: t distribution of both updates", choices=T_SAMPLERS)
    norm_momentum: float = option(0.1, "repae: momentum of the latent BatchNorm (REPA-E: 0.1)", min=0, max=1)
    norm_eps: float = option(
        1e-4, "repae: variance epsilon of the latent BatchNorm (REPA-E: 1e-4)", check=positive
    )
    grid_mismatch: str = option(
        "error",
        "repae: when the SiT's token grid is not the teacher's: 'error' (REPA-E aligns them one to one), or "
        "'resample_teacher' (the teacher tokens are resampled to the SiT's grid)",
        choices=GRID_MISMATCH_MODES,
    )


class SiTDraws(NamedTuple):
    """One step's draws for the SiT, shared by the VAE's alignment pass and the SiT's update."""

    t: torch.Tensor  # (B,) in [0, 1], 1 = noise
    eps: torch.Tensor  # (B, C, h, w)
    y: torch.Tensor  # (B,) int64 labels (zeros when unconditional)
    drop: torch.Tensor | None  # (B,) bool label dropout of the SiT's update; None: the SiT has no null class


# ---------------------------------------------------------------------------------------------------------
# Building: sizes and grids, each misfit one line that says what to do


def joint_sit_config(
    cfg: TrainVAEConfig, channels: int, latent_grid: tuple[int, int], teacher_dim: int, num_classes: int
) -> SiTConfig:
    """The ``--sit.*`` SiT for the VAE's (channels, h, w) latents and a teacher ``teacher_dim`` wide."""
    s, res = cfg.sit, cfg.data.resolution
    h, w = latent_grid
    shape = f"{channels}x{h}x{w} latents at --data.resolution {res}"
    if h != w:
        raise ValueError(f"--loss.align repae: a SiT needs a square latent grid; the VAE gives {shape}")
    patch = sit_config(s.model).patch_size
    if h % patch:
        family = s.model.rsplit("/", 1)[0]
        fits = [n for n in SIT_MODELS if n.startswith(family + "/") and h % sit_config(n).patch_size == 0]
        raise ValueError(
            f"--sit.model {s.model}: its patch size {patch} does not divide the VAE's {shape}; choose a "
            f"patch that divides {h} ({', '.join(fits)}) or another --data.resolution"
        )
    size = {k: getattr(s, k) for k in ("depth", "hidden_size", "num_heads") if getattr(s, k) is not None}
    size["encoder_depth"] = s.encoder_depth
    kw = {
        "input_size": h,
        "in_channels": channels,
        "num_classes": num_classes,
        "class_dropout_prob": s.class_dropout,
        "qk_norm": s.qk_norm,
        "projector_dim": s.projector_dim,
        "z_dims": (teacher_dim,),
    }
    try:
        return sized_sit_config(s.model, size, **kw)
    except ValueError as e:
        reason = str(e).removeprefix("invalid SiTConfig: ")
        raise ValueError(f"--sit.*: no valid SiT for the VAE's {shape}: {reason} (set the --sit.* option "
                         "each names)") from None  # fmt: skip


def check_token_grids(cfg: TrainVAEConfig, sit: SiTConfig, teacher_grid: tuple[int, int]) -> None:
    """The SiT's tokens must be on the teacher's grid (REPA-E), unless ``--sit.grid_mismatch`` resamples."""
    g, (th, tw) = sit.grid_size, teacher_grid
    if (g, g) == (th, tw) or cfg.sit.grid_mismatch == "resample_teacher":
        return
    h = sit.input_size
    family = cfg.sit.model.rsplit("/", 1)[0]
    fits = [
        n
        for n in SIT_MODELS
        if n.startswith(family + "/") and th == tw and h == th * sit_config(n).patch_size
    ]
    hint = f"--sit.model {fits[0]}, " if fits else ""
    raise ValueError(
        f"the SiT's {g}x{g} token grid ({cfg.sit.model} on {h}x{h} latents) is not the teacher's {th}x{tw} "
        f"token grid, and REPA-E aligns them one to one: use {hint}a --teacher.input_size with a {g}x{g} "
        "grid, or --sit.grid_mismatch resample_teacher (the teacher tokens are resampled to the SiT's grid)"
    )


def _num_classes(cfg: TrainVAEConfig) -> int:
    if cfg.sit.unconditional:
        return 1
    ds = build_dataset(cfg.data, seed=cfg.run.seed)
    return int(getattr(ds, "num_classes", 0) or len(getattr(ds, "classes", None) or []) or 1)


def build_repae_head(ctx: HeadContext) -> SiTAlignHead:
    """The ``repae`` entry's head: the latent BN + the SiT's first blocks and projector, the SiT trained by
    the `JointSiT` it holds. Built on the teacher's device; the BN starts from the VAE's latent statistics."""
    cfg, vae, teacher, logger = ctx.trainer, ctx.vae, ctx.teacher, ctx.logger
    res, dev = cfg.data.resolution, device_of(teacher)
    sit_cfg = joint_sit_config(
        cfg, vae.latent_channels, vae.latent_grid(res), teacher.embed_dim, _num_classes(cfg)
    )
    check_token_grids(cfg, sit_cfg, teacher.grid_size(res))
    norm = LatentNorm(vae.latent_channels, "running", cfg.sit.norm_momentum, cfg.sit.norm_eps)
    norm.set_stats(*ctx.latent_stats())
    sit = SiT(sit_cfg, grad_checkpointing=cfg.model.grad_checkpointing)  # also in the VAE's pass
    joint = JointSiT(cfg, sit.to(dev), norm.to(dev))
    if logger is not None:
        n, w = joint.sit.num_params() / 1e6, cfg.loss.align_weight
        logger.info(f"repae: {sit_cfg.describe()}, {n:.2f}M params, trained beside the VAE; latent BN from "
                    f"the VAE's latent statistics; --loss.align_weight {w:g} (REPA-E: 1.5, as the repae "
                    "presets)")  # fmt: skip
    return SiTAlignHead(joint)


# ---------------------------------------------------------------------------------------------------------
# The head (in the VAE's model) and the SiT trained beside the VAE


class _Features(nn.Module):
    """The SiT's blocks 1..encoder_depth and projector as a forward, for `torch.func.functional_call`."""

    def __init__(self, sit: SiT):
        super().__init__()
        self.sit = sit

    def forward(self, x, t, y, force_drop_ids) -> torch.Tensor:
        return self.sit.forward_features(x, t, y, force_drop_ids)[0]  # (B, N, D): the one teacher


class SiTAlignHead(nn.Module):
    """z (B, C, h, w) -> the frozen SiT's projected tokens (B, N, D) at x_t = (1 - t) BN(z) + t eps.

    Holds the BN as its module (its running statistics are checkpointed with the VAE's model) and the SiT
    only by reference: the SiT is no parameter of the VAE's model, so the VAE's optimizer and DDP never see
    it; `JointSiT` trains, syncs and checkpoints it.
    """

    def __init__(self, joint: JointSiT):
        super().__init__()
        self.norm = joint.norm
        self._held = (joint, _Features(joint.sit))  # a tuple: not registered as submodules

    @property
    def joint(self) -> JointSiT:
        return self._held[0]

    @property
    def token_grid(self) -> tuple[int, int]:
        g = self.joint.sit.config.grid_size
        return (g, g)

    def forward(self, z: torch.Tensor, draws: SiTDraws | None = None) -> torch.Tensor:
        """Gradients reach z only. Without ``draws`` (outside a training step) t, eps are drawn here and
        the labels are zeros."""
        if draws is None:
            draws = self.joint.draw(None, z.shape[0])
        x_t, _ = interpolate(self.joint.normalize(z, batch_stats=False), draws.eps, draws.t)
        keep = torch.zeros_like(draws.y, dtype=torch.bool) if draws.drop is not None else None  # true labels
        features, sit = self._held[1], self.joint.sit
        frozen = {k: p.detach() for k, p in features.named_parameters()}  # frozen for this loss
        args = (x_t, draws.t, draws.y, keep)
        if not (sit.grad_checkpointing and torch.is_grad_enabled()):
            return torch.func.functional_call(features, frozen, args)

        # --model.grad_checkpointing: the blocks are recomputed as one segment, not block by block, because
        # a block's recomputation (in the backward pass, after functional_call has put the SiT's trainable
        # parameters back) would not see the frozen ones.
        def frozen_blocks() -> torch.Tensor:
            sit.grad_checkpointing = False
            try:
                return torch.func.functional_call(features, frozen, args)
            finally:
                sit.grad_checkpointing = True

        return checkpoint(frozen_blocks, use_reentrant=False)


class JointSiT:
    """The SiT trained beside the VAE on its detached latents: model, EMA, optimizer, latent BN."""

    state_key = STATE_KEY

    def __init__(self, cfg: TrainVAEConfig, sit: SiT, norm: LatentNorm):
        self.cfg, self.sit, self.norm = cfg.sit, sit, norm
        self.device = next(sit.parameters()).device
        self.ema = copy.deepcopy(sit).requires_grad_(False).eval()
        o = cfg.optim  # betas, weight decay and clip as the VAE's (REPA-E uses one setting for all three)
        self.opt = fused_adamw(sit.parameters(), cfg.sit.lr, o.betas, o.weight_decay)
        self.clip = o.grad_clip
        self.transport = TransportConfig(t_sampler=cfg.sit.t_sampler, proj_coeff=cfg.sit.proj_coeff)
        self.amp = autocast_dtype(cfg.run.precision, self.device)
        self.ddp: nn.Module = sit
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(sit, device_ids=ids)

    def draw(self, labels: torch.Tensor | None, batch: int) -> SiTDraws:
        """This step's t, eps, labels and label dropout, from the global RNG (seeded per step and rank)."""
        c, dev = self.sit.config, self.device
        t = sample_t(batch, self.transport, dev)  # (B,)
        eps = torch.randn(batch, c.in_channels, c.input_size, c.input_size, device=dev)
        if labels is None or self.cfg.unconditional:
            y = torch.zeros(batch, dtype=torch.long, device=dev)
        else:
            y = labels.to(dev, non_blocking=True).long()
        drop = torch.rand(batch, device=dev) < c.class_dropout_prob if c.class_dropout_prob > 0 else None
        return SiTDraws(t, eps, y, drop)

    def normalize(self, z: torch.Tensor, batch_stats: bool) -> torch.Tensor:
        """The latent BN: batch statistics that also move the running ones (the SiT's update, BatchNorm in
        train mode), or the running statistics alone (the VAE's pass, BatchNorm in eval mode)."""
        was = self.norm.training
        self.norm.train(batch_stats)
        try:
            return self.norm(z)
        finally:
            self.norm.train(was)

    def step(
        self, parts: Sequence[tuple[torch.Tensor, SiTDraws, torch.Tensor]], skip: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One SiT update on the step's micro-batches (``--optim.grad_accum``; one part without it): each
        part is sg(z) (B, C, h, w), its draws and the teacher's tokens ``target`` (B, N, D); each part's loss
        is scaled by 1 / len(parts), DDP syncs on the last. Skipped with the VAE's (``skip`` = 1) or on a
        non-finite gradient. Each part normalises with its own batch statistics (pooled over the processes)
        and moves the BN's running statistics once. Returns (logged terms, found_inf)."""
        k = len(parts)
        guard = BufferGuard([self.norm])  # the BN's running statistics move in this forward
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        terms: dict[str, torch.Tensor] = {}
        for j, (z, draws, target) in enumerate(parts):
            z_hat = self.normalize(z.detach(), batch_stats=True)  # (B, C, h, w): no gradient to the VAE

            def model(x, t, y, draws=draws, **kw):  # the (DDP) SiT with this micro-batch's label dropout
                return self.ddp(x, t, y, force_drop_ids=draws.drop, **kw)

            sync = self.ddp.no_sync() if j < k - 1 and isinstance(self.ddp, DDP) else nullcontext()
            with sync:
                with amp:
                    out = training_losses(
                        model, z_hat, draws.y, target, self.transport, t=draws.t, noise=draws.eps
                    )
                (out["loss"] / k if k > 1 else out["loss"]).backward()
            accumulate_terms(
                terms,
                {"sit_loss": out["loss"], "denoise": out["denoise"], "proj": out["proj"]},
                k,
            )
        gnorm, bad = optimizer_step(self.opt, self.sit.parameters(), self.clip, skip=skip)
        guard.restore(bad)
        ema_update(self.ema, self.sit, self.cfg.ema_decay, found_inf=bad)
        terms["sit_grad_norm"] = gnorm
        return terms, bad

    # -----------------------------------------------------------------------------------------------------
    def latent_stats(self, vae_fingerprint: str | None = None) -> LatentStats:
        """The normalisation the SiT models: mean mu_BN, std sqrt(var_BN + eps) of the BN's running stats."""
        n = self.norm
        return LatentStats.from_tensors(n.running_mean, (n.running_var + n.eps).sqrt(), vae_fingerprint)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model_config": self.sit.config.to_dict(),
            "model": self.sit.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "latents": self.latent_stats().to_dict(),  # a record for sampling; the BN's state is the model's
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.sit.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])

    def export(self, out_dir: Path, vae: AutoencoderKL) -> Path:
        """out_dir/sit: the EMA SiT (model.safetensors + config.json, `sendvae.load_sit`) and latents.json
        (the BN's statistics and the fingerprint of ``vae``, the exported VAE), as train-sit exports."""
        out = Path(out_dir) / "sit"
        self.ema.save_pretrained(out)
        meta = {
            **self.latent_stats(vae_fingerprint(vae)).to_dict(),
            "null_class": self.sit.config.num_classes,
        }
        atomic_write_json(meta, out / LATENTS_FILE)
        return out


def joint_of(head: nn.Module) -> JointSiT:
    """The SiT trained beside the VAE, reached through the ``repae`` entry's head."""
    return cast(SiTAlignHead, head).joint  # the repae entry's own build_head made it


def _repae(inputs: AlignInputs, cfg: LossConfig) -> LossAndLogs:
    proj = repa_loss(inputs.pred, inputs.target)  # -(1/N) sum_n cos, REPA-E's vae_align proj_loss
    return proj, {"cos": -proj.detach()}


REPAE = Alignment(
    "repae",
    needs_teacher=True,
    build_head=build_repae_head,
    head_input=lambda cfg: NOISY_LATENT,
    token_grid=lambda head: cast(SiTAlignHead, head).token_grid,
    loss=_repae,
    logged=("align", "cos"),
    cotrained=joint_of,
    cotrained_logged=JOINT_LOGGED,
)
