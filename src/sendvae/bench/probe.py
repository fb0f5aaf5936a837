"""`sendvae bench probe`: the time to probe N latents of a VAE's shape, on this machine's device.

The probe cost depends on the number of latents, their dimension (f16d32 at 256 px: 32 x 16 x 16 = 8192)
and the tasks, not on the VAE's weights, and encoding 50k images is `bench vae`'s business. So the
features here are synthetic: a random linear image of the embedded shapes dataset's probe targets for
images 0..N-1 (attribute tables only, no pixels drawn) plus unit noise, which gives the solvers
realistic, learnable targets. Every probe of `sendvae probe` runs on them, then the latent measures.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..analysis.attributes import ProbeTask, shapes_data
from ..analysis.measures import latent_measures
from ..analysis.probes import make_split, run_probe, standardize
from ..models.vae import VAE_CONFIGS
from .timing import sync


def _encode_targets(tasks) -> np.ndarray:
    """(N, M) float32 numeric view of all targets: one-hot categories, continuous values, binary columns."""
    cols = []
    for t in tasks:
        y = np.asarray(t.target)
        if t.kind == "categorical":
            cols.append(np.eye(int(y.max()) + 1, dtype=np.float32)[np.maximum(y, 0)] * (y >= 0)[:, None])
        elif t.kind == "continuous":
            cols.append(np.nan_to_num(y.astype(np.float32))[:, None])
        else:
            cols.append(y.astype(np.float32))
    return np.concatenate(cols, 1)


def synthetic_features(tasks, dim: int, seed: int = 0) -> np.ndarray:
    """(N, dim) float32: standardised targets @ a random (M, dim) map + N(0, 1) noise."""
    t = torch.from_numpy(_encode_targets(tasks))
    t = (t - t.mean(0)) / t.std(0).clamp_min(1e-6)
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(t.shape[1], dim, generator=g) / t.shape[1] ** 0.5
    return (t @ proj + torch.randn(t.shape[0], dim, generator=g)).numpy()


def bench_probe(
    vae: str, device: torch.device, num_latents: int, resolution: int, seed: int = 0, pca_dim: int = 8
) -> dict:
    """Seconds to standardise, probe every shapes target and compute the measures for N latents."""

    cfg = VAE_CONFIGS[vae]
    side = resolution // cfg.downsample_factor
    dim = cfg.embed_dim * side * side
    data = shapes_data(num_latents, 64, seed)
    feats = synthetic_features(data.tasks, dim, seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    split = make_split(len(feats), seed)
    x = standardize(feats, split.train, device)
    cache: dict = {}
    for t in [*data.tasks, *([] if data.num_classes < 2 else [_class_task(data)])]:
        t1 = time.perf_counter()
        run_probe(t.kind, x, t.target, split, cache)
        sync(device)
        seconds[t.kind] = seconds.get(t.kind, 0.0) + time.perf_counter() - t1
    t1 = time.perf_counter()
    latent_measures(feats, data.num_classes, pca_dim, seed)
    seconds["measures"] = time.perf_counter() - t1
    total = time.perf_counter() - t0
    return {
        "vae": vae,
        "num_latents": num_latents,
        "feature_dim": dim,
        "num_probes": len(data.tasks) + 1,
        "seconds": total,
        **{f"{k}_s": v for k, v in seconds.items()},
    }


def _class_task(data):

    return ProbeTask("class", "categorical", "class", data.classes)
