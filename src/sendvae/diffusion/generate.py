"""Class-conditional samples of a SiT, decoded by its VAE, as an ADM .npz (`sendvae sample` calls this).

    from sendvae.diffusion.generate import generate
    from sendvae.diffusion.sampling import SamplerConfig

    npz = generate("runs/sit-xl2", 50000, SamplerConfig(mode="sde", steps=250, cfg_scale=2.5), "samples")

Image i uses seed + i (its own generator), so the samples do not depend on the batch size or the number
of processes. Rank r makes images r, r + world, ...; every batch is written atomically to
OUTPUT/<name>.parts/ and skipped when called again (resume); rank 0 merges the parts into
OUTPUT/<name>.npz (arr_0 uint8 (N, H, W, 3), arr_1 labels) and a grid of the first 64 as <name>.png.
The SiT, VAE and latent statistics are resolved by `diffusion.sit_source`.

A sample set is reused only when it is the same set. Its name says the sampler settings, seed and n but
not which model made it (every SiT export folder is named `sit`), so its record, OUTPUT/<name>.json
(written before the .npz, whose presence means "done") and <name>.parts/settings.json, holds what the
images are a function of: content hashes of the SiT's weights (the EMA or raw ones sampled) and of the
VAE's, their configs, the latent statistics, the sampler settings, seed, n and label mode; and, for
messages only, where the SiT and the VAE were read from (the same weights read from another path are the
same model). A finished set or parts whose record differs from the one asked for, or that have no record,
are refused in one line (`SampleSetMismatchError`: use another --output-dir or delete them), never
returned or merged: a name stays predictable, and two models never share one.

One writer per output folder: rank 0 holds OUTPUT's lock (`runtime.lock`) while it samples, so a second
start on the same folder is refused with the holder's pid, and the temp files of killed writes there can
be removed safely.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..data.latent_store import state_fingerprint, vae_fingerprint
from ..data.transforms import to_uint8
from ..models.latent_stats import LatentStats
from ..runtime import checkpoint as ckpt
from ..runtime.distributed import DistInfo, barrier, broadcast_object, resolve_device
from ..runtime.lock import rank0_folder_lock
from .sampling import SamplerConfig, sample
from .sit_source import LoadedSiT, load_sit_source, load_vae_and_stats

if TYPE_CHECKING:
    from ..models.sit import SiT
    from ..models.vae import AutoencoderKL

SETTINGS_FILE = "settings.json"  # a parts folder's record


class SampleSetMismatchError(ValueError):
    """A finished sample set or its parts were made by another model or with other settings."""


# -- labels, names and parts ---------------------------------------------------------------------------------


def make_labels(n: int, num_classes: int, seed: int, mode: str) -> torch.Tensor:
    """(n,) int64, the same for any number of processes: uniform at random, or each class n / K times
    (i % K, shuffled by a seeded permutation)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "equal":
        return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    return torch.randint(0, num_classes, (n,), generator=g)


def output_name(model_name: str, cfg: SamplerConfig, seed: int, n: int, labels: str) -> str:
    name = f"samples_{model_name}_{cfg.tag()}_{cfg.precision}_seed{seed}_n{n}"
    return name + ("_eq" if labels == "equal" else "")


