"""The alignment registry: every variant of VAE training (``--loss.align``), one entry each.

    none     no alignment: no teacher, no head, L_align = 0.
    sendvae  the Send-VAE mapper on the noisy normalised latent z_t, token cosine       (align/mapper.py)
    repa     the mapper at depth 0 on the clean normalised latent, token cosine         (align/mapper.py)
    vf       VA-VAE's 1x1 projection, marginal cosine + distance-matrix loss            (align/vf.py)
    reals    ReaLS's MLP to patch tokens and a global feature, two cosines              (align/reals.py)
    repae    REPA-E: a SiT's first blocks + projector on the noisy BatchNorm latent, the SiT trained
             beside the VAE                                                             (align/repae.py)

An entry (`base.Alignment`) carries everything its variant needs; the trainer, the objective, the export
and the downstream read-out ask the entry and never branch on the name. Its names, help lines and
lambda_align are in `names` (read before any network is built). A new variant is one module defining
its `Alignment` and one line in ``ALIGNMENTS`` below (plus its line in names.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..runtime.weights import read_json
from .base import Alignment
from .mapper import REPA, SENDVAE
from .reals import REALS
from .repae import REPAE
from .vf import VF

if TYPE_CHECKING:
    from ..train.vae_config import TrainVAEConfig

NONE = Alignment("none", needs_teacher=False)

# The registry, in the order of --loss.align's choices (names.VARIANTS lists the same names).
ALIGNMENTS: dict[str, Alignment] = {a.name: a for a in (NONE, REPA, VF, SENDVAE, REALS, REPAE)}


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
