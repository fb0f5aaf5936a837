"""One writer per folder: an advisory lock on FOLDER/.lock held for as long as a process writes there.

    with folder_lock("runs/vae-b"):          # raises FolderLockedError while another process holds it
        ...

Every writer of a folder takes it: a train run (its run folder), latent caching (the store), sampling (the
output folder), a pipeline (its root, `pipeline.stages.Stages.lock`). Two processes writing one folder
would each resume from, and overwrite, the other's half-done files; the second start is refused instead,
with the holder's pid (written into the lock file).

The lock is ``flock(2)`` on an open file: the kernel drops it when the process ends, however it ends
(SIGKILL, OOM, a power cut leaves no process), so there is never a stale lock to delete by hand. The
file itself stays, it is not the lock. Within a process the lock is re-entrant (a count per folder): the
study runs the demo's stages in a folder it already holds. Folders nest freely (the demo holds its root,
the train runs inside it hold their own subfolders). Under torchrun rank 0 holds it for every rank
(`rank0_folder_lock`).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .distributed import broadcast_object

LOCK_FILE = ".lock"


class FolderLockedError(RuntimeError):
    """Another process holds the folder (a user-facing error: the command prints it as one line)."""


# lock file (resolved) -> [open fd, how many times this process holds it]
_held: dict[str, list[int]] = {}


def _lock_file(folder: str | os.PathLike) -> str:
    return os.path.join(os.path.realpath(folder), LOCK_FILE)


def held(folder: str | os.PathLike) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return _lock_file(folder) in _held


def acquire(folder: str | os.PathLike) -> None:
    """Take ``folder``'s lock (creating the folder), or raise FolderLockedError naming the holder's pid.

    Never waits: a folder in use is an error to report, not a queue."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = _lock_file(folder)
    if path in _held:
        _held[path][1] += 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FolderLockedError(
            f"{folder} is in use by process {holder} (lock {path}); wait for it to finish or stop it, "
            "or use another output folder"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = [fd, 1]


def release(folder: str | os.PathLike) -> None:
    """Give back one hold of ``folder``'s lock; the last one unlocks it."""
    path = _lock_file(folder)
    entry = _held.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[path]
        os.close(entry[0])  # closing the only descriptor drops the flock


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block; yields the folder."""
    acquire(folder)
    try:
        yield Path(folder)
    finally:
        release(folder)


@contextmanager
def rank0_folder_lock(folder: str | os.PathLike, dist: Any) -> Iterator[Path]:
    """Rank 0 holds ``folder``'s lock for every rank; when it cannot, every rank raises (a lone failing
    rank would leave the others waiting in a collective): rank 0 its error, the others its message."""
    error: Exception | None = None
    if dist.is_main:
        try:
            acquire(folder)
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            error = e
    message = broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise FolderLockedError(message)
    try:
        yield Path(folder)
    finally:
        if dist.is_main:
            release(folder)
