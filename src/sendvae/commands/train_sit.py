"""sendvae train-sit: train SiT with REPA on a latent store. Run the same command again to resume."""

from __future__ import annotations

import argparse

from ..train.run import run_training
from ._training import Aliases, add_training_arguments, dry_run
from ._training import resolve_config as _resolve

NAME = "train-sit"
HELP = "train a SiT (flow matching + REPA) on a latent store"

DEFAULT_PRESET = "sit-xl2-repa"
# The reference scripts' options (the short spellings every command shares) -> config keys.
ALIASES: Aliases = {
    "--output-dir": ("run.output_dir", "folder holding the run folders"),
    "--exp-name": ("run.exp_name", "run folder name (default: the preset name)"),
    "--seed": ("run.seed", "global seed"),
    "--device": ("run.device", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
    "--store": ("data.store", "latent store from `sendvae cache-latents`"),
    ("--vae", "--vae-ckpt"): ("model.vae", "the VAE the store came from (checked; decodes sample grids)"),
    ("--model", "--models"): ("model.model", "SiT size and patch"),
    "--encoder-depth": ("model.encoder_depth", "REPA block (1..depth)"),
    "--proj-coeff": ("transport.proj_coeff", "REPA weight (0 disables REPA)"),
    "--batch-size": ("optim.batch_size", "global batch size"),
    "--max-steps": ("optim.max_steps", "training steps"),
    "--lr": ("optim.lr", "learning rate"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.sit_config import PRESETS, TrainSiTConfig

    add_training_arguments(p, PRESETS, TrainSiTConfig, ALIASES, DEFAULT_PRESET)
    p.add_argument(
        "--enc-type", help="the REPA teacher whose features the store caches (checked against the store)"
    )


def run(args: argparse.Namespace) -> int:
    from ..train.sit_config import PRESETS, TrainSiTConfig

    cfg = _resolve(args, PRESETS, TrainSiTConfig, DEFAULT_PRESET)
    if args.dry_run:
        from ..train.memory import estimate_train_sit

        return dry_run(cfg, args, estimate_train_sit)
    if args.enc_type and cfg.data.store:
        from ..data.latent_store import read_manifest

        cached = (read_manifest(cfg.data.store).get("teacher") or {}).get("name")
        if cached != args.enc_type:
            raise ValueError(
                f"--enc-type {args.enc_type}: the store {cfg.data.store} caches features of "
                f"{cached or 'no teacher'}; cache again with `sendvae cache-latents --enc-type "
                f"{args.enc_type}`"
            )
    from ..train.sit import SiTTrainer

    run_training(cfg, SiTTrainer, lambda tr: tr.export())
    return 0
