"""ADM reference batches and evaluate_samples end to end with a random-weight FID Inception."""

import numpy as np
import pytest
import torch

import sendvae.metrics.adm as adm
from sendvae.metrics import (
    FIDInceptionV3,
    ReferenceBatchError,
    compute_reference,
    evaluate_samples,
    feature_statistics,
    inception_score,
    load_batch,
    precision_recall,
    save_batch,
)
from tests.test_inception import _random_state_dict


@pytest.fixture(scope="module")
def net():
    model = FIDInceptionV3()
    model.load_state_dict(_random_state_dict(seed=3))
    return model.eval().requires_grad_(False)


def _images(n, seed, size=64, lo=0, hi=256):
    return np.random.default_rng(seed).integers(lo, hi, size=(n, size, size, 3), dtype=np.uint8)


def _cheap_fd(calls):
    """Stand-in for frechet_distance that records its statistics: a 2048^2 sqrtm takes ~10 s on one
    core, and frechet_distance itself is checked against an independent computation in test_frechet."""

    def fd(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2))

    return fd


def _assert_stats_close(got, want):
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_evaluate_samples_end_to_end(net, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(adm, "frechet_distance", _cheap_fd(calls))
    ref_imgs, sample_imgs = _images(6, 0), _images(6, 1, lo=60, hi=200)
    np.savez(tmp_path / "ref.npz", arr_0=ref_imgs)
    np.savez(tmp_path / "samples.npz", arr_0=sample_imgs, arr_1=np.arange(6))
    got = evaluate_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", net, batch_size=4, is_splits=2)

    # the same numbers from the network's outputs and the metric functions, computed directly
    with torch.no_grad():
        out = net(torch.from_numpy(np.concatenate([ref_imgs, sample_imgs])))
    assert out["spatial"].shape == (12, 2023)  # sFID features: 17 x 17 x 7
    pool_r, pool_s = out["pool"][:6], out["pool"][6:]
    # FID: samples' pool_3 statistics first, then the reference's; sFID: the same for the spatial features
    _assert_stats_close(calls[0], (*feature_statistics(pool_s), *feature_statistics(pool_r)))
    sp_r, sp_s = out["spatial"][:6], out["spatial"][6:]
    _assert_stats_close(calls[1], (*feature_statistics(sp_s), *feature_statistics(sp_r)))
    assert got["n"] == 6
    assert got["fid"] == pytest.approx(_cheap_fd([])(*calls[0]))
    assert got["sfid"] == pytest.approx(_cheap_fd([])(*calls[1]))
    assert got["inception_score"] == pytest.approx(inception_score(out["logits"][6:], splits=2), rel=1e-5)
    assert got["is_splits"] == "2 equal splits of 3 samples" and got["is_split_sizes"] == [3, 3]
    assert (got["precision"], got["recall"]) == pytest.approx(precision_recall(pool_r, pool_s, k=3))
    assert got["pr_distance_dtype"] == "float16"  # ADM's default

    # --make-ref output: images plus float64 statistics; evaluating against it gives the same numbers
    ref = compute_reference(ref_imgs, net, batch_size=5)
    assert ref["mu"].shape == (2048,) and ref["sigma_s"].shape == (2023, 2023)
    assert ref["mu"].dtype == np.float64
    save_batch(tmp_path / "ref_full.npz", ref)
    assert sorted(load_batch(tmp_path / "ref_full.npz")) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    stats_only = {k: v for k, v in ref.items() if k != "arr_0"}
    save_batch(tmp_path / "ref_stats.npz", stats_only)
    got2 = evaluate_samples(
        tmp_path / "samples.npz", tmp_path / "ref_stats.npz", net, batch_size=6, is_split_size=4
    )
    _assert_stats_close(calls[2], calls[0])  # the stored reference statistics are the ones used
    _assert_stats_close(calls[3], calls[1])
    assert got2["fid"] == pytest.approx(got["fid"], rel=1e-5)
    assert got2["precision"] is None and got2["recall"] is None  # no reference images
    assert got2["pr_distance_dtype"] is None
    # ADM's consecutive splits: 6 samples in parts of 4 -> 4 and 2
    assert (
        got2["is_split_sizes"] == [4, 2]
        and got2["is_splits"] == "split_size=4 as ADM: 2 splits of 4, the last of 2"
    )
    assert got2["inception_score"] == pytest.approx(
        inception_score(out["logits"][6:], split_size=4), rel=1e-5
    )


def test_evaluate_samples_defaults_and_float32_distances(net, tmp_path, monkeypatch):
    monkeypatch.setattr(adm, "frechet_distance", _cheap_fd([]))
    np.savez(tmp_path / "ref.npz", arr_0=_images(5, 0))
    np.savez(tmp_path / "samples.npz", arr_0=_images(5, 1, lo=60, hi=200))
    got = evaluate_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", net, pr_distance_dtype="float32")
    with torch.no_grad():
        out = net(torch.from_numpy(np.concatenate([_images(5, 0), _images(5, 1, lo=60, hi=200)])))
    assert got["is_splits"] == "split_size=5000 as ADM: one split of 5 samples"  # the default
    assert got["inception_score"] == pytest.approx(inception_score(out["logits"][5:], splits=1), rel=1e-5)
    want = precision_recall(out["pool"][:5], out["pool"][5:], k=3, distance_dtype="float32")
    assert got["pr_distance_dtype"] == "float32" and (got["precision"], got["recall"]) == pytest.approx(want)
    with pytest.raises(ValueError, match="pr_distance_dtype"):
        evaluate_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", net, pr_distance_dtype="bf16")
    with pytest.raises(ValueError, match="not both"):
        evaluate_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", net, is_split_size=2, is_splits=2)


def _stats():
    return {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"arr_1": np.zeros(3)}, "needs images"),
        ({"mu": np.zeros(2048), "sigma": np.eye(2048)}, "needs images"),
        ({"arr_0": np.zeros((2, 8, 8, 3), dtype=np.float32)}, "uint8"),
        ({"arr_0": np.zeros((2, 8, 8, 4), dtype=np.uint8)}, r"\(N, H, W, 3\)"),
        ({"arr_0": np.zeros((8, 8, 3), dtype=np.uint8)}, r"\(N, H, W, 3\)"),
        ({**_stats(), "sigma": np.full((2048, 2048), np.nan)}, "sigma contains NaN"),
        ({**_stats(), "mu_s": np.zeros(2048)}, r"mu_s must be \(2023,\)"),
        ({k: v for k, v in _stats().items() if k != "sigma_s"}, "mu_s without sigma_s"),
        ({**_stats(), "mu": np.zeros(2048, dtype=np.int64)}, "floating point"),
    ],
)
def test_load_batch_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ReferenceBatchError, match=match):
        load_batch(tmp_path / "bad.npz")


def test_load_missing_file_and_save_validates(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_batch(tmp_path / "nope.npz")
    with pytest.raises(ReferenceBatchError, match="uint8"):
        save_batch(tmp_path / "x.npz", {"arr_0": np.zeros((1, 8, 8, 3))})
    assert not (tmp_path / "x.npz").exists()


def test_evaluate_rejects_mismatched_batches(net, tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=_images(4, 0, size=32))
    np.savez(tmp_path / "samples.npz", arr_0=_images(4, 1, size=48))
    with pytest.raises(ReferenceBatchError, match="differ in size"):
        evaluate_samples(tmp_path / "samples.npz", tmp_path / "ref.npz", net)
    np.savez(tmp_path / "stats.npz", **_stats())
    with pytest.raises(ReferenceBatchError, match="no sample images"):
        evaluate_samples(tmp_path / "stats.npz", tmp_path / "ref.npz", net)
