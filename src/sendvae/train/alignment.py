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
  reals    ReaLS (arXiv 2502.00359). An MLP on the clean normalised latent (models/reals.py) predicts the
           patch tokens P(z_hat) (B, N, D) and a global feature g(z_hat) (B, D) from the token mean; with
           the teacher's pooled feature fbar = (1/N) sum_n f(x)[n] (``AlignInputs.target_global``):
             L_align = w_p (1 - (1/N) sum_n cos(P[n], f(x)[n])) + w_g (1 - cos(g, fbar)),
           w_p, w_g = ``--loss.reals_patch_weight``, ``--loss.reals_global_weight``; the KL weight that
           ReaLS balances against them is ``--loss.kl_weight`` (the reals-f16d32 preset records its source).
  repae    REPA-E (arXiv 2504.10483, train/repae.py). z_hat = BN(z) (BatchNorm, no affine),
           x_t = (1 - t) z_hat + t eps; the head is a SiT's blocks 1..k and REPA projector h_k, frozen for
           this loss:
             L_align = -(1/N) sum_n cos(h_k(SiT_{1..k}(x_t, t, y))[n], f(x)[n])   (REPA's projection loss);
           the SiT itself trains in the same step on sg(z) with its own loss and optimizer (``--sit.*``).

An entry carries everything its variant needs; the trainer, the objective and the export ask the entry
and never branch on the name. The trainer picks the entry once (`alignment_for`); `--loss.align`'s
choices are this registry's names. A new variant (e.g. REPA-E: the alignment passed through a frozen
SiT's first blocks) is one more entry here:
  * its head is any ``nn.Module`` mapping z (B, C, h, w) to what its loss reads (several parts, frozen or
    not, in one container); it lives in the trained model, so it is optimised, synced and checkpointed;
  * its loss reads ``AlignInputs``: the head's output and the teacher's tokens, and the teacher's global
    feature ``target_global`` when it wants one; it returns (L_align, the terms it logs);
  * its export writes whatever a user needs beside the VAE (its head and `export.head_meta`), its load
    reads the head back, and its read_out gives the head's patch tokens (B, N, D) for a latent: what the
    downstream heads (analysis/downstream.py) read; `load_exported_head` finds the variant of an export;
  * a model trained beside the VAE, by its own optimizer on the VAE's detached latents (REPA-E's SiT), is
    the entry's ``cotrained(head)`` (a `CoTrained`): the trainer lets it draw what the head reads beside z
    each step, runs its update after the VAE's, checkpoints it and exports it (export/<its name>).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from ..diffusion.transport import repa_loss
from ..losses.align import LossAndLogs, cosine_alignment_loss, reals_loss, vf_loss
from ..losses.vae_loss import AlignInputs
from ..models.mapper import VF_FILES, Mapper, VFProjector, load_mapper, load_vf_projector
from ..models.reals import REALS_FILES, RealsHead, load_reals_head, split_reals_output
from ..runtime.weights import read_json
from .export import export_mapper, export_reals, export_vf
from .latent_init import device_of, initial_latent_stats
from .repae import JOINT_LOGGED, SiTAlignHead, build_repae_head, joint_of

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
HeadLoader = Callable[[Path], nn.Module]  # the export folder -> the head, in eval mode
ReadOut = Callable[[Any, torch.Tensor], torch.Tensor]  # (head, z (B, C, h, w)) -> patch tokens (B, N, D)


class CoTrained(Protocol):
    """A model trained beside the VAE on its detached latents, by its own optimizer (REPA-E: the SiT)."""

    state_key: str  # its entry in the training state

    def draw(self, labels: torch.Tensor | None, batch: int) -> Any: ...  # what the head reads beside z

    def step(  # its update on the micro-batches' (sg(z), cond, target), skipped when ``skip``
        self, parts: Sequence[tuple[torch.Tensor, Any, torch.Tensor]], skip: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...  # -> (logged terms, found_inf 0/1)

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, out_dir: Path, vae: AutoencoderKL) -> Path: ...  # beside export/vae; -> its folder


def _never(_cfg: object) -> bool:
    return False


