"""What the training commands share: preset / saved config + alias + override resolution, run folders.

A training command names its presets, its config class, and its aliases: the reference scripts' short
options (``--output-dir``, ``--enc-type``, ...), each the short spelling of one dotted config key. Every
config field is also an option ``--section.field``. The config starts from ``--preset P`` or from a saved
``--config RUN/config.json``; the aliases, then the ``--section.field`` options, apply on top.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import (
    PresetRegistry,
    add_config_arguments,
    apply_overrides,
    field_help,
    field_of,
    format_config,
    get_value,
    iter_fields,
    load_config,
    metavar,
    overrides_from_args,
    validate,
)
from ..runtime.distributed import resolve_device

# option string(s), the first the one shown -> (config key, help)
Aliases = dict[str | tuple[str, ...], tuple[str, str]]

# Config keys renamed for one vocabulary: old dotted key -> new. The old spelling, as a flag or in a saved
# config, is refused in one line naming the new one (never read silently as the new key, nor dropped).
RENAMED = {"model.gradient_checkpointing": "model.grad_checkpointing"}


def _refuse_renamed(args: argparse.Namespace) -> None:
    for old, new in RENAMED.items():
        if getattr(args, f"renamed:{old}", None) is not None:
            raise ValueError(f"--{old} was renamed to --{new}")


def _refuse_renamed_keys(path: str) -> None:
    """A saved config that spells a renamed key: one line naming the key and its new name."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        return  # load_config reports what is wrong with the file
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            raise ValueError(f"{file}: {old} was renamed to {new} (--{new}); rename the key in the file")


def _flags(key: str | tuple[str, ...]) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else key


class _Alias(argparse.Action):
    """Stores (the option string as typed, value): errors about the value then name the user's flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (option_string, values))


def add_training_arguments(
    p: argparse.ArgumentParser,
    presets: PresetRegistry,
    cfg_cls: type,
    aliases: Aliases,
    default_preset: str,
) -> None:
    base = presets.build(default_preset)
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--preset", choices=sorted(presets), help=f"starting config (default: {default_preset})"
    )
    start.add_argument(
        "--config",
        metavar="RUN/config.json",
        help="start from a saved config instead of a preset (a run's config.json, or the run folder); "
        "the other options apply on top",
    )
    for flags, (key, help_text) in aliases.items():
        f, tp = field_of(cfg_cls, key)
        text = f"{help_text}; --{key}"
        p.add_argument(
            *_flags(flags),
            dest=f"alias:{key}",
            action=_Alias,
            metavar=metavar(tp),
            help=field_help(text, get_value(base, key), f.metadata.get("choices")),
        )
    for old, new in RENAMED.items():  # refused with a hint (`resolve_config`), not listed in --help
        if any(name == new for name, _, _ in iter_fields(cfg_cls)):
            p.add_argument(f"--{old}", dest=f"renamed:{old}", metavar="X", help=argparse.SUPPRESS)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config (stdout, JSON), then the split of the global batch and the memory "
        "estimate per process (stderr), and exit",
    )
    p.add_argument(
        "--memory-estimate",
        choices=("auto", "yes", "no"),
        default="auto",
        help=field_help(
            "with --dry-run, measure the memory per process on the run's device (a warm-up and two small "
            "steps, random weights): auto = on a GPU, where it takes seconds (on a CPU a paper-sized model "
            "takes minutes and its full size in host memory)",
            "auto",
        ),
    )
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")
    add_config_arguments(
        p,
        cfg_cls,
        skip={"preset"},
        base=base,
        title=f"config overrides, each over the preset's value (defaults shown: {default_preset}'s)",
    )


def resolve_config(
    args: argparse.Namespace,
    presets: PresetRegistry,
    cfg_cls: type,
    default_preset: str,
    extra: dict[str, Any] | None = None,
) -> Any:
    """Preset or saved config, then aliases, then ``--section.field`` overrides (the most specific wins)."""
    cfg: Any
    _refuse_renamed(args)
    if getattr(args, "config", None):
        _refuse_renamed_keys(args.config)
        try:
            cfg = load_config(cfg_cls, args.config, presets)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--config {args.config}: {e}") from None
    else:
        cfg = presets.build(getattr(args, "preset", None) or default_preset)
    for dest, given in vars(args).items():
        if dest.startswith("alias:") and given is not None:
            (flag, value), key = given, dest[len("alias:") :]
            try:
                cfg = apply_overrides(cfg, {key: value})
            except ValueError as e:
                raise ValueError(str(e).replace(f"--{key}:", f"{flag}:", 1)) from None
    cfg = apply_overrides(cfg, {**(extra or {}), **overrides_from_args(args)})
    if cfg.run.exp_name is None:
        cfg.run.exp_name = cfg.preset
    validate(cfg)  # a preset's values meet the rules a flag or a file is held to
    return cfg


def dry_run(cfg: Any, args: argparse.Namespace, estimate: Callable[[Any], Any]) -> int:
    """``--dry-run``: the resolved config on stdout; on stderr the split of the global batch for the number of
    processes torchrun gives (1 without it) and, per ``--memory-estimate``, the memory per process that
    ``estimate(cfg)`` measures (`train.memory`)."""
    from ..train import memory  # the trainers: imported only when asked (CLI start-up time)

    print(format_config(cfg))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    est, why = None, ""
    on_gpu = resolve_device(cfg.run.device).type == "cuda"
    if args.memory_estimate == "yes" or (args.memory_estimate == "auto" and on_gpu):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout holds the config alone
                est = estimate(cfg)
        except ValueError as e:  # e.g. train-sit without its latent store
            why = f"memory estimate: not made ({e})"
    elif args.memory_estimate == "auto":
        why = "memory estimate: on a CPU only with --memory-estimate yes (it measures steps on this device)"
    print(memory.describe(est, cfg.optim.batch_size, cfg.optim.grad_accum, world), file=sys.stderr)
    if why:
        print(why, file=sys.stderr)
    return 0
