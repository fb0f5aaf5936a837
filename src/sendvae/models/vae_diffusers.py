"""The diffusers layout of the VAE: LDM <-> diffusers tensor names, config.json, and the writer.

One table (`_KEY_TABLE`) translates the LDM module names of `sendvae.models.vae` to diffusers'
AutoencoderKL names and back; `save_vae` writes a folder that diffusers and `load_vae`
(`sendvae.models.vae_io`) both read. Nothing here builds a model, so `models/vae.py` can export through
it (`AutoencoderKL.save_pretrained`) without importing its own loader.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sendvae.runtime.checkpoint import atomic_save_safetensors, atomic_write_json

if TYPE_CHECKING:
    from sendvae.models.vae import AutoencoderKL, VAEConfig

FORMAT_VERSION = 1
SENDVAE_JSON = "sendvae.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
STAT_KEYS = ("latent_mean", "latent_std")  # buffers, optional in any checkpoint


# -- diffusers <-> LDM key table ------------------------------------------------------------------------

# (LDM prefix, diffusers prefix); {i} encoder level / decoder `up` index, {r} = num_levels - 1 - i
# (diffusers numbers decoder blocks from the deepest), {j} block index, {m} encoder|decoder.
_KEY_TABLE = [
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.attn.{j}.", "encoder.down_blocks.{i}.attentions.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{i}.block.{j}.", "decoder.up_blocks.{r}.resnets.{j}."),
    ("decoder.up.{i}.attn.{j}.", "decoder.up_blocks.{r}.attentions.{j}."),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{r}.upsamplers.0."),
    ("{m}.mid.block_1.", "{m}.mid_block.resnets.0."),
    ("{m}.mid.block_2.", "{m}.mid_block.resnets.1."),
    ("{m}.mid.attn_1.", "{m}.mid_block.attentions.0."),
    ("{m}.norm_out.", "{m}.conv_norm_out."),
]
# Leaf module names inside a block; the last four are diffusers' pre-0.14 attention names (import only).
_LEAF_TABLE = [
    *[("nin_shortcut", "conv_shortcut"), ("norm", "group_norm"), ("q", "to_q"), ("k", "to_k")],
    *[("v", "to_v"), ("proj_out", "to_out.0"), ("q", "query"), ("k", "key"), ("v", "value")],
    ("proj_out", "proj_attn"),
]
_GROUPS = {"i": r"(?P<i>\d+)", "r": r"(?P<r>\d+)", "j": r"(?P<j>\d+)", "m": r"(?P<m>encoder|decoder)"}


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\\{(\w)\\\}", lambda g: _GROUPS[g.group(1)], re.escape(template)))


_COMPILED = [(_compile(ldm), _compile(dif), ldm, dif) for ldm, dif in _KEY_TABLE]


def _convert_key(key: str, num_levels: int, to_diffusers: bool) -> str:
    for ldm_re, dif_re, ldm_t, dif_t in _COMPILED:
        m = (ldm_re if to_diffusers else dif_re).match(key)
        if m is None:
            continue
        g = m.groupdict()
        if "i" in g:
            g["r"] = str(num_levels - 1 - int(g["i"]))
        elif "r" in g:
            g["i"] = str(num_levels - 1 - int(g["r"]))
        prefix = (dif_t if to_diffusers else ldm_t).format(**g)
        rest = key[m.end() :]
        for ldm_leaf, dif_leaf in _LEAF_TABLE:
            src, dst = (ldm_leaf, dif_leaf) if to_diffusers else (dif_leaf, ldm_leaf)
            if rest.startswith(src + "."):
                rest = dst + rest[len(src) :]
                break
        return prefix + rest
    return key  # conv_in, conv_out, quant_conv, post_quant_conv: same in both


def ldm_to_diffusers(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """LDM-named VAE state dict -> diffusers AutoencoderKL names (attention 1x1 convs -> linears)."""
    out = {}
    for k, v in sd.items():
        if k in STAT_KEYS:
            continue
        nk = _convert_key(k, num_levels, to_diffusers=True)
        if v.ndim == 4 and ".attentions." in nk and nk.endswith(".weight"):
            v = v[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        out[nk] = v.contiguous()
    return out


def diffusers_to_ldm(sd: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Inverse of `ldm_to_diffusers` (also accepts diffusers' old query/key/value/proj_attn names)."""
    out = {}
    for k, v in sd.items():
        nk = _convert_key(k, num_levels, to_diffusers=False)
        if v.ndim == 2 and re.search(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", nk):
            v = v[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        out[nk] = v
    return out


# -- config and writer -----------------------------------------------------------------------------------


def config_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    """The config.json diffusers' AutoencoderKL expects for this architecture."""
    if cfg.z_channels != cfg.embed_dim or cfg.norm_eps != 1e-6:
        raise ValueError(
            f"diffusers' AutoencoderKL needs z_channels == embed_dim and norm_eps 1e-6; {cfg.describe()} "
            "cannot be exported in diffusers layout"
        )
    attn = set(cfg.attn_levels)
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": [
            "AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(n)
        ],
        "up_block_types": [
            "AttnUpDecoderBlock2D" if i in attn else "UpDecoderBlock2D" for i in reversed(range(n))
        ],
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.embed_dim,
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.resolution,
        "mid_block_add_attention": cfg.mid_attention,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "force_upcast": True,
    }


def save_vae(model: AutoencoderKL, directory: str | Path) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors (diffusers) and sendvae.json (ours).

    Each file goes to a temporary name beside its target and is renamed into place, so a crash leaves
    complete files (old or new) only.
    """
    directory, cfg = Path(directory), model.config
    mean, std = model.latent_mean.float().cpu().tolist(), model.latent_std.float().cpu().tolist()
    dif_cfg = config_to_diffusers(cfg)
    # diffusers pipelines normalise as (z - latents_mean) * scaling_factor / latents_std
    dif_cfg.update(scaling_factor=1.0, shift_factor=None, latents_mean=mean, latents_std=std)
    try:
        dif_cfg["_diffusers_version"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        dif_cfg["_diffusers_version"] = "0.30.0"
    meta = {"format": "sendvae.AutoencoderKL", "format_version": FORMAT_VERSION, "config": cfg.to_dict()}
    meta.update(latent_mean=mean, latent_std=std)
    weights = ldm_to_diffusers(model.state_dict(), len(cfg.ch_mult))
    atomic_save_safetensors(weights, directory / DIFFUSERS_WEIGHTS[0], metadata={"format": "pt"})
    atomic_write_json(dif_cfg, directory / "config.json")
    atomic_write_json(meta, directory / SENDVAE_JSON)
    return directory
