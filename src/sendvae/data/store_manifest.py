"""The latent store's manifest: its schema, read and checked before any shard is touched.

ROOT/manifest.json records the VAE, the dataset, the shapes, the shard list and the latent statistics
(the layout is in `latent_store`). A store folder is read from disk and may be old, truncated or hand
edited: `read_manifest` checks every key the readers use, with its type and range, and that each shard's
file names stay inside the folder, so a malformed manifest is one error line naming the file and the key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST_FILE, PLAN_FILE = "manifest.json", "plan.json"
STORE_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ROOT/manifest.json."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        hint = " (an interrupted run: run the same command again)" if (root / PLAN_FILE).exists() else ""
        raise FileNotFoundError(
            f"{root} is not a latent store: {MANIFEST_FILE} is missing{hint}; create one with "
            "`sendvae cache-latents --vae VAE --data ... --output-dir DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(
            f"{path} is not a JSON manifest ({type(e).__name__}); cache the latents again"
        ) from None
    if not isinstance(manifest, dict):
        raise ValueError(
            f"{path} holds a JSON {type(manifest).__name__}, not a manifest; cache the latents again"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: latent store format {manifest.get('format_version')!r} is not supported (this sendvae "
            f"reads version {FORMAT_VERSION}); cache the latents again"
        )
    check_manifest(path, manifest)
    return manifest


def _entry(
    path: Path, node: Any, dotted: str, kind: type | tuple[type, ...], lo: int | None = None, prefix: str = ""
) -> Any:
    """``node[dotted]`` of a manifest (or of the part of it at ``prefix``), of type ``kind`` (an int is never
    a bool) and >= ``lo``; else a one-line error naming the file and the key."""
    dotted_in = dotted
    dotted = prefix + dotted
    for part in dotted_in.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{path}: {dotted} is missing; cache the latents again")
        node = node[part]
    if node is None and type(None) in (kind if isinstance(kind, tuple) else (kind,)):
        return None
    ok = isinstance(node, kind) and not (isinstance(node, bool) and kind is not bool)
    if not ok or (lo is not None and node < lo):
        want = getattr(kind, "__name__", "a valid value") + (f" >= {lo}" if lo is not None else "")
        raise ValueError(
            f"{path}: {dotted}: expected {want}, got {str(node)[:60]!r}; cache the latents again"
        )
    return node


def _shard_file(path: Path, name: Any, where: str) -> str:
    """A shard file name: a plain name inside the store folder, never a path out of it."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{path}: {where}: {str(name)[:60]!r} is not a file name inside the store")
    return name


def check_manifest(path: Path, m: dict[str, Any]) -> None:
    """Every key the readers use, with its type and range, and each shard's files inside the store: a
    malformed manifest is one error line naming the file and the key, never a traceback or a partial read."""
    _entry(path, m, "resolution", int, 1)
    shape = _entry(path, m, "latent_shape", list)
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise ValueError(f"{path}: latent_shape: expected [C, h, w] of positive integers, got {shape!r}")
    if not isinstance(m.get("dtype"), str) or m["dtype"] not in STORE_DTYPES:
        raise ValueError(f"{path}: dtype: {m.get('dtype')!r} is not one of {', '.join(STORE_DTYPES)}")
    _entry(path, m, "dataset", dict)
    _entry(path, m, "dataset.num_classes", int, 1)
    _entry(path, m, "vae.fingerprint", str)
    teacher = _entry(path, m, "teacher", (dict, type(None)))
    if teacher is not None:
        _entry(path, m, "teacher.name", str)
        _entry(path, m, "teacher.tokens", int, 1)
        _entry(path, m, "teacher.embed_dim", int, 1)
    for key in ("mean", "std"):
        v = _entry(path, m, f"latent_stats.{key}", list)
        good = all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v)
        if len(v) != shape[0] or not good or (key == "std" and not all(x > 0 for x in v)):
            raise ValueError(f"{path}: latent_stats.{key}: expected {shape[0]} finite numbers (std > 0)")
    shards = _entry(path, m, "shards", list)
    if not shards:
        raise ValueError(f"{path}: shards: the store holds no shard; cache the latents again")
    keys = {"moments", "labels"} | ({"features"} if teacher is not None else set())
    for k, rec in enumerate(shards):
        where = f"shards[{k}]"
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: {where}: expected an object, got {str(rec)[:60]!r}")
        _entry(path, rec, "count", int, 0, prefix=f"{where}.")
        files = _entry(path, rec, "files", dict, prefix=f"{where}.")
        sizes = _entry(path, rec, "sizes", dict, prefix=f"{where}.")
        if set(files) != keys or set(sizes) != keys:
            raise ValueError(f"{path}: {where}.files: expected the files {sorted(keys)}, got {sorted(files)}")
        for key in keys:
            _shard_file(path, files[key], f"{where}.files.{key}")
            _entry(path, sizes, key, int, 0, prefix=f"{where}.sizes.")
    total = sum(rec["count"] for rec in shards)
    if "num_images" in m and _entry(path, m, "num_images", int, 0) != total:
        raise ValueError(f"{path}: num_images: {m['num_images']} but the shards hold {total}")
