"""Loading and exporting VAEs: presets, diffusers folders, LDM/SD and REPA-E checkpoints, safetensors.

`load_vae` is the single entry point. Everything is converted to the LDM module naming of
`sendvae.models.vae`; diffusers names are translated by one table in both directions
(`sendvae.models.vae_diffusers`, which also writes our exports: `save_vae`). Loading is strict by
default: any missing, unexpected or mis-shaped tensor raises `CheckpointMismatchError` with a summary,
never a silent partial load.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, cast

import torch

from sendvae.models.rae import RAE, RAE_JSON, RAEConfig, is_rae_record, load_rae, rae_from_state
from sendvae.models.vae import VAE_CONFIGS, AutoencoderKL, VAEConfig
from sendvae.models.vae_diffusers import (
    DIFFUSERS_WEIGHTS,
    FORMAT_VERSION,
    SENDVAE_JSON,
    STAT_KEYS,
    diffusers_to_ldm,
)
from sendvae.runtime.checkpoint import CheckpointMismatchError, find_state_dict, load_checked, read_checkpoint

from ..runtime.weights import malformed, read_json

log = logging.getLogger(__name__)

_VAE_ROOTS = ("encoder", "decoder", "quant_conv", "post_quant_conv", *STAT_KEYS)
_VAE_NESTS = ("vae", "state_dict", "ema", "model", "module")  # where training scripts nest state dicts


# -- configs ---------------------------------------------------------------------------------------------


def config_from_diffusers(d: dict[str, Any]) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKL config.json."""
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"expected a diffusers AutoencoderKL config, got _class_name={d['_class_name']!r}")
    if d.get("act_fn", "silu") != "silu" or not (
        d.get("use_quant_conv", 1) and d.get("use_post_quant_conv", 1)
    ):
        raise ValueError("only act_fn='silu' with quant_conv and post_quant_conv is supported")
    widths = list(d["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width")
    n = len(widths)
    down = list(d.get("down_block_types", ["DownEncoderBlock2D"] * n))
    up = list(d.get("up_block_types", ["UpDecoderBlock2D"] * n))
    attn = [i for i, t in enumerate(down) if t.startswith("Attn")]
    if [i for i, t in enumerate(reversed(up)) if t.startswith("Attn")] != attn:
        raise ValueError(f"down_block_types {down} and up_block_types {up} place attention differently")
    size = d.get("sample_size", 256)
    resolution = int(size[0] if isinstance(size, (list, tuple)) else size)
    latent = int(d.get("latent_channels", 4))
    return VAEConfig(
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=int(d.get("layers_per_block", 2)),
        attn_resolutions=tuple(resolution // 2**i for i in attn),
        resolution=resolution,
        z_channels=latent,
        embed_dim=latent,
        norm_groups=int(d.get("norm_num_groups", 32)),
        mid_attention=bool(d.get("mid_block_add_attention", True)),
    )


def infer_vae_config(sd: dict[str, torch.Tensor], resolution: int = 256) -> VAEConfig:
    """Read the architecture off LDM-named tensor shapes.

    GroupNorm's group count and dropout leave no trace in the weights: 32 groups (LDM) is assumed
    (fewer when a width is not a multiple of 32); pass a config for anything else.
    Attention levels are placed through `attn_resolutions` for a nominal `resolution` input.
    """
    try:
        conv_in = sd["encoder.conv_in.weight"]  # (ch, in, 3, 3)
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
        z_channels = sd["encoder.conv_out.weight"].shape[0] // 2
        embed_dim = sd["quant_conv.weight"].shape[0] // 2
        out_channels = sd["decoder.conv_out.weight"].shape[0]
    except KeyError as e:
        raise CheckpointMismatchError(f"cannot infer the VAE architecture: tensor {e} is missing") from e
    ch = conv_in.shape[0]
    if levels != list(range(len(levels))) or any(w % ch for w in widths):
        raise CheckpointMismatchError(f"cannot infer the VAE architecture: levels {levels}, widths {widths}")
    blocks = {int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block.")}
    attn = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    return VAEConfig(
        in_channels=conv_in.shape[1],
        out_channels=out_channels,
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=len(blocks),
        attn_resolutions=tuple(resolution // 2**i for i in attn),
        resolution=resolution,
        z_channels=z_channels,
        embed_dim=embed_dim,
        norm_groups=math.gcd(32, *widths),  # 32 unless a width forbids it
        mid_attention="encoder.mid.attn_1.q.weight" in sd,
    )


def _resolve_config(config: VAEConfig | str | None) -> VAEConfig | None:
    if isinstance(config, str):
        if config not in VAE_CONFIGS:
            raise ValueError(f"unknown VAE config {config!r}; presets: {sorted(VAE_CONFIGS)}")
        return VAE_CONFIGS[config]
    return config


# -- latent statistics -----------------------------------------------------------------------------------

# (mean key, std key, std stored as 1/std) in the formats seen in the wild: ours, diffusers-style names,
# LightningDiT's latents_stats.pt ({mean, std}), REPA-E's *-latents-stats.pt ({latents_bias, latents_scale}).
_STAT_FORMATS = [
    ("latent_mean", "latent_std", False),
    ("latents_mean", "latents_std", False),
    ("mean", "std", False),
    ("latents_bias", "latents_scale", True),
]


def parse_latent_stats(d: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) as flat float tensors from any known stats dict, or None."""
    for mk, sk, inverted in _STAT_FORMATS:
        if d.get(mk) is not None and d.get(sk) is not None:
            mean = torch.as_tensor(d[mk], dtype=torch.float32).flatten()
            std = torch.as_tensor(d[sk], dtype=torch.float32).flatten()
            return mean, (1.0 / std if inverted else std)
    return None


def load_latent_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a stats file (.pt/.json/.safetensors) in any format `parse_latent_stats` knows."""
    path = Path(path)
    d = read_json(path, "latent stats") if path.suffix == ".json" else read_checkpoint(path)
    with malformed(path, "latent stats"):
        stats = parse_latent_stats(d)
    if stats is None:
        raise ValueError(f"{path} holds no latent stats; expected keys like latent_mean/latent_std")
    return stats


# -- load -----------------------------------------------------------------------------------------------


def load_vae(
    path_or_preset: str | Path,
    *,
    config: VAEConfig | str | None = None,
    strict: bool = True,
    map_location: Any = "cpu",
    latent_stats: str | Path | None = None,
) -> AutoencoderKL:
    """Build an AutoencoderKL, in eval mode, from a preset name (random init), a diffusers/sendvae folder or
    a checkpoint; or an RAE (models/rae.py) from an RAE export folder (``rae.json``) or an RAE training state.

    `config` overrides the architecture (otherwise: the folder's config, a `vae_config` dict stored in
    the checkpoint, or shape inference). Latent stats come from `latent_stats` (a file), else the
    folder/checkpoint, else a REPA-E style `<name>-latents-stats.pt` next to the checkpoint.
    """
    path = Path(path_or_preset)
    raw = read_checkpoint(path, map_location) if path.is_file() else None
    if (path.is_dir() and (path / RAE_JSON).exists()) or (
        raw is not None and is_rae_record(raw.get("vae_config"))
    ):
        # An RAE has the interface of AutoencoderKL that training, caching, sampling, evaluation and probing
        # use (models/rae.py); their annotations name AutoencoderKL, hence the cast.
        return cast("AutoencoderKL", _load_rae(path, raw, config, map_location, latent_stats))
    cfg = _resolve_config(config)
    if not path.exists():
        if str(path_or_preset) in VAE_CONFIGS:
            log.info("VAE: preset %s with random weights", path_or_preset)
            model = AutoencoderKL(cfg or VAE_CONFIGS[str(path_or_preset)])
            if latent_stats is not None:
                model.set_latent_stats(*load_latent_stats(latent_stats))
            return model.eval()
        raise FileNotFoundError(
            f"{path_or_preset!r} is neither a file, a folder nor a VAE preset; presets: {sorted(VAE_CONFIGS)}"
        )
    if raw is None:
        sd, cfg, stats = _read_folder(path, cfg, map_location)
    else:
        sd, cfg, stats = _read_file(path, raw, cfg)

    model = AutoencoderKL(cfg)
    try:
        found = infer_vae_config(sd).describe()
        hint = f"the checkpoint looks like {found}" if found != cfg.describe() else ""
    except ValueError:  # not a readable VAE layout
        hint = ""
    load_checked(
        model,
        sd,
        strict=strict,
        expected=cfg.describe(),
        source=str(path),
        optional=STAT_KEYS.__contains__,
        hint=hint,
    )
    if latent_stats is not None:  # asked for: must fit
        model.set_latent_stats(*load_latent_stats(latent_stats))
    elif stats is not None and stats[0].numel() != cfg.embed_dim:
        log.warning("VAE: found latent stats for %d channels; the model has %d", len(stats[0]), cfg.embed_dim)
    elif stats is not None:
        model.set_latent_stats(*stats)
    return model.to(map_location).eval()


def _load_rae(
    path: Path, raw: dict[str, Any] | None, config: Any, map_location: Any, latent_stats: str | Path | None
) -> RAE:
    """An RAE export folder, or the training state ``raw`` read from ``path``: it carries its config and its
    encoder's weights."""
    if config is not None:
        raise ValueError(
            f"{path} is an RAE (a frozen encoder + ViT decoder), which carries its own config; drop the VAE "
            "config option (--vae-config / --model.vae_config / config=) for it"
        )
    if raw is None:
        model = load_rae(path, map_location)
    else:
        with malformed(path, "RAE training state"):
            cfg = RAEConfig.from_dict(raw["vae_config"])
        sd, where = find_state_dict(raw, "decoder.head.weight", _VAE_NESTS)
        roots = ("encoder", "decoder", "feature_mean", "feature_std", *STAT_KEYS)
        sd = {k: v for k, v in sd.items() if k.split(".")[0] in roots}
        log.info("RAE: %d tensors from %s (%s)", len(sd), path, where)
        model = rae_from_state(cfg, sd, str(path))
    if latent_stats is not None:
        model.set_latent_stats(*load_latent_stats(latent_stats))
    return model.to(map_location)


def _read_file(
    path: Path, raw: dict[str, Any], cfg: VAEConfig | None
) -> tuple[dict[str, torch.Tensor], VAEConfig, tuple[torch.Tensor, torch.Tensor] | None]:
    """An LDM/SD .ckpt, a REPA-E .pt, or a safetensors file (LDM or diffusers names), read as ``raw``."""
    sd, where = find_state_dict(raw, "encoder.conv_in.weight", _VAE_NESTS)
    if any(k.startswith("encoder.down_blocks.") for k in sd):
        n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
        sd, where = diffusers_to_ldm(sd, n), where + ", diffusers names"
    vae_sd = {k: v for k, v in sd.items() if k.split(".")[0] in _VAE_ROOTS}
    log.info(
        "VAE: %d tensors from %s (%s); %d others ignored", len(vae_sd), path, where, len(sd) - len(vae_sd)
    )
    stats = parse_latent_stats(raw)
    sidecar = path.with_name(path.stem + "-latents-stats.pt")
    if stats is None and sidecar.exists():
        stats = load_latent_stats(sidecar)
        log.info("VAE: latent stats from %s", sidecar)
    if cfg is None and isinstance(raw.get("vae_config"), dict):
        with malformed(path, "VAE checkpoint"):
            cfg = VAEConfig.from_dict(raw["vae_config"])
    if cfg is None:
        cfg = infer_vae_config(vae_sd)
        log.info("VAE: no config given; inferred from tensor shapes: %s", cfg.describe())
    return vae_sd, cfg, stats


def _read_folder(
    path: Path, cfg: VAEConfig | None, map_location: Any
) -> tuple[dict[str, torch.Tensor], VAEConfig, tuple[torch.Tensor, torch.Tensor] | None]:
    """A diffusers AutoencoderKL folder, optionally with our sendvae.json."""
    weights = next((path / w for w in DIFFUSERS_WEIGHTS if (path / w).exists()), None)
    if weights is None or not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} is not a VAE folder: expected config.json and one of {list(DIFFUSERS_WEIGHTS)}"
        )
    meta_path = path / SENDVAE_JSON
    dif_cfg = read_json(path / "config.json", "VAE config")
    if meta_path.exists():
        meta = read_json(meta_path, "VAE record")
        with malformed(meta_path, "VAE record"):
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(f"{meta_path} has format_version {meta['format_version']}; upgrade sendvae")
            cfg = cfg or VAEConfig.from_dict(meta["config"])
            stats = parse_latent_stats(meta)
    else:
        with malformed(path / "config.json", "VAE config"):
            cfg = cfg or config_from_diffusers(dif_cfg)
            stats = parse_latent_stats(dif_cfg)
        if dif_cfg.get("scaling_factor") is not None:  # one scalar; we keep per-channel stats instead
            log.info("VAE: ignoring scaling_factor %s of %s", dif_cfg["scaling_factor"], path)
    raw = read_checkpoint(weights, map_location)
    sd = diffusers_to_ldm(raw, len(cfg.ch_mult))
    log.info("VAE: %s (%s) from diffusers folder %s", cfg.describe(), weights.name, path)
    return sd, cfg, stats
