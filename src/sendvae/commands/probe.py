"""`sendvae probe`: latent-space analysis of VAEs by linear probes, uniformity and discrimination.

    sendvae probe --vae export/vae --vae tiny-f4d4 --pixels --data shapes --num-images 4000 \
        --resolution 64 --gfd vae=3.2 --gfd tiny-f4d4=9.1 --output-dir probe-out

    sendvae probe --store runs/latents --num-images 50000        # from a latent store, no encoder run

Features per model: the flattened posterior mean of the encoder, normalised per channel with the VAE's
latent statistics (a preset name builds a random-init encoder, the untrained baseline); `--pixels` adds
the raw image, area-downsampled to `--pixel-size`, as a baseline. `--store STORE` reads the posterior
means of the un-flipped images from a `cache-latents` store instead, normalised with the store's
statistics; a store of the embedded shapes gets every shapes probe target (its images are shapes
0..N-1 of the store's seed), any other store its class labels. For every probe target of the dataset
(see sendvae.analysis.attributes) a linear probe is fitted and scored (sendvae.analysis.probes); the
class probe accuracy is the "semantic gap" measure; uniformity and discrimination are in
sendvae.analysis.measures. Writes OUTPUT_DIR/probe.{md,csv,json}, OUTPUT_DIR/groups.png and, given --gfd
values for >= 3 models, OUTPUT_DIR/gfd_scatter.png with Pearson r. The driver is
`sendvae.analysis.report.probe_models`; this module reads the options and calls it.
"""

from __future__ import annotations

import argparse

from ..config import device_arg, nonnegative_int, positive_int

NAME = "probe"
HELP = "linear attribute probes, semantic gap, uniformity and discrimination of VAE latents"
DATASETS = ("shapes", "fashion-mnist", "celeba", "awa2", "deepfashion")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vae",
        action="append",
        default=[],
        help="VAE folder, checkpoint or preset, optionally NAME=PATH (repeatable)",
    )
    p.add_argument(
        "--store",
        action="append",
        default=[],
        help="latent store folder (from cache-latents), optionally NAME=PATH (repeatable)",
    )
    p.add_argument("--vae-config", help="VAE preset naming the architecture of checkpoints without config")
    p.add_argument("--pixels", action="store_true", help="add raw downsampled pixels as a baseline")
    p.add_argument(
        "--pixel-size", type=positive_int, default=16, help="pixel baseline side (default: %(default)s)"
    )
    p.add_argument("--data", choices=DATASETS, default="shapes", help="dataset (default: %(default)s)")
    p.add_argument("--data-path", help="dataset folder (celeba, awa2, deepfashion; fashion-mnist optional)")
    p.add_argument(
        "--num-images", type=positive_int, default=4000, help="images to probe (default: %(default)s)"
    )
    p.add_argument("--resolution", type=positive_int, default=64, help="image side (default: %(default)s)")
    p.add_argument(
        "--seed",
        type=nonnegative_int,
        default=0,
        help="splits, subsets, PCA, mixtures (default: %(default)s)",
    )
    p.add_argument("--pca-dim", type=positive_int, default=8, help="PCA dims for uniformity/discrimination")
    p.add_argument(
        "--enc-type",
        default="efficientnet-lite0",
        help="teacher for the CKNNA alignment measure, or 'none' (default: the embedded %(default)s)",
    )
    p.add_argument("--teacher-weights", help="weights file/folder of --enc-type (see `sendvae info`)")
    p.add_argument("--gfd", action="append", default=[], help="MODEL=VALUE: a model's gFID, for the scatter")
    p.add_argument(
        "--score", default="top5_recall", help="table column plotted against gFD (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder batch")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="BLAS threads for the probe fits: small fits are fastest on one",
    )
    p.add_argument("--output-dir", default="probe", help="output folder (default: %(default)s)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")


def run(args: argparse.Namespace) -> int:
    from ..analysis.report import probe_models

    probe_models(
        args.output_dir, vaes=args.vae, latents=args.store, pixels=args.pixels, data=args.data,
        data_root=args.data_path, num_images=args.num_images, resolution=args.resolution, seed=args.seed,
        pca_dim=args.pca_dim, pixel_size=args.pixel_size, teacher=args.enc_type,
        teacher_weights=args.teacher_weights, gfd=args.gfd, score=args.score, batch_size=args.batch_size,
        threads=args.threads, vae_config=args.vae_config, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    return 0
