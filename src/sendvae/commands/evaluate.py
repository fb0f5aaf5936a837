"""`sendvae evaluate`: sample metrics against an ADM reference batch, reference batches, VAE reconstructions.

    sendvae evaluate samples.npz --ref VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception.pth
    sendvae evaluate --make-ref ref.npz --data prepared --data-path data/in256 --resolution 256 \
        --num-images 50000 --inception-weights pt_inception.pth
    sendvae evaluate --recon --vae export/vae --data prepared --data-path data/val256 --num-images 50000

FID, sFID, IS and precision / recall follow the ADM evaluator and need the FID Inception weights
(pt_inception-2015-12-05-6726825d.pth). Without them the command reports FD_<teacher>, the Frechet
distance in the pooled features of a teacher (default: the embedded EfficientNet-Lite0), which is a
different metric and is never called FID.

As in ADM, IS averages over consecutive splits of 5000 samples (--is-splits K: K equal splits) and
precision / recall use float16 distances (--pr-distance-dtype float32: float32); the report names both.

The engines are the library's (evaluation/sample_batch.py, evaluation/reconstruction.py); this module
reads the options and calls them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import device_arg, nonnegative_int, positive_int
from ..runtime.distributed import resolve_device

NAME = "evaluate"
HELP = "FID / sFID / IS / precision / recall of samples, ADM reference batches, VAE reconstruction metrics"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..data.config import DATASETS
    from ..evaluation.reconstruction import PERCEPTUAL
    from ..metrics.frechet import IS_SPLIT_SIZE, PR_DISTANCE_DTYPES
    from ..teachers import DEFAULT_TEACHER, TEACHERS

    p.add_argument(
        "samples", nargs="?", metavar="SAMPLES.npz", help="sample batch (arr_0 uint8 (N, H, W, 3))"
    )
    p.add_argument("--ref", metavar="REF.npz", help="ADM reference batch to evaluate SAMPLES against")
    p.add_argument("--make-ref", metavar="OUT.npz", help="write an ADM reference batch of --data images")
    p.add_argument("--recon", action="store_true", help="reconstruction metrics of --vae on --data images")
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth); without them FD_<teacher> is "
        "reported instead of FID",
    )
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="without --inception-weights, download them once into torch's hub cache (later runs use it)",
    )
    p.add_argument(
        "--enc-type",
        choices=tuple(TEACHERS),
        default=DEFAULT_TEACHER,
        help="teacher whose pooled features give FD_<teacher> (default: %(default)s)",
    )
    p.add_argument("--teacher-weights", metavar="PATH", help="weights file/folder of --enc-type")
    p.add_argument("--vae", help="--recon: VAE folder, checkpoint or preset")
    p.add_argument("--vae-config", help="--recon: VAE preset naming the architecture of a bare checkpoint")
    p.add_argument("--data", choices=DATASETS, help="dataset of --make-ref / --recon")
    p.add_argument("--data-path", help="dataset folder (prepared / imagefolder / fashion-mnist)")
    p.add_argument(
        "--resolution", type=positive_int, default=256, help="image size in pixels (default: %(default)s)"
    )
    p.add_argument(
        "--num-images", type=positive_int, default=50000, help="images to use (default: %(default)s)"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="shapes: seed of the rendered dataset")
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per forward pass (default: %(default)s)"
    )
    splits = p.add_mutually_exclusive_group()
    splits.add_argument(
        "--is-split-size",
        type=int,
        metavar="N",
        help="Inception Score over consecutive splits of N samples, the last one shorter when N does not "
        f"divide the sample count (default: ADM's {IS_SPLIT_SIZE})",
    )
    splits.add_argument(
        "--is-splits",
        type=int,
        metavar="K",
        help="Inception Score over K equal splits instead of ADM's fixed-size ones (the same ten splits at "
        "50k samples with K = 10; different scores at other counts)",
    )
    p.add_argument(
        "--pr-distance-dtype",
        choices=PR_DISTANCE_DTYPES,
        default="float16",
        help="precision / recall distances: float16 as ADM's evaluator (float32 for any 10000 x 10000 block "
        "that would overflow), or float32 throughout, which moves precision / recall by ~1e-3 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--perceptual",
        choices=(*PERCEPTUAL, "none"),
        default="stlpips_alex",
        help="--recon: the perceptual metric, named <variant>_<net> in the report: the bundled "
        "shift-tolerant LPIPS (stlpips_*) or standard LPIPS v0.1 (lpips_*, its files on disk: "
        "--lpips-weights, --lpips-trunk-weights) (default: %(default)s)",
    )
    p.add_argument("--lpips-weights", metavar="PATH", help="--recon: weights of --perceptual (see train-vae)")
    p.add_argument("--lpips-trunk-weights", metavar="PATH", help="--recon: torchvision trunk of lpips_*")
    p.add_argument(
        "--judge",
        action="store_true",
        help="--recon on the embedded data (fashion-mnist, shapes): also rFD_<judge>, in the features of the "
        "independent judge the demo and the study report (trained once, cached)",
    )
    p.add_argument(
        "--split",
        choices=("train", "reference", "eval"),
        help="the embedded data's part (fashion-mnist, shapes): train, or a held-out part as the demo and "
        "the study use it: reference (test images 0-4999), eval (5000-9999, their reconstructions) "
        "(default: the training images)",
    )
    p.add_argument(
        "--judge-epochs",
        type=positive_int,
        default=3,
        help="--judge: its training epochs (default: %(default)s)",
    )
    p.add_argument("--judge-images", type=positive_int, help="--judge: its training images (default: all)")
    p.add_argument("--output-json", metavar="JSON", help="--recon: write the metrics here as JSON")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")


# -- the three modes: options -> the evaluation engine ------------------------------------------------------


def _embedded(args: argparse.Namespace):
    from ..data.embedded import resolve

    return resolve(args.data, args.data_path, args.resolution, fallback=False)


def _dataset(args: argparse.Namespace):
    from ..data import build_dataset
    from ..data.config import DataConfig
    from ..data.embedded import EMBEDDED

    if args.data is None:
        raise ValueError(
            "which images? pass --data shapes|prepared|imagefolder|fashion-mnist (and --data-path)"
        )
    if args.num_images < 2:
        raise ValueError(f"--num-images must be >= 2 (a covariance needs two images), got {args.num_images}")
    cfg = DataConfig(name=args.data, path=args.data_path, resolution=args.resolution)
    if args.data == "shapes":
        cfg.shapes_length = args.num_images
    if args.data_path is not None and not Path(args.data_path).exists():
        raise FileNotFoundError(f"--data-path {args.data_path} does not exist")
    if args.split is not None:
        if args.data not in EMBEDDED:
            raise ValueError(
                f"--split names a part of the embedded data ({', '.join(EMBEDDED)}), not of {args.data}"
            )
        ds = _embedded(args).split(args.split)
    else:
        ds = build_dataset(cfg, seed=args.seed)
    if len(ds) < args.num_images:
        raise ValueError(f"{args.data} has {len(ds)} images, fewer than --num-images {args.num_images}")
    return ds


def _images(ds, n: int) -> np.ndarray:
    """The first n dataset images as ADM's uint8 (n, H, W, 3)."""
    first = np.asarray(ds[0][0])
    out = np.empty((n, first.shape[1], first.shape[2], 3), dtype=np.uint8)
    for i in range(n):
        out[i] = np.asarray(ds[i][0]).transpose(1, 2, 0)
    return out


