"""Frechet distance, feature statistics, Inception Score and precision/recall against independent math."""

import numpy as np
import pytest
import torch
from scipy import linalg

import sendvae.metrics.frechet as frechet
from sendvae.metrics.frechet import (
    StatsAccumulator,
    feature_statistics,
    frechet_distance,
    inception_score,
    is_split_sizes,
    knn_radii,
    precision_recall,
)


def _reference_fd(mu1, s1, mu2, s2):
    """FD with Tr (S1 S2)^{1/2} = Tr (S1^{1/2} S2 S1^{1/2})^{1/2}, via symmetric eigendecompositions."""
    w, v = linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr = np.sqrt(np.clip(linalg.eigh(m, eigvals_only=True), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


@pytest.fixture
def two_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.5
    return a, b


def test_frechet_matches_independent_float64(two_sets):
    a, b = two_sets
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    got = frechet_distance(mu1, s1, mu2, s2)
    want = _reference_fd(mu1, s1, mu2, s2)
    assert want > 1.0
    assert abs(got - want) / want < 1e-6
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    # torch inputs are accepted and give the same number
    t = [torch.from_numpy(x) for x in (mu1, s1, mu2, s2)]
    assert frechet_distance(*t) == pytest.approx(got, rel=1e-12)


def test_frechet_sqrtm_fallback_and_imaginary_error(two_sets, monkeypatch):
    a, b = two_sets
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    want = _reference_fd(*stats)
    real_sqrtm = linalg.sqrtm
    calls = []

    def flaky_sqrtm(m):  # the first call fails as with some BLAS builds
        calls.append(1)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(frechet.linalg, "sqrtm", flaky_sqrtm)
    assert frechet_distance(*stats) == pytest.approx(want, rel=1e-4)
    assert len(calls) == 2

    monkeypatch.setattr(frechet.linalg, "sqrtm", lambda m: real_sqrtm(m) + 1j * np.eye(len(m)))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(*stats)


def test_frechet_bad_inputs():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, s, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        frechet_distance(mu, s, mu, np.eye(5))
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(mu, s, mu, bad)


def test_statistics_independent_of_batch_size():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(500, 24)) * 3 + 100  # a large mean, where naive sums lose digits
    mu_ref, sigma_ref = feats.mean(0), np.cov(feats, rowvar=False)
    for bs in (7, 64, 500):
        acc = StatsAccumulator()
        for i in range(0, len(feats), bs):
            acc.update(torch.from_numpy(feats[i : i + bs]))
        mu, sigma = acc.finalize()
        assert mu.dtype == sigma.dtype == np.float64
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-10)
    mu, sigma = feature_statistics(feats.astype(np.float32))
    np.testing.assert_allclose(
        sigma, np.cov(feats.astype(np.float32).astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-10
    )


def test_statistics_bad_inputs():
    acc = StatsAccumulator()
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        acc.update(np.zeros(5))
    acc.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        acc.finalize()
    with pytest.raises(ValueError, match="width changed"):
        acc.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 3), np.nan))


