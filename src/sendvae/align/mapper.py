"""The Send-VAE mapper h_phi: VAE latents -> teacher-shaped patch tokens.

    z (B, C, h, w) -> per-channel normalisation -> z_t = (1 - t) z + t eps   (training only)
      -> patch embed (Conv p x p, stride p) + fixed 2D sin-cos positions     (B, N, hidden)
      -> `depth` pre-norm ViT blocks -> LayerNorm                            (B, N, hidden)
      -> MLP projector hidden -> 2048 -> 2048 -> teacher width, SiLU         (B, N, D)

The paper fixes 1 block (depth 0 = MLP only and depth 2 are its ablations) and 12 / 16 heads for a
768 / 1024-wide teacher; it is silent on the block width, so it defaults to the teacher width. The
noise injection ("diffusion-aware" alignment) makes the mapper see latents as the diffusion model will.

Two variants use it (their entries at the end): ``sendvae`` (the mapper on the noisy normalised latent z_t,
t ~ U(0, 1) (``--mapper.t_sampling``), eps ~ N(0, I), in training only (``--mapper.noise``)) and ``repa``
(the REPA-style direct alignment: depth 0, no noise, on the clean normalised latent); both with

    L_align = 1 - (1/N) sum_n cos(h_phi(z)[n], f(x)[n]).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import from_dict, option, positive, to_dict
from ..losses.cosine import LossAndLogs, cosine_alignment_loss
from ..models.layers import Block, build_projector, init_vit_weights, sincos_pos_embed_2d
from ..models.timesteps import T_SAMPLERS, draw_t
from ..runtime.checkpoint import atomic_save_safetensors, atomic_write_json
from ..runtime.weights import malformed, read_json, read_weights
from .base import CLEAN_LATENT, NOISY_LATENT, AlignInputs, Alignment, HeadContext
from .latent_norm import LATENT_NORMS, LatentNorm


class GridMismatchError(ValueError):
    """The latent grid cannot be patchified onto the teacher's token grid."""


GRID_MISMATCH_MODES = ("error", "resample_teacher")


@dataclass
class MapperConfig:
    depth: int = option(1, "ViT blocks in the mapper; 0 = MLP projector only", min=0)
    hidden_dim: int | None = option(None, "block width; None = teacher width", min=1)
    num_heads: int | None = option(
        None, "attention heads; None = hidden_dim // 64 (12 at 768, 16 at 1024)", min=1
    )
    mlp_ratio: float = option(4.0, "ViT MLP hidden width / block width", check=positive)
    projector_dim: int = option(2048, "hidden width of the 3-layer SiLU projector", min=1)
    patch_size: int | None = option(
        None, "latent patch size; None = chosen so tokens match the teacher grid", min=1
    )
    grid_mismatch: str = option(
        "error",
        "when no integer patch size maps the latent grid onto the teacher grid: 'error', or "
        "'resample_teacher' (the trainer resamples teacher tokens to `mapper.token_grid`)",
        choices=GRID_MISMATCH_MODES,
    )
    noise: bool = option(True, "diffusion-aware noise injection z_t in training")
    t_sampling: str = option("uniform", "t distribution: uniform | logit_normal", choices=T_SAMPLERS)
    latent_norm: str = option(
        "running",
        "running (batch stats, EMA for eval) | fixed (the VAE's latent stats) | none",
        choices=LATENT_NORMS,
    )
    norm_momentum: float = option(0.1, "EMA momentum of the running statistics", min=0, max=1)
    norm_eps: float = option(1e-4, "variance epsilon (REPA-E's latent BN uses 1e-4)", check=positive)
    qk_norm: bool = option(False, "LayerNorm on queries and keys per head")


class TeacherLike(Protocol):
    embed_dim: int

    def grid_size(self, resolution: int) -> tuple[int, int] | int: ...


