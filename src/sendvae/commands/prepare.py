"""`sendvae prepare SRC OUT`: decode, crop and shard a dataset once, for fast training reads."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from ..config import nonnegative_int, positive_int

if TYPE_CHECKING:
    from torch.utils.data import Dataset

NAME = "prepare"
HELP = "decode, ADM-crop and shard images into the prepared format (resumable: run again to continue)"
SOURCES = ("imagefolder", "fashion-mnist", "shapes")


def resolution_type(text: str) -> int:
    """argparse type: 256, 512, or any multiple of 8 >= 32."""
    try:
        r = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be an integer, got {text!r}") from None
    if r < 32 or r % 8:
        raise argparse.ArgumentTypeError(f"resolution must be 256, 512 or a multiple of 8 >= 32, got {r}")
    return r


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        metavar="SRC",
        help="imagefolder: a folder of class subfolders (ImageNet train/val) or a flat folder of images "
        "(label 0); fashion-mnist: the folder with its IDX files; shapes: ignored (write -)",
    )
    p.add_argument("out", metavar="OUT", help="output folder (index.json, shard-*.npy, report.json)")
    p.add_argument(
        "--data", choices=SOURCES, default="imagefolder", help="dataset kind of SRC (default: %(default)s)"
    )
    p.add_argument(
        "--resolution", type=resolution_type, default=256, help="crop size in pixels (default: 256)"
    )
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        help="images per shard (default: about 192 MiB of pixels, 1024 at 256 px, at most 4096); each "
        "worker holds one shard in memory",
    )
    p.add_argument(
        "--workers", type=nonnegative_int, default=None, help="processes (default: all cores; 0 = this one)"
    )
    p.add_argument(
        "--min-size",
        type=nonnegative_int,
        default=0,
        help="skip images whose short side is below this (default 0: keep all and upsample, as ADM does)",
    )
    p.add_argument("--split", choices=("train", "test"), default="train", help="fashion-mnist split")
    p.add_argument(
        "--num-images", type=positive_int, default=10000, help="shapes: number of images to render"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="shapes: seed of the rendered dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_source(args: argparse.Namespace) -> tuple[str | os.PathLike | Dataset, str | None]:
    """(src for prepare_dataset, source name) from the parsed arguments."""
    if args.data == "imagefolder":
        return args.src, None
    if args.data == "fashion-mnist":
        from sendvae.data.fashion_mnist import FashionMNIST

        ds = FashionMNIST(args.src, split=args.split, resolution=args.resolution)
        return ds, f"fashion-mnist:{ds.root.resolve()}:{args.split}:{args.resolution}:bicubic"
    from sendvae.data.shapes import ShapesDataset
    from sendvae.data.shapes_config import ShapesConfig

    cfg = ShapesConfig(resolution=args.resolution, seed=args.seed, length=args.num_images)
    return ShapesDataset(cfg), f"shapes:{cfg!r}"


def run(args: argparse.Namespace) -> int:
    from sendvae.data.prepared import REPORT_FILE, prepare_dataset

    src, name = build_source(args)
    report = prepare_dataset(
        src,
        args.out,
        resolution=args.resolution,
        shard_size=args.shard_size,
        num_workers=args.workers,
        min_size=args.min_size,
        progress=not args.no_progress,
        source_name=name,
    )
    print(report.summary())
    for reason, files in report.skipped.items():
        shown = ", ".join(files[:5]) + (f", ... ({len(files) - 5} more)" if len(files) > 5 else "")
        print(f"  {reason}: {shown}")
    print(f"  full list in {args.out}/{REPORT_FILE}")
    return 0
