"""Run a trainer: process group, run folder and log, train, export on the main process, clean up.

The training commands and the pipelines (`sendvae demo`, `sendvae study`) all start a run through
`run_training`, so a run folder looks the same however it was started. Rank 0 holds the run folder's lock
(`runtime.lock`) for the life of the run: a second start on the same folder is refused, naming the
process that holds it. With the folder held, the temp files that killed writes left in its export and
grid folders are removed (`resume` does the same for checkpoints/).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import config_record
from ..runtime.checkpoint import atomic_write_json, sweep_temp_files
from ..runtime.distributed import cleanup, init_distributed
from ..runtime.lock import rank0_folder_lock
from ..runtime.log import RunLogger, read_stats


@dataclass(frozen=True)
class RunResult:
    """How a run ended, for a caller in the same process (the commands, the demo, the study)."""

    run_dir: Path
    step: int  # the last optimizer step
    last: dict[str, Any]  # the last logged row (step, losses, lr, img_per_s, ...); {} if none was logged
    export: Path | None  # the export folder (rank 0), else None


def run_training(cfg: Any, make_trainer, export, *, echo: bool = True) -> RunResult:
    """Set up the process group and the run folder, train, export on rank 0, clean up.

    make_trainer(cfg, dist, run_dir, log) -> a TrainerBase; export(trainer) -> the export's path.
    echo: print the log lines (False: only the run's log.txt gets them; the progress bar stays).
    Returns the run's `RunResult`.
    """

    dist = init_distributed(cfg.run.device, option="--device")
    run_dir = Path(cfg.run.output_dir) / cfg.run.exp_name
    try:
        with rank0_folder_lock(run_dir, dist):
            return _run_locked(cfg, dist, run_dir, make_trainer, export, echo)
    finally:
        cleanup()


def _run_locked(cfg: Any, dist: Any, run_dir: Path, make_trainer, export, echo: bool) -> RunResult:

    sink = None if echo else open(os.devnull, "w")
    log = RunLogger(run_dir, dist.is_main, tensorboard=cfg.run.tensorboard, stream=sink)
    try:
        if dist.is_main:
            swept = sweep_temp_files(*_written_folders(run_dir))
            if swept:
                log.info(f"removed {len(swept)} temp file(s) of an interrupted write in {run_dir}")
        # Building the trainer resumes, and refuses a config that differs from its checkpoint's
        # (train/resume.py); only then is config.json written, so a failed start leaves no false record.
        trainer = make_trainer(cfg, dist, run_dir, log)
        if dist.is_main:
            atomic_write_json(config_record(cfg), run_dir / "config.json")
        trainer.train()
        out = None
        if dist.is_main:
            trainer.check_finite()
            out = Path(export(trainer))
            log.info(f"exported to {out}")
    finally:
        log.close()
        if sink is not None:
            sink.close()
    # a run resumed at its end logged nothing in this process: its last row is the one on disk
    last = trainer.last_logged or (read_stats(run_dir / "stats.jsonl") or [{}])[-1]
    last = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in last.items()}  # once, at the end
    return RunResult(run_dir, trainer.step, last, out)


def _written_folders(run_dir: Path) -> list[Path]:
    """The run's folders written atomically besides checkpoints/: export/ and each export in it, samples/."""
    export = run_dir / "export"
    subs = sorted(p for p in export.iterdir() if p.is_dir()) if export.is_dir() else []
    return [export, *subs, run_dir / "samples"]
