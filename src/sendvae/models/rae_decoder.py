"""The ViT decoder of a representation autoencoder (RAE, arXiv 2510.11690): encoder tokens -> pixels.

    z (B, C, h, w) -> tokens (B, h*w, C) -> Linear C -> D, + 2D sin-cos positions
                   -> [cls; tokens] -> `depth` pre-norm ViT blocks -> LayerNorm -> Linear D -> p*p*3
                   -> drop cls -> unpatchify -> x (B, 3, h*p, w*p)

RAE's `GeneralDecoder` (bytetriper/RAE, src/stage1/decoders/decoder.py: MAE's decoder with a trainable cls
token, fixed sin-cos positions, `decoder_pred` to patch pixels). Differences, none of which changes the
shapes or the parameter count beyond a few scalars: our blocks are the repo's `layers.Block` (GELU with the
tanh approximation, LayerNorm eps 1e-6; RAE's ViTMAELayer: exact GELU, eps 1e-12), the positions are made
for the grid of each input (RAE interpolates the latent to its fixed grid instead), and the output is in
[-1, 1] like every decoder here (RAE decodes ImageNet-normalised pixels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import from_dict
from .layers import Block, sincos_pos_embed_2d


@dataclass
class RAEDecoderConfig:
    """Sizes of the ViT decoder; its input width (the encoder's) and patch size come from the RAE."""

    hidden_size: int = field(default=1152, metadata={"help": "decoder width"})
    depth: int = field(default=28, metadata={"help": "ViT blocks"})
    num_heads: int = field(default=16, metadata={"help": "attention heads"})
    mlp_dim: int = field(default=4096, metadata={"help": "hidden width of each block's MLP"})

    def __post_init__(self) -> None:
        problems = []
        if min(self.hidden_size, self.depth, self.num_heads, self.mlp_dim) < 1:
            problems.append("every size must be >= 1")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos positions)")
        if problems:
            raise ValueError("invalid RAEDecoderConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RAEDecoderConfig:
        return from_dict(cls, d)


# RAE's decoder configs (configs/decoder/ViT{B,L,XL}/config.json: decoder_hidden_size,
# decoder_num_hidden_layers, decoder_num_attention_heads, decoder_intermediate_size), and a CPU size.
RAE_DECODERS: dict[str, RAEDecoderConfig] = {
    "rae-vit-b": RAEDecoderConfig(hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "rae-vit-l": RAEDecoderConfig(hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "rae-vit-xl": RAEDecoderConfig(hidden_size=1152, depth=28, num_heads=16, mlp_dim=4096),
    # the embedded example: 112-d EfficientNet tokens on an 8 x 8 grid -> 32 px, seconds per 100 steps on CPU
    "rae-tiny": RAEDecoderConfig(hidden_size=128, depth=4, num_heads=4, mlp_dim=512),
}


class RAEDecoder(nn.Module):
    """Encoder tokens as a map (B, in_dim, h, w) -> image (B, out_channels, h * patch, w * patch)."""

    grad_checkpointing: bool = False

    def __init__(self, cfg: RAEDecoderConfig, in_dim: int, patch_size: int, out_channels: int = 3):
        super().__init__()
        self.config, self.in_dim, self.patch_size, self.out_channels = cfg, in_dim, patch_size, out_channels
        d = cfg.hidden_size
        self.embed = nn.Linear(in_dim, d)  # RAE's decoder_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))  # RAE's trainable_cls_token (zero init)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_dim / d) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, patch_size * patch_size * out_channels)  # RAE's decoder_pred
        self._pos: dict[tuple[int, int, str], torch.Tensor] = {}  # sin-cos positions per grid and device
        for m in self.modules():  # MAE / ViT init: Xavier-uniform linear maps, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def pos_embed(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(1, 1 + h*w, D): zeros for the cls token, then the fixed 2D sin-cos positions (MAE's)."""
        key = (h, w, str(device))
        if key not in self._pos:
            pos = sincos_pos_embed_2d(self.config.hidden_size, (h, w))  # (h*w, D)
            self._pos[key] = torch.cat([pos.new_zeros(1, pos.shape[1]), pos]).unsqueeze(0).to(device)
        return self._pos[key]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.in_dim:
            raise ValueError(
                f"the RAE decoder expects latents (B, {self.in_dim}, h, w), got {tuple(z.shape)}"
            )
        b, _, h, w = z.shape
        x = self.embed(z.flatten(2).transpose(1, 2))  # (B, h*w, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + h*w, D)
        x = x + self.pos_embed(h, w, x.device).to(x.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.head(self.norm(x))[:, 1:]  # (B, h*w, p*p*c)
        p, c = self.patch_size, self.out_channels
        x = x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, c, h, p, w, p)
        return x.reshape(b, c, h * p, w * p)

    def extra_repr(self) -> str:
        c = self.config
        return f"in_dim={self.in_dim}, patch_size={self.patch_size}, width={c.hidden_size}, depth={c.depth}"
