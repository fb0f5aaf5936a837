"""What a sample run decodes with: the SiT, the VAE, and the latent statistics the SiT was trained on.

A SiT learns normalised latents z_n = (z - mean) / std; its samples are decoded as vae.decode(z_n * std +
mean) with exactly the statistics it was trained with (`models.latent_stats`). Our train-sit runs record
them in their config from step 0 (so in every checkpoint and in an export's latents.json) and they are
used as recorded; a SiT that records none (REPA / REPA-E / SiT checkpoints) needs them given explicitly
(a latent store, a latents.json or stats file, or "vae" for the VAE's own): a missing value is an error,
never a guess.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data.latent_store import LatentStore, vae_fingerprint
from ..models.latent_stats import LatentStats
from ..models.sit import SiT, SiTConfig
from ..models.sit_io import load_sit
from ..models.vae_io import load_latent_stats, load_vae
from ..runtime import checkpoint as ckpt
from ..runtime.weights import malformed, read_json

if TYPE_CHECKING:
    from ..models.sit import SiT
    from ..models.vae import AutoencoderKL


@dataclass
class LoadedSiT:
    """A SiT and what its source says about how to decode it."""

    model: SiT
    name: str  # for output file names
    source: str  # the resolved file or folder
    weights: str  # "ema" or "model"
    vae: str | None = None  # the VAE the run names (train-sit's --model.vae), if any
    vae_config: str | None = None
    stats: LatentStats | None = None  # the statistics it was trained with, when recorded
    stats_from: str | None = None  # where those were read, for messages


def stats_from_path(path: str | os.PathLike) -> LatentStats:
    """Latent statistics from a latent store folder, a SiT export folder or a stats file (json / tensors)."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return LatentStore(path).stats
    if path.is_dir():
        path = path / "latents.json"
    if path.suffix == ".json" and path.is_file():
        with malformed(path, "latent stats"):
            return LatentStats.from_dict(read_json(path, "latent stats"))
    mean, std = load_latent_stats(path)
    return LatentStats.from_tensors(mean, std)


def trained_stats(cfg: dict[str, Any]) -> LatentStats | None:
    """The statistics a train-sit config recorded at step 0 (None for a run made before they were)."""
    lat = cfg.get("latents") or {}
    if lat.get("mean") is None or lat.get("std") is None:
        return None
    return LatentStats(tuple(lat["mean"]), tuple(lat["std"]), lat.get("vae_fingerprint"))


def _joint_state(raw: Any) -> dict[str, Any] | None:
    """The SiT part of a train-vae ``--loss.align repae`` state (align/repae.py: under ``"sit"``), or None."""
    part = raw.get("sit") if isinstance(raw, dict) else None
    return part if isinstance(part, dict) and "model_config" in part else None


def _from_train_state(raw: Any, weights: str, path: Path) -> tuple[SiT, dict[str, Any]]:
    with malformed(path, "training state"):  # a crafted or foreign file: one line naming it
        return _read_train_state(raw, weights, path)


def _read_train_state(raw: dict[str, Any], weights: str, path: Path) -> tuple[SiT, dict[str, Any]]:
    """A SiT from a train-sit checkpoint (keys model, ema, model_config, config) and the run's settings, or
    from a train-vae repae checkpoint: its SiT, decoded by the VAE in the same file with the statistics of
    its latent BatchNorm at that step."""
    joint = _joint_state(raw)
    if joint is not None:
        model = SiT(SiTConfig.from_dict(joint["model_config"]))
        model.load_state_dict(joint[weights])
        stats = LatentStats.from_dict(joint["latents"])
        where = f"the latent BatchNorm in {path.name}"
        return model, {"vae": str(path), "vae_config": None, "stats": stats, "stats_from": where}
    model = SiT(SiTConfig.from_dict(raw["model_config"]))
    model.load_state_dict(raw[weights])
    cfg = raw.get("config") or {}
    info = {
        "vae": (cfg.get("model") or {}).get("vae"),
        "vae_config": (cfg.get("model") or {}).get("vae_config"),
        "stats": trained_stats(cfg),
        "stats_from": "the checkpoint's config (latents.*)",
    }
    return model, info