def _report(metrics: dict[str, Any], path: Path | None) -> None:
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"{k}: {v:.6g}")
        elif not isinstance(v, (dict, list)):
            print(f"{k}: {v}")
    if path is not None:
        from ..runtime.checkpoint import atomic_write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(metrics, path)
        print(f"wrote {path}")


def _judge_space(args: argparse.Namespace, device: torch.device):
    """The embedded data's judge (evaluation/judge.py) for --judge: the demo's and the study's rFD space."""
    from ..data.embedded import EMBEDDED
    from ..evaluation.judge import JudgeRecipe, load_judge

    if args.data not in EMBEDDED:
        raise ValueError(f"--judge needs the embedded data (--data {' or '.join(EMBEDDED)}), not {args.data}")
    recipe = JudgeRecipe(epochs=args.judge_epochs, train_images=args.judge_images)
    return load_judge(_embedded(args), recipe, device=device)


def evaluate_reconstructions(args: argparse.Namespace) -> dict[str, Any]:
    """rFID (or rFD_<teacher>), PSNR, SSIM and the perceptual metric of --vae's reconstructions of --data."""
    from ..evaluation.reconstruction import InceptionSpace, perceptual_net, score_reconstructions
    from ..evaluation.sample_batch import fid_note, resolve_inception_weights
    from ..metrics.features import FeatureExtractor
    from ..metrics.inception import load_fid_inception
    from ..models.vae_io import load_vae

    if args.vae is None:
        raise ValueError("--recon needs the VAE to evaluate: pass --vae PATH_OR_PRESET")
    device = resolve_device(args.device)
    ds = _dataset(args)
    torch.manual_seed(0)  # a preset (random weights) is the same VAE every run
    vae = load_vae(args.vae, config=args.vae_config).eval().requires_grad_(False)
    weights = resolve_inception_weights(args.inception_weights, args.allow_download)
    spaces: list[Any] = []
    if weights:
        spaces.append(InceptionSpace(load_fid_inception(weights, device), device))
    else:
        print(fid_note(), file=sys.stderr)
        fx = FeatureExtractor(
            args.enc_type, args.teacher_weights, args.resolution, device=device, batch_size=args.batch_size
        )
        spaces.append(fx)
    if args.judge:
        spaces.append(_judge_space(args, device))
    perceptual = None if args.perceptual == "none" else args.perceptual
    net = perceptual_net(perceptual, args.lpips_weights, args.lpips_trunk_weights) if perceptual else None
    scores = score_reconstructions(vae, ds, args.num_images, perceptual=perceptual, perceptual_module=net,
                                   spaces=spaces, device=device, batch_size=args.batch_size)  # fmt: skip
    out = {"vae": str(args.vae), "data": args.data, **scores.metrics}
    if not weights:
        out["note"] = fid_note()
    return out


