"""Alignment losses: the Send-VAE/REPA token cosine and VA-VAE's VF loss, against naive float64 code."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sendvae.align.vf import vf_loss
from sendvae.losses.cosine import cosine_alignment_loss


def _cos64(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _naive_cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> float:
    b, n, _ = pred.shape
    p, t = pred.double().tolist(), target.double().tolist()
    return 1.0 - sum(_cos64(p[i][j], t[i][j]) for i in range(b) for j in range(n)) / (b * n)


def _naive_vf(z: torch.Tensor, f: torch.Tensor, m_c: float, m_d: float) -> tuple[float, float]:
    b, n, _ = z.shape
    zs, fs = z.double().tolist(), f.double().tolist()
    l_cos = sum(max(0.0, 1 - m_c - _cos64(fs[i][j], zs[i][j])) for i in range(b) for j in range(n)) / (b * n)
    l_dist = 0.0
    for i, j, k in itertools.product(range(b), range(n), range(n)):
        diff = abs(_cos64(zs[i][j], zs[i][k]) - _cos64(fs[i][j], fs[i][k]))
        l_dist += max(0.0, diff - m_d)
    return l_cos, l_dist / (b * n * n)


def test_cosine_matches_float64():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 7, 48), torch.randn(3, 7, 48) + 0.5 * torch.randn(1, 1, 48)
    loss, mean_cos = cosine_alignment_loss(pred, target)
    expected = _naive_cosine_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item() - expected) / abs(expected) < 1e-6
    assert mean_cos.item() == pytest.approx(1 - expected, abs=1e-6) and not mean_cos.requires_grad


def test_cosine_limits():
    x = torch.randn(2, 5, 16)
    assert cosine_alignment_loss(x, x)[0].abs().item() < 1e-6
    assert cosine_alignment_loss(3.0 * x, x)[0].abs().item() < 1e-6  # scale-invariant
    assert cosine_alignment_loss(-x, x)[0].item() == pytest.approx(2.0, abs=1e-6)


def test_cosine_zero_vectors_are_safe():
    pred = torch.randn(2, 4, 8)
    pred[0, 1] = 0.0
    pred.requires_grad_()
    target = torch.randn(2, 4, 8)
    loss, _ = cosine_alignment_loss(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    # The zero token contributes cos = 0.
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 1] = False
    cos = torch.nn.functional.cosine_similarity(pred.detach(), target, dim=-1)
    assert loss.item() == pytest.approx(1 - (cos * keep).sum().item() / 8, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cosine_low_precision_inputs(dtype):
    torch.manual_seed(0)
    # Norms near 500: the squared norm (2.5e5) overflows fp16 arithmetic, but not our fp32 path.
    pred, target = (20 * torch.randn(2, 6, 640)).to(dtype), (20 * torch.randn(2, 6, 640)).to(dtype)
    assert torch.isinf((pred * pred).sum(-1)).any() == (dtype == torch.float16)
    loss, mean_cos = cosine_alignment_loss(pred, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(mean_cos)
    ref, _ = cosine_alignment_loss(pred.float(), target.float())
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_cosine_is_fp32_under_autocast():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = cosine_alignment_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.item() == cosine_alignment_loss(pred, target)[0].item()


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="resample"):
        cosine_alignment_loss(torch.randn(2, 225, 8), torch.randn(2, 256, 8))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        vf_loss(torch.randn(2, 8), torch.randn(2, 8))


def test_target_gets_no_gradient():
    pred, target = torch.randn(1, 3, 4, requires_grad=True), torch.randn(1, 3, 4, requires_grad=True)
    cosine_alignment_loss(pred, target)[0].backward()
    assert pred.grad is not None and target.grad is None


@pytest.mark.parametrize("m_c, m_d", [(0.5, 0.25), (0.0, 0.0), (0.9, 0.1)])
def test_vf_matches_naive_loop(m_c, m_d):
    torch.manual_seed(1)
    z, f = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    f[:, :3] += 2 * z[:, :3]  # some tokens partly aligned, so both relu branches occur
    loss, parts = vf_loss(z, f, margin_cos=m_c, margin_dist=m_d)
    l_cos, l_dist = _naive_vf(z, f, m_c, m_d)
    assert l_cos > 0 and l_dist > 0
    assert parts["vf_cos"].item() == pytest.approx(l_cos, rel=1e-5, abs=1e-7)
    assert parts["vf_dist"].item() == pytest.approx(l_dist, rel=1e-5, abs=1e-7)
    assert loss.item() == pytest.approx(l_cos + l_dist, rel=1e-5)
    weighted, _ = vf_loss(z, f, margin_cos=m_c, margin_dist=m_d, weight_cos=0.3, weight_dist=2.0)
    assert weighted.item() == pytest.approx(0.3 * l_cos + 2.0 * l_dist, rel=1e-5)


def test_vf_zero_when_aligned_and_pairs_stay_within_images():
    torch.manual_seed(0)
    f = torch.randn(3, 8, 16)
    loss, _ = vf_loss(2.0 * f, f)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # Permuting images in the batch together changes nothing: no cross-image pairs.
    z = torch.randn(3, 8, 16)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(vf_loss(z, f)[0], vf_loss(z[perm], f[perm])[0])


def test_vf_gradient_and_autocast():
    torch.manual_seed(0)
    z, f = torch.randn(2, 16, 24, requires_grad=True), torch.randn(2, 16, 24)
    loss, parts = vf_loss(z, f)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ac, _ = vf_loss(z, f)
    assert loss_ac.dtype == torch.float32 and loss_ac.item() == loss.item()  # Gram matrices stay fp32
    assert set(parts) == {"vf_cos", "vf_dist", "mean_cos"}