def _adm_inception_score(probs, split_size):
    """ADM evaluator's compute_inception_score, written out in numpy: consecutive parts of split_size."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_inception_score_hand_computed():
    # split 1: two confident, different classes -> p(y) uniform, KL = log 2 each -> IS 2
    # split 2: two uniform predictions -> KL 0 -> IS 1; mean 1.5
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    assert inception_score(probs, splits=2, from_logits=False) == pytest.approx(1.5, abs=1e-12)
    assert inception_score(probs, split_size=2, from_logits=False) == pytest.approx(1.5, abs=1e-12)
    # one split of 3 one-hot samples over 3 classes: IS = number of classes
    assert inception_score(np.eye(3) * 50) == pytest.approx(3.0, rel=1e-9)


def test_inception_score_of_confident_predictions_is_finite():
    # logits ~ 215 wide (a random-weight network): p(y|x) has subnormal entries whose mean over x
    # rounds to 0, so log mean p would be -inf; four distinct one-hot predictions give IS = 4
    logits = np.random.default_rng(0).normal(size=(4, 1008)) * 215
    assert inception_score(logits) == pytest.approx(4.0, rel=1e-9)


def test_inception_score_matches_adm_formula():
    logits = np.random.default_rng(2).normal(size=(40, 10)) * 2
    probs = _softmax(logits)
    want = _adm_inception_score(probs, split_size=10)
    assert inception_score(torch.from_numpy(logits).float(), split_size=10) == pytest.approx(want, rel=1e-5)
    assert inception_score(probs, split_size=10, from_logits=False) == pytest.approx(want, rel=1e-10)
    assert inception_score(probs, splits=4, from_logits=False) == pytest.approx(want, rel=1e-10)  # 4 x 10


def test_inception_score_adm_splits_with_a_short_last_split():
    """12000 samples: ADM's split_size=5000 gives parts 5000, 5000, 2000, the default here; ten equal
    parts of 1200 (the other definition) give a different score. Reference: ADM's algorithm in numpy,
    float64, so the tolerance is float64 rounding (rel 1e-10)."""
    logits = (np.random.default_rng(5).normal(size=(12000, 1008)) * 4).astype(np.float32)
    probs = _softmax(logits.astype(np.float64))
    assert is_split_sizes(12000) == [5000, 5000, 2000]
    got = inception_score(logits)
    assert got == pytest.approx(_adm_inception_score(probs, 5000), rel=1e-10)  # 92.269
    # ADM itself runs in float32 (TF softmax, numpy logs of float32): within 1e-5 of float64
    assert got == pytest.approx(_adm_inception_score(_softmax(logits), 5000), rel=1e-5)

    assert is_split_sizes(12000, splits=10) == [1200] * 10
    equal = inception_score(logits, splits=10)
    parts = np.array_split(probs, 10)
    assert equal == pytest.approx(np.mean([_adm_inception_score(q, len(q)) for q in parts]), rel=1e-10)
    assert got - equal > 5  # 92.27 vs 86.84: smaller parts see a less uniform marginal p(y)
    # at 50k the two definitions cut the same ten parts
    assert is_split_sizes(50_000) == is_split_sizes(50_000, splits=10) == [5000] * 10
    assert is_split_sizes(7, split_size=3) == [3, 3, 1] and is_split_sizes(7, splits=3) == [3, 2, 2]


def test_inception_score_bad_inputs():
    with pytest.raises(ValueError, match="at least `splits` samples"):
        inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(ValueError, match="not both"):
        inception_score(np.zeros((5, 3)), split_size=2, splits=2)
    with pytest.raises(ValueError, match="split_size must be >= 1"):
        inception_score(np.zeros((5, 3)), split_size=0)
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.full((4, 2), 0.3), splits=2, from_logits=False)
    with pytest.raises(ValueError, match=r"\(N, classes\)"):
        inception_score(np.zeros(8), splits=2)


def test_precision_recall_hand_computed():
    # 1-D, k = 1. real {0, 1, 2, 10}: squared radii 1, 1, 1, 64. fake {0.5, 5, 20, 100}: radii
    # 20.25, 20.25, 225, 6400. Fake in a real ball: 0.5 (of 0), 5 (of 10: 25 <= 64) -> precision 1/2.
    # Real in a fake ball: 0, 1, 2 (of 0.5), 10 (of 20: 100 <= 225) -> recall 1.
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    fake = np.array([[0.5], [5.0], [20.0], [100.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # swapping the sets swaps the roles: real {0.5, 5, 20, 100} covers fake 0, 1, 2, 10 -> 1; fake balls
    # hold 0.5 and 5 only -> 1/2
    assert precision_recall(fake, real, k=1) == (1.0, 0.5)


def _brute_force_pr(real, fake, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((real[:, None] - fake[None]) ** 2).sum(-1)  # (R, F)
    precision = (d <= radii(real)[:, None]).any(0).mean()
    recall = (d <= radii(fake)[None]).any(1).mean()
    return precision, recall


def test_precision_recall_chunked_matches_brute_force():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 8)).astype(np.float32)
    fake = (rng.normal(size=(45, 8)) * 0.7 + 0.8).astype(np.float32)
    want = _brute_force_pr(real.astype(np.float64), fake.astype(np.float64), k=3)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    for chunk, block in ((7, 20), (1024, 10000)):
        real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)
        got = precision_recall(real_t, fake_t, k=3, chunk=chunk, block=block, distance_dtype="float32")
        assert got == pytest.approx(want, abs=1e-12)


# -- ADM's float16 distances ---------------------------------------------------------------------------------


def _adm_distances(u, v):
    """ADM's DistanceBlock on one block, from its TF graph, in numpy: the features cast to float16,
    norm = reduce_sum(square(x)), D = max(norm_u - 2 u v^T + norm_v, 0), each op rounded to float16
    (reductions accumulated in float32); when any of the block's D is not finite, the float32 graph."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        nu = np.square(u16).astype(np.float32).sum(1).astype(np.float16)
        nv = np.square(v16).astype(np.float32).sum(1).astype(np.float16)
        uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        d = np.maximum(nu[:, None] - np.float16(2) * uv + nv[None], np.float16(0))
    if np.isfinite(d).all():
        return d.astype(np.float32)
    d = np.square(u).sum(1)[:, None] - 2 * (u @ v.T) + np.square(v).sum(1)[None]
    return np.maximum(d, 0).astype(np.float32)


def _adm_radii(x, k, block):
    """ManifoldEstimator.manifold_radii: the (k + 1)-th smallest of each row's distances (self included)."""
    radii = np.zeros(len(x), np.float32)
    for r in range(0, len(x), block):
        row = np.concatenate(
            [_adm_distances(x[r : r + block], x[c : c + block]) for c in range(0, len(x), block)], 1
        )
        radii[r : r + block] = np.partition(row, k, axis=1)[:, k]
    return radii


