"""Loading SiTs: our exports (model.safetensors + config.json) and REPA / REPA-E / SiT checkpoints.

The module names of `sendvae.models.sit.SiT` are the REPA layout, so a checkpoint's tensors load as they
are; only its fixed `pos_embed` (recomputed here) and REPA-E's latent BatchNorm (`bn.*`, latent statistics
that belong with the VAE) are set aside. Loading is strict by default: missing, unexpected or mis-shaped
tensors raise `CheckpointMismatchError` with a summary. The model comes back in eval mode.

Which way a foreign checkpoint runs time is read once, here, into `SiTConfig.time_convention`:

    layout                                     tensors                          time
    REPA / REPA-E (train.py, last.pt)          projectors.*, C outputs [, bn.*] t = 1 noise, v = eps - x
    Ma et al.'s SiT (SiT-XL-2-256x256.pt,      no projectors, 2C outputs        t = 0 noise, v = x - eps
      its train.py checkpoints)                (learn_sigma)

Training arguments stored beside the weights decide first: REPA / REPA-E write path_type linear|cosine
and prediction v, SiT writes Linear|GVP|VP and velocity|score|noise. Only the linear path with velocity
prediction is what our samplers integrate; the others are refused. DiT checkpoints share SiT's tensor
layout but predict DDPM noise on t in 0..999: a bare DiT state dict cannot be told apart from the
released SiT file, so do not pass one.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from sendvae.models.sit import CONFIG_FILE, FORMAT_VERSION, SIT_MODELS, WEIGHTS_FILE, SiT, SiTConfig
from sendvae.runtime.checkpoint import CheckpointMismatchError, find_state_dict, load_checked, read_checkpoint

from ..runtime.weights import malformed, read_json

log = logging.getLogger(__name__)

_ANCHOR = "x_embedder.proj.weight"
# heads leave no trace in the weights: the registry's widths decide, else 64-wide heads
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
_IGNORED_PREFIXES = ("bn.",)  # REPA-E's latent BatchNorm: statistics of the VAE's latents, not the SiT
# the two families' training arguments (argparse choices) do not overlap
_SIT_PATHS, _SIT_PREDICTIONS = ("Linear", "GVP", "VP"), ("velocity", "score", "noise")
_REPA_PATHS, _REPA_PREDICTIONS = ("linear", "cosine"), ("v",)


def _args_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """The training arguments REPA / REPA-E store beside the weights (an argparse.Namespace), as a dict."""
    args = raw.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def infer_time_convention(sd: dict[str, torch.Tensor], args: dict[str, Any] | None = None) -> str:
    """The time convention of a checkpoint: "sit" for Ma et al.'s SiT (t = 0 noise), "repa" for REPA / REPA-E.

    The stored training `args` decide when they name a path or a prediction; a bare state dict (the
    released files) by its layout: learn_sigma outputs (2C channels) without REPA projectors is SiT's.
    """
    args = args or {}
    path, pred = args.get("path_type"), args.get("prediction")
    if str(args.get("model", "")).startswith("DiT-"):
        raise CheckpointMismatchError(
            f"a DiT checkpoint (args.model={args['model']!r}): DiT predicts DDPM noise, not a SiT velocity"
        )
    if path in _SIT_PATHS or pred in _SIT_PREDICTIONS:
        if (path, pred) != ("Linear", "velocity"):
            raise CheckpointMismatchError(
                f"a SiT checkpoint trained with path_type={path!r}, prediction={pred!r}: only the Linear "
                "path with velocity prediction can be sampled here"
            )
        return "sit"
    if path in _REPA_PATHS or pred in _REPA_PREDICTIONS:
        if path == "cosine":
            raise CheckpointMismatchError(
                "a REPA checkpoint trained on the cosine path: only the linear interpolant can be sampled"
            )
        return "repa"
    try:
        patch_w, final = sd[_ANCHOR], sd["final_layer.linear.weight"]  # (D, C, p, p), (p*p*C_out, D)
    except KeyError as e:
        raise CheckpointMismatchError(f"cannot infer the SiT architecture: tensor {e} is missing") from e
    learn_sigma = final.shape[0] == 2 * patch_w.shape[1] * patch_w.shape[2] ** 2
    has_projectors = any(k.startswith("projectors.") for k in sd)
    return "sit" if learn_sigma and not has_projectors else "repa"


def infer_sit_config(sd: dict[str, torch.Tensor], args: dict[str, Any] | None = None) -> SiTConfig:
    """Read a SiTConfig off REPA-layout tensor shapes, completed by the checkpoint's training `args`.

    From the shapes: width, depth, patch, channels, input size (from `pos_embed`), classes, learn_sigma,
    qk-norm, projector widths, the wide head's depth and width (its heads: from its qk-norm, else 16).
    Not in the shapes: the head count (from `args.model` such as "SiT-XL/2",
    else the registry width -> heads table, else 64-wide heads), `encoder_depth` (`args.encoder_depth`,
    else the registry's 4 / 8), the label dropout (a null row is assumed: classes = rows - 1) and the
    time convention (`infer_time_convention`).
    """
    args = args or {}
    try:
        patch_w = sd[_ANCHOR]  # (D, C, p, p)
        table = sd["y_embedder.embedding_table.weight"]  # (classes [+ 1], D)
        final = sd["final_layer.linear.weight"]  # (p*p*C_out, D)
    except KeyError as e:
        raise CheckpointMismatchError(f"cannot infer the SiT architecture: tensor {e} is missing") from e
    hidden, channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if "pos_embed" not in sd:
        raise CheckpointMismatchError(
            "cannot infer the SiT input size: the checkpoint has no pos_embed; pass a SiTConfig"
        )
    grid = round(sd["pos_embed"].shape[-2] ** 0.5)
    projectors = sorted({int(k.split(".")[1]) for k in sd if k.startswith("projectors.")})
    z_dims = tuple(sd[f"projectors.{i}.4.weight"].shape[0] for i in projectors)
    projector_dim = sd["projectors.0.0.weight"].shape[0] if projectors else 2048
    q_norm = sd.get("blocks.0.attn.q_norm.weight")
    preset = str(args.get("model", ""))
    default_enc = 4 if depth <= 12 else 8
    if preset in SIT_MODELS:
        heads, default_enc = SIT_MODELS[preset]().num_heads, SIT_MODELS[preset]().encoder_depth
    elif q_norm is not None:  # (head_dim,)
        heads = hidden // q_norm.shape[0]
    elif hidden in _HEADS_BY_WIDTH:
        heads = _HEADS_BY_WIDTH[hidden]
    else:  # 64-wide heads, or the nearest count that divides the width
        heads = next(h for h in range(max(1, hidden // 64), 0, -1) if hidden % h == 0)
    dropout = float(args.get("cfg_prob", 0.1)) or 0.1  # the table has a null row, so dropout was > 0
    head_depth = len({k.split(".")[2] for k in sd if k.startswith("head.blocks.")})  # our DiT^DH head
    head_width = sd["head.x_embedder.proj.weight"].shape[0] if head_depth else 2048
    head_q = sd.get("head.blocks.0.attn.q_norm.weight")
    head_heads = head_width // head_q.shape[0] if head_q is not None else (16 if head_width % 16 == 0 else 1)
    return SiTConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        class_dropout_prob=dropout,
        num_classes=table.shape[0] - 1,
        learn_sigma=final.shape[0] == 2 * patch * patch * channels,
        qk_norm=q_norm is not None,
        qk_norm_type="layer" if "blocks.0.attn.q_norm.bias" in sd or q_norm is None else "rms",
        encoder_depth=min(int(args.get("encoder_depth", default_enc)), depth),
        projector_dim=projector_dim,
        z_dims=z_dims,
        fused_attn=bool(args.get("fused_attn", True)),
        time_convention=infer_time_convention(sd, args),
        head_depth=head_depth,
        head_width=head_width,
        head_num_heads=head_heads,
    )


def _resolve(config: str | None, inferred: SiTConfig) -> SiTConfig:
    """The inferred config, or the preset `config` with the sizes read off the tensors."""
    if config is None:
        return inferred
    if config not in SIT_MODELS:
        raise ValueError(f"unknown SiT model {config!r}; choices: {sorted(SIT_MODELS)}")
    keep: tuple[str, ...] = ("input_size", "in_channels", "num_classes", "learn_sigma", "qk_norm")
    keep += ("qk_norm_type", "projector_dim", "z_dims", "class_dropout_prob", "time_convention")
    keep += ("head_depth", "head_width", "head_num_heads")
    return SIT_MODELS[config](**{k: getattr(inferred, k) for k in keep})


def load_sit(
    path: str | Path,
    config: SiTConfig | str | None = None,
    *,
    weights: str = "ema",
    strict: bool = True,
    map_location: Any = "cpu",
) -> SiT:
    """A SiT in eval mode from our export folder (or its model.safetensors) or a REPA / REPA-E / SiT
    checkpoint; whichever way the checkpoint runs time, the model speaks ours (t = 1 noise, v = eps - x).

    `config`: a SiTConfig, a registry name ("SiT-XL/2": heads and encoder_depth from the preset, sizes and
    time convention from the tensors), or None (the export's config.json, a `sit_config` dict in the
    checkpoint, else `infer_sit_config`). `weights`: "ema" (default) or "model" when a checkpoint holds both.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SiT checkpoint or export folder at {path}")
    folder = path if path.is_dir() else path.parent
    stored: SiTConfig | None
    if path.is_dir() or (path.name == WEIGHTS_FILE and (folder / CONFIG_FILE).exists()):
        sd, stored, args, where = _read_export(folder)
    else:
        sd, stored, args, where = _read_checkpoint(path, weights, map_location)
    ignored = [k for k in sd if k.startswith(_IGNORED_PREFIXES)]
    if ignored:
        log.info("SiT: ignoring %s (REPA-E's latent BatchNorm; the VAE owns latent statistics)", ignored)
    sd = {k: v for k, v in sd.items() if k not in ignored}
    inferred = None
    if isinstance(config, SiTConfig):
        cfg = config
        try:  # only for the error message
            inferred = infer_sit_config(sd, args)
        except CheckpointMismatchError:
            pass
        if inferred is not None and inferred.time_convention != cfg.time_convention:
            log.warning(
                "SiT: %s looks like a checkpoint with time_convention=%r, the config says %r",
                path,
                inferred.time_convention,
                cfg.time_convention,
            )
    elif stored is not None:
        if config is not None:
            raise ValueError(f"{path} carries its own config; pass a SiTConfig or None, not {config!r}")
        cfg = stored
    else:
        inferred = infer_sit_config(sd, args)
        cfg = _resolve(config, inferred)
    pos = sd.pop("pos_embed", None)
    model = SiT(cfg)
    hint = ""
    if inferred is not None and inferred.to_dict() != cfg.to_dict():
        hint = f"the tensors look like {inferred.describe()}"
    load_checked(model, sd, strict=strict, expected=cfg.describe(), source=f"{path} ({where})", hint=hint)
    if pos is not None:
        _check_pos_embed(model, pos, path)
    log.info("SiT: %s from %s (%s)", cfg.describe(), path, where)
    return model.to(map_location).eval()


def _read_checkpoint(
    path: Path, weights: str, map_location: Any
) -> tuple[dict[str, torch.Tensor], SiTConfig | None, dict[str, Any], str]:
    # REPA / REPA-E keep their argparse.Namespace under "args"; allow just that class in the safe unpickler.
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = read_checkpoint(path, map_location)
    nests = ("ema", "model") if weights == "ema" else ("model", "ema")
    sd, where = find_state_dict(
        raw, _ANCHOR, (*nests, "state_dict", "module"), source=f"SiT checkpoint {path}"
    )
    with malformed(path, "SiT checkpoint"):
        stored = SiTConfig.from_dict(raw["sit_config"]) if isinstance(raw.get("sit_config"), dict) else None
    return sd, stored, _args_dict(raw), where


def _read_export(folder: Path) -> tuple[dict[str, torch.Tensor], SiTConfig, dict[str, Any], str]:
    weights, meta_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not (weights.exists() and meta_path.exists()):
        raise FileNotFoundError(f"{folder} is not a SiT export: expected {WEIGHTS_FILE} and {CONFIG_FILE}")
    meta = read_json(meta_path, "SiT config")
    with malformed(meta_path, "SiT config"):
        if meta.get("format") != "sendvae.SiT":
            raise ValueError(f"{meta_path} is not a sendvae SiT config (format={meta.get('format')!r})")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{meta_path} has format_version {meta['format_version']}; upgrade sendvae")
        cfg = SiTConfig.from_dict(meta["config"])
    return read_checkpoint(weights), cfg, {}, "export"


def _check_pos_embed(model: SiT, pos: torch.Tensor, path: Path) -> None:
    """The stored position embedding should be the fixed sin-cos one we recompute."""
    ours = model.pos_embed.cpu()
    if pos.shape[-2:] != ours.shape[-2:]:
        raise CheckpointMismatchError(
            f"{path}: pos_embed has {tuple(pos.shape)}, the model {tuple(ours.shape)}; is input_size right?"
        )
    err = (pos.float().cpu().reshape(ours.shape) - ours).abs().max().item()
    if err > 1e-4:
        log.warning("SiT: %s stores a pos_embed that differs from the 2D sin-cos one by %.3g", path, err)