def _pair(x: int | tuple[int, int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _fmt(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def resolve_patch_size(latent_grid: tuple[int, int], teacher_grid: tuple[int, int]) -> int:
    """The patch size p with latent_grid / p == teacher_grid; GridMismatchError if none exists."""
    (lh, lw), (th, tw) = _pair(latent_grid), _pair(teacher_grid)
    if lh % th == 0 and lw % tw == 0 and lh // th == lw // tw:
        return lh // th
    raise GridMismatchError(
        f"latent grid {_fmt((lh, lw))} cannot be patchified onto the teacher token grid {_fmt((th, tw))} "
        "with an integer patch size. Options: set MapperConfig.grid_mismatch='resample_teacher' (teacher "
        "tokens are resampled to the mapper grid), set MapperConfig.patch_size together with that, or pick "
        "a teacher input resolution whose token grid divides the latent grid."
    )


def _closest_patch_size(latent_grid: tuple[int, int], teacher_grid: tuple[int, int]) -> int:
    """The patch size whose token count is closest (in log ratio) to the teacher's; ties -> larger p."""
    (lh, lw), (th, tw) = latent_grid, teacher_grid
    candidates = [p for p in range(1, min(lh, lw) + 1) if lh % p == 0 and lw % p == 0]
    return min(candidates, key=lambda p: (abs(math.log(lh * lw / p**2 / (th * tw))), -p))


def _resolve_heads(hidden: int, num_heads: int | None) -> int:
    if num_heads is None:
        if hidden % 64 != 0:
            raise ValueError(f"cannot pick a head count for width {hidden}; set MapperConfig.num_heads")
        num_heads = hidden // 64
    if hidden % num_heads != 0:
        raise ValueError(f"mapper width {hidden} is not divisible by num_heads={num_heads}")
    return num_heads


class Mapper(nn.Module):
    """h_phi: latents (B, C, h, w) -> tokens (B, N, teacher_dim) on `token_grid` (N = product)."""

    grad_checkpointing: bool = False  # recompute block activations in the backward pass

    def __init__(
        self,
        latent_channels: int,
        latent_grid: tuple[int, int],
        teacher_dim: int,
        teacher_grid: tuple[int, int],
        config: MapperConfig | None = None,
    ):
        super().__init__()
        cfg = config or MapperConfig()
        if cfg.grid_mismatch not in GRID_MISMATCH_MODES:
            raise ValueError(f"grid_mismatch must be one of {GRID_MISMATCH_MODES}, got {cfg.grid_mismatch!r}")
        if cfg.t_sampling not in T_SAMPLERS:
            raise ValueError(f"t_sampling must be one of {sorted(T_SAMPLERS)}, got {cfg.t_sampling!r}")
        if cfg.depth < 0:
            raise ValueError(f"depth must be >= 0, got {cfg.depth}")
        self.config = cfg
        self.latent_channels = latent_channels
        self.latent_grid, self.teacher_grid = _pair(latent_grid), _pair(teacher_grid)
        self.teacher_dim = teacher_dim
        self.patch_size = self._choose_patch_size()
        self.token_grid = (self.latent_grid[0] // self.patch_size, self.latent_grid[1] // self.patch_size)

        hidden = cfg.hidden_dim or teacher_dim
        heads = _resolve_heads(hidden, cfg.num_heads) if cfg.depth > 0 else 0
        self.hidden_dim, self.num_heads = hidden, heads
        self.norm = LatentNorm(latent_channels, cfg.latent_norm, cfg.norm_momentum, cfg.norm_eps)
        self.patch_embed = nn.Conv2d(latent_channels, hidden, self.patch_size, stride=self.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, self.token_grid), persistent=False)
        self.blocks = nn.ModuleList(
            Block(hidden, heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth)
        )
        self.final_norm = nn.LayerNorm(hidden, eps=1e-6) if cfg.depth > 0 else nn.Identity()
        self.projector = build_projector(hidden, cfg.projector_dim, teacher_dim)
        init_vit_weights(self, self.patch_embed)

    @classmethod
    def from_teacher(
        cls,
        latent_channels: int,
        latent_grid: tuple[int, int],
        teacher: TeacherLike,
        config: MapperConfig | None = None,
        *,
        resolution: int,
    ) -> Mapper:
        """Mapper for `teacher` (needs `.embed_dim`, `.grid_size(resolution)`) at image `resolution`."""
        teacher_grid = _pair(teacher.grid_size(resolution))
        return cls(latent_channels, latent_grid, teacher.embed_dim, teacher_grid, config)

    def _choose_patch_size(self) -> int:
        cfg, lg, tg = self.config, self.latent_grid, self.teacher_grid
        if cfg.patch_size is None:
            try:
                return resolve_patch_size(lg, tg)
            except GridMismatchError:
                if cfg.grid_mismatch == "error":
                    raise
                return _closest_patch_size(lg, tg)
        p = cfg.patch_size
        if p < 1 or lg[0] % p or lg[1] % p:
            raise ValueError(f"patch_size {p} does not divide the latent grid {_fmt(lg)}")
        if (lg[0] // p, lg[1] // p) != tg and cfg.grid_mismatch == "error":
            raise GridMismatchError(
                f"patch_size {p} turns the latent grid {_fmt(lg)} into {_fmt((lg[0] // p, lg[1] // p))} "
                f"tokens, not the teacher grid {_fmt(tg)}; set MapperConfig.grid_mismatch='resample_teacher' "
                "to resample the teacher tokens, or leave patch_size unset."
            )
        return p

    @property
    def needs_teacher_resample(self) -> bool:
        """True when the teacher tokens must be resampled to `token_grid` before the loss."""
        return self.token_grid != self.teacher_grid

    @property
    def num_tokens(self) -> int:
        return self.token_grid[0] * self.token_grid[1]

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Load per-channel latent statistics (required for latent_norm='fixed'; seeds 'running')."""
        self.norm.set_stats(mean, std)

    def add_noise(
        self, z: torch.Tensor, t: torch.Tensor | float | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z_t = (1 - t) z + t eps with t (B,) broadcast to (B, 1, 1, 1); missing t / eps are sampled."""
        if t is None:  # t ~ p(t) per sample (B,): the paper's U(0, 1), or SiT/SD3's logit-normal
            t = draw_t(z.shape[0], self.config.t_sampling, z.device)
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(-1).expand(z.shape[0])
        t = t.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        eps = torch.randn_like(z) if noise is None else noise.to(z)
        return (1 - t) * z + t * eps

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor | float | None = None,
        noise: torch.Tensor | None = None,
        add_noise: bool | None = None,
    ) -> torch.Tensor:
        """Latents (B, C, h, w) -> tokens (B, N, teacher_dim).

        Noise is injected when `add_noise` is True, or when it is None and either t / noise is given or
        the module is in training mode with `config.noise`. Evaluation therefore sees the clean mapping
        by default: deterministic validation of the alignment and ReaLS-style feature read-out.
        """
        if z.ndim != 4 or z.shape[1] != self.latent_channels or tuple(z.shape[2:]) != self.latent_grid:
            raise ValueError(
                f"mapper expects latents (B, {self.latent_channels}, {_fmt(self.latent_grid)}), "
                f"got {tuple(z.shape)}"
            )
        z = self.norm(z)  # fp32
        if add_noise is None:
            add_noise = t is not None or noise is not None or (self.training and self.config.noise)
        if add_noise:
            z = self.add_noise(z, t, noise)
        x = self.patch_embed(z).flatten(2).transpose(1, 2)  # (B, N, hidden)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:  # activation checkpointing: recompute each block in the backward pass
            ckpt = self.grad_checkpointing and torch.is_grad_enabled()
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        return self.projector(self.final_norm(x))  # (B, N, teacher_dim)

    def num_params(self, part: str | None = None) -> int:
        """Parameter count of the whole mapper or of one part: patch_embed | blocks | projector."""
        module = self if part is None else getattr(self, part)
        return sum(p.numel() for p in module.parameters())


def load_mapper(export_dir: str | Path) -> Mapper:
    """The mapper exported beside a trained VAE (``export/vae``: mapper.json + mapper.safetensors), in eval
    mode."""
    d = Path(export_dir)
    meta_path = d / "mapper.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no mapper.json in {d}: this VAE was exported without an alignment mapper")
    meta = read_json(meta_path, "mapper record")
    with malformed(meta_path, "mapper record"):
        m = Mapper(
            meta["latent_channels"],
            tuple(meta["latent_grid"]),
            meta["teacher_dim"],
            tuple(meta["teacher_grid"]),
            from_dict(MapperConfig, meta["config"], source=str(meta_path)),
        )
        m.load_state_dict(read_weights(d / "mapper.safetensors", "mapper weights"))
    return m.eval()


MAPPER_FILES = ("mapper.safetensors", "mapper.json")


def save_mapper(mapper: nn.Module, out_dir: Path, meta: dict) -> None:
    atomic_save_safetensors(dict(mapper.state_dict()), out_dir / MAPPER_FILES[0])
    atomic_write_json(meta, out_dir / MAPPER_FILES[1])


def export_mapper(mapper: Mapper, out_dir: Path, meta: dict[str, Any]) -> None:
    """The mapper beside the VAE (mapper.safetensors + mapper.json, what `load_mapper` reads)."""
    save_mapper(mapper, out_dir, {**meta, "config": to_dict(mapper.config)})


def mapper_head(head_cls: type[nn.Module] | None = None, **overrides) -> Callable[[HeadContext], nn.Module]:
    """The head builder of the mapper of ``--mapper.*`` with ``overrides`` of its MapperConfig (REPA: depth
    0, no noise); ``head_cls`` (ReaLS's two-branch MLP) is built from the same options instead.

    With ``--mapper.latent_norm fixed`` its LatentNorm gets the starting VAE's latent statistics here
    (``ctx.latent_stats()``), before the first step; they stay fixed for the run and travel in its
    checkpoints.
    """
    cls = head_cls or Mapper

    def build(ctx: HeadContext) -> nn.Module:
        mcfg = replace(ctx.mapper, **overrides)
        head = cls(ctx.vae.latent_channels, ctx.latent_grid, ctx.teacher.embed_dim, ctx.teacher_grid, mcfg)
        if mcfg.latent_norm == "fixed":
            head.set_latent_stats(*ctx.latent_stats())  # type: ignore[operator]
        return head

    return build


def mapper_grid(head: nn.Module) -> tuple[int, int]:
    """The head's token grid (a Mapper's, or a head holding one with the same property)."""
    return cast(Mapper, head).token_grid


def cosine_loss(inputs: AlignInputs, cfg: object) -> LossAndLogs:
    loss, mean_cos = cosine_alignment_loss(inputs.pred, inputs.target)
    return loss, {"cos": mean_cos}


SENDVAE = Alignment(
    "sendvae",
    needs_teacher=True,
    build_head=mapper_head(),
    head_input=lambda cfg: NOISY_LATENT if cfg.mapper.noise else CLEAN_LATENT,
    token_grid=mapper_grid,
    loss=cosine_loss,
    logged=("align", "cos"),
    export=export_mapper,
    exports=MAPPER_FILES,
    load=load_mapper,
)
REPA = Alignment(
    "repa",
    needs_teacher=True,
    build_head=mapper_head(depth=0, noise=False),
    head_input=lambda cfg: CLEAN_LATENT,
    token_grid=mapper_grid,
    loss=cosine_loss,
    logged=("align", "cos"),
    export=export_mapper,
    exports=MAPPER_FILES,
    load=load_mapper,
)
