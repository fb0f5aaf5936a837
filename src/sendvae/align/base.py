"""What an alignment variant is: the `Alignment` entry, what its head is built from, what its loss reads.

z ~ q(z|x) is the VAE latent (B, C, h, w), f(x) the frozen teacher's patch tokens (B, N, D) on the head's
token grid (resampled when the grids differ); the objective adds lambda_align * L_align to L_VAE
(losses/vae_loss.py). A variant's module (align/mapper.py, vf.py, reals.py, repae.py) builds its entry from
the pieces below; `align.registry` lists the entries.

  * its head is any ``nn.Module`` mapping z (B, C, h, w) to what its loss reads (several parts, frozen or
    not, in one container); it lives in the trained model, so it is optimised, synced and checkpointed;
    it is built from a `HeadContext`: the loss and mapper options, the image resolution, the VAE and the
    teacher it is sized by, the starting VAE's latent statistics on demand;
  * its loss reads ``AlignInputs``: the head's output and the teacher's tokens, and the teacher's global
    feature ``target_global`` when it wants one; it returns (L_align, the terms it logs);
  * its export writes what a user needs beside the VAE (its head, and the record `head_meta` the trainer
    passes), its load reads the head back, and its read_out gives the head's patch tokens (B, N, D) for a
    latent: what the downstream heads (evaluation/downstream.py) read;
  * a model trained beside the VAE, by its own optimizer on the VAE's detached latents (REPA-E's SiT), is
    the entry's ``cotrained(head)`` (a `CoTrained`): the trainer lets it draw what the head reads beside z
    each step, runs its update after the VAE's, checkpoints it and exports it (export/<its name>).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..losses.cosine import LossAndLogs
from .names import VARIANTS

if TYPE_CHECKING:
    from ..models.vae import AutoencoderKL
    from ..teachers import Teacher
    from ..train.vae_config import LossConfig, TrainVAEConfig
    from .mapper import MapperConfig

# What a head consumes (``Alignment.head_input``).
NOISY_LATENT = "noisy latent"  # z_t = (1 - t) z_hat + t eps in training, the clean latent in eval
CLEAN_LATENT = "clean latent"  # z itself (or its per-channel normalisation), in training and eval


@dataclass(frozen=True)
class AlignInputs:
    """What an alignment variant's loss reads: its head's output and the frozen teacher's tokens."""

    pred: torch.Tensor  # (B, N, D) the head's tokens
    target: torch.Tensor  # (B, N, D) teacher patch tokens on the head's token grid (no gradient)

    @property
    def target_global(self) -> torch.Tensor:
        """(B, D) the teacher's global feature: the mean of its patch tokens (teachers drop the cls token)."""
        return self.target.mean(1)


@dataclass(frozen=True)
class HeadContext:
    """What a head is built from. The mapper-like heads read ``mapper``, ``loss`` and the sizes; only a
    variant that trains a model beside the VAE (REPA-E's SiT: its ``--sit.*``, data and run options) reads
    ``trainer``, the whole train-vae config."""

    loss: LossConfig
    mapper: MapperConfig
    resolution: int  # image side in pixels
    vae: AutoencoderKL
    teacher: Teacher
    latent_stats: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # the starting VAE's (C,) mean, std
    trainer: TrainVAEConfig
    logger: Any = None

    @property
    def latent_grid(self) -> tuple[int, int]:
        return self.vae.latent_grid(self.resolution)

    @property
    def teacher_grid(self) -> tuple[int, int]:
        g = self.teacher.grid_size(self.resolution)
        return (g, g) if isinstance(g, int) else (int(g[0]), int(g[1]))


HeadBuilder = Callable[[HeadContext], nn.Module]
AlignLoss = Callable[[AlignInputs, "LossConfig"], LossAndLogs]
# (the head its entry built, export/vae, head_meta) -> None: writes the head's files beside the VAE
HeadExporter = Callable[[Any, Path, dict[str, Any]], None]
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

    name: str  # one of `names.VARIANTS` (its help line and paper lambda_align live there)
    needs_teacher: bool  # build the teacher (the trainer computes its tokens every step)
    build_head: HeadBuilder | None = None  # HeadContext -> the head, h(z) -> the `pred` of AlignInputs
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

    def __post_init__(self) -> None:
        if self.name not in VARIANTS:
            raise ValueError(f"alignment {self.name!r} has no entry in align/names.py (its help and lambda)")

    @property
    def help(self) -> str:
        return VARIANTS[self.name].help

    def compute(self, pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> LossAndLogs:
        """L_align (unweighted) and its logged terms for the head's output and the teacher's tokens."""
        assert self.loss is not None, f"alignment {self.name} has no loss"
        return self.loss(AlignInputs(pred, target), cfg)