def _adm_precision_recall(real, fake, k=3, block=10000):
    """ManifoldEstimator.evaluate_pr over block x block distance blocks, real rows by fake columns."""
    r_real, r_fake = _adm_radii(real, k, block), _adm_radii(fake, k, block)
    real_in, fake_in = np.zeros(len(real), bool), np.zeros(len(fake), bool)
    for r in range(0, len(real), block):
        for c in range(0, len(fake), block):
            d = _adm_distances(real[r : r + block], fake[c : c + block])
            real_in[r : r + block] |= (d <= r_fake[None, c : c + block]).any(1)
            fake_in[c : c + block] |= (d <= r_real[r : r + block, None]).any(0)
    return fake_in.mean(), real_in.mean(), r_real


def _pool3_like(n_real, n_fake, seed=0, dim=2048):
    """Non-negative features on a 12-d manifold, squared norms ~460 like Inception pool_3."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(12, dim)) / np.sqrt(12)
    to_feats = lambda z: np.maximum(0.5 * z @ w + 0.2, 0).astype(np.float32)
    return to_feats(rng.normal(size=(n_real, 12))), to_feats(rng.normal(size=(n_fake, 12)) * 0.9 + 0.15)


def test_precision_recall_float16_matches_adm_on_exact_sums():
    """Features on a 1/8 grid below 8: every float32 sum of squares and products is exact in any order,
    so ADM's algorithm has one answer, and ours must give it exactly (no tolerance); the float16
    roundings of norms, products and their combination stay (ulp 0.25-2 at these magnitudes)."""
    real, fake = (np.round(8 * np.minimum(f, 7.8)) / 8 for f in _pool3_like(700, 500, seed=1))
    want_p, want_r, want_radii = _adm_precision_recall(real, fake)
    assert 0.1 < want_p < 0.99 and 0.1 < want_r < 0.99
    real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)
    for chunk in (1024, 97):
        assert precision_recall(real_t, fake_t, chunk=chunk) == (want_p, want_r)
        assert torch.equal(knn_radii(real_t, chunk=chunk), torch.from_numpy(want_radii))
    # float32 throughout is another answer: the radii differ, the float32 reference is matched exactly
    r32 = knn_radii(real_t, distance_dtype="float32")
    assert (r32 != torch.from_numpy(want_radii)).float().mean() > 0.5
    d32 = np.square(real).sum(1)[:, None] - 2 * (real @ real.T) + np.square(real).sum(1)[None]
    assert torch.equal(r32, torch.from_numpy(np.partition(np.maximum(d32, 0), 3, axis=1)[:, 3]))


def test_precision_recall_float16_falls_back_per_block():
    """Rows scaled by 16 overflow float16 (|x|^2 ~ 1e5 > 65504): as ADM, only the blocks holding them
    are computed in float32. Block 100 here instead of 10000; exact sums as above, so no tolerance."""
    real, fake = (np.round(8 * np.minimum(f, 7.8)) / 8 for f in _pool3_like(300, 250, seed=2))
    real[:40] *= 16
    fake[230:] *= 16
    want_p, want_r, want_radii = _adm_precision_recall(real, fake, block=100)
    real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)
    assert precision_recall(real_t, fake_t, chunk=64, block=100) == (want_p, want_r)
    radii = knn_radii(real_t, chunk=64, block=100)
    assert torch.equal(radii, torch.from_numpy(want_radii))
    r32 = knn_radii(real_t, distance_dtype="float32")
    assert torch.equal(radii[:100], r32[:100])  # every block of rows 0-99 overflowed: float32
    assert not torch.equal(radii[100:], r32[100:])  # the other rows also saw float16 blocks


def test_precision_recall_float16_matches_adm_on_pool3_like_features():
    """Continuous features, 2048-d. The float32 accumulation order of u.v differs between BLAS builds,
    and ~1e-4 of the products round to the neighbouring float16 value, which moves a distance by up to
    2 ulp(float16(u.v)). Tolerances: 99% of radii identical, every radius within 4 ulp of float16 at the
    largest squared norm, precision and recall within one sample (1/N)."""
    real, fake = _pool3_like(1000, 800, seed=0)
    want_p, want_r, want_radii = _adm_precision_recall(real, fake)
    real_t, fake_t = torch.from_numpy(real), torch.from_numpy(fake)
    p16, r16 = precision_recall(real_t, fake_t)
    assert abs(p16 - want_p) <= 1 / len(fake) and abs(r16 - want_r) <= 1 / len(real)
    radii = knn_radii(real_t).numpy()
    assert (radii == want_radii).mean() >= 0.99
    norms = np.square(real.astype(np.float16).astype(np.float32)).sum(1)
    assert np.abs(radii - want_radii).max() <= 4 * np.spacing(np.float16(norms.max()))
    # the float16 / float32 difference is larger than the tolerance: the test can tell them apart
    r32 = knn_radii(real_t, distance_dtype="float32").numpy()
    assert (r32 == want_radii).mean() < 0.5


def test_precision_recall_bad_inputs():
    with pytest.raises(ValueError, match="same D"):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.random.rand(3, 2), np.random.rand(5, 2), k=3)
    with pytest.raises(ValueError, match="distance_dtype"):
        precision_recall(np.random.rand(5, 2), np.random.rand(5, 2), distance_dtype="bfloat16")
