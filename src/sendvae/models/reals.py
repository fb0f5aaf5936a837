"""The ReaLS alignment network (Xu et al., arXiv 2502.00359): latents -> teacher patch and global features.

    z (B, C, h, w) -> per-channel normalisation (`LatentNorm`, as the Send-VAE mapper)
      -> patch embed (Conv p x p, stride p) + fixed 2D sin-cos positions       u (B, N, hidden)
      -> patch branch:  MLP hidden -> 2048 -> 2048 -> D, SiLU, per token         (B, N, D)
      -> global branch: the same MLP shape on the token mean (1/N) sum_n u_n     (B, D)
    output: [global; patch tokens]  (B, 1 + N, D), the global feature first as a ViT's cls token.

ReaLS aligns the latents "with an MLP" at patch level and at global level; the paper's exact widths are
not recorded in our references, so the MLP is the Send-VAE mapper's 3-layer projector (``--mapper.*``
sets its widths, patch size and latent normalisation) with no ViT blocks and no noise: ReaLS aligns the
clean latent. After training the same network turns generated latents into features for downstream
heads (`analysis.downstream`); `patch_tokens` is that read-out.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..config import from_dict
from ..runtime.weights import malformed, read_json, read_weights
from .layers import build_projector, init_vit_weights
from .mapper import Mapper, MapperConfig

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
