"""``sendvae <command>``: one entry point for every stage of the pipeline.

Each command lives in ``sendvae.commands.<module>`` with ``NAME``, ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their command runs, so ``sendvae --help``
stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
    "bench": ("bench", "measure throughput and memory of a stage (vae, train-vae, ...)"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sendvae", description="Send-VAE: semantic-disentangled VAEs and latent diffusion, end to end."
    )
    parser.add_argument("--version", action="version", version=f"sendvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input: printed as one clear line, not a traceback."""
    from .runtime.checkpoint import WriteError
    from .runtime.weights import WeightsError

    return (ValueError, FileNotFoundError, FloatingPointError, ConnectionError, WeightsError, WriteError)


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
    """Parse ``argv`` for a command module and run it; bad input is one clear line and exit code 2.

    Also what ``python -m sendvae.commands.<module>`` runs (each module's ``main``).
    """
    p = argparse.ArgumentParser(prog=f"sendvae {module.NAME}", description=module.HELP)
    module.add_arguments(p)
    args = p.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except Exception as e:
        if getattr(args, "traceback", False) or not isinstance(e, user_errors()):
            raise
        print(f"sendvae {module.NAME}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