def _write_part(path: Path, **arrays: np.ndarray) -> None:
    # numpy's stubs match **arrays against savez's keyword allow_pickle: bool
    ckpt.atomic_write_bytes(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def _done_indices(parts: Path) -> set[int]:
    done: set[int] = set()
    for f in parts.glob("part-*.npz"):
        with np.load(f) as z:
            done.update(z["indices"].tolist())
    return done


def merge_parts(parts: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """All parts -> (images (n, H, W, 3) uint8, labels (n,)); every index must be present."""
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    seen = np.zeros(n, dtype=bool)
    for f in sorted(parts.glob("part-*.npz")):
        with np.load(f) as z:
            idx = z["indices"]
            if images is None:
                images = np.zeros((n, *z["images"].shape[1:]), dtype=np.uint8)
                labels = np.zeros(n, dtype=np.int64)
            assert labels is not None  # made with images
            images[idx], labels[idx], seen[idx] = z["images"], z["labels"], True
    missing = np.flatnonzero(~seen)
    if len(missing):
        raise RuntimeError(
            f"{len(missing)} samples missing from {parts} (e.g. {missing[:10].tolist()}); run again"
        )
    assert images is not None and labels is not None  # n >= 1 and no index missing: some part was read
    return images, labels


def save_grid(images: np.ndarray, path: Path, nrow: int = 8) -> None:
    import torchvision

    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float().div(255)  # (n, 3, H, W)
    buf = io.BytesIO()
    torchvision.utils.save_image(x, buf, format="png", nrow=nrow)
    ckpt.atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


# -- the record of a sample set -------------------------------------------------------------------------


def sample_set_record(
    sit: LoadedSiT,
    vae: AutoencoderKL,
    vae_source: str,
    stats: LatentStats,
    sampler_cfg: SamplerConfig,
    seed: int,
    n: int,
    label_sampling: str,
) -> dict[str, Any]:
    """What the images are a function of ("identity", compared) and where the models came from ("sources",
    for messages), as JSON reads it back."""
    identity = {
        "sit": {"weights_sha256": state_fingerprint(sit.model), "config": sit.model.config.to_dict(),
                "weights": sit.weights},
        "vae": {"weights_sha256": vae_fingerprint(vae), "config": vae.config.to_dict()},
        "latent_stats": stats.to_dict(),
        "sampler": dataclasses.asdict(sampler_cfg), "seed": seed, "num_samples": n,
        "label_sampling": label_sampling,
    }  # fmt: skip
    record = {"identity": identity, "sources": {"sit": sit.source, "vae": vae_source}}
    return json.loads(json.dumps(record))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}{key}.").items()}


def record_mismatch(record: dict[str, Any], path: Path, what: Path) -> str | None:
    """Why the sample set `what`, recorded in `path`, is not the one `record` asks for; None when it is."""
    fix = "use another --output-dir, or delete it to sample anew"
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        old = {}
    if not isinstance(old, dict) or "identity" not in old:  # none, unreadable, or an older format's
        return f"{what} has no record of the model and settings that made it ({path}); {fix}"
    a, b = _flat(old.get("identity", {})), _flat(record["identity"])
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not diff:
        return None
    made_by = (old.get("sources") or {}).get("sit", "?")
    return (
        f"{what} holds samples of another model or other settings (made by {made_by}; differs in "
        f"{', '.join(diff[:6])}{', ...' if len(diff) > 6 else ''}); {fix}"
    )


# -- the driver ----------------------------------------------------------------------------------------------


def generate(
    sit_source: str | os.PathLike | LoadedSiT,
    num_samples: int,
    sampler_cfg: SamplerConfig,
    output_dir: str | os.PathLike = "samples",
    *,
    vae: str | AutoencoderKL | None = None,
    vae_config: str | None = None,
    latent_stats: str | LatentStats | None = None,
    train_steps: int | None = None,
    weights: str = "ema",
    batch_size: int = 64,
    seed: int = 0,
    label_sampling: str = "random",
    device: str | torch.device = "auto",
    dist: Any = None,
    progress: bool = True,
) -> Path:
    """Make `num_samples` images of a SiT into OUTPUT/<name>.npz; returns its path (on every rank).

    sit_source: a train-sit run folder (checkpoint `train_steps`, default the latest), a SiT export
        folder or checkpoint file, or a `LoadedSiT` (`diffusion.sit_source`); `weights`: ema or model.
    vae: a `load_vae` spec or a module (default: the VAE the run names); vae_config names the
        architecture of a bare checkpoint.
    latent_stats: for a SiT that records none: a latent store, latents.json or stats file, "vae" for the
        VAE's own, or LatentStats; a run's recorded statistics are always the ones used.
    label_sampling: "random" (uniform) or "equal" (as many of each class, shuffled), drawn from `seed`.
    dist: a `runtime.distributed.DistInfo` (under torchrun: `init_distributed`'s); default: one process
        on `device` ("auto": the GPU when there is one).
    Raises SampleSetMismatchError when OUTPUT holds this name's samples (or parts) of another model or
    settings, and `runtime.lock.FolderLockedError` when another process samples into OUTPUT.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    dist = dist or DistInfo(0, 1, 0, resolve_device(str(device)))
    sit = sit_source
    if not isinstance(sit, LoadedSiT):
        sit = load_sit_source(sit, train_steps, weights)
    sit.model.eval().requires_grad_(False)
    vae_module, stats = load_vae_and_stats(sit, vae, vae_config, latent_stats)
    vae_name = f"module {vae_fingerprint(vae_module)}" if isinstance(vae, nn.Module) else str(vae or sit.vae)
    name = output_name(sit.name, sampler_cfg, seed, num_samples, label_sampling)
    with rank0_folder_lock(output_dir, dist):
        record = None
        if dist.is_main:  # hashing the weights is rank 0's alone
            record = sample_set_record(
                sit, vae_module, vae_name, stats, sampler_cfg, seed, num_samples, label_sampling
            )
        return _make(sit.model, vae_module, stats, record, Path(output_dir), name, num_samples, sampler_cfg,
                     seed, label_sampling, batch_size, dist, progress)  # fmt: skip


def _prepare(out: Path, name: str, record: dict[str, Any]) -> tuple[bool, str | None]:
    """Rank 0, the folder held: (already done?, error). Finishes a set killed after its .npz, checks or
    starts the parts' record."""
    final, parts = out / f"{name}.npz", out / f"{name}.parts"
    ckpt.sweep_temp_files(out, parts)  # leftovers of a killed write
    if final.exists():
        error = record_mismatch(record, out / f"{name}.json", final)
        if error is None:  # finish what a run killed after writing the .npz left undone
            if not (out / f"{name}.png").exists():
                with np.load(final) as f:
                    save_grid(f["arr_0"][:64], out / f"{name}.png")
            shutil.rmtree(parts, ignore_errors=True)
            print(f"{final} exists; nothing to do")
        return error is None, error
    parts.mkdir(parents=True, exist_ok=True)
    sfile = parts / SETTINGS_FILE
    if sfile.exists() or any(parts.glob("part-*.npz")):
        return False, record_mismatch(record, sfile, parts)
    ckpt.atomic_write_json(record, sfile)
    return False, None


def _make(
    model: SiT,
    vae: AutoencoderKL,
    stats: LatentStats,
    record: dict[str, Any] | None,
    out: Path,
    name: str,
    n: int,
    sampler_cfg: SamplerConfig,
    seed: int,
    label_sampling: str,
    batch_size: int,
    dist: DistInfo,
    progress: bool,
) -> Path:
    """The sampling itself, with OUTPUT held: check or resume the set, make the missing images, merge."""
    from tqdm import tqdm

    final, parts = out / f"{name}.npz", out / f"{name}.parts"
    done_before, error = False, None
    if dist.is_main:
        assert record is not None  # made by rank 0
        done_before, error = _prepare(out, name, record)
    done_before, error = broadcast_object((done_before, error))
    if error:
        raise SampleSetMismatchError(error)
    if done_before:
        return final
    barrier()

    mc = model.config
    model, vae = model.to(dist.device), vae.to(dist.device)
    labels_all = make_labels(n, mc.num_classes, seed, label_sampling)
    done = _done_indices(parts)
    todo = [i for i in range(dist.rank, n, dist.world_size) if i not in done]
    if dist.is_main:
        print(
            f"{name}: {n} samples ({n - len(done)} to make) by {dist.world_size} process(es), "
            f"{mc.describe()}",
            flush=True,
        )
    bar = tqdm(total=len(todo), unit="img", desc="sample", disable=not (progress and dist.is_main))
    for b in range(0, len(todo), batch_size):
        idx = todo[b : b + batch_size]
        y = labels_all[idx].to(dist.device)
        z = sample(model, y, [seed + i for i in idx], sampler_cfg)  # (B, C, h, w), normalised latents
        with torch.no_grad():
            x = vae.decode(stats.denormalize(z)).float()  # (B, 3, H, W) in [-1, 1]
        bad = [i for i, ok in zip(idx, x.flatten(1).isfinite().all(1).tolist()) if not ok]
        if bad:
            raise FloatingPointError(f"non-finite samples at indices {bad[:20]} (seeds seed + index)")
        images = to_uint8(x.clamp(-1, 1)).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        _write_part(
            parts / f"part-{idx[0]:07d}.npz",
            images=images,
            labels=y.cpu().numpy(),
            indices=np.asarray(idx, dtype=np.int64),
        )
        bar.update(len(idx))
    bar.close()
    barrier()  # every part is on disk
    if dist.is_main:
        images, labels = merge_parts(parts, n)
        save_grid(images, out / f"{name}.png")  # before the .npz, whose presence means "done"
        ckpt.atomic_write_json(record, out / f"{name}.json")  # what made it, also before the .npz
        ckpt.atomic_write_bytes(final, lambda f: np.savez(f, arr_0=images, arr_1=labels))
        shutil.rmtree(parts)
        print(f"wrote {final} {images.shape} and {name}.png", flush=True)
    barrier()
    return final
