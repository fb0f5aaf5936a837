"""`sendvae sample`: class-conditional samples of a SiT, decoded by its VAE, as an ADM .npz for evaluation.

    sendvae sample --exp-path runs/sit-xl2 --mode sde --steps 250 --cfg-scale 2.5 --guidance-high 0.75
    torchrun --nproc_per_node 8 -m sendvae.cli sample --model export/sit --vae export/vae ...

Image i uses seed + i (its own generator), so the samples do not depend on the batch size or the number
of processes. Rank r makes images r, r + world, ...; every batch is written atomically to
OUTPUT_DIR/<name>.parts/ and skipped when the command runs again (resume); rank 0 merges the parts into
OUTPUT_DIR/<name>.npz (arr_0 uint8 (N, H, W, 3), arr_1 labels) and a grid of the first 64 as <name>.png.
<name>.json records the hashes of the SiT's and the VAE's weights, the latent statistics and the settings:
a finished set (or parts) of another model in OUTPUT_DIR is refused, never reused (use another
--output-dir). The driver is `sendvae.diffusion.generate.generate`; this module reads the options and
calls it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ..config import device_arg, field_arg, nonnegative_int, positive_int
from ..diffusion.sampling import SamplerConfig

NAME = "sample"
HELP = "sample a SiT with an ODE/SDE sampler and CFG into an ADM .npz (resumable, multi-process)"


def add_sampler_arguments(p: argparse.ArgumentParser, help_prefix: str = "") -> None:
    """One option per SamplerConfig field (--steps, --cfg-scale, ...), spelled the same in every command."""

    hints = typing.get_type_hints(SamplerConfig)
    for f in dataclasses.fields(SamplerConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=field_arg(f, hints[f.name]),
            default=f.default,
            choices=f.metadata.get("choices"),
            help=f"{help_prefix}{f.metadata['help']} (default: %(default)s)",
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--exp-path", help="a train-sit run folder (its checkpoints, config and latent store)")
    src.add_argument("--model", help="a SiT export folder, or a SiT / REPA / REPA-E checkpoint file")
    p.add_argument(
        "--train-steps", type=nonnegative_int, help="with --exp-path: the checkpoint step (default: latest)"
    )
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--vae", help="VAE folder, checkpoint or preset (default: the run's train-sit --vae)")
    p.add_argument("--vae-config", help="VAE preset naming the architecture of a checkpoint without config")
    p.add_argument(
        "--latent-stats",
        help="latent mean/std for a SiT that records none (REPA / REPA-E / SiT checkpoints): a latent store, "
        "a latents.json or stats file, or 'vae' for the VAE's own; our runs use the ones they were trained "
        "with",
    )
    p.add_argument(
        "--num-samples", type=positive_int, default=50000, help="images to make (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch, per process")
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="image i uses seed + i; labels are drawn from seed"
    )
    p.add_argument(
        "--label-sampling",
        choices=("random", "equal"),
        default="random",
        help="random labels, or equal: as many of each class (shuffled)",
    )
    add_sampler_arguments(p)
    p.add_argument("--output-dir", default="samples", help="output folder (default: %(default)s)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")


def run(args: argparse.Namespace) -> int:
    from ..diffusion.generate import generate
    from ..diffusion.sit_source import load_sit_model, load_sit_run
    from ..runtime.distributed import cleanup, init_distributed

    scfg = SamplerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig)})
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be >= 1")
    dist = init_distributed(args.device)
    try:
        if args.model:
            sit = load_sit_model(args.model, args.weights)
        else:
            sit = load_sit_run(args.exp_path, args.train_steps, args.weights)
        generate(
            sit, args.num_samples, scfg, args.output_dir, vae=args.vae, vae_config=args.vae_config,
            latent_stats=args.latent_stats, batch_size=args.batch_size, seed=args.seed,
            label_sampling=args.label_sampling, dist=dist, progress=not args.no_progress,
        )  # fmt: skip
    finally:
        cleanup()
    return 0
