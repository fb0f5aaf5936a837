"""ADM reference batches and the `sendvae evaluate` metrics on them.

A reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) is an .npz with
- arr_0: uint8 images (N, H, W, 3), needed for precision / recall and for statistics it lacks;
- mu, sigma: pool_3 mean (2048,) and covariance (2048, 2048), float64, for FID;
- mu_s, sigma_s: the same for the 2023 spatial features, for sFID.
A sample batch has arr_0 (and optionally arr_1 labels, ignored). As in ADM's evaluator, stored
statistics are used when present; the sample statistics are always recomputed from its images.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from sendvae.metrics.frechet import (
    IS_SPLIT_SIZE,
    PR_DISTANCE_DTYPES,
    StatsAccumulator,
    frechet_distance,
    inception_score,
    is_split_sizes,
    precision_recall,
)
from sendvae.metrics.inception import FIDInceptionV3

STAT_DIMS = {"mu": 2048, "mu_s": 2023}  # pool_3 and spatial feature widths
STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))


class ReferenceBatchError(ValueError):
    """A reference or sample .npz that cannot be evaluated."""


def validate_images(images: np.ndarray, name: str = "arr_0") -> None:
    """Raise ReferenceBatchError unless images is a non-empty uint8 (N, H, W, 3) array."""
    if images.dtype != np.uint8:
        raise ReferenceBatchError(
            f"{name} must be uint8 images, got dtype {images.dtype}; "
            "quantise samples to [0, 255] before saving"
        )
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ReferenceBatchError(f"{name} must be (N, H, W, 3) with N > 0, got shape {images.shape}")


def validate_statistics(stats: dict[str, np.ndarray], source: str = "statistics") -> None:
    """Check every (mu, sigma) pair present: shapes (D,), (D, D) with ADM's D, finite values."""
    for mu_key, sigma_key in STAT_PAIRS:
        has_mu, has_sigma = mu_key in stats, sigma_key in stats
        if has_mu != has_sigma:
            raise ReferenceBatchError(
                f"{source} has {mu_key if has_mu else sigma_key} without {sigma_key if has_mu else mu_key}"
            )
        if not has_mu:
            continue
        d = STAT_DIMS[mu_key]
        mu, sigma = stats[mu_key], stats[sigma_key]
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise ReferenceBatchError(
                f"{source}: {mu_key} must be ({d},) and {sigma_key} ({d}, {d}), got "
                f"{mu.shape} and {sigma.shape}"
            )
        for key, a in ((mu_key, mu), (sigma_key, sigma)):
            if not np.issubdtype(a.dtype, np.floating):
                raise ReferenceBatchError(f"{source}: {key} must be floating point, got {a.dtype}")
            if not np.isfinite(a).all():
                raise ReferenceBatchError(f"{source}: {key} contains NaN or inf")


