"""Latent caching: encode a dataset once into a latent store (`sendvae cache-latents` is a shell over this).

    from sendvae.data import DataConfig
    from sendvae.data.caching import cache_latents

    store = cache_latents(vae, DataConfig("shapes", resolution=64, shapes_length=10000), "latents")

Every image and its horizontal flip are encoded; a store keeps the posterior mean and std of both, the
labels and optionally a teacher's patch tokens (REPA targets without running the teacher in the training
loop); see `sendvae.data.latent_store` for the format. The work is a fixed plan of shards: under torchrun
each rank encodes every world_size-th pending shard and rank 0 writes the manifest (with the float64
latent statistics, summed in shard order, so 1 and N processes give the same bytes). Calling it again on
the same folder with the same settings keeps the complete shards (resume); other settings are refused.
Rank 0 holds the store folder's lock (`runtime.lock`) while it is written: a second start is refused.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..runtime.checkpoint import atomic_write_json
from ..runtime.distributed import DistInfo, barrier, broadcast_object, resolve_device
from ..runtime.lock import rank0_folder_lock
from . import build_dataset
from . import latent_store as ls
from .config import DataConfig
from .latent_store import LatentStore
from .prepared_dataset import read_index
from .transforms import to_float

if TYPE_CHECKING:
    from ..models.vae import AutoencoderKL
    from ..teachers import Teacher

# Test hook: stop the process (os._exit) once this many shards were written in the current run.
STOP_AFTER_ENV = "SENDVAE_CACHE_STOP_AFTER"


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{int(n)} B"


# -- what is encoded --------------------------------------------------------------------------------------


def cache_data_config(
    name: str,
    path: str | None = None,
    resolution: int | None = None,
    num_images: int = 10000,
    shapes_scene: str = "full",
) -> DataConfig:
    """The dataset spec of a cache run; the resolution defaults to a prepared dataset's own, else 256."""
    if resolution is None:
        resolution = read_index(path)["resolution"] if name == "prepared" and path else 256
    return DataConfig(
        name=name, path=path, resolution=resolution, shapes_length=num_images, shapes_scene=shapes_scene
    )


