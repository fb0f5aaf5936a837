"""What the training commands share: preset + alias + override resolution, run folders.

A training command names its presets, its config class, and its aliases (the reference scripts' short
options -> dotted config keys). Every config field is also an option ``--section.field``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import PresetRegistry, add_config_arguments, apply_overrides, overrides_from_args, to_dict


def add_training_arguments(
    p: argparse.ArgumentParser,
    presets: PresetRegistry,
    cfg_cls: type,
    aliases: dict[str, tuple[str, str]],
    default_preset: str,
) -> None:
    """aliases: option name (underscored) -> (config key, help)."""
    p.add_argument(
        "--preset",
        default=default_preset,
        choices=sorted(presets),
        help=f"starting config (default: {default_preset})",
    )
    for name, (key, help_text) in aliases.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{help_text} ({key})")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")
    add_config_arguments(p, cfg_cls, skip={"preset"})


def resolve_config(
    args: argparse.Namespace,
    presets: PresetRegistry,
    aliases: dict[str, tuple[str, str]],
    extra: dict[str, Any] | None = None,
) -> Any:
    """Preset, then aliases, then ``--section.field`` overrides (the most specific wins)."""
    cfg = presets.build(args.preset)
    overrides = {
        key: getattr(args, a) for a, (key, _) in aliases.items() if getattr(args, a, None) is not None
    }
    overrides.update(extra or {})
    overrides.update(overrides_from_args(args))
    cfg = apply_overrides(cfg, overrides)
    if cfg.run.exp_name is None:
        cfg.run.exp_name = cfg.preset
    return cfg


def run_training(cfg: Any, make_trainer, export) -> int:
    """Set up the process group and the run folder, train, export on rank 0, clean up."""
    from ..runtime.checkpoint import atomic_write_json
    from ..runtime.distributed import cleanup, init_distributed
    from ..runtime.log import RunLogger

    dist = init_distributed(cfg.run.device)
    run_dir = Path(cfg.run.output_dir) / cfg.run.exp_name
    log = RunLogger(run_dir, dist.is_main, tensorboard=cfg.run.tensorboard)
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
    return 0
