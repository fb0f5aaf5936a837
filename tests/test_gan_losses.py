"""GAN loss terms against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sendvae.losses.gan import (
    D_LOSSES,
    G_LOSSES,
    LeCamEMA,
    adaptive_gan_weight,
    d_hinge_loss,
    d_non_saturating_loss,
    g_loss,
    g_non_saturating_loss,
)

REAL = torch.tensor([2.0, 0.5, -1.0, 0.0])
FAKE = torch.tensor([-2.0, -0.5, 1.0, 0.0])


def test_hinge_discriminator_loss():
    # relu(1 - real) = [0, 0.5, 2, 1] -> mean 0.875; relu(1 + fake) = [0, 0.5, 2, 1] -> mean 0.875
    assert d_hinge_loss(REAL, FAKE).item() == pytest.approx(0.5 * (0.875 + 0.875))
    # Confident and correct: zero loss. At chance (all logits 0): 1.0 with the 0.5 convention.
    assert d_hinge_loss(torch.full((3,), 1.5), torch.full((3,), -1.5)).item() == 0.0
    assert d_hinge_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)).item() == pytest.approx(1.0)


def test_generator_losses():
    assert g_loss(FAKE).item() == pytest.approx(-(-2.0 - 0.5 + 1.0 + 0.0) / 4)
    expected = sum(math.log1p(math.exp(-v)) for v in FAKE.tolist()) / 4
    assert g_non_saturating_loss(FAKE).item() == pytest.approx(expected, rel=1e-6)


def test_non_saturating_discriminator_loss():
    softplus = lambda v: math.log1p(math.exp(v))
    real = sum(softplus(-v) for v in REAL.tolist()) / 4
    fake = sum(softplus(v) for v in FAKE.tolist()) / 4
    assert d_non_saturating_loss(REAL, FAKE).item() == pytest.approx(0.5 * (real + fake), rel=1e-6)
    # Equals binary cross-entropy with targets 1 (real) and 0 (fake).
    bce = nn.functional.binary_cross_entropy_with_logits
    ref = 0.5 * (bce(REAL, torch.ones(4)) + bce(FAKE, torch.zeros(4)))
    assert d_non_saturating_loss(REAL, FAKE).item() == pytest.approx(ref.item(), rel=1e-6)


def test_losses_are_fp32_for_bf16_logits_and_registries():
    assert d_hinge_loss(REAL.bfloat16(), FAKE.bfloat16()).dtype == torch.float32
    assert g_loss(FAKE.bfloat16()).dtype == torch.float32
    assert set(D_LOSSES) == set(G_LOSSES) == {"hinge", "non_saturating"}
    assert D_LOSSES["hinge"] is d_hinge_loss and G_LOSSES["hinge"] is g_loss


def test_lecam_ema_update_and_regulariser():
    lecam = LeCamEMA(decay=0.9)
    real1, fake1 = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -3.0])
    lecam.update(real1, fake1)  # first update copies the batch means
    assert lecam.ema_real.item() == pytest.approx(2.0) and lecam.ema_fake.item() == pytest.approx(-2.0)
    real2, fake2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    reg = lecam(real2, fake2)  # updates first: ema_real = 0.9 * 2 + 0.1 * 0, ema_fake = 0.9 * -2 + 0.1 * 1
    assert lecam.ema_real.item() == pytest.approx(1.8) and lecam.ema_fake.item() == pytest.approx(-1.7)
    assert lecam.num_updates.item() == 2
    # mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2) = 1.7^2 + 0.8^2
    assert reg.item() == pytest.approx(1.7**2 + 0.8**2, rel=1e-6)
    # update=False leaves the EMAs alone; the relu cuts logits on the right side of the EMAs.
    reg = lecam(torch.tensor([-5.0]), torch.tensor([5.0]), update=False)
    assert lecam.ema_real.item() == pytest.approx(1.8) and reg.item() == 0.0


def test_lecam_gradient_and_checkpoint():
    lecam = LeCamEMA()
    real = torch.tensor([0.5, 1.5], requires_grad=True)
    fake = torch.tensor([-0.5, 0.5], requires_grad=True)
    lecam(real, fake).backward()
    assert real.grad.abs().sum() > 0 and fake.grad.abs().sum() > 0
    restored = LeCamEMA()
    restored.load_state_dict(lecam.state_dict())
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake", "num_updates"}
    assert restored.ema_real.item() == lecam.ema_real.item() == pytest.approx(1.0)
    assert restored.num_updates.item() == 1
    with pytest.raises(ValueError, match="decay"):
        LeCamEMA(decay=1.0)


def test_adaptive_gan_weight_matches_manual_autograd():
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 3, padding=1))
    last = decoder[2].weight
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    nll_fn = lambda out: (out - x).abs().mean()
    gen_fn = lambda out: -(out * target).mean()
    out = decoder(x)
    nll, gen = nll_fn(out), gen_fn(out)
    weight = adaptive_gan_weight(nll, gen, last)
    assert not weight.requires_grad and weight.dtype == torch.float32
    assert last.grad is None  # nothing written to .grad; the graph is still usable for the real backward
    (nll + weight * gen).backward()
    # Manual: each loss's gradient at the last layer from its own forward and backward pass.
    grads = []
    for loss_fn in (nll_fn, gen_fn):
        decoder.zero_grad(set_to_none=True)
        loss_fn(decoder(x)).backward()
        grads.append(last.grad.clone())
    expected = grads[0].norm() / (grads[1].norm() + 1e-4)
    assert 1e-3 < expected.item() < 1e3
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5)


def test_adaptive_gan_weight_clamped():
    w = torch.ones(3, requires_grad=True)
    nll = (w * 10.0).sum()
    gen = (w * 0.0).sum()  # zero GAN gradient: 30 / 1e-4 = 3e5 before clamping
    assert adaptive_gan_weight(nll, gen, w).item() == pytest.approx(1e4)
    assert adaptive_gan_weight(nll, gen, w, max_weight=50.0).item() == pytest.approx(50.0)
    assert adaptive_gan_weight(gen, nll, w).item() == 0.0
