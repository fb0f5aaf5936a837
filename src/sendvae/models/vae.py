"""The LDM AutoencoderKL (Rombach et al. 2022), the VAE family Send-VAE fine-tunes.

Module names follow the original LDM code (`encoder.down.{i}.block.{j}.conv1`, `encoder.mid.attn_1.q`,
`decoder.up.{i}.upsample.conv`, `quant_conv`, ...), so SD-VAE, IN-VAE, VA-VAE and REPA-E state dicts
load without renaming. Diffusers folders are read by `sendvae.models.vae_io` and written by
`sendvae.models.vae_diffusers` (which needs nothing from here, so there is no import cycle).

Per-channel latent statistics live here, as buffers of the VAE: the diffusion stage sees
`normalize_latents(z) = (z - mean) / std`, and samples go back through `denormalize_latents`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import from_dict
from .autoencoder import Autoencoder
from .vae_diffusers import save_vae

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp of the posterior log-variance


@dataclass
class VAEConfig:
    """Architecture of an LDM AutoencoderKL (the `ddconfig` + `embed_dim` of LDM configs)."""

    in_channels: int = field(default=3, metadata={"help": "image channels"})
    out_channels: int = field(default=3, metadata={"help": "reconstructed image channels"})
    ch: int = field(default=128, metadata={"help": "base width; level i has ch * ch_mult[i] channels"})
    ch_mult: tuple[int, ...] = field(
        default=(1, 2, 4, 4), metadata={"help": "width multipliers; len(ch_mult) - 1 stride-2 downsamplings"}
    )
    num_res_blocks: int = field(default=2, metadata={"help": "res blocks per encoder level (decoder: +1)"})
    attn_resolutions: tuple[int, ...] = field(
        default=(), metadata={"help": "feature-map sizes (for a `resolution` input) with attention blocks"}
    )
    resolution: int = field(default=256, metadata={"help": "nominal input size; only places attention"})
    z_channels: int = field(default=4, metadata={"help": "channels of the encoder output (per moment)"})
    embed_dim: int = field(default=4, metadata={"help": "latent channels after quant_conv"})
    double_z: bool = field(default=True, metadata={"help": "encoder outputs mean and logvar"})
    dropout: float = field(default=0.0, metadata={"help": "dropout inside the res blocks"})
    norm_groups: int = field(default=32, metadata={"help": "GroupNorm groups"})
    norm_eps: float = field(default=1e-6, metadata={"help": "GroupNorm epsilon"})
    mid_attention: bool = field(default=True, metadata={"help": "self-attention in the mid blocks"})

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        widths = [self.ch * m for m in self.ch_mult]
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ValueError(f"widths {bad} are not divisible by norm_groups={self.norm_groups}")
        if not self.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder predicts mean and logvar)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def attn_levels(self) -> list[int]:
        """Levels (0 = full resolution) whose blocks carry attention; level i sees resolution / 2**i."""
        return [i for i in range(len(self.ch_mult)) if self.resolution // 2**i in self.attn_resolutions]

    def describe(self) -> str:
        return (
            f"f{self.downsample_factor}d{self.embed_dim} (ch={self.ch}, ch_mult={list(self.ch_mult)}, "
            f"num_res_blocks={self.num_res_blocks}, z_channels={self.z_channels}, "
            f"attention levels={self.attn_levels}, mid_attention={self.mid_attention})"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Strictly: unknown fields and values of the wrong type are errors (`config.from_dict`)."""
        return from_dict(cls, d)


VAE_CONFIGS: dict[str, VAEConfig] = {
    # SD-VAE layout (LDM kl-f8): 83.65M params; 256 px -> 4 x 32 x 32.
    "f8d4": VAEConfig(ch_mult=(1, 2, 4, 4), z_channels=4, embed_dim=4),
    # IN-VAE / VA-VAE layout (kl-f16, d32): 69.84M params; 256 px -> 32 x 16 x 16.
    "f16d32": VAEConfig(ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), z_channels=32, embed_dim=32),
    # CPU test presets with the same topology at a fraction of the width.
    "tiny-f8d4": VAEConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
    # f4: a 64 px image -> 16x16x4 latent, the token grid of f16 at 256 px (the embedded example's VAE)
    "tiny-f4d4": VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
    # the same with 16 latent channels: room for appearance next to the aligned semantics, as d32 at f16
    "tiny-f4d16": VAEConfig(
        ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, z_channels=16, embed_dim=16
    ),
    "tiny-f16d32": VAEConfig(
        ch=16,
        ch_mult=(1, 1, 2, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(16,),
        z_channels=32,
        embed_dim=32,
        norm_groups=8,
    ),
}


