"""What the README's "Reliability" section promises: NaN steps change nothing, resume is the uninterrupted
run (1 and 2 processes), only harmless config changes are accepted on resume, bad checkpoints are
skipped, full disks and killed writes leave nothing half-done."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sendvae.cli import main
from sendvae.config import to_dict
from sendvae.runtime import checkpoint as ckpt
from sendvae.runtime.log import read_stats
from sendvae.train.resume import FREE_SIT, FREE_VAE, refused_changes
from sendvae.train.sit_config import TrainSiTConfig
from sendvae.train.vae_config import TrainVAEConfig

from .conftest import tiny_train_args
from .test_sample_cmd import NAME as SAMPLE_NAME
from .test_sample_cmd import _args as sample_args
from .test_sample_cmd import run_dir  # noqa: F401, F811  (a fixture: a tiny train-sit run folder)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _state(folder):
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(folder))


def _tensors(obj, prefix=""):
    """Every tensor of a nested state, by dotted name."""
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}{i}."))
    return out


def _assert_same_state(a, b, keys=("model", "ema", "disc", "opt_g", "opt_d", "loss", "opt")):
    for key in keys:
        if key not in a and key not in b:
            continue
        ta, tb = _tensors(a[key]), _tensors(b[key])
        assert ta.keys() == tb.keys(), key
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{key}.{k} differs (max {(ta[k] - tb[k]).abs().max()})"


# -- a NaN batch ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latent_norm", ["running", "none"])
def test_nan_batch_changes_no_state(tmp_path, latent_norm):
    """A NaN input batch at step 2 (default mapper, GAN on from step 0): the step changes no tensor at all
    (weights, buffers, EMA, discriminator, optimizers), the run completes, nan_steps = 1, all finite."""
    from sendvae.train.vae import VAETrainer

    common = {"mapper.latent_norm": latent_norm, "loss.gan_start": 0, "model.ema": "true"}
    args = tiny_train_args(tmp_path, exp="a", steps=2, **{**common, "run.ckpt_every": 1})
    assert main(["train-vae", *args]) == 0
    before = _state(tmp_path / "a")
    # the same run folder, 2 -> 3 steps, with step 2's batch made NaN
    more = tiny_train_args(tmp_path, exp="a", steps=3, **{**common, "run.ckpt_every": 1})
    assert main(["train-vae", *more, "--run.fault_nan_steps", "2"]) == 0
    after = _state(tmp_path / "a")
    assert after["step"] == 3 and float(after["nan_steps"]) == 1
    _assert_same_state(before, after)
    rows = read_stats(tmp_path / "a" / "stats.jsonl")
    assert rows[-1]["nan_steps"] == 1
    # and training goes on normally after it
    longer = tiny_train_args(tmp_path, exp="a", steps=5, **{**common, "run.ckpt_every": 1})
    assert main(["train-vae", *longer]) == 0
    final = _state(tmp_path / "a")
    assert not any(torch.equal(final["model"][k], v) for k, v in before["model"].items() if "weight" in k)
    assert all(bool(t.isfinite().all()) for t in _tensors(final).values() if t.is_floating_point())
    assert VAETrainer.resume_free is FREE_VAE


def test_diverging_run_stops_without_export(tmp_path):
    """Most recent steps skipped (NaN batches at 4 of the last 6 steps): an error, no export."""
    args = tiny_train_args(tmp_path, steps=6, **{"run.fault_nan_steps": "1,2,4,5", "run.log_every": 3})
    assert main(["train-vae", *args]) == 2
    assert not (tmp_path / "run" / "export").exists()


# -- resume -----------------------------------------------------------------------------------------------


def _torchrun(args, check=True):
    launcher = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run(
        [launcher, "--standalone", "--nproc_per_node", "2", "-m", "sendvae.cli", "train-vae", *args],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_two_process_kill_and_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    """Default embedded config (teacher, LPIPS, GAN, flips, posterior sampling, mapper noise), 2 gloo
    processes, 6 steps; killed after step 3 and resumed == uninterrupted, bitwise."""
    common = {"run.ckpt_every": 3, "loss.gan_start": 0, "model.ema": "true"}
    _torchrun(tiny_train_args(tmp_path, exp="straight", steps=6, **common))
    killed = _torchrun(
        tiny_train_args(tmp_path, exp="resumed", steps=6, **common, **{"run.fault_exit_step": 3}), check=False
    )
    assert killed.returncode != 0
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step-0000003.pt"
    _torchrun(tiny_train_args(tmp_path, exp="resumed", steps=6, **common))
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    _assert_same_state(a, b)
    rows = read_stats(tmp_path / "resumed" / "stats.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # no replayed rows


def test_truncated_newest_checkpoint_falls_back(tmp_path, capsys):
    args = tiny_train_args(tmp_path, steps=4, **{"run.ckpt_every": 2, "run.keep_ckpts": 0})
    assert main(["train-vae", *args]) == 0
    straight = _state(tmp_path / "run")
    newest = ckpt.checkpoint_path(tmp_path / "run", 4)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert main(["train-vae", *args]) == 0  # resumes from step 2 and redoes 3, 4
    out = capsys.readouterr().out
    assert "skipping unreadable checkpoint step-0000004.pt" in out and "at step 2" in out
    _assert_same_state(straight, _state(tmp_path / "run"))


def test_killed_write_leftovers_are_swept(tmp_path):
    args = tiny_train_args(tmp_path, steps=2, **{"run.ckpt_every": 1})
    assert main(["train-vae", *args]) == 0
    junk = tmp_path / "run" / "checkpoints" / ".step-0000003.pt.abc123.tmp"
    junk.write_bytes(b"\0" * 1000)
    assert main(["train-vae", *tiny_train_args(tmp_path, steps=3, **{"run.ckpt_every": 1})]) == 0
    assert not junk.exists()


def test_disk_full_is_one_line_and_keeps_the_old_checkpoint(tmp_path, capsys, monkeypatch):
    args = tiny_train_args(tmp_path, steps=2, **{"run.ckpt_every": 1})
    assert main(["train-vae", *args]) == 0
    before = ckpt.latest_checkpoint(tmp_path / "run").read_bytes()

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    capsys.readouterr()
    assert main(["train-vae", *tiny_train_args(tmp_path, steps=3, **{"run.ckpt_every": 1})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0], err
    assert ckpt.latest_checkpoint(tmp_path / "run").read_bytes() == before
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))


# -- the resume policy ------------------------------------------------------------------------------------


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, (list, tuple)):
        return [*value, 7]
    if isinstance(value, str):
        return value + "-x"
    return "something"  # None


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# The documented table (train/resume.py, README "Reliability"): every field a resume may change.
ALLOWED_VAE = {
    "preset", "run.output_dir", "run.exp_name", "run.device", "run.compile", "run.channels_last",
    "run.log_every", "run.ckpt_every", "run.keep_ckpts", "run.sample_every", "run.tensorboard",
    "run.stats_images", "run.fault_nan_steps", "run.fault_exit_step", "run.fault_exit_micro",
    "data.num_workers", "model.grad_checkpointing", "optim.max_steps", "optim.epochs", "optim.grad_accum",
    "model.vae_ckpt", "model.disc_ckpt", "teacher.allow_download",
}  # fmt: skip
ALLOWED_SIT_EXTRA = {"model.vae", "model.vae_config"}


@pytest.mark.parametrize("cfg_cls, free", [(TrainVAEConfig, FREE_VAE), (TrainSiTConfig, FREE_SIT)])
def test_resume_policy_field_by_field(cfg_cls, free):
    base = to_dict(cfg_cls())
    if cfg_cls is TrainVAEConfig:
        allowed = ALLOWED_VAE
    else:
        allowed = (
            ALLOWED_VAE - {"model.vae_ckpt", "model.disc_ckpt", "teacher.allow_download"}
        ) | ALLOWED_SIT_EXTRA
    checked = 0
    for key, value in _leaves(base):
        new = to_dict(cfg_cls())
        *path, leaf = key.split(".")
        d = new
        for p in path:
            d = d[p]
        d[leaf] = _changed(value)
        refused = refused_changes(base, new, free)
        expect_free = key in allowed or key.startswith("eval.")
        assert (not refused) == expect_free, (key, refused)
        checked += 1
    assert checked > 30
    # the ones the audit named
    for key in ("run.seed", "run.precision", "run.tf32"):
        assert key not in allowed


def test_resume_accepts_harmless_changes_and_refuses_the_others(tmp_path, capsys):
    assert main(["train-vae", *tiny_train_args(tmp_path, steps=2)]) == 0
    for extra in (["--run.seed", "1"], ["--run.precision", "bf16"], ["--loss.kl_weight", "0.5"]):
        capsys.readouterr()
        assert main(["train-vae", *tiny_train_args(tmp_path, steps=2), *extra]) == 2
        err = capsys.readouterr().err
        assert "another config" in err and extra[0].lstrip("-") in err, err
    # harmless: more workers, a longer run (extends the finished one)
    assert main(["train-vae", *tiny_train_args(tmp_path, steps=3), "--data.num_workers", "1"]) == 0
    assert _state(tmp_path / "run")["step"] == 3
    assert '"max_steps": 3' in (tmp_path / "run" / "config.json").read_text()


def test_resume_refuses_fewer_steps_than_the_checkpoint(tmp_path, capsys):
    """--max-steps below the checkpoint's step would record a 2-step config over a 4-step model: refused in
    one line, nothing rewritten. The same length just exports again."""
    assert main(["train-vae", *tiny_train_args(tmp_path, steps=4)]) == 0
    config = (tmp_path / "run" / "config.json").read_text()
    export = tmp_path / "run" / "export" / "vae" / "diffusion_pytorch_model.safetensors"
    weights = export.read_bytes()
    capsys.readouterr()
    assert main(["train-vae", *tiny_train_args(tmp_path, steps=2)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "step 4" in err[0] and "2 steps" in err[0] and "--optim.max_steps" in err[0], err
    assert (tmp_path / "run" / "config.json").read_text() == config
    assert export.read_bytes() == weights
    assert main(["train-vae", *tiny_train_args(tmp_path, steps=4)]) == 0
    assert _state(tmp_path / "run")["step"] == 4 and export.read_bytes() == weights


def test_failed_start_does_not_poison_the_folder(tmp_path):
    assert (
        main(["train-vae", *tiny_train_args(tmp_path, steps=1), "--vae-ckpt", str(tmp_path / "typo.pt")]) == 2
    )
    assert not (tmp_path / "run" / "config.json").exists()
    assert main(["train-vae", *tiny_train_args(tmp_path, steps=1)]) == 0


def test_refused_changes_lists_what_differs():
    a = to_dict(TrainVAEConfig())
    b = dataclasses.replace(TrainVAEConfig(), seed=None) if hasattr(TrainVAEConfig, "seed") else None
    assert b is None  # the seed lives in run, not at the top level
    b = to_dict(TrainVAEConfig())
    b["run"]["seed"], b["run"]["log_every"] = 5, 1
    assert refused_changes(a, b, FREE_VAE) == ["run.seed: 0 -> 5"]


# -- sample: a run killed right after the final .npz appeared ---------------------------------------------


def test_sample_killed_after_npz_finishes_grid_and_parts(run_dir, tmp_path):  # noqa: F811
    from .test_sample_cmd import main as sample_main

    out = tmp_path / "out"
    assert sample_main(sample_args(run_dir, out)) == 0
    (out / f"{SAMPLE_NAME}.png").unlink()  # as if killed between the .npz and the rest
    (out / f"{SAMPLE_NAME}.parts").mkdir()
    (out / f"{SAMPLE_NAME}.parts" / "part-0000000.npz").write_bytes(b"x")
    assert sample_main(sample_args(run_dir, out)) == 0
    assert (out / f"{SAMPLE_NAME}.png").exists() and not (out / f"{SAMPLE_NAME}.parts").exists()


def test_run_training_returns_how_the_run_ended(tmp_path):
    """A caller in the same process learns the final step, the last logged row and the export from
    run_training itself (the demo and the study read no stats file); a rerun at the end returns the same."""
    import argparse

    from sendvae.commands import train_vae as cmd
    from sendvae.runtime.log import read_stats
    from sendvae.train.export import export_run
    from sendvae.train.run import run_training
    from sendvae.train.vae import VAETrainer

    from .conftest import tiny_train_args

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    cfg = cmd.resolve_config(p.parse_args(tiny_train_args(tmp_path, steps=3, **{"run.log_every": 1})))
    first = run_training(cfg, VAETrainer, export_run, echo=False)
    rows = read_stats(tmp_path / "run" / "stats.jsonl")
    assert first.step == 3 and first.last["step"] == 3 and first.last["rec"] == rows[-1]["rec"]
    assert all(isinstance(v, (int, float, str)) for v in first.last.values())  # plain values (JSON records)
    assert first.export == tmp_path / "run" / "export" / "vae" and (first.export / "config.json").is_file()
    again = run_training(cfg, VAETrainer, export_run, echo=False)  # resumed at its end: nothing to train
    assert again.step == 3 and again.last["rec"] == first.last["rec"]
