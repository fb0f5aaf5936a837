"""Losses: alignment (cosine, VF), LPIPS, adversarial, and the composed VAE objective."""

from .align import cosine_alignment_loss, vf_loss
from .gan import D_LOSSES, G_LOSSES, LeCamEMA, adaptive_gan_weight, d_hinge_loss, g_loss
from .lpips import LPIPS, LPIPSWeightsError, build_lpips

__all__ = [
    "D_LOSSES",
    "G_LOSSES",
    "LPIPS",
    "LPIPSWeightsError",
    "LeCamEMA",
    "adaptive_gan_weight",
    "build_lpips",
    "cosine_alignment_loss",
    "d_hinge_loss",
    "g_loss",
    "vf_loss",
]
