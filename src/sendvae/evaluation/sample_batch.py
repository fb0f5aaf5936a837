"""Generated samples against a reference batch, and reference batches: the engine of `sendvae evaluate`.

    m = score_sample_batch("samples.npz", "ref.npz", inception_weights="pt_inception.pth")
        # {FID, sFID, IS, IS_splits, IS_split_sizes, precision, recall, ...}  (the ADM evaluator's numbers)
    m = score_sample_batch("samples.npz", "ref.npz", inception_weights=None)  # {FD_<teacher>, n, note}
    make_reference(images, "ref.npz", inception_weights=...)

FID, sFID, IS and precision / recall follow the ADM evaluator (metrics/adm.py) and need the FID Inception
weights. Without them the Frechet distance is taken in the pooled features of a teacher (default: the
embedded EfficientNet-Lite0), reported as FD_<teacher>, never as FID.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..metrics.adm import ReferenceBatchError, compute_reference, evaluate_samples, load_batch, save_batch
from ..metrics.features import FeatureExtractor
from ..metrics.inception import (
    WEIGHTS_FILE,
    WEIGHTS_URL,
    cached_weights_path,
    download_weights,
    load_fid_inception,
)

ADM_NAMES = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "is_splits": "IS_splits",
             "is_split_sizes": "IS_split_sizes"}  # fmt: skip


def fid_note() -> str:
    """What a report says when it has no FID."""
    return (
        f"FID, sFID, IS and precision/recall need the FID Inception weights {WEIGHTS_FILE} "
        f"({WEIGHTS_URL}); pass --inception-weights PATH or --allow-download. Reported instead: the "
        "Frechet distance in teacher features, which is not FID."
    )


def resolve_inception_weights(path: str | None, allow_download: bool = False) -> str | None:
    """``path``, else the file in torch's hub cache, else a download into it if allowed, else None."""
    if path:
        return path
    cached = cached_weights_path()
    if not cached.is_file() and allow_download:
        download_weights(cached)
    if cached.is_file():
        print(f"FID Inception weights: {cached}", file=sys.stderr)
        return str(cached)
    return None


def _batches(images: np.ndarray, size: int):
    return (images[i : i + size] for i in range(0, len(images), size))


def score_sample_batch(
    samples: str | Path,
    ref: str | Path,
    *,
    inception_weights: str | None,
    teacher: str,
    teacher_weights: str | None = None,
    batch_size: int = 64,
    is_split_size: int | None = None,
    is_splits: int | None = None,
    pr_distance_dtype: str = "float16",
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """FID & co. of SAMPLES against REF with the Inception weights, else FD_<teacher> (both need images)."""
    device = torch.device(device)
    out: dict[str, Any] = {"samples": str(Path(samples).resolve()), "ref": str(Path(ref).resolve())}
    if inception_weights:
        net = load_fid_inception(inception_weights, device)
        m = evaluate_samples(
            samples,
            ref,
            net,
            batch_size=batch_size,
            is_split_size=is_split_size,
            is_splits=is_splits,
            pr_distance_dtype=pr_distance_dtype,
        )
        return {**out, **{ADM_NAMES.get(k, k): v for k, v in m.items()}}

    s_batch, r_batch = load_batch(samples), load_batch(ref)
    if "arr_0" not in s_batch:
        raise ReferenceBatchError(f"{samples} has no sample images (arr_0)")
    if "arr_0" not in r_batch:
        raise ReferenceBatchError(
            f"{ref} holds only Inception statistics; FD_{teacher} needs its images (arr_0)"
        )
    s, r = s_batch["arr_0"], r_batch["arr_0"]
    if s.shape[1:] != r.shape[1:]:
        raise ReferenceBatchError(
            f"sample images {s.shape[1:]} and reference images {r.shape[1:]} differ in size; "
            "evaluate at the reference's resolution"
        )
    print(fid_note(), file=sys.stderr)
    fx = FeatureExtractor(teacher, weights=teacher_weights, resolution=s.shape[1], device=device,
                          batch_size=batch_size)  # fmt: skip
    fd = fx.frechet_distance(_batches(r, batch_size), _batches(s, batch_size))
    return {**out, fx.metric_name: fd, "n": int(len(s)), "n_ref": int(len(r)), "note": fid_note()}


def make_reference(
    images: np.ndarray,
    out: str | Path,
    *,
    inception_weights: str | None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Write an ADM reference batch of uint8 (N, H, W, 3) ``images``: arr_0, plus mu / sigma / mu_s /
    sigma_s when the Inception weights are given (else they are computed from the images when used)."""
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"--make-ref must name an .npz file, got {out}")
    if inception_weights:
        net = load_fid_inception(inception_weights, torch.device(device))
        batch = compute_reference(images, net, batch_size=batch_size)
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
