"""Run logging: a rank-0 text log, ``stats.jsonl`` with every scalar, optional TensorBoard.

Values are logged as tensors and converted to Python numbers only here, at log time, so the hot
loop has no host syncs. Library modules log through ``logging.getLogger(__name__)``; `configure_logging`
(called once by the CLI) shows their INFO lines on stdout, and a `RunLogger` also writes them to its
run's ``log.txt`` while it is open.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from .checkpoint import atomic_write_bytes

_FORMAT = "[%(asctime)s] %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` (or ``sys.stderr``) is at the time of the record: the stream may
    be replaced (tests). stdout by default, beside the run log's lines; stderr for commands whose stdout
    is their data (bench JSON), so that errors stay the only lines a failing command adds to stderr."""

    def __init__(self, to_stderr: bool = False) -> None:
        super().__init__()
        self.to_stderr = to_stderr

    @property
    def stream(self):
        return sys.stderr if self.to_stderr else sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: int = logging.INFO, to_stderr: bool = False) -> None:
    """Send the ``sendvae`` loggers' records to stdout (or stderr), in the run log's format."""
    root = logging.getLogger("sendvae")
    root.setLevel(level)
    for h in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(h)
    h = _ConsoleHandler(to_stderr)
    h.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
    root.addHandler(h)
    root.propagate = False


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().mean().item()
    return v


class RunLogger:
    """Writes to ``run_dir/log.txt`` and ``run_dir/stats.jsonl`` on the main rank; silent elsewhere."""

    def __init__(
        self,
        run_dir: str | Path | None,
        is_main: bool = True,
        tensorboard: bool = False,
        stream: TextIO | None = None,
    ):
        self.is_main = is_main
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.stream = stream if stream is not None else sys.stdout
        self._text = self._stats = self._tb = None
        self._handler: logging.Handler | None = None
        if is_main and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._text = open(self.run_dir / "log.txt", "a", buffering=1)
            self._handler = logging.StreamHandler(self._text)  # library log lines reach log.txt too
            self._handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
            logging.getLogger("sendvae").addHandler(self._handler)
            self._stats = open(self.run_dir / "stats.jsonl", "a", buffering=1)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:  # pragma: no cover - optional dependency
                    raise RuntimeError("TensorBoard logging needs `pip install tensorboard`") from e
                self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def info(self, msg: str) -> None:
        if not self.is_main:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, file=self.stream, flush=True)
        if self._text:
            self._text.write(line + "\n")

    def stats(self, step: int, values: dict[str, Any], echo: bool = True) -> dict[str, Any]:
        """Log a dict of scalars (tensors allowed) for ``step``; returns the converted dict."""
        row = {"step": step, **{k: _scalar(v) for k, v in values.items()}}
        if not self.is_main:
            return row
        if self._stats:
            self._stats.write(json.dumps(row) + "\n")
        if self._tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if echo:
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()]
            self.info(" | ".join(parts))
        return row

    def truncate_stats(self, step: int) -> None:
        """Drop the stats.jsonl rows after ``step`` (a resumed run replays those steps)."""
        if not self._stats:
            return
        assert self.run_dir is not None  # stats.jsonl is only open inside a run folder
        path = self.run_dir / "stats.jsonl"
        self._stats.close()
        rows = [r for r in read_stats(path) if int(r.get("step", 0)) <= step]
        atomic_write_bytes(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        self._stats = open(path, "a", buffering=1)

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger("sendvae").removeHandler(self._handler)
            self._handler = None
        for h in (self._text, self._stats):
            if h:
                h.close()
        if self._tb:
            self._tb.close()
        self._text = self._stats = self._tb = None


def read_stats(path: str | Path) -> list[dict[str, Any]]:
    """Read a stats.jsonl file (tolerates a torn last line from a killed run)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
