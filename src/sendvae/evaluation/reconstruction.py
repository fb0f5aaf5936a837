"""Reconstruction metrics of a VAE (or any autoencoder with encode / decode): the one implementation.

    scores = score_reconstructions(vae, dataset, 1000, perceptual="stlpips_alex", spaces=[fx])
    scores.metrics   # {psnr, ssim, stlpips_alex, rFD_efficientnet-lite0, n}
    scores.originals, scores.recons   # ImageSet: uint8 (N, 3, H, W) + labels

`sendvae evaluate --recon`, the demo and the study all call it. The VAE decodes the posterior mean (the
convention of rFID). Each metric's key names what it measured, so two numbers under one key are
comparable:

  psnr, ssim           on uint8 pixels (metrics/recon.py: per image, then the mean)
  <variant>_<net>      the perceptual distance and its network: stlpips_alex, stlpips_vgg (the bundled
                       shift-tolerant LPIPS), lpips_alex, lpips_vgg (standard LPIPS v0.1, files on disk)
  rFID                 FD of the reconstructions to their originals in the FID Inception's pool_3
  rFD_<space>          the same in another named feature space (a teacher's pooled features, a judge's)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..losses.lpips import build_lpips
from ..metrics.frechet import StatsAccumulator, frechet_distance
from ..metrics.recon import ReconMetrics, reconstruct
from .images import ImageSet

PERCEPTUAL = ("stlpips_alex", "stlpips_vgg", "lpips_alex", "lpips_vgg")  # <variant>_<net>


class FeatureSpace(Protocol):
    """Where a Frechet distance is taken: FD_<name> (a teacher, a judge) or FID (the FID Inception)."""

    metric_name: str  # "FD_<name>" or "FID"

    def features(self, images: torch.Tensor) -> Any: ...  # uint8 (B, 3, H, W) -> (B, D)


class InceptionSpace:
    """The FID Inception's pool_3 features (2048) as a feature space: FID, rFID."""

    metric_name = "FID"

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        self.net, self.device = net, device

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return self.net(images.to(self.device))["pool"]


def recon_fd_name(space: FeatureSpace) -> str:
    """rFID for the Inception, rFD_<name> for FD_<name>."""
    return "r" + space.metric_name


def perceptual_net(
    name: str, weights: str | None = None, trunk_weights: str | None = None, random_init: bool = False
) -> torch.nn.Module:
    """The perceptual network a key names: ``<variant>_<net>`` (see PERCEPTUAL)."""
    if name not in PERCEPTUAL:
        raise ValueError(f"unknown perceptual metric {name!r}; choose one of: {', '.join(PERCEPTUAL)}")
    variant, net = name.split("_")
    return build_lpips(variant, net, weights, trunk_weights, pretrained=not random_init)


@dataclass
class ReconScores:
    metrics: dict[str, float]  # psnr, ssim, <perceptual>, rFID / rFD_<space>..., n
    originals: ImageSet
    recons: ImageSet


def score_reconstructions(
    vae,
    dataset,
    n: int,
    *,
    perceptual: str | None = "stlpips_alex",
    perceptual_module: torch.nn.Module | None = None,
    spaces: Sequence[FeatureSpace] = (),
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> ReconScores:
    """Reconstruct the first ``n`` images of ``dataset`` ((uint8 (3, H, W), label) items) and score them.

    ``perceptual`` names the perceptual metric (None: none); ``perceptual_module`` is that network when
    the caller built it (standard LPIPS from its files), else it is built here. ``spaces``: the feature
    spaces of the Frechet distances of the reconstructions to their originals.
    """
    device = torch.device(device)
    lp = None
    if perceptual is not None:
        lp = (perceptual_module or perceptual_net(perceptual)).to(device)
    metrics = ReconMetrics(lp)
    accs = [(StatsAccumulator(), StatsAccumulator()) for _ in spaces]
    originals, recons = [], []
    for x, y in reconstruct(vae, dataset, n, batch_size, device):
        metrics.update(x, y)
        for space, (real, fake) in zip(spaces, accs):
            real.update(space.features(x))
            fake.update(space.features(y))
        originals.append(x)
        recons.append(y)
    out: dict[str, Any] = metrics.result()
    if perceptual is not None:
        out[perceptual] = out.pop("lpips")
    for space, (real, fake) in zip(spaces, accs):
        out[recon_fd_name(space)] = float(frechet_distance(*fake.finalize(), *real.finalize()))
    out["n"] = n
    labels = np.array([int(dataset[i][1]) for i in range(n)])
    return ReconScores(out, ImageSet(torch.cat(originals), labels), ImageSet(torch.cat(recons), labels))
