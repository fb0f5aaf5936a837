"""Latent statistics have one owner: a SiT run records them at step 0 and sampling uses exactly those."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sendvae.cli import main
from sendvae.models.latent_stats import LatentStats
from sendvae.models.vae_io import load_vae
from sendvae.runtime import checkpoint as ckpt


def test_normalize_roundtrip_and_one_implementation():
    stats = LatentStats((0.5, -1.0, 2.0), (2.0, 0.5, 1.5))
    z = torch.randn(4, 3, 5, 5)
    zn = stats.normalize(z)
    mean = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    std = torch.tensor([2.0, 0.5, 1.5]).view(1, 3, 1, 1)
    assert torch.allclose(zn, (z - mean) / std) and torch.allclose(stats.denormalize(zn), z, atol=1e-6)
    torch.manual_seed(0)
    vae = load_vae("tiny-f4d4")
    vae.set_latent_stats(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    own = LatentStats.from_tensors(vae.latent_mean, vae.latent_std)
    z4 = torch.randn(2, 4, 3, 3)
    assert torch.equal(vae.normalize_latents(z4), own.normalize(z4))
    assert LatentStats.from_dict(own.to_dict()) == own
    with pytest.raises(ValueError, match="std > 0"):
        LatentStats((0.0,), (0.0,))


@pytest.fixture(scope="module")
def sit_run(tmp_path_factory):
    """A 2-step train-sit run on a tiny store (random tiny VAE), and the store it was trained on."""
    root = tmp_path_factory.mktemp("lat")
    store = root / "store"
    cache = ["cache-latents", "--vae", "tiny-f4d4", "--data", "shapes", "--resolution", "32",
             "--num-images", "16", "--output-dir", str(store), "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(cache) == 0
    args = ["train-sit", "--preset", "shapes-tiny", "--store", str(store), "--output-dir", str(root),
            "--exp-name", "sit", "--max-steps", "2", "--batch-size", "4", "--vae", "tiny-f4d4",
            "--transport.proj_coeff", "0", "--run.log_every", "1", "--run.ckpt_every", "0",
            "--run.sample_every", "0", "--model.depth", "1", "--model.hidden_size", "32",
            "--model.num_heads", "2"]  # fmt: skip
    assert main(args) == 0
    return root / "sit", store


def _sample(run, out, *extra):
    return main(["sample", "--exp-path", str(run), "--num-samples", "4", "--batch-size", "4", "--steps", "2",
                 "--output-dir", str(out), "--no-progress", "--device", "cpu", *extra])  # fmt: skip


def _images(out):
    (f,) = out.glob("*.npz")
    with np.load(f) as z:
        return z["arr_0"]


def test_recorded_from_step_zero(sit_run):
    from sendvae.data.latent_store import LatentStore

    run, store = sit_run
    st = LatentStore(store).stats
    cfg = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["config"]
    assert tuple(cfg["latents"]["mean"]) == st.mean and tuple(cfg["latents"]["std"]) == st.std
    assert cfg["latents"]["vae_fingerprint"] == st.vae_fingerprint
    exported = json.loads((run / "export" / "sit" / "latents.json").read_text())
    assert LatentStats.from_dict(exported) == st


def test_moved_or_deleted_store_still_samples_with_the_trained_statistics(sit_run, tmp_path):
    run, store = sit_run
    assert _sample(run, tmp_path / "before") == 0
    before = _images(tmp_path / "before")
    moved = tmp_path / "moved-store"
    shutil.copytree(store, moved)
    shutil.rmtree(store)  # the store is gone from where the run was trained
    try:
        assert _sample(run, tmp_path / "after") == 0
        assert np.array_equal(_images(tmp_path / "after"), before)
        # an explicit --latent-stats must agree with the trained ones
        assert _sample(run, tmp_path / "same", "--latent-stats", str(moved)) == 0
    finally:
        shutil.copytree(moved, store)


def test_checkpoint_without_statistics_is_refused(sit_run, tmp_path, capsys):
    run, _ = sit_run
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    path = ckpt.latest_checkpoint(old)
    state = ckpt.load_checkpoint(path)
    del state["config"]["latents"]  # as written before the statistics were recorded
    ckpt.atomic_torch_save(state, path)
    capsys.readouterr()
    assert _sample(old, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not record the latent statistics" in err[0] and "--latent-stats" in err[0]
    # the VAE's own statistics are used only when asked for
    assert _sample(old, tmp_path / "out", "--latent-stats", "vae") == 0


def test_differing_explicit_statistics_are_refused(sit_run, tmp_path, capsys):
    run, _ = sit_run
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"latent_mean": [0.0] * 4, "latent_std": [3.0] * 4}))
    capsys.readouterr()
    assert _sample(run, tmp_path / "out", "--latent-stats", str(other)) == 2
    assert "differs from the statistics this SiT was trained with" in capsys.readouterr().err
