"""The alignment variants of VAE training, one registry entry each (``--loss.align``).

z ~ q(z|x) is the VAE latent (B, C, h, w), f(x) the frozen teacher's patch tokens (B, N, D) on the head's
token grid (resampled when the grids differ), and the objective adds lambda_align * L_align
(``--loss.align_weight``) to L_VAE (losses/vae_loss.py):

  none     no alignment: no teacher, no head, L_align = 0.
  sendvae  Send-VAE (arXiv 2601.05823, Sec. 3). Per-channel normalisation z_hat = (z - mu) / sigma
           (``--mapper.latent_norm``), noise injection z_t = (1 - t) z_hat + t eps, t ~ U(0, 1)
           (``--mapper.t_sampling``), eps ~ N(0, I) (training only; ``--mapper.noise``), the mapper
           h_phi = patch embed -> ``--mapper.depth`` ViT blocks -> MLP to the teacher width
           (models/mapper.py), and
             L_align = 1 - (1/N) sum_n cos(h_phi(z_t)[n], f(x)[n]).
  repa     REPA-style direct alignment: the same head with depth 0 (patch embed + MLP) and no noise,
           on the clean normalised latent: L_align = 1 - (1/N) sum_n cos(MLP(z_hat)[n], f(x)[n]).
  vf       VA-VAE's VF loss (Yao et al., LightningDiT). A bias-free 1x1 conv W on the raw latent, tokens on
           the latent grid (it must equal the teacher grid), margins m_c, m_d (``--loss.vf_margin_*``):
             L_mcos = mean_{b,n} relu(1 - m_c - cos(Wz_n, f_n)),
             L_mdms = mean_{b,i,j} relu(|cos(Wz_i, Wz_j) - cos(f_i, f_j)| - m_d),
             L_align = L_mcos + L_mdms,
           weighted by lambda_align * ||d L_nll / dW_e|| / (||d L_align / dW_e|| + 1e-4) at the encoder's
           last conv W_e when ``--loss.vf_adaptive`` (VA-VAE's adaptive weight).

An entry carries everything its variant needs; the trainer, the objective and the export ask the entry
and never branch on the name. The trainer picks the entry once (`alignment_for`); `--loss.align`'s
choices are this registry's names. A new variant (ReaLS: patch + global cosine terms through an MLP;
REPA-E: the alignment passed through a frozen SiT's first blocks) is one more entry here:
  * its head is any ``nn.Module`` mapping z (B, C, h, w) to what its loss reads (several parts, frozen or
    not, in one container); it lives in the trained model, so it is optimised, synced and checkpointed;
  * its loss reads ``AlignInputs``: the head's output and the teacher's tokens, and the teacher's global
    feature ``target_global`` when it wants one; it returns (L_align, the terms it logs);
  * its export writes whatever a user needs beside the VAE (the mapper today; ReaLS's feature head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from ..losses.align import LossAndLogs, cosine_alignment_loss, vf_loss
from ..losses.vae_loss import AlignInputs
from ..models.mapper import Mapper, VFProjector
from .export import export_mapper

if TYPE_CHECKING:
    from ..models.vae import AutoencoderKL
    from ..teachers import Teacher
    from .vae_config import LossConfig, TrainVAEConfig

# What a head consumes (``Alignment.head_input``).
NOISY_LATENT = "noisy latent"  # z_t = (1 - t) z_hat + t eps in training, the clean latent in eval
CLEAN_LATENT = "clean latent"  # z itself (or its per-channel normalisation), in training and eval

HeadBuilder = Callable[["TrainVAEConfig", "AutoencoderKL", "Teacher", object], nn.Module]
AlignLoss = Callable[[AlignInputs, "LossConfig"], LossAndLogs]
# the first argument is the head the entry's own build_head made (a Mapper for sendvae / repa)
HeadExporter = Callable[[Any, Path, "TrainVAEConfig", "AutoencoderKL", "Teacher"], None]


def _never(_cfg: object) -> bool:
    return False


def _no_head(_cfg: object) -> None:
    return None


def _teacher_grid(_head: nn.Module) -> None:
    return None


@dataclass(frozen=True)
class Alignment:
    """One alignment variant: how to build its head, its loss, what it logs and what it exports."""

    name: str
    help: str  # one line for ``--loss.align``'s help
    needs_teacher: bool  # build the teacher (the trainer computes its tokens every step)
    # (cfg, vae, teacher, logger) -> the head, h(z) -> the `pred` of AlignInputs; None: no head
    build_head: HeadBuilder | None = None
    # what the head consumes under this config: NOISY_LATENT, CLEAN_LATENT, or None (no head)
    head_input: Callable[[TrainVAEConfig], str | None] = _no_head
    # the head's token grid when it may differ from the teacher's (the teacher tokens are resampled to
    # it); None: the head's tokens are on the teacher's grid
    token_grid: Callable[[nn.Module], tuple[int, int] | None] = _teacher_grid
    loss: AlignLoss | None = None  # (AlignInputs, LossConfig) -> (L_align unweighted, logged terms)
    # scale lambda_align by ||grad L_nll|| / (||grad L_align|| + 1e-4) at the encoder's last conv
    adaptive: Callable[[LossConfig], bool] = _never
    logged: tuple[str, ...] = ()  # every key the alignment adds to the logged terms ("align" + the loss's)
    export: HeadExporter | None = None  # writes the head beside the exported VAE; None: nothing
    exports: tuple[str, ...] = ()  # the files `export` writes in export/vae


# ---------------------------------------------------------------------------------------------------------
# Heads


def _mapper_head(**overrides) -> HeadBuilder:
    """The Send-VAE mapper of ``--mapper.*`` with ``overrides`` of its MapperConfig (REPA: depth 0, no noise).

    With ``--mapper.latent_norm fixed`` its LatentNorm gets the starting VAE's latent statistics here
    (`builders.initial_latent_stats`, measured on the teacher's device when the VAE carries none), before
    the first step; they stay fixed for the run and travel in its checkpoints.
    """

    def build(cfg: TrainVAEConfig, vae: AutoencoderKL, teacher: Teacher, logger=None) -> nn.Module:
        # not at the top: builders imports vae_config, which imports this module
        from .builders import _device_of, initial_latent_stats

        res = cfg.data.resolution
        mcfg = replace(cfg.mapper, **overrides)
        latent_grid, teacher_grid = vae.latent_grid(res), teacher.grid_size(res)
        mapper = Mapper(vae.latent_channels, latent_grid, teacher.embed_dim, teacher_grid, mcfg)
        if mcfg.latent_norm == "fixed":
            mapper.set_latent_stats(*initial_latent_stats(cfg, vae, _device_of(teacher), logger))
        return mapper

    return build


def _vf_head(cfg: TrainVAEConfig, vae: AutoencoderKL, teacher: Teacher, logger=None) -> nn.Module:
    res = cfg.data.resolution
    latent_grid, teacher_grid = vae.latent_grid(res), teacher.grid_size(res)
    if latent_grid != teacher_grid:
        raise ValueError(
            f"the VF loss compares latent tokens {latent_grid} with teacher tokens "
            f"{teacher_grid} one to one; they must match (VA-VAE uses f16 with a /14 teacher "
            f"at 224)"
        )
    return VFProjector(vae.latent_channels, teacher.embed_dim)


def _mapper_grid(head: nn.Module) -> tuple[int, int]:
    return cast(Mapper, head).token_grid  # a tuple already


# ---------------------------------------------------------------------------------------------------------
# Losses


def _cosine(inputs: AlignInputs, cfg: LossConfig) -> LossAndLogs:
    loss, mean_cos = cosine_alignment_loss(inputs.pred, inputs.target)
    return loss, {"cos": mean_cos}


def _vf(inputs: AlignInputs, cfg: LossConfig) -> LossAndLogs:
    return vf_loss(inputs.pred, inputs.target, cfg.vf_margin_cos, cfg.vf_margin_dist)


# ---------------------------------------------------------------------------------------------------------
# The registry (its order is the order of --loss.align's choices)

_MAPPER_FILES = ("mapper.safetensors", "mapper.json")

ALIGNMENTS: dict[str, Alignment] = {
    a.name: a
    for a in (
        Alignment(
            "sendvae",
            "Send-VAE: mapper (ViT blocks + MLP) on the noisy latent z_t, token cosine",
            needs_teacher=True,
            build_head=_mapper_head(),
            head_input=lambda cfg: NOISY_LATENT if cfg.mapper.noise else CLEAN_LATENT,
            token_grid=_mapper_grid,
            loss=_cosine,
            logged=("align", "cos"),
            export=export_mapper,
            exports=_MAPPER_FILES,
        ),
        Alignment(
            "repa",
            "REPA-style: MLP on the clean latent, token cosine",
            needs_teacher=True,
            build_head=_mapper_head(depth=0, noise=False),
            head_input=lambda cfg: CLEAN_LATENT,
            token_grid=_mapper_grid,
            loss=_cosine,
            logged=("align", "cos"),
            export=export_mapper,
            exports=_MAPPER_FILES,
        ),
        Alignment(
            "vf",
            "VA-VAE: 1x1 projection, marginal cosine + distance-matrix VF loss",
            needs_teacher=True,
            build_head=_vf_head,
            head_input=lambda cfg: CLEAN_LATENT,
            loss=_vf,
            adaptive=lambda cfg: cfg.vf_adaptive,
            logged=("align", "vf_cos", "vf_dist", "mean_cos"),
        ),
        Alignment("none", "no alignment (no teacher, no head)", needs_teacher=False),
    )
}


def alignment_help() -> str:
    """The help of ``--loss.align``: every variant's name and line."""
    return "alignment variant: " + "; ".join(f"{a.name}: {a.help}" for a in ALIGNMENTS.values())


def alignment_for(cfg: TrainVAEConfig) -> Alignment:
    """The registry entry of ``--loss.align``."""
    name = cfg.loss.align
    if name not in ALIGNMENTS:
        raise ValueError(f"--loss.align: unknown variant {name!r}; choose one of: {', '.join(ALIGNMENTS)}")
    return ALIGNMENTS[name]


def head_summary(entry: Alignment, cfg: TrainVAEConfig, head: nn.Module) -> str:
    """One log line: the variant, its head, what the head consumes, its size."""
    n = sum(p.numel() for p in head.parameters()) / 1e6
    return f"alignment {entry.name}: {type(head).__name__} on the {entry.head_input(cfg)}, {n:.2f}M params"
