"""`sendvae sample` end to end on a tiny run folder: the .npz, multi-process equality, resume, errors."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sendvae.cli import main as cli_main
from sendvae.config import to_dict
from sendvae.data.latent_store import LatentStore
from sendvae.diffusion.generate import make_labels
from sendvae.models.sit import SiT, SiTConfig
from sendvae.runtime import checkpoint as ckpt
from sendvae.train.sit_config import TrainSiTConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
NAME = "samples_run-0000002-ema_4ode_euler_cfg1.5_0-1_fp32_seed3_n10"


def main(argv: list[str]) -> int:
    return cli_main(["sample", *argv])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A train-sit run folder: a checkpoint with the trainer's keys, over a real 4x8x8 latent store."""
    return _tiny_sit_run(tmp_path_factory.mktemp("sample"))


def _tiny_sit_run(root: Path) -> Path:
    store = root / "store"
    args = ["cache-latents", "--vae", "tiny-f4d4", "--data", "shapes", "--resolution", "32",
            "--num-images", "16", "--output-dir", str(store), "--workers", "0", "--no-progress"]  # fmt: skip
    assert cli_main(args) == 0
    st = LatentStore(store)
    cfg = TrainSiTConfig()
    cfg.data.store, cfg.model.vae = str(store), "tiny-f4d4"
    cfg.latents.mean, cfg.latents.std = st.stats.mean, st.stats.std  # recorded at step 0 by train-sit
    cfg.latents.vae_fingerprint = st.vae_fingerprint
    torch.manual_seed(0)
    mcfg = SiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
        num_classes=st.num_classes, z_dims=(), encoder_depth=1,
    )  # fmt: skip
    model = SiT(mcfg)
    ema = SiT(mcfg)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run = root / "run"
    state = {"step": 2, "config": to_dict(cfg), "model_config": mcfg.to_dict(),
             "model": model.state_dict(), "ema": ema.state_dict()}  # fmt: skip
    ckpt.save_training_state(run, 2, state)
    return run


