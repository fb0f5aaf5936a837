"""Run a trainer: process group, run folder and log, train, export on the main process, clean up.

The training commands and the pipelines (`sendvae demo`, `sendvae study`) all start a run through
`run_training`, so a run folder looks the same however it was started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import to_dict


def run_training(cfg: Any, make_trainer, export, *, echo: bool = True) -> int:
    """Set up the process group and the run folder, train, export on rank 0, clean up.

    make_trainer(cfg, dist, run_dir, log) -> a TrainerBase; export(trainer) -> the export's path.
    echo: print the log lines (False: only the run's log.txt gets them; the progress bar stays).
    """
    from ..runtime.checkpoint import atomic_write_json
    from ..runtime.distributed import cleanup, init_distributed
    from ..runtime.log import RunLogger

    dist = init_distributed(cfg.run.device, option="--device")
    run_dir = Path(cfg.run.output_dir) / cfg.run.exp_name
    sink = None if echo else open(os.devnull, "w")
    log = RunLogger(run_dir, dist.is_main, tensorboard=cfg.run.tensorboard, stream=sink)
    try:
        # Building the trainer resumes, and refuses a config that differs from its checkpoint's
        # (train/resume.py); only then is config.json written, so a failed start leaves no false record.
        trainer = make_trainer(cfg, dist, run_dir, log)
        if dist.is_main:
            atomic_write_json(to_dict(cfg), run_dir / "config.json")
        trainer.train()
        if dist.is_main:
            trainer.check_finite()
            log.info(f"exported to {export(trainer)}")
    finally:
        log.close()
        cleanup()
        if sink is not None:
            sink.close()
    return 0
