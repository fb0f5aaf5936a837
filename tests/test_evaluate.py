"""`sendvae evaluate` and its metrics: PSNR / SSIM (vs skimage), FD_<teacher>, reference batches, --recon."""

import json

import numpy as np
import pytest
import torch

import sendvae.evaluation.reconstruction as reconstruction
import sendvae.metrics.adm as adm
from sendvae.cli import main as cli_main
from sendvae.metrics.features import FeatureExtractor
from sendvae.metrics.recon import PSNR_MAX, psnr, ssim
from tests.test_inception import _random_state_dict


def main(argv: list[str]) -> int:
    return cli_main(["evaluate", *argv])


def _noise(n, size=32, seed=0, lo=0, hi=256):
    return torch.from_numpy(np.random.default_rng(seed).integers(lo, hi, (n, 3, size, size), dtype=np.uint8))


def _cheap_fd(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Stand-in for 2048-d Frechet distances (a 2048^2 sqrtm takes ~10 s on one core); frechet_distance is
    checked against an independent computation in test_frechet."""
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
    torch.save(_random_state_dict(seed=1), path)
    return path


# -- PSNR / SSIM ---------------------------------------------------------------------------------------------


def test_psnr_by_hand():
    a = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0, 0] = 10  # MSE = 100 / (3 * 16 * 16)
    b[1] = 255  # MSE = 255^2 -> 0 dB
    got = psnr(a, b)
    np.testing.assert_allclose(got[0].item(), 10 * np.log10(255**2 / (100 / 768)), rtol=1e-12)
    assert got[1].item() == pytest.approx(0.0, abs=1e-12)
    assert psnr(a, a).tolist() == [PSNR_MAX, PSNR_MAX]  # a perfect reconstruction is capped, not inf


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    a = _noise(2, size=24, seed=1)
    b = (a.int() + torch.from_numpy(np.random.default_rng(2).integers(-40, 40, a.shape))).clamp(0, 255)
    b = b.to(torch.uint8)
    b[1, :, :12] = a[1, :, :12]  # one image half identical
    for sample_cov in (True, False):
        got = ssim(a, b, sample_covariance=sample_cov)
        for i in range(2):
            want = metrics.structural_similarity(
                a[i].permute(1, 2, 0).numpy(),
                b[i].permute(1, 2, 0).numpy(),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=sample_cov,
                data_range=255,
                channel_axis=-1,
            )
            np.testing.assert_allclose(got[i].item(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ssim(a, a).numpy(), 1.0, rtol=1e-12)
    assert (ssim(a, b) < 0.99).all()


def test_ssim_psnr_reject_bad_input():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_noise(1, size=8), _noise(1, size=8))
    with pytest.raises(ValueError, match="uint8"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="one shape"):
        psnr(_noise(1, size=16), _noise(2, size=16))


# -- FD in teacher features ----------------------------------------------------------------------------------


def test_teacher_fd_identical_zero_different_positive():
    fx = FeatureExtractor()  # the embedded EfficientNet-Lite0 with its real weights
    assert fx.metric_name == "FD_efficientnet-lite0"
    a = _noise(12, seed=3).permute(0, 2, 3, 1).numpy()  # ADM layout (N, H, W, 3)
    b = _noise(12, seed=4, lo=100, hi=160)
    assert fx.features(a).shape == (12, fx.dim)
    # batches vs one array: the same statistics
    mu, sigma = fx.statistics(a)
    mu2, sigma2 = fx.statistics([a[:5], a[5:]])
    np.testing.assert_allclose(mu, mu2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, sigma2, rtol=1e-4, atol=1e-6)
    assert abs(fx.frechet_distance(a, a)) < 1e-3
    assert fx.frechet_distance(a, b) > 1.0


# -- the command ---------------------------------------------------------------------------------------------


def _make_ref(path, n=12, res=32, extra=()):
    argv = ["--make-ref", str(path), "--data", "shapes", "--resolution", str(res), "--num-images", str(n)]
    return main(argv + ["--device", "cpu", "--batch-size", "8", *extra])


def test_make_ref_then_self_evaluation_teacher_fd(tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    assert _make_ref(ref) == 0
    with np.load(ref) as f:
        assert sorted(f.files) == ["arr_0"]
        assert f["arr_0"].shape == (12, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    assert main([str(ref), "--ref", str(ref), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err
    out = json.loads((tmp_path / "ref.metrics.json").read_text())
    assert "FID" not in out and out["n"] == 12
    assert abs(out["FD_efficientnet-lite0"]) < 1e-3  # FD > 0 for different sets: test above


@pytest.mark.slow
def test_inception_metrics(tmp_path, inception_weights, monkeypatch):
    monkeypatch.setattr(adm, "frechet_distance", _cheap_fd)
    ref = tmp_path / "ref.npz"
    assert _make_ref(ref, n=4, extra=["--inception-weights", str(inception_weights)]) == 0
    with np.load(ref) as f:
        assert f["mu"].shape == (2048,) and f["sigma_s"].shape == (2023, 2023)
        trace = np.trace(f["sigma"])
    argv = [str(ref), "--ref", str(ref), "--inception-weights", str(inception_weights), "--device", "cpu"]
    assert main(argv) == 0
    out = json.loads((tmp_path / "ref.metrics.json").read_text())
    assert {"FID", "sFID", "IS", "precision", "recall"} <= out.keys()
    # stand-in FD = |mu1 - mu2|^2 + tr S1 + tr S2: the stored and the recomputed statistics agree
    assert out["FID"] == pytest.approx(2 * trace, rel=1e-6)
    assert out["precision"] == 1.0 and out["recall"] == 1.0  # a set lies in its own manifold
    # the report names the split definition and the distance precision: ADM's by default
    assert out["IS_splits"] == "split_size=5000 as ADM: one split of 4 samples" and out["IS_split_sizes"] == [
        4
    ]
    assert out["pr_distance_dtype"] == "float16"
    assert main(argv + ["--is-splits", "2", "--pr-distance-dtype", "float32"]) == 0
    out2 = json.loads((tmp_path / "ref.metrics.json").read_text())
    assert out2["IS_splits"] == "2 equal splits of 2 samples" and out2["pr_distance_dtype"] == "float32"
    assert main(argv + ["--is-split-size", "3"]) == 0
    assert json.loads((tmp_path / "ref.metrics.json").read_text())["IS_split_sizes"] == [3, 1]


def test_inception_weights_download_only_when_allowed(tmp_path, inception_weights, monkeypatch, capsys):
    from sendvae.metrics import inception

    monkeypatch.setattr(adm, "frechet_distance", _cheap_fd)
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        if len(calls) > 1:
            raise OSError("network is unreachable")
        torch.save(torch.load(inception_weights, weights_only=True), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert _make_ref(tmp_path / "a.npz", n=4) == 0  # not allowed: no download, teacher FD only
    assert calls == [] and sorted(np.load(tmp_path / "a.npz").files) == ["arr_0"]
    assert _make_ref(tmp_path / "b.npz", n=4, extra=["--allow-download"]) == 0
    assert calls == [inception.WEIGHTS_URL] and inception.cached_weights_path().is_file()
    assert "mu" in np.load(tmp_path / "b.npz").files
    assert _make_ref(tmp_path / "c.npz", n=4) == 0  # later runs use the cached file, no new download
    assert len(calls) == 1 and "mu" in np.load(tmp_path / "c.npz").files
    inception.cached_weights_path().unlink()
    capsys.readouterr()
    assert _make_ref(tmp_path / "d.npz", n=4, extra=["--allow-download"]) == 2  # offline: a clear error
    err = capsys.readouterr().err
    assert "could not download the FID Inception weights" in err and "--inception-weights PATH" in err


def test_recon_writes_json(tmp_path):
    out = tmp_path / "recon.json"
    argv = ["--recon", "--vae", "tiny-f4d4", "--data", "shapes", "--resolution", "32", "--num-images", "8"]
    assert main(argv + ["--batch-size", "4", "--device", "cpu", "--output-json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert {"rFD_efficientnet-lite0", "psnr", "ssim", "stlpips_alex", "n"} <= m.keys()  # the network named
    assert "rFID" not in m and "lpips" not in m and m["n"] == 8
    assert 0 < m["psnr"] < PSNR_MAX and -1 < m["ssim"] < 1 and m["stlpips_alex"] > 0  # random weights: poor


def test_recon_rfid(tmp_path, inception_weights, monkeypatch):
    monkeypatch.setattr(reconstruction, "frechet_distance", _cheap_fd)
    out = tmp_path / "recon.json"
    argv = ["--recon", "--vae", "tiny-f4d4", "--data", "shapes", "--resolution", "32", "--num-images", "2"]
    argv += ["--inception-weights", str(inception_weights), "--device", "cpu", "--output-json", str(out)]
    assert main(argv) == 0
    m = json.loads(out.read_text())
    assert m["rFID"] > 0 and not any(k.startswith(("FD_", "rFD_")) for k in m)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "choose one of"),
        (["missing.npz", "--ref", "missing.npz"], "no such .npz batch"),
        (["{s}"], "pass --ref"),
        (["{s}", "--ref", "{small}"], "differ in size"),
        (["{s}", "--ref", "{s}", "--inception-weights", "nope.pth"], "pt_inception-2015-12-05-6726825d"),
        (["--make-ref", "{tmp}/r.npz"], "pass --data"),
        (["--make-ref", "{tmp}/r.npz", "--data", "prepared", "--data-path", "{tmp}/none"], "does not exist"),
        (["--recon", "--data", "shapes"], "--vae"),
        (["{bad}", "--ref", "{s}"], "uint8"),
        (["{s}", "--ref", "{s}", "--is-split-size", "0"], "--is-split-size must be >= 1"),
        (["{s}", "--ref", "{s}", "--is-splits", "0"], "--is-splits must be >= 1"),
    ],
)
def test_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    files = {"s": tmp_path / "s.npz", "small": tmp_path / "small.npz", "bad": tmp_path / "bad.npz"}
    np.savez(files["s"], arr_0=_noise(4).permute(0, 2, 3, 1).numpy())
    np.savez(files["small"], arr_0=_noise(4, size=16).permute(0, 2, 3, 1).numpy())
    np.savez(files["bad"], arr_0=np.zeros((4, 32, 32, 3), dtype=np.float32))
    argv = [a.format(tmp=tmp_path, **files) for a in argv]
    assert main(argv + ["--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