def _args(run_dir: Path, out: Path, **kw) -> list[str]:
    args = ["--exp-path", str(run_dir), "--num-samples", "10", "--batch-size", "4", "--seed", "3",
            "--steps", "4", "--cfg-scale", "1.5", "--output-dir", str(out), "--no-progress",
            "--device", "cpu"]  # fmt: skip
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_sample_writes_adm_npz_and_grid(run_dir, tmp_path):
    assert main(_args(run_dir, tmp_path)) == 0
    with np.load(tmp_path / f"{NAME}.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert images.std() > 1  # decoded, not a constant
    num_classes = SiTConfig.from_dict(ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["model_config"])
    assert labels.tolist() == make_labels(10, num_classes.num_classes, 3, "random").tolist()
    assert (tmp_path / f"{NAME}.png").exists() and not (tmp_path / f"{NAME}.parts").exists()

    # a different batch size gives the same images (one seed per image)
    other = tmp_path / "b7"
    assert main(_args(run_dir, other, batch_size=7)) == 0
    with np.load(other / f"{NAME}.npz") as z:
        assert np.abs(z["arr_0"].astype(int) - images).max() <= 1


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_skips_parts(run_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(run_dir, one)) == 0
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "sendvae.cli", "sample"]
    r = subprocess.run([*cmd, *_args(run_dir, two)], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(one / f"{NAME}.npz") as a, np.load(two / f"{NAME}.npz") as b:
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"]).max() <= 1
        assert (a["arr_1"] == b["arr_1"]).all()
        ref = a["arr_0"]

    # resume: plant a finished part with marked images; a rerun must keep it and make only the rest
    res = tmp_path / "resume"
    parts = res / f"{NAME}.parts"
    assert main(_args(run_dir, res, num_samples=10)) == 0
    (res / f"{NAME}.npz").unlink()
    parts.mkdir()
    marked = np.full((3, 32, 32, 3), 7, dtype=np.uint8)
    np.savez(parts / "part-0000000.npz", images=marked, labels=np.zeros(3, dtype=np.int64),
             indices=np.array([0, 1, 2]))  # fmt: skip
    shutil.copy(res / f"{NAME}.json", parts / "settings.json")  # parts of this very sample set
    assert main(_args(run_dir, res)) == 0
    with np.load(res / f"{NAME}.npz") as z:
        assert (z["arr_0"][:3] == 7).all()  # skipped, taken from the part
        assert np.abs(z["arr_0"][3:].astype(int) - ref[3:]).max() <= 1


def test_clear_errors(run_dir, tmp_path, capsys):
    assert main(_args(run_dir, tmp_path, train_steps=5)) == 2
    assert "no checkpoint of step 5" in capsys.readouterr().err
    assert main(_args(run_dir, tmp_path, vae="tiny-f8d4")) == 2  # not the store's VAE
    assert "--vae" in capsys.readouterr().err
    # an export folder names no VAE
    export = run_dir.parent / "export"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    sit = SiT(SiTConfig.from_dict(state["model_config"]))
    sit.load_state_dict(state["ema"])
    sit.save_pretrained(export)
    model_only = ["--model", str(export), "--num-samples", "2", "--output-dir", str(tmp_path / "e")]
    assert main(model_only) == 2
    assert "pass --vae" in capsys.readouterr().err
    # with a VAE and the store's statistics it samples, and equals the run's EMA sampled via --exp-path
    assert main([*model_only, "--vae", "tiny-f4d4", "--latent-stats", state["config"]["data"]["store"],
                 "--steps", "3", "--seed", "3", "--no-progress"]) == 0  # fmt: skip
    assert main(_args(run_dir, tmp_path / "r", num_samples=2, steps=3, cfg_scale=1)) == 0
    (a,) = (tmp_path / "e").glob("*.npz")
    (b,) = (tmp_path / "r").glob("*.npz")
    assert a.name.startswith("samples_export_3ode_euler_cfg1_")
    with np.load(a) as za, np.load(b) as zb:
        assert np.abs(za["arr_0"].astype(int) - zb["arr_0"]).max() <= 1


def _export_sit(run_dir: Path, folder: Path, seed: int) -> str:
    """The run's SiT moved by noise of `seed`, exported to `folder`; returns its latent store's path."""
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    sit = SiT(SiTConfig.from_dict(state["model_config"]))
    sit.load_state_dict(state["ema"])
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sit.save_pretrained(folder)
    return state["config"]["data"]["store"]


def _export_args(export: Path, store: str, out: Path) -> list[str]:
    return ["--model", str(export), "--vae", "tiny-f4d4", "--latent-stats", store, "--num-samples", "4",
            "--batch-size", "2", "--steps", "2", "--output-dir", str(out), "--no-progress",
            "--device", "cpu"]  # fmt: skip


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "--output-dir" in lines[0], err
    return lines[0]


def test_samples_of_another_model_are_never_reused(run_dir, tmp_path, capsys):
    """Every SiT export folder is named `sit`: sampling run B's into the folder that holds run A's samples
    is refused in one line (it used to return A's samples for B); A's set is reused, untouched."""
    a, b = tmp_path / "a" / "export" / "sit", tmp_path / "b" / "export" / "sit"
    store = _export_sit(run_dir, a, seed=1)
    _export_sit(run_dir, b, seed=2)
    out = tmp_path / "out"
    assert main(_export_args(a, store, out)) == 0
    (npz,) = out.glob("*.npz")
    before = npz.read_bytes()
    capsys.readouterr()
    assert main(_export_args(b, store, out)) == 2
    _one_line_error(capsys.readouterr().err)
    assert npz.read_bytes() == before
    assert main(_export_args(a, store, out)) == 0  # the same model: its finished set
    assert "nothing to do" in capsys.readouterr().out
    # A retrained in place (same path, other weights) is another model too
    _export_sit(run_dir, a, seed=3)
    assert main(_export_args(a, store, out)) == 2
    _one_line_error(capsys.readouterr().err)
    assert main(_export_args(b, store, tmp_path / "out-b")) == 0  # in a folder of its own, B samples
    for record in (tmp_path / "out-b").glob("*.json"):  # a set without its record cannot be vouched for
        record.unlink()
    capsys.readouterr()
    assert main(_export_args(b, store, tmp_path / "out-b")) == 2
    assert "no record" in _one_line_error(capsys.readouterr().err)


def test_parts_of_another_model_are_never_merged(run_dir, tmp_path, capsys, monkeypatch):
    """A sample run killed after its first part, then the model at the same path replaced: the parts it left
    are refused, not merged with the new model's."""
    import sendvae.diffusion.generate as gen

    sit, out = tmp_path / "export" / "sit", tmp_path / "out"
    store = _export_sit(run_dir, sit, seed=1)
    real = gen._write_part

    def killed_after_one(path, **arrays):
        real(path, **arrays)
        raise KeyboardInterrupt  # as if killed

    monkeypatch.setattr(gen, "_write_part", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        main(_export_args(sit, store, out))
    monkeypatch.setattr(gen, "_write_part", real)
    (parts,) = out.glob("*.parts")
    assert len(list(parts.glob("part-*.npz"))) == 1
    _export_sit(run_dir, sit, seed=2)
    capsys.readouterr()
    assert main(_export_args(sit, store, out)) == 2
    _one_line_error(capsys.readouterr().err)
    assert not list(out.glob("*.npz"))


def test_nan_samples_name_their_indices(run_dir, tmp_path, monkeypatch):
    import sendvae.diffusion.generate as gen

    real = gen.sample

    def poisoned(model, labels, seeds, cfg):
        z = real(model, labels, seeds, cfg)
        z[[i for i, s in enumerate(seeds) if s - 3 == 5]] = float("nan")  # image index 5
        return z

    monkeypatch.setattr(gen, "sample", poisoned)
    with pytest.raises(FloatingPointError, match=r"indices \[5\]"):
        main([*_args(run_dir, tmp_path), "--traceback"])


def test_original_sit_checkpoint_samples_like_sits_own_sampler(tmp_path):
    """`sendvae sample --model SiT-XL-2-256x256.pt` (Ma et al.'s layout: t = 0 noise, learn_sigma; here tiny
    and random) gives the images of SiT's Euler sampler on the raw checkpoint, decoded by the same VAE."""
    from sendvae.data.transforms import to_uint8
    from sendvae.models.vae_io import load_vae
    from tests.test_sit import per_seed_noise, sit_euler, sit_state_dict

    sd = sit_state_dict(c=4, p=2, d=128, depth=2, heads=2, mlp=512, classes=5, grid=4, seed=7)
    path = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(sd, path)  # the released file is a bare state dict
    out = tmp_path / "out"
    args = ["--model", str(path), "--vae", "tiny-f4d4", "--num-samples", "6", "--batch-size", "4", "--seed",
            "3", "--steps", "6", "--output-dir", str(out), "--no-progress", "--device", "cpu",
                "--latent-stats", "vae"]  # fmt: skip
    assert main(args) == 0
    (npz,) = out.glob("*.npz")
    with np.load(npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert labels.tolist() == make_labels(6, 5, 3, "random").tolist()
    with torch.no_grad():
        latents = sit_euler(sd, per_seed_noise(range(3, 9), (4, 8, 8)), torch.from_numpy(labels), 6, 2, 2)
        torch.manual_seed(0)  # the command's preset VAE: the same random weights
        vae = load_vae("tiny-f4d4")
        assert not vae.training and not load_vae(vae.save_pretrained(tmp_path / "vae")).training
        mean, std = (t.view(1, -1, 1, 1) for t in (vae.latent_mean, vae.latent_std))
        expected = to_uint8(vae.decode(latents * std + mean).float().clamp(-1, 1)).permute(0, 2, 3, 1).numpy()
    assert images.std() > 1 and expected.std() > 1
    assert np.abs(images.astype(int) - expected).max() <= 1  # uint8 rounding
