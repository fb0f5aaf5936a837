"""SiT: the DiT transformer (adaLN-Zero) as a velocity model on latents, with REPA projectors.

    x (B, C, H, W) -> patch embed (Conv p x p, stride p) + fixed 2D sin-cos positions      (B, N, D)
    c = TimestepEmbedder(t) + LabelEmbedder(y)                                              (B, D)
    `depth` blocks: x + gate * Attn(modulate(LN(x))), x + gate * MLP(modulate(LN(x))), all from c
      after block `encoder_depth`: REPA projectors D -> 2048 -> 2048 -> z_dim (SiLU)      [(B, N, z)]
    FinalLayer: modulate(LN(x)) -> Linear D -> p*p*C_out -> unpatchify                     (B, C, H, W)
    [head_depth > 0: RAE's wide head (`sit_blocks.WideHead`) of width W between the blocks and the
     FinalLayer, which then reads W-wide tokens with a per-token condition from the backbone]

DiT (Peebles & Xie 2023) / SiT (Ma et al. 2024) architecture; REPA (Yu et al. 2025) adds the
projectors. Module names are the public REPA / REPA-E layout (`x_embedder.proj`, `t_embedder.mlp.0`,
`blocks.3.attn.qkv`, `final_layer.adaLN_modulation.1`, `projectors.0.4`, ...), so their checkpoints
load without renaming (`sendvae.models.sit_io.load_sit`). Differences from those codebases: the null
class is `num_classes` of the config (never a literal 1000), the position embedding is a
non-persistent buffer, and `learn_sigma` checkpoints return only the velocity half.

Time convention: `forward` always speaks REPA's (t = 1 is noise, v = eps - x). Weights trained the other
way round, as Ma et al.'s SiT (t = 0 noise, t = 1 data, v = x - eps), say so in the config
(`time_convention="sit"`) and are converted at the model's edge: for x_t = (1 - t) x + t eps = x_s(SiT)
with s = 1 - t, v(x, t) = d x_t / dt = -v_SiT(x, 1 - t). Samplers and losses never see the difference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sendvae.config import from_dict
from sendvae.models.layers import build_projector, init_vit_weights, sincos_pos_embed_2d
from sendvae.models.sit_blocks import (
    FREQ_DIM,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    SiTBlock,
    TimestepEmbedder,
    WideHead,
)
from sendvae.runtime.checkpoint import atomic_save_safetensors, atomic_write_json

FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
QK_NORMS = ("layer", "rms")
TIME_CONVENTIONS = ("repa", "sit")


@dataclass
class SiTConfig:
    """Architecture of a SiT; the defaults are SiT-XL/2 on 4 x 32 x 32 latents with one 768-wide teacher."""

    input_size: int = field(default=32, metadata={"help": "latent side H = W"})
    patch_size: int = field(
        default=2, metadata={"help": "latent patch size p; N = (input_size / p)^2 tokens"}
    )
    in_channels: int = field(default=4, metadata={"help": "latent channels C"})
    hidden_size: int = field(default=1152, metadata={"help": "transformer width D"})
    depth: int = field(default=28, metadata={"help": "number of adaLN-Zero blocks"})
    num_heads: int = field(default=16, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width / D"})
    class_dropout_prob: float = field(
        default=0.1,
        metadata={"help": "label dropout to the null class in training (classifier-free guidance)"},
    )
    num_classes: int = field(
        default=1000, metadata={"help": "classes; the null (unconditional) class is this index"}
    )
    learn_sigma: bool = field(
        default=False,
        metadata={"help": "final layer outputs 2C channels (DiT/SiT checkpoints); the first C are used"},
    )
    qk_norm: bool = field(default=False, metadata={"help": "normalise queries and keys per head"})
    qk_norm_type: str = field(
        default="layer", metadata={"help": "qk-norm kind: layer (LayerNorm) | rms (RMSNorm)"}
    )
    encoder_depth: int = field(
        default=8, metadata={"help": "REPA: the projectors read the tokens after this block (1..depth)"}
    )
    projector_dim: int = field(default=2048, metadata={"help": "REPA: hidden width of each projector MLP"})
    z_dims: tuple[int, ...] = field(
        default=(768,), metadata={"help": "REPA: one projector per teacher, to these widths; empty = no REPA"}
    )
    fused_attn: bool = field(
        default=True,
        metadata={"help": "attention through F.scaled_dot_product_attention (else explicit softmax)"},
    )
    time_convention: str = field(
        default="repa",
        metadata={
            "help": "how the weights read t: repa (t = 1 noise, v = eps - x; REPA, REPA-E, ours) | sit "
            "(Ma et al.'s SiT: t = 0 noise, v = x - eps); forward() takes and returns repa's either way"
        },
    )
    time_shift: float = field(
        default=1.0,
        metadata={
            "help": "the dimension-dependent time shift alpha the SiT was trained with (1 = none); the "
            "samplers warp their time grid by it (diffusion.transport.shift_time)"
        },
    )

    head_depth: int = field(
        default=0, metadata={"help": "DiT^DH (RAE): blocks of the wide head after the backbone; 0 = none"}
    )
    head_width: int = field(default=2048, metadata={"help": "DiT^DH: width of the head (RAE's XL: 2048)"})
    head_num_heads: int = field(default=16, metadata={"help": "DiT^DH: attention heads of the head"})

    def __post_init__(self) -> None:
        self.z_dims = tuple(int(z) for z in self.z_dims)
        problems = []
        if self.input_size % self.patch_size:
            problems.append(f"patch_size {self.patch_size} does not divide input_size {self.input_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos positions)")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            problems.append(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.qk_norm_type not in QK_NORMS:
            problems.append(f"qk_norm_type must be one of {QK_NORMS}, got {self.qk_norm_type!r}")
        if self.time_convention not in TIME_CONVENTIONS:
            problems.append(f"time_convention must be in {TIME_CONVENTIONS}, got {self.time_convention!r}")
        if not (math.isfinite(self.time_shift) and self.time_shift > 0):
            problems.append(f"time_shift must be a number > 0, got {self.time_shift}")
        if self.head_depth < 0:
            problems.append(f"head_depth must be >= 0, got {self.head_depth}")
        if self.head_depth and (self.head_width < 1 or self.head_width % self.head_num_heads):
            problems.append(
                f"head_width {self.head_width} must be a multiple of head_num_heads {self.head_num_heads}"
            )
        token = self.in_channels * self.patch_size**2
        if self.hidden_size < token and not (self.head_depth and self.head_width >= token):
            problems.append(
                f"hidden_size {self.hidden_size} is narrower than a token of in_channels x patch_size^2 = "
                f"{token} values (RAE: the width must be at least the token dimension); use a wider model "
                f"(hidden_size >= {token}) or a wide head (head_depth >= 1, head_width >= {token})"
            )
        if self.z_dims and not 1 <= self.encoder_depth <= self.depth:
            problems.append(f"encoder_depth must be in 1..depth={self.depth}, got {self.encoder_depth}")
        if problems:
            raise ValueError("invalid SiTConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    def describe(self) -> str:
        extra = f", REPA z_dims={list(self.z_dims)} at block {self.encoder_depth}" if self.z_dims else ""
        extra += ", SiT time (t = 0 noise)" if self.time_convention == "sit" else ""
        extra += f", time shift {self.time_shift:g}" if self.time_shift != 1.0 else ""
        extra += f", head {self.head_depth} x {self.head_width}" if self.head_depth else ""
        return (
            f"SiT depth={self.depth} width={self.hidden_size} heads={self.num_heads} patch={self.patch_size} "
            f"on {self.in_channels}x{self.input_size}x{self.input_size}, {self.num_classes} classes{extra}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["z_dims"] = list(self.z_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiTConfig:
        """Strictly: unknown fields and values of the wrong type are errors (`config.from_dict`)."""
        return from_dict(cls, d)


def _preset(depth: int, hidden: int, heads: int, patch: int, encoder_depth: int, **kw: Any) -> SiTConfig:
    kw.setdefault("input_size", 32)
    kw.setdefault("in_channels", 4)
    kw.setdefault("num_classes", 1000)
    kw.setdefault("encoder_depth", encoder_depth)
    return SiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kw)


# name -> f(input_size=32, in_channels=4, num_classes=1000, **overrides) -> SiTConfig.
# REPA's projector depth: 4 for S/B, 8 for L/XL (its paper's settings).
_SIZES = {"S": (12, 384, 6, 4), "B": (12, 768, 12, 4), "L": (24, 1024, 16, 8), "XL": (28, 1152, 16, 8)}
SIT_MODELS = {
    f"SiT-{size}/{p}": partial(_preset, d, w, h, p, e)
    for size, (d, w, h, e) in _SIZES.items()
    for p in (1, 2, 4)
}


def sit_config(name: str, **kwargs: Any) -> SiTConfig:
    """The registry's config `name` with overrides (input_size, in_channels, num_classes, z_dims, ...)."""
    if name not in SIT_MODELS:
        raise ValueError(f"unknown SiT model {name!r}; choices: {sorted(SIT_MODELS)}")
    return SIT_MODELS[name](**kwargs)