class DiagonalGaussian:
    """Posterior N(mean, diag(var)) from encoder moments (B, 2C, h, w)."""

    def __init__(self, moments: torch.Tensor):
        if moments.ndim != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must be (B, 2C, h, w), got {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (reparameterised)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, (B,) in fp32: 0.5 * sum_{c,h,w} (mean^2 + var - 1 - logvar)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, with a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, c_in: int, c_out: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, c_in, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, c_out, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions; q/k/v/proj_out are 1x1 convs as in LDM."""

    def __init__(self, c: int, cfg: VAEConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, h, w) -> (B, 1, h*w, C): one head of width C, softmax(q k^T / sqrt(C)) v
        q, k, v = (t(y).flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 conv3x3 after padding right/bottom by one (LDM's asymmetric padding)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(c: int, cfg: VAEConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(c, c, cfg)
    mid.attn_1 = AttnBlock(c, cfg) if cfg.mid_attention else nn.Identity()
    mid.block_2 = ResnetBlock(c, c, cfg)
    return mid


class _Stack(nn.Module):
    """Shared forward helper: optional activation checkpointing around each block."""

    grad_checkpointing: bool = False
    mid: nn.Module  # block_1, attn_1, block_2 (`_mid_block`)

    def _run(self, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, h, use_reentrant=False)
        return module(h)

    def _mid(self, h: torch.Tensor) -> torch.Tensor:
        for m in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = self._run(cast(nn.Module, m), h)
        return h


class Encoder(_Stack):
    """x (B, in, H, W) -> moments (B, 2 z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        attn_levels = set(cfg.attn_levels)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for i, c_out in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c_in, c_out, cfg))
                if i in attn_levels:
                    level.attn.append(AttnBlock(c_out, cfg))
                c_in = c_out
            if i != len(widths) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        self.mid = _mid_block(c_in, cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c_in, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            blocks, attns = cast(nn.ModuleList, level.block), cast(nn.ModuleList, level.attn)
            for j, block in enumerate(blocks):
                h = self._run(block, h)
                if len(attns):
                    h = self._run(attns[j], h)
            if hasattr(level, "downsample"):
                h = cast(nn.Module, level.downsample)(h)
        h = self._mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_Stack):
    """z (B, z_channels, h, w) -> x (B, out, h*f, w*f); `up[i]` is level i, run from the deepest."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        attn_levels = set(cfg.attn_levels)
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _mid_block(c_in, cfg)
        levels: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, widths[i], cfg))
                if i in attn_levels:
                    level.attn.append(AttnBlock(widths[i], cfg))
                c_in = widths[i]
            if i != 0:
                level.upsample = Upsample(c_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c_in, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(c_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._mid(self.conv_in(z))
        for level in reversed(self.up):
            blocks, attns = cast(nn.ModuleList, level.block), cast(nn.ModuleList, level.attn)
            for j, block in enumerate(blocks):
                h = self._run(block, h)
                if len(attns):
                    h = self._run(attns[j], h)
            if hasattr(level, "upsample"):
                h = cast(nn.Module, level.upsample)(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(Autoencoder):
    """KL-regularised autoencoder: images in [-1, 1] (B, 3, H, W) <-> latents (B, embed_dim, H/f, W/f)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config = replace(config)  # a copy: registry presets stay untouched
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        # Per-channel statistics of the latents (posterior means/samples over a data set); saved with
        # the weights so the diffusion stage never needs a magic scale factor.
        self._init_latent_stats(config.embed_dim)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.config.embed_dim

    @property
    def grad_checkpointing(self) -> bool:
        return self.encoder.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enabled: bool) -> None:
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = bool(enabled)

    def latent_grid(self, resolution: int | tuple[int, int]) -> tuple[int, int]:
        """Latent (h, w) for an image of `resolution` (int or (H, W))."""
        hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        f = self.downsample_factor
        if any(s % f for s in hw):
            raise ValueError(
                f"image size {hw[0]}x{hw[1]} is not divisible by the VAE downsampling factor {f}; "
                f"resize or crop to a multiple of {f}"
            )
        return hw[0] // f, hw[1] // f

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            c = self.config.in_channels
            raise ValueError(f"expected {c} image channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        self.latent_grid((x.shape[2], x.shape[3]))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x in [-1, 1] (B, 3, H, W) -> posterior over (B, embed_dim, H/f, W/f)."""
        self._check_image(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) latent (B, embed_dim, h, w) -> image (B, 3, h*f, w*f), about [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, h, w), got shape {tuple(z.shape)}"
            )
        return self.decoder(self.post_quant_conv(z))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a diffusers-loadable folder plus `sendvae.json`; see `vae_diffusers.save_vae`."""
        return save_vae(self, directory)
