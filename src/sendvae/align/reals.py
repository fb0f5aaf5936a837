"""The ReaLS alignment network (Xu et al., arXiv 2502.00359): latents -> teacher patch and global features.

    z (B, C, h, w) -> per-channel normalisation (`LatentNorm`, as the Send-VAE mapper)
      -> patch embed (Conv p x p, stride p) + fixed 2D sin-cos positions       u (B, N, hidden)
      -> patch branch:  MLP hidden -> 2048 -> 2048 -> D, SiLU, per token         (B, N, D)
      -> global branch: the same MLP shape on the token mean (1/N) sum_n u_n     (B, D)
    output: [global; patch tokens]  (B, 1 + N, D), the global feature first as a ViT's cls token.

ReaLS aligns the latents "with an MLP" at patch level and at global level; the paper's exact widths are
not recorded in our references, so the MLP is the Send-VAE mapper's 3-layer projector (``--mapper.*``
sets its widths, patch size and latent normalisation) with no ViT blocks and no noise: ReaLS aligns the
clean latent. With the teacher's pooled feature fbar = (1/N) sum_n f(x)[n] (``AlignInputs.target_global``):

    L_align = w_p (1 - (1/N) sum_n cos(P[n], f(x)[n])) + w_g (1 - cos(g, fbar)),

w_p, w_g = ``--loss.reals_patch_weight``, ``--loss.reals_global_weight``; the KL weight that ReaLS balances
against them is ``--loss.kl_weight`` (the reals-f16d32 preset records its source).

After training the same network turns generated latents into features for downstream heads
(`evaluation.downstream`); `patch_tokens` is that read-out.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import from_dict, to_dict
from ..losses.cosine import LossAndLogs, cosine_alignment_loss
from ..models.layers import build_projector, init_vit_weights
from ..runtime.checkpoint import atomic_save_safetensors, atomic_write_json
from ..runtime.weights import malformed, read_json, read_weights
from .base import CLEAN_LATENT, AlignInputs, Alignment
from .mapper import Mapper, MapperConfig, mapper_grid, mapper_head

if TYPE_CHECKING:
    from ..train.vae_config import LossConfig

REALS_FILES = ("reals_head.safetensors", "reals_head.json")


class RealsHead(nn.Module):
    """h: latents (B, C, h, w) -> (B, 1 + N, teacher_dim): the global feature, then N patch tokens."""

    def __init__(
        self,
        latent_channels: int,
        latent_grid: tuple[int, int],
        teacher_dim: int,
        teacher_grid: tuple[int, int],
        config: MapperConfig | None = None,
    ):
        super().__init__()
        cfg = replace(config or MapperConfig(), depth=0, noise=False)  # an MLP on the clean latent
        # the patch branch is a depth-0 mapper: its grid rules (patch size, grid_mismatch) and LatentNorm
        self.patch = Mapper(latent_channels, latent_grid, teacher_dim, teacher_grid, cfg)
        self.global_proj = build_projector(self.patch.hidden_dim, cfg.projector_dim, teacher_dim)
        init_vit_weights(self, self.patch.patch_embed)  # both branches as the mapper: Xavier, zero biases
        self.config = cfg

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.patch.token_grid

    @property
    def latent_channels(self) -> int:
        return self.patch.latent_channels

    @property
    def latent_grid(self) -> tuple[int, int]:
        return self.patch.latent_grid

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.patch.set_latent_stats(mean, std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m = self.patch
        if z.ndim != 4 or z.shape[1] != m.latent_channels or tuple(z.shape[2:]) != m.latent_grid:
            raise ValueError(
                f"ReaLS head expects latents (B, {m.latent_channels}, {m.latent_grid[0]}x"
                f"{m.latent_grid[1]}), got {tuple(z.shape)}"
            )
        u = m.patch_embed(m.norm(z)).flatten(2).transpose(1, 2)  # (B, N, hidden), fp32 latent norm
        u = u + m.pos_embed.to(u.dtype)
        patches = m.projector(u)  # (B, N, D)
        glob = self.global_proj(u.mean(1))  # (B, D)
        return torch.cat([glob[:, None].to(patches.dtype), patches], 1)  # (B, 1 + N, D)

    def patch_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """The patch-level features (B, N, D): what downstream heads read."""
        return self(z)[:, 1:]


def split_reals_output(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1 + N, D) -> (patch tokens (B, N, D), global feature (B, D))."""
    return pred[:, 1:], pred[:, 0]