def sized_sit_config(name: str, size: dict, **kw) -> SiTConfig:
    """A registry config with depth / hidden_size / num_heads overridden (validated again)."""
    return replace(sit_config(name, **kw), **size) if size else sit_config(name, **kw)


def flops_per_image(config: SiTConfig, training: bool = False) -> float:
    """FLOPs of one image (multiply-adds x 2), counting the matmuls and convolutions.

    training=False: forward of the velocity path (DiT's "118.6 Gflops" = 237.2 GFLOP for XL/2 at 256
    tokens). training=True: forward + backward (3 x forward) including the REPA projectors.
    """
    n, d, p = config.num_tokens, config.hidden_size, config.patch_size
    mlp = int(d * config.mlp_ratio)
    macs = n * config.in_channels * p * p * d  # patch embedding
    macs += FREQ_DIM * d + d * d  # timestep MLP (per image)
    block = n * (4 * d * d + 2 * d * mlp)  # qkv + out projection + MLP
    block += 2 * n * n * d  # q k^T and attn @ v
    block += 6 * d * d  # adaLN modulation (per image)
    macs += config.depth * block
    if config.head_depth:  # RAE's wide head: patch embedding, condition, blocks and final adaLN per token
        w, wm = config.head_width, int(config.head_width * config.mlp_ratio)
        macs += n * (config.in_channels * p * p * w + d * w)
        macs += config.head_depth * (n * (4 * w * w + 2 * w * wm + 6 * w * w) + 2 * n * n * w)
        macs += n * 2 * w * w + n * w * p * p * config.out_channels
    else:
        macs += 2 * d * d + n * d * p * p * config.out_channels  # final adaLN + linear
    if training:
        pd = config.projector_dim
        macs += sum(n * (d * pd + pd * pd + pd * z) for z in config.z_dims)
        return 3 * 2.0 * macs
    return 2.0 * macs