def run(args: argparse.Namespace) -> int:
    from ..evaluation.sample_batch import make_reference, resolve_inception_weights, score_sample_batch

    modes = [
        m
        for m, on in (("SAMPLES", args.samples), ("--make-ref", args.make_ref), ("--recon", args.recon))
        if on
    ]
    if len(modes) != 1:
        raise ValueError(
            "choose one of: SAMPLES.npz --ref REF.npz, --make-ref OUT.npz, --recon"
            + (f" (got {' and '.join(modes)})" if modes else "")
        )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag, value in (("--is-split-size", args.is_split_size), ("--is-splits", args.is_splits)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    device = resolve_device(args.device)
    if args.samples:
        if args.ref is None:
            raise ValueError(
                "evaluating samples needs a reference batch: pass --ref REF.npz (see --make-ref)"
            )
        metrics = score_sample_batch(
            args.samples,
            args.ref,
            inception_weights=resolve_inception_weights(args.inception_weights, args.allow_download),
            teacher=args.enc_type,
            teacher_weights=args.teacher_weights,
            batch_size=args.batch_size,
            is_split_size=args.is_split_size,
            is_splits=args.is_splits,
            pr_distance_dtype=args.pr_distance_dtype,
            device=device,
        )
        path = Path(args.samples)
        _report(metrics, path.with_name(path.name.removesuffix(".npz") + ".metrics.json"))
    elif args.make_ref:
        if Path(args.make_ref).suffix != ".npz":
            raise ValueError(f"--make-ref must name an .npz file, got {args.make_ref}")
        make_reference(
            _images(_dataset(args), args.num_images),
            args.make_ref,
            inception_weights=resolve_inception_weights(args.inception_weights, args.allow_download),
            batch_size=args.batch_size,
            device=device,
        )
    else:
        metrics = evaluate_reconstructions(args)
        _report(metrics, Path(args.output_json) if args.output_json else None)
    return 0
