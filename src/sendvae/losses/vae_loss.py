"""The VAE objective of Send-VAE training, term by term (Send-VAE, Sec. 3: L_VAE + lambda L_align).

Generator (VAE + mapper):
    L = w_rec * |x - x_hat|_1 (mean)  +  w_lpips * LPIPS(x, x_hat)  +  w_kl * KL  +  w_gan * g(D(x_hat))
        + lambda_align * L_align
  with KL summed over latent elements and averaged over the batch (the LDM / REPA-E convention that
  makes 1e-6 the right weight), g = -mean(logits) (hinge generator loss), and the adversarial term
  active only from ``gan_start``.
Discriminator: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) (+ LeCam); non-saturating optional.
All losses are reduced in fp32 even when the networks ran under bf16 autocast.
L_align is the chosen alignment variant's (align/): the objective calls its ``compute`` on the head's
tokens and the teacher's and applies lambda_align (times the adaptive weight when the variant asks for it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .cosine import LossAndLogs
from .gan import D_LOSSES, G_LOSSES, LeCamEMA, adaptive_gan_weight


class AlignmentTerm(Protocol):
    """The objective's view of an alignment variant (an entry of ``align.ALIGNMENTS``)."""

    @property
    def loss(self) -> object | None: ...  # None: the variant adds no alignment term

    def compute(self, pred: torch.Tensor, target: torch.Tensor, cfg: Any) -> LossAndLogs: ...  # L_align, logs

    @property
    def adaptive(self) -> Callable[[Any], bool]: ...  # scale lambda_align at the encoder's last conv


class VAELoss(nn.Module):
    def __init__(
        self, cfg, lpips: nn.Module | None, disc: nn.Module | None, alignment: AlignmentTerm | None = None
    ):
        """``alignment``: the variant whose L_align joins the objective; None (or a variant without a loss)
        adds no alignment term."""
        super().__init__()
        self.cfg = cfg
        self.alignment = alignment if alignment is not None and alignment.loss is not None else None
        # Held outside the module tree (a plain dict): their weights belong to their own checkpoints
        # entries, not to this loss's state (which is only the LeCam EMA). The discriminator is the raw
        # module, not DDP: the generator step needs no gradient sync for it.
        self._nets = {"lpips": lpips, "disc": disc}
        self.lecam = LeCamEMA() if cfg.lecam_weight > 0 else None

    @property
    def lpips(self) -> nn.Module | None:
        return self._nets["lpips"]

    @property
    def disc(self) -> nn.Module | None:
        return self._nets["disc"]

    # -----------------------------------------------------------------------------------------------------
    def generator(
        self,
        x,
        recon,
        posterior,
        pred,
        target,
        gan_on: bool,
        dec_last: torch.Tensor | None,
        enc_last: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        xf, rf = x.float(), recon.float()
        rec = F.l1_loss(rf, xf) if c.recon == "l1" else F.mse_loss(rf, xf)
        terms: dict[str, torch.Tensor] = {"rec": rec.detach()}
        nll = c.recon_weight * rec
        if self.lpips is not None and c.lpips_weight > 0:
            lp = self.lpips(recon, x).float().mean()
            nll = nll + c.lpips_weight * lp
            terms["lpips"] = lp.detach()
        kl = posterior.kl().float().mean()
        terms["kl"] = kl.detach()
        total = nll + c.kl_weight * kl

        if self.alignment is not None and pred is not None and target is not None:
            align, parts = self.alignment.compute(pred, target, c)  # __init__ kept a variant with a loss
            weight = c.align_weight
            if self.alignment.adaptive(c) and enc_last is not None and torch.is_grad_enabled():
                weight = weight * adaptive_gan_weight(nll, align, enc_last)
            terms.update({k: v.detach() for k, v in parts.items()})
            total = total + weight * align
            terms["align"] = align.detach()

        if gan_on and self.disc is not None and c.gan_weight > 0:
            logits_fake = self.disc(recon)
            g = G_LOSSES[c.disc_loss](logits_fake.float())
            weight = c.gan_weight
            if c.gan_adaptive and dec_last is not None and torch.is_grad_enabled():
                weight = weight * adaptive_gan_weight(nll, g, dec_last)
            total = total + weight * g
            terms["g"] = g.detach()
        terms["loss"] = total.detach()
        return total, terms

    # -----------------------------------------------------------------------------------------------------
    def discriminator(self, disc: nn.Module, x, recon) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``disc`` may be the DDP wrapper (its gradients are synced here)."""
        logits_real = disc(x.detach()).float()
        logits_fake = disc(recon.detach()).float()
        d = D_LOSSES[self.cfg.disc_loss](logits_real, logits_fake)
        terms = {
            "d": d.detach(),
            "logit_real": logits_real.detach().mean(),
            "logit_fake": logits_fake.detach().mean(),
        }
        if self.lecam is not None:
            reg = self.lecam(logits_real, logits_fake)
            d = d + self.cfg.lecam_weight * reg
            terms["lecam"] = reg.detach()
        return d, terms
