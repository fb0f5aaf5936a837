"""``sendvae bench sample`` and ``sendvae bench evaluate``: the two costs of a 50k-sample FID run.

sample: milliseconds per network evaluation of the sampler (SiT with CFG: conditional and unconditional
halves in one call of 2B), the FLOP floor of that call at the measured bf16 matmul rate, and the implied
wall time of 50k samples with an SDE of 250 steps. evaluate: FID-Inception images/s (random weights:
the speed does not depend on them) and the implied time for 50k images, against pytorch-fid's
InceptionV3([3]) on the same weights and the same uint8 images in the same run when pytorch-fid is
installed, at a chosen CPU thread count; optionally the precision / recall distances in float16 (ADM)
and float32 on a fixed random feature set."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from unittest import mock

import numpy as np
import torch

from ..diffusion.sampling import guided_velocity
from ..metrics.frechet import PR_DISTANCE_DTYPES, precision_recall
from ..metrics.inception import FIDInceptionV3
from ..models.sit import SiT, flops_per_image, sized_sit_config
from ..runtime.hardware import measured_matmul_tflops
from .timing import peak_gib, reset_peak, sync, time_fn


def bench_sample(
    model: str,
    device: torch.device,
    batch: int,
    dtype: torch.dtype | None,
    cfg_scale: float = 1.5,
    steps: int = 250,
    num_samples: int = 50_000,
    iters: int = 5,
    warmup: int = 2,
    compile: bool = False,
    **size,
) -> dict:
    cfg = sized_sit_config(model, size, input_size=32, in_channels=4, num_classes=1000, z_dims=())
    net = SiT(cfg).to(device).eval().requires_grad_(False)
    fwd = torch.compile(net) if compile else net
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    t = torch.full((), 0.5, device=device)  # inside the guidance interval: both halves run

    def call() -> None:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext(),
        ):
            guided_velocity(fwd, x, t, y, cfg.num_classes, cfg_scale)

    reset_peak(device)
    sec = time_fn(call, device, warmup, iters)
    evals = batch * (2 if cfg_scale != 1.0 else 1)  # network evaluations (images) per call
    flops = evals * flops_per_image(cfg)
    peak = measured_matmul_tflops(device)
    floor = flops / (peak * 1e12) if peak else None
    return {
        "model": model,
        "batch": batch,
        "cfg_scale": cfg_scale,
        "ms_per_call": 1e3 * sec,
        "evals_per_call": evals,
        "peak_gib": peak_gib(device),
        "floor_ms": None if floor is None else 1e3 * floor,
        "vs_floor": None if floor is None else sec / floor,
        "hours_for_50k": num_samples / batch * steps * sec / 3600,
        "steps": steps,
        "num_samples": num_samples,
    }


def _calibrated_inception(device: torch.device):
    """The FID Inception with random weights and BN statistics taken from one batch of noise, so that
    activations stay O(1) through the network as with the real weights (with the default statistics
    they shrink to ~1e-8 by Mixed_7c; no measurable change in speed, but no near-degenerate values)."""

    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the running statistics
    net.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (2, 299, 299, 3), dtype=torch.uint8))
    return net.eval().requires_grad_(False).to(device)


def _pytorch_fid_inception(state: dict, device: torch.device):
    """pytorch-fid's InceptionV3([3]) (pool_3 features) holding `state`, or None without pytorch-fid.

    Its constructor fetches the weights by URL; its loader is handed our state dict instead (the same
    pt_inception key layout, loaded strictly)."""
    try:
        import pytorch_fid.inception as pytorch_fid_inception
    except ImportError:
        return None
    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: dict(state)):
        net = pytorch_fid_inception.InceptionV3([pytorch_fid_inception.InceptionV3.DEFAULT_BLOCK_INDEX])
    return net.eval().to(device)


def _interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, iters: int):
    """Seconds per call of each fn, timed in turn within each of `iters` rounds, so that load from other
    processes falls on all of them alike; per-round lists, after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def bench_evaluate(
    device: torch.device,
    batch: int,
    resolution: int = 256,
    iters: int = 5,
    warmup: int = 2,
    num_images: int = 50_000,
    threads: int | None = None,
) -> dict:
    """Our FID Inception and pytorch-fid's InceptionV3([3]) on the same uint8 (N, H, W, 3) images, the
    ADM layout, each from the uint8 batch to its features: ours with its conversion, TF1 resize to 299
    and all three outputs; pytorch-fid's with its input convention done in the timing,
    images.permute(0, 3, 1, 2).float() / 255 (a channels-last view, which its convs then run in: the
    faster of its two layouts on CPU), then its own half-pixel resize and scaling to [-1, 1].

    Both under torch.no_grad as the evaluator runs, timed in turn in each of `iters` rounds after
    `warmup` rounds, on `threads` CPU threads (torch.set_num_threads; None: as set). img_s is from the
    median round, img_s_best from the fastest; vs_pytorch_fid is the median over the rounds of our
    time / its time in the same round, vs_pytorch_fid_best the ratio of the fastest rounds (< 1: ours
    is faster). With the machine shared, the fastest rounds are the least disturbed ones."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        net = _calibrated_inception(device)
        images = torch.randint(0, 256, (batch, resolution, resolution, 3), dtype=torch.uint8, device=device)
        fns = {"ours": lambda: net(images)}
        reference = _pytorch_fid_inception(net.state_dict(), device)
        if reference is not None:
            fns["pytorch_fid"] = lambda: reference(images.permute(0, 3, 1, 2).float().div(255))

        reset_peak(device)
        with torch.no_grad():
            times = _interleaved(fns, device, warmup, iters)
    finally:
        torch.set_num_threads(previous_threads)
    sec = statistics.median(times["ours"])
    out = {
        "batch": batch,
        "resolution": resolution,
        "threads": threads if threads is not None else previous_threads,
        "img_s": batch / sec,
        "img_s_best": batch / min(times["ours"]),
        "peak_gib": peak_gib(device),
        "seconds_for_50k": num_images / batch * sec,
        "pytorch_fid_img_s": None,
        "pytorch_fid_img_s_best": None,
        "vs_pytorch_fid": None,
        "vs_pytorch_fid_best": None,
        "rounds": iters,
    }
    if reference is not None:
        theirs = times["pytorch_fid"]
        out["pytorch_fid_img_s"] = batch / statistics.median(theirs)
        out["pytorch_fid_img_s_best"] = batch / min(theirs)
        out["vs_pytorch_fid"] = statistics.median(a / b for a, b in zip(times["ours"], theirs))
        out["vs_pytorch_fid_best"] = min(times["ours"]) / min(theirs)
    return out


def pool3_like_features(n: int, dim: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random stand-in for Inception pool_3 features: non-negative, on a 12-d manifold, squared
    norms ~460; `real` and a shifted, narrower `fake` set of n vectors each, float32."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(12, dim)) / np.sqrt(12)
    to_feats = lambda z: np.maximum(0.5 * z @ w + 0.2, 0).astype(np.float32)
    return to_feats(rng.normal(size=(n, 12))), to_feats(rng.normal(size=(n, 12)) * 0.9 + 0.15)


def bench_precision_recall(device: torch.device, n: int, seed: int = 0) -> dict:
    """Precision / recall of pool3_like_features(n) with float16 (ADM's) and float32 distances: the
    figures side by side and the seconds each takes (3 n^2 distances in 2048-d)."""

    real, fake = (torch.from_numpy(a).to(device) for a in pool3_like_features(n, seed=seed))
    out: dict = {"pr_features": n, "seed": seed}
    for dtype in PR_DISTANCE_DTYPES:
        sync(device)
        t0 = time.perf_counter()
        out[f"precision_{dtype}"], out[f"recall_{dtype}"] = precision_recall(real, fake, distance_dtype=dtype)
        sync(device)
        out[f"pr_{dtype}_s"] = time.perf_counter() - t0
    return out
