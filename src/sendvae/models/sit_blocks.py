"""The layers of a SiT (`models.sit`): embedders, the adaLN-Zero block, the final layer and the wide head.

Module names follow the public REPA / REPA-E layout (`x_embedder.proj`, `t_embedder.mlp.0`,
`blocks.3.attn.qkv`, `final_layer.adaLN_modulation.1`, ...), so their checkpoints load without renaming.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sendvae.models.layers import Attention, NormLayer, mlp

if TYPE_CHECKING:
    from sendvae.models.sit import SiTConfig

FREQ_DIM = 256  # width of the sinusoidal timestep features fed to the timestep MLP


def per_token(v: torch.Tensor) -> torch.Tensor:
    """An adaLN value (B, D) per sample as (B, 1, D); one (B, N, D) per token (the wide head's) as it is."""
    return v if v.ndim == 3 else v.unsqueeze(1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift; scale / shift (B, D) per sample or (B, N, D) per token."""
    return x * (1 + per_token(scale)) + per_token(shift)


class PatchEmbed(nn.Module):
    """Conv p x p, stride p: (B, C, H, W) -> (B, N, D), tokens in row-major order."""

    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t (B,) -> [cos(t w_k), sin(t w_k)] with w_k = 10000^(-k / 128), k < 128 -> MLP (SiLU) -> (B, D).

    t is used as given (in [0, 1] for the flow-matching SiT; no x1000 rescaling, as in REPA).
    """

    freqs: torch.Tensor  # buffer (128,)

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = mlp((FREQ_DIM, hidden, hidden), nn.SiLU)
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]  # (B, 128), fp32
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D); row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def forward(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None:
            if self.dropout_prob == 0:
                raise ValueError("force_drop_ids needs a null class: the model has class_dropout_prob = 0")
            y = torch.where(force_drop_ids.bool(), self.num_classes, y)
        elif self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob  # (B,), stays on device
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


def qk_norm_layer(cfg: SiTConfig) -> NormLayer | None:
    """The per-head q/k normalisation of `cfg`: timm's Attention(qk_norm=True) LayerNorm (eps 1e-5), or
    RMSNorm (eps 1e-6); None without qk_norm."""
    if not cfg.qk_norm:
        return None
    return nn.LayerNorm if cfg.qk_norm_type == "layer" else partial(nn.RMSNorm, eps=1e-6)


class SiTBlock(nn.Module):
    """adaLN-Zero block: c -> (shift, scale, gate) x 2; zero-init gates make it start as the identity.

    `width` and `heads` default to the backbone's (hidden_size, num_heads); the wide head's blocks pass
    its own. c is (B, width) per sample, or (B, N, width) per token.
    """

    def __init__(self, cfg: SiTConfig, width: int | None = None, heads: int | None = None):
        super().__init__()
        d = width or cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, heads or cfg.num_heads, qk_norm_layer(cfg), fused=cfg.fused_attn)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        gelu = partial(nn.GELU, approximate="tanh")
        self.mlp = mlp((d, int(d * cfg.mlp_ratio), d), gelu, timm_names=True)  # mlp.fc1, mlp.fc2
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(
            6, dim=-1
        )  # (B, D) or (B, N, D) each
        x = x + per_token(gate1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + per_token(gate2) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """modulate(LN(x)) -> Linear width -> p*p*C_out; `width`: the head's when there is one."""

    def __init__(self, cfg: SiTConfig, width: int | None = None):
        super().__init__()
        d = width or cfg.hidden_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*C_out)


class WideHead(nn.Module):
    """RAE's DiT^DH head (Zheng et al. 2025, after DDT): `head_depth` adaLN-Zero blocks, W = head_width wide.

        z = PatchEmbed_W(x_t)                                   (B, N, W)  the noisy input, embedded anew
        s = Linear_{D -> W}(SiLU(h + t_emb))                    (B, N, W)  h: the backbone's output tokens
        z <- block(z, s) x head_depth                           per-token adaLN from s
        the SiT's FinalLayer (width W) reads (z, s)

    As RAE's DiTwDDTHead (stage2/models/DDT.py): the backbone's tokens condition the head per token (they
    carry the class and the positions; the head's input has no position embedding), and the head, wide
    enough for high-dimensional tokens (2048 for XL on 768-channel DINOv2 latents), predicts the velocity.
    Module names: `head.x_embedder.proj`, `head.cond`, `head.blocks.N.*`.
    """

    def __init__(self, cfg: SiTConfig):
        super().__init__()
        w = cfg.head_width
        self.x_embedder = PatchEmbed(cfg.in_channels, w, cfg.patch_size)
        self.cond = nn.Linear(cfg.hidden_size, w)
        self.blocks = nn.ModuleList(SiTBlock(cfg, w, cfg.head_num_heads) for _ in range(cfg.head_depth))

    def condition(self, h: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """s (B, N, W) from the backbone's tokens h (B, N, D) and the timestep embedding (B, D)."""
        return self.cond(F.silu(h + t_emb.unsqueeze(1)))
