"""VA-VAE's alignment (``--loss.align vf``, Yao et al., LightningDiT): the VF loss through a 1x1 projection.

A bias-free 1x1 conv W on the raw latent gives tokens on the latent grid (it must equal the teacher grid,
or ``--mapper.grid_mismatch resample_teacher``); with margins m_c, m_d (``--loss.vf_margin_*``):

    L_mcos = mean_{b,n} relu(1 - m_c - cos(Wz_n, f_n)),
    L_mdms = mean_{b,i,j} relu(|cos(Wz_i, Wz_j) - cos(f_i, f_j)| - m_d),
    L_align = L_mcos + L_mdms,

weighted by lambda_align * ||d L_nll / dW_e|| / (||d L_align / dW_e|| + 1e-4) at the encoder's last conv W_e
when ``--loss.vf_adaptive`` (VA-VAE's adaptive weight, applied by the objective, which owns both losses).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.cosine import LossAndLogs, check_tokens, unit
from ..runtime.checkpoint import atomic_save_safetensors, atomic_write_json
from ..runtime.weights import malformed, read_json, read_weights
from .base import CLEAN_LATENT, AlignInputs, Alignment, HeadContext

if TYPE_CHECKING:
    from ..train.vae_config import LossConfig


class VFProjector(nn.Module):
    """VA-VAE's head: bias-free 1x1 conv latent -> teacher width, tokens on the latent grid."""

    def __init__(self, latent_channels: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(latent_channels, teacher_dim, kernel_size=1, bias=False)
        self.token_grid: tuple[int, int] | None = None  # the latent grid, set by the trainer's builder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z).flatten(2).transpose(1, 2)  # (B, h*w, teacher_dim)


def vf_loss(
    z_proj: torch.Tensor,
    f: torch.Tensor,
    margin_cos: float = 0.5,
    margin_dist: float = 0.25,
    weight_cos: float = 1.0,
    weight_dist: float = 1.0,
) -> LossAndLogs:
    """VA-VAE's VF loss on projected latent tokens z_proj and teacher tokens f, both (B, N, D).

    L_mcos  = mean_{b,n} relu(1 - m_c - cos(z_n, f_n))
    L_mdms  = mean_{b,i,j} relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m_d)      (pairs within each image)
    L_vf    = weight_cos * L_mcos + weight_dist * L_mdms

    Memory: two (B, N, N) fp32 matrices, 4 B N^2 bytes each (N = 256: 256 KiB per image).
    VA-VAE's adaptive weight ||grad L_nll|| / (||grad L_vf|| + 1e-4) at the encoder's last layer is
    applied by the trainer, which owns both losses.
    """
    check_tokens(z_proj, f)
    with torch.autocast(device_type=z_proj.device.type, enabled=False):
        zu, fu = unit(z_proj), unit(f.detach())  # (B, N, D)
        cos = (zu * fu).sum(-1)  # (B, N)
        l_cos = F.relu(1.0 - margin_cos - cos).mean()
        gram_z = torch.bmm(zu, zu.transpose(1, 2))  # (B, N, N)
        gram_f = torch.bmm(fu, fu.transpose(1, 2))  # (B, N, N)
        l_dist = F.relu((gram_z - gram_f).abs() - margin_dist).mean()
        loss = weight_cos * l_cos + weight_dist * l_dist
    parts = {"vf_cos": l_cos.detach(), "vf_dist": l_dist.detach(), "mean_cos": cos.mean().detach()}
    return loss, parts


VF_FILES = ("vf_projector.safetensors", "vf_projector.json")


def load_vf_projector(export_dir: str | Path) -> VFProjector:
    """The VA-VAE projection exported beside a trained VAE (vf_projector.json + .safetensors), eval mode."""
    d = Path(export_dir)
    if not (d / VF_FILES[1]).exists():
        raise FileNotFoundError(f"no {VF_FILES[1]} in {d}: this VAE was not trained with --loss.align vf")
    meta = read_json(d / VF_FILES[1], "VF projector record")
    with malformed(d / VF_FILES[1], "VF projector record"):
        proj = VFProjector(meta["latent_channels"], meta["teacher_dim"])
        proj.load_state_dict(read_weights(d / VF_FILES[0], "VF projector weights"))
    return proj.eval()


def export_vf(proj: VFProjector, out_dir: Path, meta: dict[str, Any]) -> None:
    """The projection beside the VAE (vf_projector.*, what `load_vf_projector` reads); its tokens are on the
    latent grid."""
    atomic_save_safetensors(dict(proj.state_dict()), out_dir / VF_FILES[0])
    atomic_write_json(meta, out_dir / VF_FILES[1])


def build_vf_head(ctx: HeadContext) -> VFProjector:
    latent_grid, teacher_grid = ctx.latent_grid, ctx.teacher_grid
    if latent_grid != teacher_grid and ctx.mapper.grid_mismatch != "resample_teacher":
        raise ValueError(
            f"the VF loss compares latent tokens {latent_grid} with teacher tokens "
            f"{teacher_grid} one to one; they must match (VA-VAE uses f16 with a /14 teacher "
            f"at 224), or pass --mapper.grid_mismatch resample_teacher to resample the teacher's"
        )
    head = VFProjector(ctx.vae.latent_channels, ctx.teacher.embed_dim)
    head.token_grid = (int(latent_grid[0]), int(latent_grid[1]))  # the teacher tokens are resampled to it
    return head


def _vf(inputs: AlignInputs, cfg: LossConfig) -> LossAndLogs:
    return vf_loss(inputs.pred, inputs.target, cfg.vf_margin_cos, cfg.vf_margin_dist)


VF = Alignment(
    "vf",
    needs_teacher=True,
    build_head=build_vf_head,
    head_input=lambda cfg: CLEAN_LATENT,
    token_grid=lambda head: cast(VFProjector, head).token_grid,
    loss=_vf,
    adaptive=lambda cfg: cfg.vf_adaptive,
    logged=("align", "vf_cos", "vf_dist", "mean_cos"),
    export=export_vf,
    exports=VF_FILES,
    load=load_vf_projector,
)