def dataset_record(data: DataConfig, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """(dataset, its description for the manifest: enough to rebuild the images of a shapes store)."""
    ds = build_dataset(data, seed=seed)
    classes = list(getattr(ds, "classes", None) or getattr(ds, "class_names", None) or [])
    info = dict(
        name=data.name, path=str(Path(data.path).resolve()) if data.path else None,
        resolution=data.resolution, num_images=len(ds), classes=classes,
        num_classes=int(getattr(ds, "num_classes", 0) or len(classes)),
    )  # fmt: skip
    if data.name == "shapes":
        info["config"] = repr(ds.config)
        info["seed"] = seed  # with name/resolution/num_images/scene: enough to rebuild the images
        info["scene"] = data.shapes_scene
    return ds, info


def teacher_record(
    teacher: Teacher, resolution: int, weights: str | os.PathLike | None = None, random_init: bool = False
) -> dict[str, Any]:
    """The manifest's description of a teacher (name, token grid, weights, fingerprint)."""
    gh, gw = teacher.grid_size(resolution)
    return dict(
        name=teacher.name, embed_dim=teacher.embed_dim, grid=[gh, gw], tokens=gh * gw,
        weights=str(weights) if weights else None, random_init=bool(random_init),
        fingerprint=ls.state_fingerprint(teacher), dtype="float16",
    )  # fmt: skip


def describe_vae_source(spec: str | os.PathLike, seed: int = 0) -> str:
    """Where a `load_vae` spec came from: the resolved path, or the preset and the seed of its weights."""
    path = Path(spec)
    return str(path.resolve()) if path.exists() else f"preset {spec} (random weights, seed {seed})"


# -- the engine --------------------------------------------------------------------------------------------


def cache_latents(
    vae: AutoencoderKL,
    data: DataConfig,
    output_dir: str | os.PathLike,
    *,
    teacher: Teacher | None = None,
    teacher_info: dict[str, Any] | None = None,
    seed: int = 0,
    vae_source: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    shard_size: int | None = None,
    precision: str = "fp32",
    dtype: str = "fp32",
    device: str | torch.device = "auto",
    dist: Any = None,
    progress: bool = True,
) -> LatentStore:
    """Encode the dataset `data` (shapes rendered with `seed`) with `vae` into a latent store.

    teacher: also store its patch tokens (B, N, D) of every image and flip, float16; `teacher_info` is its
        manifest record (default: `teacher_record(teacher, data.resolution)`).
    vae_source: where the VAE came from, for the manifest (default: "in-memory module").
    precision: encoder compute, fp32 or bf16 autocast; dtype: stored moments, fp32 or fp16.
    dist: a `runtime.distributed.DistInfo` (under torchrun: `init_distributed`'s); default: one process
        on `device` ("auto": the GPU when there is one).
    Returns the store (with its teacher features when a teacher was given), on every rank.
    """
    dist = dist or DistInfo(0, 1, 0, resolve_device(str(device)))
    dataset, info = dataset_record(data, seed)
    if teacher is not None and teacher_info is None:
        teacher_info = teacher_record(teacher, data.resolution)
    with rank0_folder_lock(output_dir, dist):  # one writer per store: a second start is refused
        encode_dataset(
            vae, dataset, output_dir, dataset_info=info, vae_source=vae_source or "in-memory module",
            teacher=teacher, teacher_info=teacher_info, shard_size=shard_size, batch_size=batch_size,
            num_workers=num_workers, precision=precision, dtype=dtype, dist=dist, progress=progress,
        )  # fmt: skip
    return LatentStore(output_dir, with_features=teacher is not None)


def _batch_plan(spans: list[tuple[int, int, int]], batch_size: int) -> list[list[int]]:
    """Batches of item indices that never cross a shard boundary, shard after shard."""
    return [list(range(b, min(b + batch_size, stop))) for _, start, stop in spans
            for b in range(start, stop, batch_size)]  # fmt: skip


def encode_dataset(
    vae: AutoencoderKL,
    dataset: Any,
    out: str | os.PathLike,
    *,
    dataset_info: dict[str, Any],
    vae_source: str,
    teacher: Teacher | None = None,
    teacher_info: dict[str, Any] | None = None,
    shard_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    dtype: str = "fp32",
    dist: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode `dataset` (yielding (uint8 (3, H, W), label)) into a latent store at `out`; returns the
    manifest. Under torchrun each rank encodes every world_size-th pending shard; rank 0 writes the
    manifest after a barrier. Complete shards of an earlier run with the same plan are kept. The caller holds
    the folder's lock (`cache_latents` does: `runtime.lock`)."""
    from tqdm import tqdm

    dist = dist or DistInfo(0, 1, 0, resolve_device("auto"))
    device, root = dist.device, Path(out)
    res = int(dataset_info["resolution"])
    vae = vae.to(device).eval().requires_grad_(False)
    if teacher is not None:
        teacher = teacher.to(device)
    latent_shape = (vae.latent_channels, *vae.latent_grid(res))
    fingerprint = ls.vae_fingerprint(vae)
    tokens, dim = 0, 0
    if teacher is not None:
        assert teacher_info is not None  # cache_latents makes it (teacher_record)
        tokens, dim = teacher_info["tokens"], teacher_info["embed_dim"]
    sizes = ls.bytes_per_image(latent_shape, dtype, tokens, dim)
    n = len(dataset)
    shard_size = int(shard_size or ls.default_shard_size(sizes["total"]))
    num_shards = -(-n // shard_size)
    vae_info = dict(fingerprint=fingerprint, source=vae_source, config=vae.config.to_dict())
    plan = dict(
        format_version=ls.FORMAT_VERSION, vae=vae_info, dataset=dataset_info, resolution=res,
        latent_shape=list(latent_shape), dtype=dtype, shard_size=shard_size, num_images=n,
        teacher=teacher_info, precision=precision,
    )  # fmt: skip
    spans = [(k, k * shard_size, min(n, (k + 1) * shard_size)) for k in range(num_shards)]

    # Rank 0 checks the folder and decides which shards are left; everyone gets the same list.
    error: str | None = None
    pending: list[int] = []
    if dist.is_main:
        try:
            error, pending = _prepare_folder(root, plan, spans)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(e).__name__}: {e}"
    error, pending, fp0 = broadcast_object((error, pending, fingerprint))
    if error is None and fp0 != fingerprint:
        error = f"rank {dist.rank} holds other VAE weights ({fingerprint}) than rank 0 ({fp0})"
    if error is not None:
        raise ls.LatentStoreMismatchError(error)
    mine = [spans[k] for k in pending[dist.rank :: dist.world_size]]

    if dist.is_main:
        c, h, w = latent_shape
        print(f"latent store {root}: {n} images -> {num_shards} shards of {shard_size} "
              f"({len(spans) - len(pending)} already complete), {dist.world_size} process(es)")  # fmt: skip
        print(f"  moments: {n} x 2 flips x 2 x {c}x{h}x{w} x {np.dtype(ls.STORE_DTYPES[dtype]).itemsize} B "
              f"= {_size(n * sizes['moments'])} ({sizes['moments']} B/image)")  # fmt: skip
        if teacher is not None:
            assert teacher_info is not None
            print(f"  teacher tokens ({teacher_info['name']}): {n} x 2 flips x {tokens} tokens x {dim} x 2 B "
                  f"= {_size(n * sizes['features'])} ({sizes['features']} B/image)")  # fmt: skip
        print(f"  total {_size(n * sizes['total'])} ({sizes['total']} B/image)", flush=True)

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=_batch_plan(mine, batch_size), num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )  # fmt: skip
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    bar = tqdm(total=sum(b - a for _, a, b in mine), unit="img", desc="cache-latents",
               disable=not (progress and dist.is_main), smoothing=0.05)  # fmt: skip
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    buf: dict[str, list] = {"moments": [], "labels": [], "features": []}
    shard_iter, written, t0 = iter(mine), 0, time.time()
    k, start, stop = next(shard_iter, (None, 0, 0))
    with torch.inference_mode():
        for images, labels in loader:
            x = to_float(images.to(device, non_blocking=True))
            xx = torch.cat([x, x.flip(-1)])  # (2B, 3, H, W): images, then their mirrors
            with autocast:
                post = vae.encode(xx)
                feats = teacher(xx) if teacher is not None else None  # (2B, N, D)
            b = x.shape[0]
            m = torch.stack([post.mean.float(), post.std.float()], dim=1)  # (2B, 2, C, h, w)
            m = m.view(2, b, *m.shape[1:]).transpose(0, 1)  # (B, 2 flips, 2, C, h, w)
            buf["moments"].append(m.to(torch.float16 if dtype == "fp16" else torch.float32).cpu().numpy())
            buf["labels"].append(labels.numpy())
            if feats is not None:
                f = feats.float().view(2, b, *feats.shape[1:]).transpose(0, 1)  # (B, 2, N, D)
                buf["features"].append(f.to(torch.float16).cpu().numpy())
            bar.update(b)
            if sum(len(a) for a in buf["labels"]) == stop - start:
                arrays = {key: np.concatenate(v) if v else None for key, v in buf.items()}
                assert k is not None and arrays["moments"] is not None and arrays["labels"] is not None
                ls.write_shard(root, k, start, stop, arrays["moments"], arrays["labels"], arrays["features"])
                buf = {key: [] for key in buf}
                written += 1
                if stop_after and written >= stop_after:
                    os._exit(75)
                k, start, stop = next(shard_iter, (None, 0, 0))
    bar.close()
    if dist.is_main:
        rate = sum(b - a for _, a, b in mine) / max(time.time() - t0, 1e-9)
        print(f"rank 0 encoded {len(mine)} shards ({rate:.1f} img/s)", flush=True)

    barrier()  # every shard is on disk
    result: dict[str, Any] | str | None = None
    if dist.is_main:
        try:
            result = _write_manifest(root, plan, spans, latent_shape)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            result = f"{type(e).__name__}: {e}"
    result = broadcast_object(result)
    if isinstance(result, str):
        raise RuntimeError(result)
    assert result is not None  # rank 0 wrote a manifest or an error
    return result


# -- the folder: plan, resume, manifest --------------------------------------------------------------------


def _plan_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each differing setting, one level into nested dicts (vae, dataset, teacher)."""
    out = []
    for key, v in new.items():
        o = old.get(key)
        if o == v:
            continue
        if isinstance(o, dict) and isinstance(v, dict):
            out += [f"{key}.{k}: {o.get(k)!r} -> {v.get(k)!r}" for k in {**o, **v} if o.get(k) != v.get(k)]
        else:
            out.append(f"{key}: {o!r} -> {v!r}")
    return out


def _prepare_folder(root: Path, plan: dict[str, Any], spans: list) -> tuple[str | None, list[int]]:
    """Check/write plan.json and clear temp files; returns (error or None, pending shard indices)."""
    root.mkdir(parents=True, exist_ok=True)
    if (root / ls.PLAN_FILE).exists():
        old = json.loads((root / ls.PLAN_FILE).read_text())
        new = json.loads(json.dumps(plan))  # tuples -> lists, as stored
        for p in (old, new):  # the same weights read from another path are the same VAE
            if isinstance(p.get("vae"), dict):
                p["vae"].pop("source", None)
        diff = _plan_diff(old, new)
        if diff:
            return (f"{root} holds a latent store made with other settings ({'; '.join(diff)}); use a new "
                    "store folder (--output-dir) or delete this one"), []  # fmt: skip
    atomic_write_json(plan, root / ls.PLAN_FILE)
    (root / ls.MANIFEST_FILE).unlink(missing_ok=True)
    for tmp in root.glob(".*.tmp"):  # leftovers of an interrupted run
        tmp.unlink()
    return None, [k for k, a, b in spans if ls.completed_shard(root, k, a, b) is None]


def _write_manifest(root: Path, plan: dict[str, Any], spans: list, latent_shape) -> dict[str, Any]:
    found = [ls.completed_shard(root, k, a, b) for k, a, b in spans]
    missing = [k for k, rec in zip(range(len(spans)), found) if rec is None]
    if missing:
        raise RuntimeError(
            f"shards {missing[:10]} of {root} are missing after encoding; run the command again"
        )
    records = [rec for rec in found if rec is not None]  # all of them
    c = latent_shape[0]
    s1, s2, count = np.zeros(c), np.zeros(c), 0
    for rec in records:  # shard order: the same float64 sums for any number of processes
        s1, s2, count = s1 + np.asarray(rec["sum"]), s2 + np.asarray(rec["sum_sq"]), count + rec["sum_count"]
    mean, std = ls.stats_from_sums(s1, s2, count)
    labels = np.concatenate([np.load(root / rec["files"]["labels"]) for rec in records])
    dataset = dict(plan["dataset"])
    dataset["num_classes"] = max(int(dataset.get("num_classes") or 0), int(labels.max()) + 1)
    manifest = dict(
        plan, dataset=dataset, num_images=int(len(labels)), num_shards=len(records),
        layout="moments (n, 2 flips [image, mirror], 2 [mean, std], C, h, w); features (n, 2 flips, N, D)",
        latent_stats=dict(
            mean=mean.tolist(), std=std.tolist(), count_per_channel=int(count),
            definition="z ~ q(z|x) over all images and both flips: mean = E[mu], "
            "std = sqrt(E[mu^2 + sigma^2] - mean^2), float64",
        ),
        shards=[{key: rec[key] for key in ("files", "sizes", "count")} for rec in records],
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )  # fmt: skip
    atomic_write_json(manifest, root / ls.MANIFEST_FILE)
    return manifest