def load_sit_model(path: str | os.PathLike, weights: str = "ema") -> LoadedSiT:
    """A SiT export folder, a train-sit checkpoint file, or a SiT / REPA / REPA-E checkpoint file."""
    path = Path(path)
    name, source = (path.name if path.is_dir() else path.stem), str(path.resolve())
    raw = None
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        with torch.serialization.safe_globals([argparse.Namespace]):  # REPA keeps its args in one
            raw = ckpt.load_checkpoint(path)
    if isinstance(raw, dict) and ("model_config" in raw or _joint_state(raw) is not None):  # our trainers'
        model, more = _from_train_state(raw, weights, path)
        return LoadedSiT(model, name, source, weights, **more)
    model = load_sit(path, weights=weights)
    stats, where = None, str(path)
    if path.is_dir() and (path / "latents.json").exists():  # our export
        stats, where = stats_from_path(path), str(path / "latents.json")
    return LoadedSiT(model, name, source, weights, stats=stats, stats_from=where)


def load_sit_run(
    run_dir: str | os.PathLike, train_steps: int | None = None, weights: str = "ema"
) -> LoadedSiT:
    """The SiT of a train-sit (or train-vae repae) run folder at checkpoint step `train_steps` (default:
    the latest)."""
    run = Path(run_dir)
    found = dict(ckpt.list_checkpoints(run))
    if not found:
        raise FileNotFoundError(f"{run} holds no checkpoints/step-*.pt; is it a train-sit run folder?")
    step = train_steps if train_steps is not None else max(found)
    if step not in found:
        raise FileNotFoundError(f"{run} has no checkpoint of step {step}; it has steps {sorted(found)}")
    model, info = _from_train_state(ckpt.load_checkpoint(found[step]), weights, found[step])
    name, source = f"{run.name}-{step:07d}-{weights}", str(found[step].resolve())
    return LoadedSiT(model, name, source, weights, **info)


def load_sit_source(
    source: str | os.PathLike, train_steps: int | None = None, weights: str = "ema"
) -> LoadedSiT:
    """A run folder (it holds checkpoints/) as `load_sit_run`, anything else as `load_sit_model`."""
    if (Path(source) / ckpt.CKPT_DIR).is_dir():
        return load_sit_run(source, train_steps, weights)
    return load_sit_model(source, weights)


def resolve_stats(
    trained: LatentStats | None, given: str | LatentStats | None, vae: AutoencoderKL, source: str
) -> LatentStats:
    """The statistics to decode with: exactly the ones the SiT was trained with; never a guess.

    ``given`` (--latent-stats: a store, export or stats file, "vae" for the VAE's own, or LatentStats) is
    for SiTs that carry none (REPA / REPA-E / SiT checkpoints); for our own runs it must agree with the
    trained ones.
    """
    if given is not None:
        if isinstance(given, LatentStats):
            explicit, shown = given, "(the statistics given)"
        elif given == "vae":
            explicit, shown = LatentStats.from_tensors(vae.latent_mean, vae.latent_std), given
        else:
            explicit, shown = stats_from_path(given), given
        if trained is not None and not trained.same_values(explicit):
            raise ValueError(
                f"--latent-stats {shown} differs from the statistics this SiT was trained with "
                f"({source}); drop --latent-stats"
            )
        return trained or explicit
    if trained is None:
        raise ValueError(
            f"{source} does not record the latent statistics its SiT was trained with: pass "
            "--latent-stats STORE_OR_FILE (the latent store it was trained on, or a latents.json), or "
            "--latent-stats vae for the VAE's own"
        )
    return trained


def load_vae_and_stats(
    sit: LoadedSiT,
    vae: str | AutoencoderKL | None = None,
    vae_config: str | None = None,
    latent_stats: str | LatentStats | None = None,
) -> tuple[AutoencoderKL, LatentStats]:
    """(VAE, LatentStats) to decode `sit`'s samples; the VAE is checked against the latents' fingerprint
    when it is known. `vae` defaults to the one the run names."""
    vae_src: str | None
    if isinstance(vae, nn.Module):
        vae_src = "the given VAE module"
        vae = vae.eval().requires_grad_(False)
    else:
        vae_src = vae or sit.vae
        if not vae_src:
            raise ValueError("which VAE decodes these latents? the run names none: pass --vae PATH_OR_PRESET")
        torch.manual_seed(0)  # a preset (random weights; tests) is then the same VAE in every process
        vae = load_vae(vae_src, config=vae_config or sit.vae_config).requires_grad_(False)
    stats = resolve_stats(sit.stats, latent_stats, vae, sit.stats_from or sit.source)
    fp = stats.vae_fingerprint
    if fp is not None and fp != vae_fingerprint(vae):
        raise ValueError(
            f"the VAE {vae_src} is not the one the SiT's latents came from (its statistics name VAE "
            f"weights {fp[:12]}..., this VAE has {vae_fingerprint(vae)[:12]}...); pass the right --vae"
        )
    if stats.channels != vae.latent_channels:
        c = vae.latent_channels
        raise ValueError(f"latent statistics for {stats.channels} channels, the VAE has {c}")
    return vae, stats
