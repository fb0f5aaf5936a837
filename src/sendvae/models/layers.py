"""Transformer building blocks shared by the Send-VAE mapper (`align/mapper.py`) and SiT (`models/sit.py`).

    Attention         x (B, N, D) -> qkv -> per-head [q/k norm] -> softmax(q k^T / sqrt(d_h)) v -> proj
    mlp               Linear -> act -> Linear [-> act -> Linear ...], an nn.Sequential
    build_projector   REPA's token projector D -> 2048 -> 2048 -> z (SiLU), also the mapper's head
    Block             pre-norm ViT block x + Attn(LN(x)), x + MLP(LN(x)): the mapper's, a ViT decoder's
    sincos_pos_embed_2d, init_vit_weights

Parameter names are part of the checkpoint formats (REPA / REPA-E SiTs, exported mappers), so each block
keeps the names those layouts use: `qkv`, `q_norm`, `k_norm`, `proj` in attention; Sequential indices
(`0`, `2`, `4`) in the mapper's MLPs and the projectors, timm's `fc1` / `fc2` in a DiT / SiT block.
Modules are created in a fixed order, so a seeded build draws the same initial weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

NormLayer = Callable[[int], nn.Module]


class Attention(nn.Module):
    """Multi-head self-attention with packed qkv: (B, N, D) -> (B, N, D).

    `qk_norm(head_dim)` builds the per-head query / key normalisation (None: none). `fused` runs
    F.scaled_dot_product_attention, else the explicit softmax(q k^T / sqrt(head_dim)) v.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: NormLayer | None = None, fused: bool = True):
        super().__init__()
        self.num_heads, self.fused = num_heads, fused
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = qk_norm(head_dim) if qk_norm is not None else nn.Identity()
        self.k_norm = qk_norm(head_dim) if qk_norm is not None else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # softmax(q k^T / sqrt(head_dim)) v
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


def mlp(widths: Sequence[int], act: Callable[[], nn.Module], timm_names: bool = False) -> nn.Sequential:
    """Linear maps widths[0] -> widths[1] -> ... -> widths[-1] with `act()` between consecutive ones.

    Parameters are named by Sequential index (`0.`, `2.`, `4.`, ...), or, with `timm_names` (one hidden
    layer only), `fc1.` / `fc2.` as timm's Mlp and the DiT / SiT checkpoints name a block's MLP.
    """
    if len(widths) < 2:
        raise ValueError(f"an MLP needs at least an input and an output width, got {list(widths)}")
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i:
            layers.append(act())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    if not timm_names:
        return nn.Sequential(*layers)
    if len(layers) != 3:
        raise ValueError(
            f"timm names (fc1, act, fc2) need exactly one hidden layer, got widths {list(widths)}"
        )
    return nn.Sequential(OrderedDict(zip(("fc1", "act", "fc2"), layers)))


def build_projector(hidden: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    """REPA's token projector: Linear -> SiLU -> Linear -> SiLU -> Linear (indices 0, 2, 4).

    The Send-VAE mapper ends in the same 3-layer head (hidden -> 2048 -> 2048 -> teacher width).
    """
    return mlp((hidden, projector_dim, projector_dim, out_dim), nn.SiLU)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE/DiT formula), (H*W, dim), tokens in row-major order.

    First half encodes the column index, second half the row index (MAE's order); each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1.
    """
    if dim % 4 != 0:
        raise ValueError(f"the 2D sin-cos embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (H*W, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


@torch.no_grad()
def init_vit_weights(model: nn.Module, patch_embed: nn.Conv2d) -> None:
    """ViT / DiT init: Xavier-uniform for every linear map of `model`, the patch convolution as one (its
    kernel flattened to (out, in * p * p)), zero biases. Draws in module order."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = patch_embed.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    assert patch_embed.bias is not None
    nn.init.zeros_(patch_embed.bias)


class Block(nn.Module):
    """Pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x)) with GELU(tanh)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, partial(nn.LayerNorm, eps=1e-6) if qk_norm else None)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = mlp((dim, hidden, dim), partial(nn.GELU, approximate="tanh"))  # mlp.0, mlp.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
