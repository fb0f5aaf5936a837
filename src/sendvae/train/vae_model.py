"""The trainable part of Send-VAE training: the VAE plus its alignment head, as one module.

One module so that DDP sees every parameter that receives gradients in one forward:
    x -> VAE encoder -> posterior -> z ~ q(z|x) -> decoder -> x_hat
                                     z -> alignment head -> tokens (B, N, D_teacher)
The alignment head is the chosen variant's (align/): the Send-VAE mapper (patch embed ->
ViT blocks -> MLP projector, with z_t = (1 - t) z + t eps inside), the same mapper with depth 0 and no
noise for the REPA-style direct alignment baseline, VA-VAE's bias-free 1x1 projection, REPA-E's latent
BatchNorm + frozen SiT blocks (the SiT itself is trained beside this module, not in it), or none.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ..models.rae import RAE, RAEPosterior
from ..models.vae import AutoencoderKL, DiagonalGaussian


class SendVAEModel(nn.Module):
    def __init__(
        self,
        vae: AutoencoderKL | RAE,
        head: nn.Module | None,
        sample_posterior: bool = True,
        token_grid: tuple[int, int] | None = None,
    ):
        """``token_grid``: the head's token grid when it may differ from the teacher's (the variant's
        ``Alignment.token_grid(head)``); the trainer resamples the teacher tokens to it."""
        super().__init__()
        self.vae = vae
        self.head = head
        self.sample_posterior = sample_posterior
        self._token_grid = cast(
            "tuple[int, int] | None", tuple(token_grid) if token_grid is not None else None
        )

    def forward(
        self, x: torch.Tensor, cond: Any = None
    ) -> tuple[torch.Tensor, DiagonalGaussian | RAEPosterior, torch.Tensor, torch.Tensor | None]:
        """``cond``: what the head reads beside z this step, drawn by the variant's co-trained model
        (REPA-E: the SiT's t, noise and labels); None for a head that reads z alone."""
        posterior = self.vae.encode(x)
        z = posterior.sample() if self.sample_posterior else posterior.mean  # (B, C, h, w)
        recon = self.vae.decode(z)  # (B, 3, H, W)
        pred = None
        if self.head is not None:
            pred = self.head(z) if cond is None else self.head(z, cond)  # (B, N, D)
        return recon, posterior, z, pred

    @property
    def token_grid(self) -> tuple[int, int] | None:
        return self._token_grid
