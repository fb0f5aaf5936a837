"""Reconstruction metrics of `sendvae evaluate --recon`: PSNR, SSIM, LPIPS, and the reconstructions.

- PSNR per image on uint8 pixels: 10 log10(255^2 / MSE), MSE over all H * W * 3 values, then averaged
  over images. Identical images (MSE = 0) score PSNR_MAX = 100 dB instead of inf, so a mean stays finite.
- SSIM (Wang et al. 2004) per image: an 11x11 Gaussian window, sigma 1.5, C1 = (0.01 * 255)^2,
  C2 = (0.03 * 255)^2, SSIM map averaged over the pixels whose window lies inside the image and over the
  RGB channels; the same number as skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
  data_range=255, channel_axis=-1), sample covariances (N / (N - 1) with N = 121) included.
- LPIPS: the mean over images of build_lpips()(x, y).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sendvae.data.transforms import to_float, to_uint8

if TYPE_CHECKING:
    from sendvae.models.vae import AutoencoderKL

PSNR_MAX = 100.0  # dB, the score of a perfect reconstruction
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # skimage: int(truncate * sigma + 0.5) with truncate 3.5 -> an 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two (N, C, H, W) batches of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 (N, C, H, W) batches, float64 (N,), capped at PSNR_MAX."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).square().flatten(1).mean(1)  # (N,)
    out = 10.0 * torch.log10(255.0**2 / mse)  # inf where mse == 0
    return out.clamp(max=PSNR_MAX)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()  # (11,)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over H and W of (N, C, H, W), 'valid' region only: (N, C, H - 10, W - 10).

    skimage filters with reflect padding and then crops the 5-pixel border, so the pixels it keeps see
    only the image itself; a valid convolution gives exactly those.
    """
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)  # along H
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)  # along W


def ssim(a: torch.Tensor, b: torch.Tensor, sample_covariance: bool = True) -> torch.Tensor:
    """Per-image SSIM of uint8 (N, C, H, W) batches, float64 (N,); H and W must be >= 11.

    With m = G * x (G the Gaussian window), s_xy = G * (xy) - m_x m_y (times 121 / 120 when
    sample_covariance, as skimage's default),
    SSIM = (2 m_x m_y + C1)(2 s_xy + C2) / ((m_x^2 + m_y^2 + C1)(s_xx + s_yy + C2)).
    """
    _check_pair(a, b)
    side = 2 * SSIM_RADIUS + 1
    if min(a.shape[-2:]) < side:
        raise ValueError(f"SSIM needs images of at least {side}x{side} pixels, got {tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    g = _gaussian_window(x.device)
    mx, my = _blur(x, g), _blur(y, g)
    cov_norm = side * side / (side * side - 1) if sample_covariance else 1.0
    sxx = cov_norm * (_blur(x * x, g) - mx * mx)
    syy = cov_norm * (_blur(y * y, g) - my * my)
    sxy = cov_norm * (_blur(x * y, g) - mx * my)
    c1, c2 = (SSIM_K1 * 255.0) ** 2, (SSIM_K2 * 255.0) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)  # (N,): mean over channels and valid pixels


class ReconMetrics:
    """Running means of PSNR, SSIM and (when an LPIPS module is given) LPIPS over uint8 batches."""

    def __init__(self, lpips: torch.nn.Module | None = None) -> None:
        self.lpips = lpips
        self.n = 0
        self._sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}

    @torch.no_grad()
    def update(self, originals: torch.Tensor, recons: torch.Tensor) -> None:
        """Add a batch of uint8 (B, 3, H, W) originals and their reconstructions."""
        self._sums["psnr"] += psnr(originals, recons).sum().item()
        self._sums["ssim"] += ssim(originals, recons).sum().item()
        if self.lpips is not None:
            device = next(self.lpips.parameters()).device
            x, y = (to_float(t.to(device)) for t in (originals, recons))
            with torch.autocast(device.type, enabled=False):
                self._sums["lpips"] += self.lpips(x, y).double().sum().item()
        self.n += originals.shape[0]

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no images were added")
        keys = ("psnr", "ssim", "lpips") if self.lpips is not None else ("psnr", "ssim")
        out = {k: self._sums[k] / self.n for k in keys}
        if not math.isfinite(out["psnr"]):
            raise FloatingPointError("non-finite PSNR")
        return out


@torch.no_grad()
def reconstruct(
    vae: AutoencoderKL,
    dataset,
    n: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (originals, reconstructions), uint8 (B, 3, H, W) on the CPU, for the first n items of dataset.

    The VAE decodes the posterior mean (no sampling noise), the reconstruction convention of rFID.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    if n > len(dataset):
        raise ValueError(f"asked for {n} images but the dataset has {len(dataset)}; pass fewer --num-images")
    device = torch.device(device)
    vae = vae.to(device).eval()
    for start in range(0, n, batch_size):
        x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(start, min(start + batch_size, n))])
        z = vae.encode(to_float(x.to(device))).mode()  # (B, C, h, w) posterior mean
        recon = vae.decode(z).float().clamp(-1, 1)  # (B, 3, H, W)
        if not torch.isfinite(recon).all():
            raise FloatingPointError(f"non-finite reconstructions in images {start}..{start + len(x) - 1}")
        yield x.cpu(), to_uint8(recon).cpu()
