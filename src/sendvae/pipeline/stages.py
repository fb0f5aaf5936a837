"""Resumable stages: each stage of a pipeline runs once, records what it produced, and is skipped after.

A stage is a named function returning a JSON-able result with a one-line ``summary``. When it returns,
the result is written atomically to ``ROOT/stages/<name>.json``; running the pipeline again loads that
file instead of running the stage (an interrupted stage has no file, so it runs again, and the stage
engines resume their own partial work: training from its newest checkpoint, latent caching and
sampling from their complete shards / parts). The record is keyed by the stage's settings: a rerun with
other settings is refused instead of mixing results, the way a training run refuses a changed config.

One writer per pipeline folder: a pipeline runs its stages inside ``with stages.lock():``, which holds
ROOT/.lock (`runtime.lock`) and, once held, removes the temp files killed writes left in ROOT and
ROOT/stages/. A second process on the same folder is refused with the holder's pid; the same process may
take it again (the study running the demo's stages in its folder), and the train runs, stores and
sample folders inside ROOT hold their own locks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..runtime.checkpoint import atomic_write_json, sweep_temp_files
from ..runtime.lock import folder_lock

StageFn = Callable[[], dict[str, Any]]
# Testing aid: exit the process (os._exit, like a killed job) right after this stage is recorded.
STOP_AFTER_ENV = "SENDVAE_STOP_AFTER_STAGE"


class StageSettingsError(ValueError):
    """A finished stage was recorded with other settings than the ones asked for now."""


class Stages:
    """The stage records of one pipeline folder, and the runner that consults them."""

    def __init__(self, root: str | Path, echo: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.dir = self.root / "stages"
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.ran: list[str] = []  # stages run (not loaded) by this process, in order

    @contextmanager
    def lock(self) -> Iterator[Stages]:
        """Hold the folder for this process (re-entrant), sweeping killed writes' temp files on entry;
        raises `runtime.lock.FolderLockedError` (one line, naming the holder's pid) when another holds it."""
        with folder_lock(self.root):
            sweep_temp_files(self.root, self.dir)
            yield self

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def done(self, name: str) -> bool:
        return self.path(name).is_file()

    def load(self, name: str) -> dict[str, Any]:
        """The stage's record; a broken one (not JSON, not an object, without its summary, settings or
        seconds) is one error line naming the file, never a result taken on trust."""
        path = self.path(name)
        try:
            rec = json.loads(path.read_text())
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem = f"is not JSON ({type(e).__name__})"
        else:
            kinds: dict[str, type | tuple[type, ...]] = {
                "summary": str,
                "settings": dict,
                "seconds": (int, float),
            }
            if not isinstance(rec, dict):
                problem = f"holds a JSON {type(rec).__name__}, not a stage record"
            else:
                bad = [
                    k for k, t in kinds.items() if not isinstance(rec.get(k), t) or isinstance(rec[k], bool)
                ]
                if not bad:
                    return rec
                problem = f"lacks a valid {', '.join(bad)}"
        raise ValueError(f"{path} {problem}; delete it to run stage '{name}' again")

    def run(self, name: str, fn: StageFn, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """The stage's result: the recorded one when it finished before with these settings, else fn()."""
        settings = json.loads(json.dumps(settings or {}))  # as it reads back (tuples -> lists)
        if self.done(name):
            rec = self.load(name)
            if rec.get("settings", {}) != settings:
                changed = sorted(
                    k
                    for k in set(settings) | set(rec.get("settings", {}))
                    if settings.get(k) != rec.get("settings", {}).get(k)
                )
                raise StageSettingsError(
                    f"{self.root}: stage '{name}' finished earlier with other settings "
                    f"({', '.join(changed)}); "
                    "use another --output-dir, or delete that folder to start over"
                )
            self.echo(f"[{name}] done earlier ({rec['seconds']:.0f} s): {rec['summary']}")
            return rec
        self.echo(f"[{name}] ...")
        t0 = time.perf_counter()
        result = fn()
        rec = {**result, "settings": settings, "seconds": time.perf_counter() - t0}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rec, self.path(name))
        self.ran.append(name)
        self.echo(f"[{name}] {rec['seconds']:.0f} s: {rec['summary']}")
        if os.environ.get(STOP_AFTER_ENV) == name:
            os._exit(3)
        return rec
