"""Checkpoints: atomic writes, safe loading, auto-resume, RNG state, exports, and reading foreign ones.

Two different things live in a run folder:
  * training state (``checkpoints/step-0001000.pt``): everything needed to continue bit-for-bit —
    models, EMA, optimizers, step (which fixes the data position and every random draw). Loaded with
    ``weights_only=True`` and ``map_location="cpu"``; only tensors and plain containers go in.
  * exports (``export/``): small, framework-neutral safetensors + config.json for users.
Running the same command again finds the newest training state and resumes from it.

Every model loader (VAE, discriminator, SiT) reads a checkpoint through the same three steps:
`read_checkpoint` (a dict, read as data), `find_state_dict` (the nested, prefixed state dict) and
`load_checked` (a strict load whose mismatch report names the keys).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .weights import WeightsError, read_weights

CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step-(\d+)\.pt$")
_TMP_GLOB = ".*.tmp"  # what atomic writes leave behind when the process is killed mid-write
log = logging.getLogger(__name__)


class WriteError(RuntimeError):
    """A file could not be written (disk full, permissions); the previous version is untouched."""


def _write_error(path: Path, err: OSError) -> WriteError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full: free some space (or lower --run.keep_ckpts) and run the command again"
    elif err.errno == errno.EIO:
        why = "an input/output error: the disk or its connection failed, check it and run the command again"
    else:
        why = f"{err.strerror or err}: check the folder's permissions and free space"
    return WriteError(f"could not write {path}: {why}; the previous version, if any, is intact")


# errno values that mean the storage failed (not the caller): each a WriteError, never a traceback
_STORAGE_ERRNOS = {
    errno.ENOSPC: "No space left",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EIO: "Input/output error",
}


def _storage_error(e: BaseException) -> OSError | None:
    """The OSError a writer's exception stands for when it names no errno itself: safetensors' Rust writer
    reports ``IoError(Os { code: 28, ... })``, torch's C++ writer a bare RuntimeError."""
    text = str(e)
    for code, words in _STORAGE_ERRNOS.items():
        if words in text or f"code: {code}," in text:
            return OSError(code, os.strerror(code))
    return None


class _KeepWriteError:
    """The temp file as a writer sees it. torch.save's C++ writer turns the OSError of a failed write (a
    full disk) into ``RuntimeError: unexpected pos``; the OSError kept here says what happened."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


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
    kept = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _file_mode())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            kept = _KeepWriteError(f)
            writer(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        _unlink(tmp)
        raise _write_error(path, e) from None
    except BaseException as e:
        _unlink(tmp)
        cause = (kept.error if kept is not None else None) or _storage_error(e)
        if isinstance(e, Exception) and cause is not None:  # torch's "unexpected pos": the disk failed
            raise _write_error(path, cause) from None
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
    except BaseException as e:
        _unlink(tmp)
        cause = _storage_error(e)  # safetensors: SafetensorError "... IoError(Os { code: 28, ... })"
        if isinstance(e, Exception) and cause is not None:
            raise _write_error(path, cause) from None
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
# Reading foreign checkpoints into a model


class CheckpointMismatchError(ValueError):
    """The tensors in a checkpoint do not fit the architecture they were loaded into."""


def read_checkpoint(path: str | Path, map_location: Any = "cpu", what: str = "checkpoint") -> dict[str, Any]:
    """Read a .safetensors file or a torch file as data (`sendvae.runtime.weights`) into a dict."""
    obj = read_weights(path, what, map_location=map_location)
    if not isinstance(obj, dict):
        raise WeightsError(f"{what} '{path}' holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def find_state_dict(
    obj: dict[str, Any], anchor: str, nest_keys: Iterable[str], source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], str]:
    """Locate the sub-state-dict containing `anchor` (e.g. "encoder.conv_in.weight") and strip its prefix.

    Looks at the top level, then under each of `nest_keys` in order; within a dict, any key ending in
    `anchor` names the prefix (`first_stage_model.`, `module.`, `loss.discriminator.`, ...). Returns the
    tensors under that prefix, prefix removed, and a description of where they were found.
    """
    candidates = [("top level", obj)] + [
        (f"'{k}'", obj[k]) for k in nest_keys if isinstance(obj.get(k), dict)
    ]
    for where, d in candidates:
        prefixes = sorted(
            {k[: -len(anchor)] for k in d if isinstance(k, str) and k.endswith(anchor)}, key=len
        )
        prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
        if prefixes:
            p = prefixes[0]
            sd = {k[len(p) :]: v for k, v in d.items() if k.startswith(p) and torch.is_tensor(v)}
            return sd, f"{where}" + (f", prefix '{p}'" if p else "")
    top = sorted(str(k) for k in obj)[:20]
    raise CheckpointMismatchError(
        f"no tensor named '*{anchor}' in the {source} (top-level keys: {top}); "
        "is this the right kind of checkpoint?"
    )


def _fmt_keys(keys: Iterable[str], n: int = 10) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_checked(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    strict: bool,
    expected: str,
    source: str,
    optional: Callable[[str], bool] = lambda k: False,
    hint: str = "",
) -> None:
    """`module.load_state_dict` with a readable report; raises CheckpointMismatchError when strict."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not optional(k)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the expected architecture {expected}:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_fmt_keys(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_fmt_keys(unexpected)}")
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatches: " + "; ".join(shapes[:10]))
        if hint:
            lines.append(f"  {hint}")
        if strict:
            raise CheckpointMismatchError("\n".join(lines) + "\n  (strict=False loads the matching tensors)")
        log.warning("\n".join(lines) + "\n  loading the matching tensors only (strict=False)")
    bad = {s.split(":")[0] for s in shapes}
    usable = {k: v for k, v in state_dict.items() if k in own and k not in bad}
    module.load_state_dict(usable, strict=False)
