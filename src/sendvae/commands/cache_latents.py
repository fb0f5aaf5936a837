"""`sendvae cache-latents`: encode a dataset once into a latent store for the diffusion stage.

    sendvae cache-latents --vae runs/vae/export/vae --data prepared --data-path data/in256 \
        --output-dir latents
    torchrun --nproc_per_node 8 -m sendvae.cli cache-latents ...   (each rank encodes its own shards)

Stores the posterior mean and std of every image and of its horizontal flip, the labels, and optionally
a teacher's patch tokens (REPA targets without running the teacher in the training loop); see
`sendvae.data.latent_store` for the format. To resume an interrupted run, run the same command again.
The engine is `sendvae.data.caching.cache_latents`; this module reads the options and calls it.
"""

from __future__ import annotations

import argparse
import os

import torch

from ..config import device_arg, nonnegative_int, positive_int
from ..data.config import DATASETS

NAME = "cache-latents"
HELP = "encode a dataset with a VAE into a latent store (posterior moments, flips, labels, teacher tokens)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", required=True, help="VAE: exported folder, checkpoint file, or preset (random)")
    p.add_argument("--vae-config", help="VAE preset naming the architecture of a checkpoint without config")
    p.add_argument("--data", choices=DATASETS, default="shapes", help="dataset kind (default: %(default)s)")
    p.add_argument("--data-path", help="dataset folder (prepared / imagefolder / fashion-mnist)")
    p.add_argument(
        "--resolution",
        type=positive_int,
        help="image size in pixels (default: the prepared dataset's, else 256)",
    )
    p.add_argument(
        "--num-images", type=positive_int, default=10000, help="shapes: number of images to render"
    )
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="shapes dataset seed; init seed of random presets"
    )
    p.add_argument("--output-dir", required=True, help="latent store folder (manifest.json, shard-*.npy)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder call, per rank")
    p.add_argument(
        "--workers",
        type=nonnegative_int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader worker processes per rank",
    )
    p.add_argument(
        "--shard-size", type=positive_int, help="images per shard (default: about 256 MiB of store)"
    )
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="encoder compute precision")
    p.add_argument(
        "--dtype", choices=("fp32", "fp16"), default="fp32", help="stored moments (fp16 halves the size)"
    )
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument(
        "--enc-type",
        help="also cache this teacher's patch tokens, fp16 (e.g. dinov2-vit-b; see `sendvae info`)",
    )
    p.add_argument("--teacher-weights", help="local teacher weights file or folder")
    p.add_argument("--teacher-random-init", action="store_true", help="random teacher (tests/benchmarks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")


def run(args: argparse.Namespace) -> int:
    from ..data.caching import cache_data_config, cache_latents, describe_vae_source, teacher_record
    from ..models.vae_io import load_vae
    from ..runtime.distributed import cleanup, init_distributed

    dist = init_distributed(args.device)
    try:
        if args.data != "shapes" and not args.data_path:
            raise ValueError(f"--data {args.data} needs --data-path DIR")
        data = cache_data_config(args.data, args.data_path, args.resolution, args.num_images)
        torch.manual_seed(args.seed)  # a preset VAE (random weights) is then the same on every rank
        vae = load_vae(args.vae, config=args.vae_config)
        teacher = teacher_info = None
        if args.enc_type:
            from ..teachers import build_teacher

            torch.manual_seed(args.seed)
            teacher = build_teacher(
                args.enc_type, weights=args.teacher_weights, resolution=data.resolution,
                random_init=args.teacher_random_init,
            ).to(dist.device)  # fmt: skip
            teacher_info = teacher_record(
                teacher, data.resolution, args.teacher_weights, args.teacher_random_init
            )
        cache_latents(
            vae, data, args.output_dir, teacher=teacher, teacher_info=teacher_info, seed=args.seed,
            vae_source=describe_vae_source(args.vae, args.seed), batch_size=args.batch_size,
            num_workers=args.workers, shard_size=args.shard_size, precision=args.precision, dtype=args.dtype,
            dist=dist, progress=not args.no_progress,
        )  # fmt: skip
        if dist.is_main:
            print(f"wrote {args.output_dir}/manifest.json")
    finally:
        cleanup()
    return 0