def load_batch(path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate an ADM .npz; returns the arrays among arr_0, mu, sigma, mu_s, sigma_s."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz batch: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):  # a plain .npy array
            raise ValueError("a single array, not an .npz archive")
        with loaded as f:
            out = {k: f[k] for k in ("arr_0", "mu", "sigma", "mu_s", "sigma_s") if k in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # torn, not a zip, objects
        raise ReferenceBatchError(f"{path} is not a readable .npz batch ({type(e).__name__}: {e})") from None
    if "arr_0" in out:
        validate_images(out["arr_0"], f"{path}: arr_0")
    validate_statistics(out, str(path))
    if "arr_0" not in out and not all(k in out for k in ("mu", "sigma", "mu_s", "sigma_s")):
        raise ReferenceBatchError(
            f"{path} needs images (arr_0) or all of mu, sigma, mu_s, sigma_s; found {sorted(out)}"
        )
    return out


def save_batch(path: str | Path, batch: dict[str, np.ndarray]) -> None:
    """Write a validated batch as an uncompressed .npz (ADM's format), atomically."""
    path = Path(path)
    if "arr_0" in batch:
        validate_images(batch["arr_0"])
    validate_statistics(batch, str(path))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **batch)  # type: ignore[arg-type]  # numpy's stubs: **batch vs allow_pickle: bool
    tmp.replace(path)


class Activations(TypedDict):
    """What `compute_activations` returns."""

    pool: np.ndarray
    logits: np.ndarray
    stats: tuple[np.ndarray, np.ndarray]
    stats_s: tuple[np.ndarray, np.ndarray]


@torch.no_grad()
def compute_activations(images: np.ndarray, net: FIDInceptionV3, batch_size: int = 100) -> Activations:
    """One pass of the network over uint8 (N, H, W, 3) images.

    Returns pool (N, 2048) float32 features, logits (N, 1008) float32, and the float64 statistics
    stats = (mu, sigma) of pool and stats_s = (mu_s, sigma_s) of the spatial features; the spatial
    features themselves are accumulated, never stored (2023 floats per image).
    """
    validate_images(images)
    device = next(net.parameters()).device
    pool, logits = [], []
    acc, acc_s = StatsAccumulator(), StatsAccumulator()
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
        with torch.autocast(device.type, enabled=False):  # metrics in float32, never bf16
            out = net(x)
        acc.update(out["pool"])
        acc_s.update(out["spatial"])
        pool.append(out["pool"].float().cpu().numpy())
        logits.append(out["logits"].float().cpu().numpy())
    return {
        "pool": np.concatenate(pool),
        "logits": np.concatenate(logits),
        "stats": acc.finalize(),
        "stats_s": acc_s.finalize(),
    }


def compute_reference(
    images: np.ndarray, net: FIDInceptionV3, batch_size: int = 100
) -> dict[str, np.ndarray]:
    """The reference batch `evaluate --make-ref` writes: the images plus mu, sigma, mu_s, sigma_s."""
    acts = compute_activations(images, net, batch_size)
    (mu, sigma), (mu_s, sigma_s) = acts["stats"], acts["stats_s"]
    return {"arr_0": images, "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def describe_is_splits(n: int, split_size: int | None = None, splits: int | None = None) -> str:
    """The split definition of an Inception Score of n samples in words, for the evaluate report."""
    sizes = is_split_sizes(n, split_size, splits)
    if splits is not None:
        each = f"{sizes[0]}" if sizes[0] == sizes[-1] else f"{sizes[-1]}-{sizes[0]}"
        return f"{splits} equal splits of {each} samples"
    size = IS_SPLIT_SIZE if split_size is None else split_size
    if len(sizes) == 1:
        return f"split_size={size} as ADM: one split of {n} samples"
    last = f", the last of {sizes[-1]}" if sizes[-1] != size else ""
    return f"split_size={size} as ADM: {len(sizes)} splits of {size}{last}"


def evaluate_samples(
    sample_npz: str | Path,
    ref_npz: str | Path,
    net: FIDInceptionV3,
    batch_size: int = 100,
    is_split_size: int | None = None,
    is_splits: int | None = None,
    k: int = 3,
    pr_distance_dtype: str = "float16",
) -> dict[str, float | int | str | list[int] | None]:
    """FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch.

    Follows ADM's evaluator: reference statistics from the file when stored (else from arr_0),
    precision / recall on pool_3 features of all reference and sample images (None when the
    reference has no images) with float16 distances (pr_distance_dtype="float32" for float32, see
    precision_recall), IS over consecutive splits of is_split_size = 5000 samples, or is_splits equal
    splits instead (see inception_score). The result names the IS split definition (is_splits, in
    words, and is_split_sizes) and the distance precision used.
    """
    samples = load_batch(sample_npz)
    if "arr_0" not in samples:
        raise ReferenceBatchError(f"{sample_npz} has no sample images (arr_0)")
    ref = load_batch(ref_npz)
    if "arr_0" in ref and ref["arr_0"].shape[1:] != samples["arr_0"].shape[1:]:
        raise ReferenceBatchError(
            f"sample images {samples['arr_0'].shape[1:]} and reference images "
            f"{ref['arr_0'].shape[1:]} differ in size; evaluate at the reference's "
            "resolution"
        )
    n = len(samples["arr_0"])
    sizes = is_split_sizes(n, is_split_size, is_splits)  # bad options fail before the network runs
    if pr_distance_dtype not in PR_DISTANCE_DTYPES:
        raise ValueError(f"pr_distance_dtype must be one of {PR_DISTANCE_DTYPES}, got {pr_distance_dtype!r}")

    sample_acts = compute_activations(samples["arr_0"], net, batch_size)
    ref_acts = None
    if "arr_0" in ref:
        ref_acts = compute_activations(ref["arr_0"], net, batch_size)
    if "mu" in ref and "mu_s" in ref:
        ref_stats, ref_stats_s = (ref["mu"], ref["sigma"]), (ref["mu_s"], ref["sigma_s"])
    else:
        assert ref_acts is not None  # load_batch: a batch without all the statistics has images
        ref_stats = (ref["mu"], ref["sigma"]) if "mu" in ref else ref_acts["stats"]
        ref_stats_s = (ref["mu_s"], ref["sigma_s"]) if "mu_s" in ref else ref_acts["stats_s"]

    precision = recall = None
    if ref_acts is not None:
        device = next(net.parameters()).device
        real, fake = (torch.from_numpy(a["pool"]).to(device) for a in (ref_acts, sample_acts))
        precision, recall = precision_recall(real, fake, k=k, distance_dtype=pr_distance_dtype)
    return {
        "fid": frechet_distance(*sample_acts["stats"], *ref_stats),
        "sfid": frechet_distance(*sample_acts["stats_s"], *ref_stats_s),
        "inception_score": inception_score(sample_acts["logits"], split_size=is_split_size, splits=is_splits),
        "is_splits": describe_is_splits(n, is_split_size, is_splits),
        "is_split_sizes": sizes,
        "precision": precision,
        "recall": recall,
        "pr_distance_dtype": pr_distance_dtype if ref_acts is not None else None,
        "n": int(n),
    }