class SiT(nn.Module):
    """Velocity model v(x_t, t, y) on latents (B, C, H, W); optionally REPA's projected tokens."""

    pos_embed: torch.Tensor  # buffer (1, N, D)

    def __init__(self, config: SiTConfig | None = None, grad_checkpointing: bool = False):
        super().__init__()
        cfg = self.config = config or SiTConfig()
        self.grad_checkpointing = grad_checkpointing  # recompute block activations in backward
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        grid = (cfg.grid_size, cfg.grid_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, grid)[None], persistent=False)  # (1, N, D)
        self.blocks = nn.ModuleList(SiTBlock(cfg) for _ in range(cfg.depth))
        self.projectors = nn.ModuleList(build_projector(d, cfg.projector_dim, z) for z in cfg.z_dims)
        self.head = WideHead(cfg) if cfg.head_depth else None
        self.final_layer = FinalLayer(cfg, cfg.head_width if cfg.head_depth else None)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers (adaLN-Zero)."""
        init_vit_weights(self, self.x_embedder.proj)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[0]).weight, std=0.02)
        nn.init.normal_(cast(nn.Linear, self.t_embedder.mlp[2]).weight, std=0.02)
        blocks = list(self.blocks)
        if self.head is not None:  # its patch convolution as a linear map, as the backbone's (RAE's too)
            w = self.head.x_embedder.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(cast(torch.Tensor, self.head.x_embedder.proj.bias))
            blocks += list(self.head.blocks)
        for layer in [cast(SiTBlock, b).adaLN_modulation[-1] for b in blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            layer = cast(nn.Linear, layer)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); each token's channels are ordered (p_row, p_col, C)."""
        b, g, p = x.shape[0], self.config.grid_size, self.config.patch_size
        c = self.config.out_channels
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(b, c, g * p, g * p)

    def _embed(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens h (B, N, D), the timestep embedding t_emb and the label embedding y_emb (B, D); the
        blocks' conditioning is c = t_emb + y_emb."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2:] != (cfg.input_size, cfg.input_size):
            raise ValueError(
                f"SiT expects latents (B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}), "
                f"got {tuple(x.shape)}"
            )
        t = t.reshape(-1).expand(x.shape[0])  # a scalar t applies to the whole batch
        if cfg.time_convention == "sit":
            t = 1 - t  # the weights' own time: s = 1 - t
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        return h, self.t_embedder(t), self.y_embedder(y, force_drop_ids)

    def _block(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        return_features: bool = False,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B, C, H, W), t (B,) in [0, 1] (1 = noise), y (B,) int64 (== num_classes: unconditional).

        Returns the velocity eps - x (B, C, H, W), whatever the config's `time_convention`; with
        `return_features` also the REPA tokens [(B, N, z_dim)].
        `force_drop_ids` (B,) marks labels to replace by the null class (classifier-free guidance).
        """
        cfg = self.config
        h, t_emb, y_emb = self._embed(x, t, y, force_drop_ids)
        c = t_emb + y_emb  # (B, D)
        features: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            h = self._block(block, h, c)
            if return_features and i + 1 == cfg.encoder_depth:
                features = [proj(h) for proj in self.projectors]  # [(B, N, z_dim)]
        if self.head is not None:  # RAE's DiT^DH: x_t embedded anew, conditioned per token on h
            c = self.head.condition(h, t_emb)  # (B, N, W)
            h = self.head.x_embedder(x)  # (B, N, W)
            for block in self.head.blocks:
                h = self._block(block, h, c)
        out = self.unpatchify(self.final_layer(h, c))  # (B, C_out, H, W)
        if cfg.learn_sigma:
            out = out[:, : cfg.in_channels]  # the velocity half; the variance half is unused by flow matching
        if cfg.time_convention == "sit":
            out = -out  # v(x, t) = -v_SiT(x, 1 - t)
        return (out, features) if return_features else out

    def forward_features(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """REPA tokens only: runs blocks 1..encoder_depth and the projectors (REPA-E's VAE alignment)."""
        h, t_emb, y_emb = self._embed(x, t, y, force_drop_ids)
        c = t_emb + y_emb
        for block in self.blocks[: self.config.encoder_depth]:
            h = self._block(block, h, c)
        return [proj(h) for proj in self.projectors]

    def num_params(self, projectors: bool = True) -> int:
        """Parameter count, with or without the REPA projectors (which are dropped after training)."""
        n = sum(p.numel() for p in self.parameters())
        return n if projectors else n - sum(p.numel() for p in self.projectors.parameters())

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model.safetensors + config.json atomically; `load_sit(directory)` reads them back."""
        directory = Path(directory)
        meta = {"format": "sendvae.SiT", "format_version": FORMAT_VERSION, "config": self.config.to_dict()}
        atomic_save_safetensors(self.state_dict(), directory / WEIGHTS_FILE, metadata={"format": "pt"})
        atomic_write_json(meta, directory / CONFIG_FILE)
        return directory