def _no_head(_cfg: object) -> None:
    return None


def _teacher_grid(_head: nn.Module) -> None:
    return None


def _alone(_head: nn.Module) -> None:
    return None


def _all_tokens(head: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return head(z)


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
    load: HeadLoader | None = None  # reads the exported head back (eval mode); None: nothing exported
    # the head's patch tokens (B, N, D) on its token grid for a latent, in eval mode (downstream features)
    read_out: ReadOut = field(default=_all_tokens)
    # the model trained beside the VAE, reached through the head; None: the VAE trains alone
    cotrained: Callable[[nn.Module], CoTrained | None] = _alone
    cotrained_logged: tuple[str, ...] = ()  # every key its update adds to the logged terms


# ---------------------------------------------------------------------------------------------------------
# Heads


def _mapper_head(head_cls: type[Mapper] | type[RealsHead] = Mapper, **overrides) -> HeadBuilder:
    """The Send-VAE mapper of ``--mapper.*`` with ``overrides`` of its MapperConfig (REPA: depth 0, no noise);
    ``head_cls`` RealsHead builds ReaLS's two-branch MLP from the same options.

    With ``--mapper.latent_norm fixed`` its LatentNorm gets the starting VAE's latent statistics here
    (`latent_init.initial_latent_stats`, measured on the teacher's device when the VAE carries none), before
    the first step; they stay fixed for the run and travel in its checkpoints.
    """

    def build(cfg: TrainVAEConfig, vae: AutoencoderKL, teacher: Teacher, logger=None) -> nn.Module:
        res = cfg.data.resolution
        mcfg = replace(cfg.mapper, **overrides)
        latent_grid, teacher_grid = vae.latent_grid(res), teacher.grid_size(res)
        mapper = head_cls(vae.latent_channels, latent_grid, teacher.embed_dim, teacher_grid, mcfg)
        if mcfg.latent_norm == "fixed":
            mapper.set_latent_stats(*initial_latent_stats(cfg, vae, device_of(teacher), logger))
        return mapper

    return build


def _vf_head(cfg: TrainVAEConfig, vae: AutoencoderKL, teacher: Teacher, logger=None) -> nn.Module:
    res = cfg.data.resolution
    latent_grid, teacher_grid = vae.latent_grid(res), teacher.grid_size(res)
    if latent_grid != teacher_grid and cfg.mapper.grid_mismatch != "resample_teacher":
        raise ValueError(
            f"the VF loss compares latent tokens {latent_grid} with teacher tokens "
            f"{teacher_grid} one to one; they must match (VA-VAE uses f16 with a /14 teacher "
            f"at 224), or pass --mapper.grid_mismatch resample_teacher to resample the teacher's"
        )
    head = VFProjector(vae.latent_channels, teacher.embed_dim)
    head.token_grid = (
        int(latent_grid[0]),
        int(latent_grid[1]),
    )  # the teacher tokens are resampled to it when the grids differ
    return head


def _mapper_grid(head: nn.Module) -> tuple[int, int]:
    return cast(Mapper, head).token_grid  # a tuple already (RealsHead has the same property)


def _reals_patches(head: RealsHead, z: torch.Tensor) -> torch.Tensor:
    return head.patch_tokens(z)


# ---------------------------------------------------------------------------------------------------------
# Losses


def _cosine(inputs: AlignInputs, cfg: LossConfig) -> LossAndLogs:
    loss, mean_cos = cosine_alignment_loss(inputs.pred, inputs.target)
    return loss, {"cos": mean_cos}


def _vf(inputs: AlignInputs, cfg: LossConfig) -> LossAndLogs:
    return vf_loss(inputs.pred, inputs.target, cfg.vf_margin_cos, cfg.vf_margin_dist)


def _repae(inputs: AlignInputs, cfg: LossConfig) -> LossAndLogs:
    proj = repa_loss(inputs.pred, inputs.target)  # -(1/N) sum_n cos, REPA-E's vae_align proj_loss
    return proj, {"cos": -proj.detach()}


def _reals(inputs: AlignInputs, cfg: LossConfig) -> LossAndLogs:
    patch, glob = split_reals_output(inputs.pred)  # the head's (B, 1 + N, D): global first
    w_p, w_g = cfg.reals_patch_weight, cfg.reals_global_weight
    return reals_loss(patch, glob, inputs.target, inputs.target_global, w_p, w_g)  # pooled teacher feature


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
            load=load_mapper,
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
            load=load_mapper,
        ),
        Alignment(
            "vf",
            "VA-VAE: 1x1 projection, marginal cosine + distance-matrix VF loss",
            needs_teacher=True,
            build_head=_vf_head,
            head_input=lambda cfg: CLEAN_LATENT,
            token_grid=lambda head: cast(VFProjector, head).token_grid,
            loss=_vf,
            adaptive=lambda cfg: cfg.vf_adaptive,
            logged=("align", "vf_cos", "vf_dist", "mean_cos"),
            export=export_vf,
            exports=VF_FILES,
            load=load_vf_projector,
        ),
        Alignment(
            "reals",
            "ReaLS: MLP on the clean latent to patch tokens and a global feature, patch + global cosine",
            needs_teacher=True,
            build_head=_mapper_head(RealsHead),
            head_input=lambda cfg: CLEAN_LATENT,
            token_grid=_mapper_grid,
            loss=_reals,
            logged=("align", "cos", "cos_global"),
            export=export_reals,
            exports=REALS_FILES,
            load=load_reals_head,
            read_out=_reals_patches,
        ),
        Alignment(
            "repae",
            "REPA-E: a SiT's first blocks + projector on the noisy BatchNorm latent (SiT frozen for this "
            "loss), token cosine; the SiT trains beside the VAE on the detached latents (--sit.*)",
            needs_teacher=True,
            build_head=build_repae_head,
            head_input=lambda cfg: NOISY_LATENT,
            token_grid=lambda head: cast(SiTAlignHead, head).token_grid,
            loss=_repae,
            logged=("align", "cos"),
            cotrained=joint_of,
            cotrained_logged=JOINT_LOGGED,
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


# ---------------------------------------------------------------------------------------------------------
# An exported head, read back (downstream tasks)


@dataclass(frozen=True)
class ExportedHead:
    """The alignment head exported beside a VAE (export/vae), with its entry and `export.head_meta`."""

    alignment: Alignment
    head: nn.Module  # eval mode
    meta: dict[str, Any]

    @property
    def token_grid(self) -> tuple[int, int]:
        """The grid of `tokens` (exports made before head_meta recorded it: the head's, or the teacher's)."""
        meta = self.meta
        grid = meta.get("token_grid") or self.alignment.token_grid(self.head) or meta["teacher_grid"]
        return (int(grid[0]), int(grid[1]))

    @torch.no_grad()
    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Latents z ~ q(z|x) (B, C, h, w), not normalised -> the head's patch tokens (B, N, D)."""
        return self.alignment.read_out(self.head, z.float())


def load_exported_head(export_dir: str | Path) -> ExportedHead:
    """The alignment head of a train-vae export folder, whichever variant trained it.

    ValueError (one line, what to do) when the folder holds none: a VAE trained with ``--loss.align none``,
    a VAE from elsewhere, or a preset name.
    """
    d = Path(export_dir)
    found = [a for a in ALIGNMENTS.values() if a.load is not None and a.exports]
    found = [a for a in found if all((d / f).is_file() for f in a.exports)]
    if not found:
        variants = ", ".join(a.name for a in ALIGNMENTS.values() if a.load is not None)
        raise ValueError(
            f"{export_dir} holds no alignment head (a VAE trained with --loss.align none, a VAE from "
            f"elsewhere, or a preset): features from latents need one; give the export/vae folder of a "
            f"train-vae run with --loss.align one of {variants}"
        )
    meta_file = next(f for f in found[0].exports if f.endswith(".json"))
    meta = read_json(d / meta_file, "alignment head record")
    # sendvae and repa export the same files; the recorded variant decides (both read out alike)
    entry = next((a for a in found if a.name == meta.get("align")), found[0])
    assert entry.load is not None  # found holds loadable entries only
    return ExportedHead(entry, entry.load(d), meta)
