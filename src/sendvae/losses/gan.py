"""Adversarial loss terms for VAE training (PatchGAN discriminator, taming/LDM conventions).

Convention: the hinge discriminator loss carries taming's factor 0.5,
    L_D = 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))),
so that discriminator learning rates, logged loss values and the loss at chance (1.0 for logits at 0)
are those of LDM / REPA-E / Send-VAE, whose training code this follows. The generator term is
    L_G = -mean(D(x_hat)),
scaled in the VAE loss by adaptive_gan_weight(...) * disc_weight, from step ``gan_start`` on.

All reductions run in fp32 so bf16 logits from an autocast discriminator give fp32 losses.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))); scalar."""
    loss_real = F.relu(1.0 - logits_real.float()).mean()
    loss_fake = F.relu(1.0 + logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def d_non_saturating_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Logistic (BCE) discriminator loss, 0.5 * (mean(softplus(-real)) + mean(softplus(fake))); scalar."""
    loss_real = F.softplus(-logits_real.float()).mean()
    loss_fake = F.softplus(logits_fake.float()).mean()
    return 0.5 * (loss_real + loss_fake)


def g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss paired with the hinge discriminator: -mean(D(x_hat)); scalar."""
    return -logits_fake.float().mean()


def g_non_saturating_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss, mean(softplus(-D(x_hat))) = -mean(log sigmoid(D(x_hat))); scalar."""
    return F.softplus(-logits_fake.float()).mean()


# Registries: name -> loss function; a config's gan_loss field picks one pair.
D_LOSSES = {"hinge": d_hinge_loss, "non_saturating": d_non_saturating_loss}
G_LOSSES = {"hinge": g_loss, "non_saturating": g_non_saturating_loss}


class LeCamEMA(nn.Module):
    """LeCam regulariser (Yu et al. 2021, "Regularizing GANs under limited data").

    Keeps EMAs of the mean real and fake discriminator logits and penalises logits that cross them:
        R = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x_hat))^2).
    The EMAs are buffers, so they are saved and restored with the module's state dict. The first update
    copies the batch means (the reference code runs with decay 0 before its start step). Each process
    keeps its own EMAs of its local batch; under DDP they differ only by batch noise.
    """

    ema_real: torch.Tensor
    ema_fake: torch.Tensor
    num_updates: torch.Tensor

    def __init__(self, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCam EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """ema <- decay * ema + (1 - decay) * batch mean (plain copy on the first update)."""
        # weight 1 on the first update, 1 - decay after; a device tensor (no host read of num_updates)
        w = torch.where(self.num_updates > 0, 1.0 - self.decay, 1.0).to(self.ema_real.dtype)
        self.ema_real.lerp_(logits_real.detach().float().mean(), w)
        self.ema_fake.lerp_(logits_fake.detach().float().mean(), w)
        self.num_updates += 1

    def forward(
        self, logits_real: torch.Tensor, logits_fake: torch.Tensor, update: bool = True
    ) -> torch.Tensor:
        """Update the EMAs with this batch (unless update=False), then return R; scalar, fp32."""
        if update:
            self.update(logits_real, logits_fake)
        reg_real = F.relu(logits_real.float() - self.ema_fake).square().mean()
        reg_fake = F.relu(self.ema_real - logits_fake.float()).square().mean()
        return reg_real + reg_fake

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


def adaptive_gan_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the decoder's last layer (taming).

    w = ||d nll / d W|| / (||d g / d W|| + 1e-4), clamped to [0, max_weight] and detached; scalar fp32.
    Uses torch.autograd.grad with retain_graph=True, so the graph stays usable for the real backward
    and no .grad is written (DDP's gradient hooks do not fire).
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = torch.linalg.vector_norm(nll_grad.float()) / (torch.linalg.vector_norm(g_grad.float()) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
