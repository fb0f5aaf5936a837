"""Losses: the token cosine, LPIPS, adversarial, and the composed VAE objective (the alignment variants' own
losses are in align/)."""

from .cosine import cosine_alignment_loss, mean_token_cosine
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
    "mean_token_cosine",
]
