"""sendvae train-vae: train a Send-VAE. Run the same command again to resume."""

from __future__ import annotations

import argparse

from ..train.run import run_training
from ._training import Aliases, add_training_arguments, dry_run
from ._training import resolve_config as _resolve

NAME = "train-vae"
HELP = "train a Send-VAE (VAE + mapper alignment to a vision foundation model)"

DEFAULT_PRESET = "shapes-tiny"
# The reference scripts' options (the short spellings every command shares) -> config keys.
ALIASES: Aliases = {
    "--output-dir": ("run.output_dir", "folder holding the run folders"),
    "--exp-name": ("run.exp_name", "run folder name (default: the preset name)"),
    "--seed": ("run.seed", "global seed"),
    "--device": ("run.device", "auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
    "--vae": ("model.vae", "VAE preset: f8d4, f16d32, tiny-f4d4, ... (see `sendvae info`)"),
    "--vae-ckpt": ("model.vae_ckpt", "initial VAE weights for the --vae preset"),
    "--disc-pretrained-ckpt": ("model.disc_ckpt", "initial discriminator weights"),
    "--enc-type": ("teacher.enc_type", "teacher, e.g. dinov2-vit-b (see `sendvae info`)"),
    "--teacher-weights": ("teacher.weights", "local teacher weights file/folder"),
    "--data": ("data.name", "dataset kind"),
    "--data-path": ("data.path", "dataset folder"),
    "--resolution": ("data.resolution", "image resolution"),
    "--batch-size": ("optim.batch_size", "global batch size"),
    "--max-steps": ("optim.max_steps", "training steps"),
    "--lr": ("optim.lr", "learning rate"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.vae_config import PRESETS, TrainVAEConfig

    add_training_arguments(p, PRESETS, TrainVAEConfig, ALIASES, DEFAULT_PRESET)
    p.add_argument(
        "--teacher-random-init", action="store_true", help="random teacher (tests/benchmarks only)"
    )


def resolve_config(args: argparse.Namespace):
    from ..train.vae_config import PRESETS, TrainVAEConfig

    extra = {"teacher.random_init": True} if getattr(args, "teacher_random_init", False) else {}
    return _resolve(args, PRESETS, TrainVAEConfig, DEFAULT_PRESET, extra)


def _make_trainer(cfg, dist, run_dir, log):
    from ..train.vae import VAETrainer

    trainer = VAETrainer(cfg, dist, run_dir, log)
    if getattr(trainer.teacher, "is_embedded", False):
        log.info(
            "teacher: the embedded EfficientNet-Lite0 (ImageNet-trained, bundled with the install), "
            "not a vision foundation model; results are for the embedded example only"
        )
    return trainer


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.dry_run:
        from ..train.memory import estimate_train_vae

        return dry_run(cfg, args, estimate_train_vae)
    from ..train.export import export_run

    run_training(cfg, _make_trainer, export_run)
    return 0
