"""``sendvae <command>``: one entry point for every stage of the pipeline.

Each command lives in ``sendvae.commands.<module>`` with ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``, a thin shell over the library; modules are imported only when their command
runs, so ``sendvae --help`` stays fast and a missing optional dependency only affects its own command.
``sendvae <command>`` and ``python -m sendvae.cli <command>`` (what torchrun runs: ``torchrun ... -m
sendvae.cli <command>``) are the entry points.

One vocabulary: a concept has one option name in every command (the reference scripts' names:
``--output-dir``, ``--exp-name``, ``--vae``, ``--vae-ckpt``, ``--enc-type``, ``--teacher-weights``,
``--data-path``, ``--seed``, ``--device``, ...; tests/test_cli_vocabulary.py holds the table), options are
never abbreviated (``allow_abbrev=False`` everywhere: ``--out`` is an error, not ``--output-dir``), and
every option's help shows its default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info", "versions, devices, model presets, teachers and which weights are present"),
    "prepare": ("prepare", "center-crop an image folder once into a sharded dataset for fast training"),
    "train-vae": ("train_vae", "train a Send-VAE (VAE + mapper alignment to a vision foundation model)"),
    "cache-latents": (
        "cache_latents",
        "encode a dataset with a VAE into a latent store (+ teacher features)",
    ),
    "train-sit": ("train_sit", "train a SiT (flow matching + REPA) on a latent store"),
    "sample": ("sample", "sample a SiT (ODE/SDE, CFG in an interval) into an ADM .npz; resumable, torchrun"),
    "evaluate": ("evaluate", "FID, sFID, IS, precision, recall vs an ADM batch; FD_<teacher>; --recon"),
    "probe": ("probe", "linear attribute probes and latent-space measures for one or more VAEs"),
    "downstream": (
        "downstream",
        "segmentation / depth heads on teacher features, read from latents through the alignment head",
    ),
    "study": ("study", "compare the alignment variants on generation (shared init, same SiT, seeds)"),
    "demo": ("demo", "the whole pipeline on the embedded example, with its report (train ... probe)"),
    "bench": ("bench", "measure throughput and memory of a stage (vae, train-vae, ...)"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # the package's __init__, resolved when the parser is built

    parser = argparse.ArgumentParser(
        prog="sendvae",
        description="Send-VAE: semantic-disentangled VAEs and latent diffusion, end to end.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"sendvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False, allow_abbrev=False)
    return parser


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the text already speaks of its default, or the
    default is nothing (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if not action.option_strings or "default" in text or d is argparse.SUPPRESS:
            return text
        if d is None or d is False or (isinstance(d, list) and not d):
            return text
        return text + " (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose errors are one line, as the command's own errors are (``--help`` has the
    usage)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def command_parser(module) -> argparse.ArgumentParser:
    """The parser of one command module: its ``add_arguments``, no abbreviations, defaults in the help."""
    p = CommandParser(
        prog=f"sendvae {module.NAME}",
        description=module.HELP,
        allow_abbrev=False,
        formatter_class=HelpFormatter,
    )
    module.add_arguments(p)
    try:
        p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")
    except argparse.ArgumentError:  # the command has it already
        pass
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input: printed as one clear line, not a traceback."""
    # here, not at the top: they import torch, and `sendvae --help` needs none of it
    from .runtime.checkpoint import WriteError
    from .runtime.lock import FolderLockedError
    from .runtime.weights import WeightsError

    return (
        ValueError, FileNotFoundError, FloatingPointError, ConnectionError, WeightsError, WriteError,
        FolderLockedError,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    if argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --help / --version exit here; anything else is an error listing commands
        return 2
    module = importlib.import_module(f"sendvae.commands.{COMMANDS[argv[0]][0]}")
    return run_command(module, argv[1:])


def run_command(module, argv: list[str] | None = None) -> int:
    """Parse ``argv`` for a command module and run it; bad input is one clear line and exit code 2."""
    from .runtime.log import configure_logging  # here: keeps `sendvae --help` from importing torch

    configure_logging(to_stderr=getattr(module, "STDOUT_IS_DATA", False))
    args = command_parser(module).parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except Exception as e:
        if getattr(args, "traceback", False) or not isinstance(e, user_errors()):
            raise
        print(f"sendvae {module.NAME}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