def load_reals_head(export_dir: str | Path) -> RealsHead:
    """The ReaLS head exported beside a trained VAE (reals_head.json + reals_head.safetensors), eval mode."""
    d = Path(export_dir)
    meta_path = d / REALS_FILES[1]
    if not meta_path.exists():
        raise FileNotFoundError(
            f"no {REALS_FILES[1]} in {d}: this VAE was not trained with --loss.align reals"
        )
    meta = read_json(meta_path, "ReaLS head record")
    with malformed(meta_path, "ReaLS head record"):
        head = RealsHead(
            meta["latent_channels"],
            tuple(meta["latent_grid"]),
            meta["teacher_dim"],
            tuple(meta["teacher_grid"]),
            from_dict(MapperConfig, meta["config"], source=str(meta_path)),
        )
        head.load_state_dict(read_weights(d / REALS_FILES[0], "ReaLS head weights"))
    return head.eval()


def reals_loss(
    patch: torch.Tensor,
    glob: torch.Tensor,
    target: torch.Tensor,
    target_global: torch.Tensor,
    weight_patch: float = 1.0,
    weight_global: float = 1.0,
) -> LossAndLogs:
    """ReaLS's two alignment terms: patch tokens patch, target (B, N, D); global features glob,
    target_global (B, D), the teacher's pooled feature.

    L_patch  = 1 - (1/BN) sum_{b,n} cos(patch[b, n], target[b, n])
    L_global = 1 - (1/B) sum_b cos(glob[b], target_global[b])
    L        = weight_patch * L_patch + weight_global * L_global
    """
    if glob.ndim != 2 or glob.shape != target_global.shape:
        raise ValueError(
            f"the global term expects predicted and teacher global features (B, D) of one shape, got "
            f"{tuple(glob.shape)} and {tuple(target_global.shape)}"
        )
    l_patch, cos_patch = cosine_alignment_loss(patch, target)
    l_global, cos_global = cosine_alignment_loss(glob[:, None], target_global[:, None])  # (B, 1, D)
    loss = weight_patch * l_patch + weight_global * l_global
    return loss, {"cos": cos_patch, "cos_global": cos_global}


def export_reals(head: RealsHead, out_dir: Path, meta: dict[str, Any]) -> None:
    """The ReaLS head beside the VAE (reals_head.safetensors + .json, what `load_reals_head` reads)."""
    atomic_save_safetensors(dict(head.state_dict()), out_dir / REALS_FILES[0])
    atomic_write_json({**meta, "config": to_dict(head.config)}, out_dir / REALS_FILES[1])


def _reals(inputs: AlignInputs, cfg: LossConfig) -> LossAndLogs:
    patch, glob = split_reals_output(inputs.pred)  # the head's (B, 1 + N, D): global first
    w_p, w_g = cfg.reals_patch_weight, cfg.reals_global_weight
    return reals_loss(patch, glob, inputs.target, inputs.target_global, w_p, w_g)  # pooled teacher feature


def _patches(head: RealsHead, z: torch.Tensor) -> torch.Tensor:
    return head.patch_tokens(z)


REALS = Alignment(
    "reals",
    needs_teacher=True,
    build_head=mapper_head(RealsHead),
    head_input=lambda cfg: CLEAN_LATENT,
    token_grid=mapper_grid,
    loss=_reals,
    logged=("align", "cos", "cos_global"),
    export=export_reals,
    exports=REALS_FILES,
    load=load_reals_head,
    read_out=_patches,
)
