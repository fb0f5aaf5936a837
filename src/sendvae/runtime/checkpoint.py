"""Checkpoints: atomic writes, safe loading, auto-resume, RNG state, and exports.

Two different things live in a run folder:
  * training state (``checkpoints/step-0001000.pt``): everything needed to continue bit-for-bit —
    models, EMA, optimizers, step (which fixes the data position and every random draw). Loaded with
    ``weights_only=True`` and ``map_location="cpu"``; only tensors and plain containers go in.
  * exports (``export/``): small, framework-neutral safetensors + config.json for users.
Running the same command again finds the newest training state and resumes from it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .weights import read_weights

CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step-(\d+)\.pt$")
_TMP_GLOB = ".*.tmp"  # what atomic writes leave behind when the process is killed mid-write
log = logging.getLogger(__name__)


class WriteError(RuntimeError):
    """A file could not be written (disk full, permissions); the previous version is untouched."""


def _write_error(path: Path, err: OSError) -> WriteError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full: free some space (or lower --run.keep_ckpts) and run the command again"
    else:
        why = f"{err.strerror or err}: check the folder's permissions and free space"
    return WriteError(f"could not write {path}: {why}; the previous version, if any, is intact")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    """0666 less the process umask: what a plain open(..., "w") would create."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, writer) -> None:
    """Write through ``writer(file_obj)`` to a temp file beside ``path``, fsync, then rename over it.

    A crash at any point leaves either the old file or the new one, never a torn file (a killed process
    may leave the temp file ``.<name>.*.tmp``; `sweep_temp_files` removes those). A full disk is a
    `WriteError` with one clear line.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _file_mode())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _unlink(tmp)
        raise _write_error(path, e) from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def sweep_temp_files(*folders: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed atomic writes left in ``folders`` (not recursive)."""
    removed = []
    for d in folders:
        d = Path(d)
        if d.is_dir():
            for p in d.glob(_TMP_GLOB):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _file_mode())  # mkstemp (and safetensors' rewrite) leave 0600
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the rename makes them the file
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _unlink(tmp)
        raise _write_error(path, e) from None
    except BaseException:
        _unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training state on the CPU with the safe unpickler (a bad file is a WeightsError)."""
    return read_weights(path, "training state")


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:07d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def save_training_state(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the step's checkpoint atomically; keep the newest ``keep`` (0 = all)."""
    path = checkpoint_path(run_dir, step)
    atomic_torch_save(state, path)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# Exports


def export_safetensors(
    out_dir: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` (its config) into ``out_dir``."""
    out_dir = Path(out_dir)
    atomic_save_safetensors(tensors, out_dir / f"{name}.safetensors")
    atomic_write_json(config, out_dir / f"{name}.json")
    return out_dir / f"{name}.safetensors"
