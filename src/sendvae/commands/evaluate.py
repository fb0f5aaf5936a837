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
DATASETS = ("shapes", "prepared", "imagefolder", "fashion-mnist")


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--output-json", metavar="JSON", help="--recon: write the metrics here as JSON")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")


# -- helpers -------------------------------------------------------------------------------------------------


def _fid_note() -> str:
    from ..metrics.inception import WEIGHTS_FILE, WEIGHTS_URL

    return (
        f"FID, sFID, IS and precision/recall need the FID Inception weights {WEIGHTS_FILE} "
        f"({WEIGHTS_URL}); pass --inception-weights PATH or --allow-download. Reported instead: the "
        "Frechet distance in teacher features, which is not FID."
    )


def _inception_weights(args: argparse.Namespace) -> str | None:
    """--inception-weights, else the file in the hub cache, else a download if allowed, else None."""
    from ..metrics.inception import cached_weights_path, download_weights

    if args.inception_weights:
        return args.inception_weights
    cached = cached_weights_path()
    if not cached.is_file() and args.allow_download:
        download_weights(cached)
    if cached.is_file():
        print(f"FID Inception weights: {cached}", file=sys.stderr)
        return str(cached)
    return None


def _feature_extractor(args: argparse.Namespace, resolution: int):
    from ..metrics.features import FeatureExtractor

    return FeatureExtractor(
        args.enc_type,
        weights=args.teacher_weights,
        resolution=resolution,
        device=resolve_device(args.device),
        batch_size=args.batch_size,
    )


def _dataset(args: argparse.Namespace):
    from ..data import build_dataset
    from ..data.config import DataConfig

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


def _batches(images: np.ndarray, size: int):
    return (images[i : i + size] for i in range(0, len(images), size))


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


# -- the three modes -----------------------------------------------------------------------------------------


def evaluate_sample_batch(args: argparse.Namespace) -> dict[str, Any]:
    """FID & co. with the Inception weights, else FD_<teacher>, of SAMPLES against --ref."""
    from ..metrics.adm import ReferenceBatchError, evaluate_samples, load_batch

    if args.ref is None:
        raise ValueError("evaluating samples needs a reference batch: pass --ref REF.npz (see --make-ref)")
    out: dict[str, Any] = {"samples": str(Path(args.samples).resolve()), "ref": str(Path(args.ref).resolve())}
    weights = _inception_weights(args)
    if weights:
        from ..metrics.inception import load_fid_inception

        net = load_fid_inception(weights, resolve_device(args.device))
        m = evaluate_samples(
            args.samples,
            args.ref,
            net,
            batch_size=args.batch_size,
            is_split_size=args.is_split_size,
            is_splits=args.is_splits,
            pr_distance_dtype=args.pr_distance_dtype,
        )
        names = {
            "fid": "FID",
            "sfid": "sFID",
            "inception_score": "IS",
            "is_splits": "IS_splits",
            "is_split_sizes": "IS_split_sizes",
        }
        return {**out, **{names.get(k, k): v for k, v in m.items()}}

    samples, ref = load_batch(args.samples), load_batch(args.ref)
    if "arr_0" not in samples:
        raise ReferenceBatchError(f"{args.samples} has no sample images (arr_0)")
    if "arr_0" not in ref:
        raise ReferenceBatchError(
            f"{args.ref} holds only Inception statistics; FD_{args.enc_type} needs its images (arr_0)"
        )
    s, r = samples["arr_0"], ref["arr_0"]
    if s.shape[1:] != r.shape[1:]:
        raise ReferenceBatchError(
            f"sample images {s.shape[1:]} and reference images {r.shape[1:]} differ in size; "
            "evaluate at the reference's resolution"
        )
    print(_fid_note(), file=sys.stderr)
    fx = _feature_extractor(args, s.shape[1])
    fd = fx.frechet_distance(_batches(r, args.batch_size), _batches(s, args.batch_size))
    return {**out, fx.metric_name: fd, "n": int(len(s)), "n_ref": int(len(r)), "note": _fid_note()}


def make_reference(args: argparse.Namespace) -> dict[str, Any]:
    """Write --make-ref: arr_0, plus mu/sigma/mu_s/sigma_s when the Inception weights are given."""
    from ..metrics.adm import compute_reference, save_batch

    out = Path(args.make_ref)
    if out.suffix != ".npz":
        raise ValueError(f"--make-ref must name an .npz file, got {out}")
    images = _images(_dataset(args), args.num_images)
    weights = _inception_weights(args)
    if weights:
        from ..metrics.inception import load_fid_inception

        net = load_fid_inception(weights, resolve_device(args.device))
        batch = compute_reference(images, net, batch_size=args.batch_size)
    else:
        batch = {"arr_0": images}
        print(
            "no --inception-weights: the reference holds images only (FID statistics are then computed "
            "from them at evaluation time)",
            file=sys.stderr,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_batch(out, batch)
    print(f"wrote {out}: {', '.join(f'{k} {v.shape}' for k, v in batch.items())}")
    return {"reference": str(out.resolve()), "n": int(len(images)), "keys": sorted(batch)}


def evaluate_reconstructions(args: argparse.Namespace) -> dict[str, Any]:
    """rFID (or FD_<teacher>), PSNR, SSIM and LPIPS of the VAE's reconstructions of --data images."""
    from ..losses.lpips import build_lpips
    from ..metrics.frechet import StatsAccumulator, frechet_distance
    from ..metrics.recon import ReconMetrics, reconstruct
    from ..models.vae_io import load_vae

    if args.vae is None:
        raise ValueError("--recon needs the VAE to evaluate: pass --vae PATH_OR_PRESET")
    device = resolve_device(args.device)
    ds = _dataset(args)
    torch.manual_seed(0)  # a preset (random weights) is the same VAE every run
    vae = load_vae(args.vae, config=args.vae_config).eval().requires_grad_(False)
    metrics = ReconMetrics(build_lpips().to(device))

    weights = _inception_weights(args)
    if weights:
        from ..metrics.inception import load_fid_inception

        net = load_fid_inception(weights, device)
        fd_name, fx = "rFID", None
    else:
        print(_fid_note(), file=sys.stderr)
        net, fx = None, _feature_extractor(args, args.resolution)
        fd_name = fx.metric_name
    acc_real, acc_fake = StatsAccumulator(), StatsAccumulator()
    for x, y in reconstruct(vae, ds, args.num_images, args.batch_size, device):
        metrics.update(x, y)
        for acc, imgs in ((acc_real, x), (acc_fake, y)):
            if net is not None:
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    acc.update(net(imgs.to(device))["pool"])
            else:
                assert fx is not None  # made when there is no Inception network
                acc.update(fx.features(imgs))
    fd = frechet_distance(*acc_fake.finalize(), *acc_real.finalize())
    out = {"vae": str(args.vae), "data": args.data, "n": args.num_images, fd_name: fd, **metrics.result()}
    if net is None:
        out["note"] = _fid_note()
    return out


def run(args: argparse.Namespace) -> int:
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
    if args.samples:
        metrics = evaluate_sample_batch(args)
        path = Path(args.samples)
        _report(metrics, path.with_name(path.name.removesuffix(".npz") + ".metrics.json"))
    elif args.make_ref:
        make_reference(args)
    else:
        metrics = evaluate_reconstructions(args)
        _report(metrics, Path(args.output_json) if args.output_json else None)
    return 0
