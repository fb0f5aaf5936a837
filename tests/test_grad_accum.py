"""Gradient accumulation (`--optim.grad_accum K`) and activation checkpointing (`--model.grad_checkpointing`).

K micro-batches give the update of the whole batch (train-sit; train-vae without batch statistics), the
documented BatchNorm differences stay bounded, 2 processes x K = 2 is 1 process x K = 4, a run killed
between micro-batches resumes bitwise, a NaN micro-batch skips the whole step, and checkpointing changes
no number.

Why the weights are compared loosely and the gradients tightly: AdamW's first update is
lr * g / (|g| + 1e-8), a sign for every gradient element above ~1e-8, so an element whose gradient is
within float rounding of 1e-8 moves its weight by a sizeable part of lr either way. The sharp check is on
the gradient itself: the optimizer's first moment after one step is (1 - beta1) x the clipped gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sendvae.cli import main
from sendvae.runtime import checkpoint as ckpt
from sendvae.runtime.log import read_stats

from .conftest import assert_ddp_matches_single, tiny_train_args
from .test_reliability import _assert_same_state
from .test_train_sit import _args as sit_args
from .test_train_sit import _store

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# train-vae without random draws: a micro-batch draws from (seed, step, rank + world x micro), so K = 4 on
# one process draws what 4 processes would, not what one process with the whole batch draws (test (c)
# checks the draws: 2 processes x 2 = 1 x 4)
NO_DRAWS = {"data.hflip": "false", "model.sample_posterior": "false", "mapper.noise": "false"}


@pytest.fixture(scope="module")
def repa_store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("stores") / "repa", True)


def _state(run):
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(run))


def _max_param_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the floating tensors of two state dicts, BatchNorm-style statistics left out."""
    skip = ("running_mean", "running_var", "num_batches_tracked", "stats_set")
    return max(
        float((a[k].float() - b[k].float()).abs().max())
        for k in a
        if a[k].is_floating_point() and not k.endswith(skip)
    )


def _grad_rel_diff(opt_a: dict, opt_b: dict) -> float:
    """||m_a - m_b|| / ||m_a|| of AdamW's first moments (after one step: 0.1 x the clipped gradient)."""
    ma = torch.cat([s["exp_avg"].flatten() for s in opt_a["state"].values()])
    mb = torch.cat([s["exp_avg"].flatten() for s in opt_b["state"].values()])
    return float((ma - mb).norm() / ma.norm())


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def _one_step(command: str, args_of, k: int) -> tuple[dict, dict]:
    """(checkpoint, stats row) of one step of batch 16 run as ``k`` micro-batches."""
    run, args = args_of(f"k{k}", {"optim.batch_size": 16, "optim.grad_accum": k})
    assert main([command, *args]) == 0
    (row,) = read_stats(run / "stats.jsonl")
    return _state(run), row


# -- (a) train-sit + REPA: K = 4 x 4 is one step of 16 -------------------------------------------------------


def test_sit_accumulation_is_the_large_batch(tmp_path, repa_store):
    def args_of(exp, over):
        return tmp_path / exp, sit_args(tmp_path, repa_store, exp=exp, steps=1, **over)

    (a, ra), (b, rb) = _one_step("train-sit", args_of, 1), _one_step("train-sit", args_of, 4)
    # The step's draws are made for the global batch (every micro-batch takes its rows): same noise, same
    # samples, only the order of the float sums differs. Measured over --run.seed 0-2: gradient 2.1e-7
    # relative, weights 3.2e-6 (lr 3e-4; see the module docstring), EMA 3e-8, loss 1.2e-7 relative.
    assert _grad_rel_diff(a["opt"], b["opt"]) < 2e-6
    assert _max_param_diff(a["model"], b["model"]) < 3e-5
    assert _max_param_diff(a["ema"], b["ema"]) < 3e-7
    for key in ("loss", "denoise", "proj", "grad_norm"):  # logged: the mean over the micro-batches
        assert _rel(ra[key], rb[key]) < 1e-5, (key, ra[key], rb[key])


# -- (b) train-vae: alignment + LPIPS without GAN equals the large batch; with it, bounded -------------------


def test_vae_accumulation_is_the_large_batch_without_batch_statistics(tmp_path):
    # the default mapper's running LatentNorm normalises with the micro-batch's statistics: 'none' here
    over = {**NO_DRAWS, "loss.gan_weight": 0, "mapper.latent_norm": "none", "optim.max_steps": 1}

    def args_of(exp, more):
        return tmp_path / exp, tiny_train_args(tmp_path, exp=exp, **over, **more)

    (a, ra), (b, rb) = _one_step("train-vae", args_of, 1), _one_step("train-vae", args_of, 4)
    assert "lpips" in ra and "align" in ra and "g" not in ra  # the terms under test, no GAN
    # Measured over --run.seed 0-2: gradient 1.5e-6 to 2.1e-6 relative (largest element 3e-8, near
    # AdamW's eps), weights 2e-4 to 3.2e-4 (lr 2e-3: the near-eps elements, module docstring), loss 9e-8.
    assert _grad_rel_diff(a["opt_g"], b["opt_g"]) < 2e-5
    assert _max_param_diff(a["model"], b["model"]) < 1.5e-3
    for key in ("loss", "rec", "lpips", "kl", "align", "grad_norm"):
        assert _rel(ra[key], rb[key]) < 1e-5, (key, ra[key], rb[key])


def test_vae_accumulation_with_the_patchgan_differs_by_its_batch_statistics(tmp_path):
    """With the GAN and the default running LatentNorm, each micro-batch normalises with its own statistics
    (the PatchGAN's BatchNorm over 4 images instead of 16, the mapper's LatentNorm likewise), as documented
    in VAETrainer.train_step: the update is close to the large batch's, not equal to it."""
    over = {**NO_DRAWS, "loss.gan_start": 0, "optim.max_steps": 1}

    def args_of(exp, more):
        return tmp_path / exp, tiny_train_args(tmp_path, exp=exp, **over, **more)

    (a, ra), (b, rb) = _one_step("train-vae", args_of, 1), _one_step("train-vae", args_of, 4)
    assert "g" in ra and "d" in ra
    # Measured over --run.seed 0-1: generator gradient 5.4e-2 to 5.9e-2 relative with LatentNorm 'none',
    # 6.9e-2 to 7.8e-2 with 'running'; discriminator gradient 0.29 to 0.34 (its own BatchNorm, on batches
    # of 4 real and 4 fake images, is most of its function); logged loss 4e-4 to 7e-4 relative. The bounds
    # leave room for other seeds and kernels, and still fail for a lost micro-batch or a missing 1 / K
    # (the grad_norm check; Adam and clipping hide a scale in the weights).
    assert _grad_rel_diff(a["opt_g"], b["opt_g"]) < 0.2
    assert _grad_rel_diff(a["opt_d"], b["opt_d"]) < 0.6
    assert _rel(ra["loss"], rb["loss"]) < 1e-2
    assert _rel(ra["grad_norm"], rb["grad_norm"]) < 0.2
    assert _rel(ra["rec"], rb["rec"]) < 1e-5  # what has no batch statistics agrees as without the GAN


# -- (c) 2 processes x K = 2 is 1 process x K = 4 -----------------------------------------------------------


@pytest.mark.slow
def test_two_processes_with_accumulation_match_one_with_more(tmp_path):
    # Every draw on (flips, posterior samples, mapper noise, GAN from step 0): micro-batch j of rank r is
    # virtual rank r + 2 j of 4 in both runs (the same rows, the same draws), and the PatchGAN's BatchNorm
    # normalises per micro-batch in both (per process under DDP). The running LatentNorm would not match:
    # it pools over the processes, so over 2 micro-batches in one run and 1 in the other.
    common = {"loss.gan_start": 0, "mapper.latent_norm": "none", "optim.batch_size": 8}
    one = tiny_train_args(tmp_path, exp="one", steps=3, **common, **{"optim.grad_accum": 4})
    two = tiny_train_args(tmp_path, exp="two", steps=3, **common, **{"optim.grad_accum": 2})
    assert_ddp_matches_single("train-vae", one, two, tmp_path / "one", tmp_path / "two", steps=3)
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    # Measured over --run.seed 0-2: after 3 steps the VAE + mapper weights differ by 6.5e-6 to 1.4e-5, the
    # discriminator's by 3.7e-7 to 3.6e-6 (lr 2e-3; the gradients' sum order), the losses by <= 1.1e-7
    # relative (the helper's bound: 1e-5).
    assert _max_param_diff(a["model"], b["model"]) < 2e-4
    assert _max_param_diff(a["disc"], b["disc"]) < 1e-4


@pytest.mark.slow
def test_sit_two_processes_with_accumulation_match_one_with_more(tmp_path, repa_store):
    one = sit_args(tmp_path, repa_store, exp="one", steps=3, **{"optim.grad_accum": 4})
    two = sit_args(tmp_path, repa_store, exp="two", steps=3, **{"optim.grad_accum": 2})
    assert_ddp_matches_single("train-sit", one, two, tmp_path / "one", tmp_path / "two", steps=3)


# -- (d) killed between micro-batches, resumed: the uninterrupted run, bitwise ------------------------------


def _kill_between_micro_batches(command: str, args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sendvae.cli", command, *args, "--run.fault_exit_micro", "3,1"],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]  # died after micro-batch 1 of step 3, before its update


def test_vae_killed_between_micro_batches_resumes_bitwise(tmp_path):
    common = {"optim.grad_accum": 2, "run.ckpt_every": 2, "loss.gan_start": 0, "model.ema": "true"}
    assert main(["train-vae", *tiny_train_args(tmp_path, exp="full", steps=4, **common)]) == 0
    part = tiny_train_args(tmp_path, exp="part", steps=4, **common)
    _kill_between_micro_batches("train-vae", part)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "part")] == [2]
    assert main(["train-vae", *part]) == 0
    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert a["step"] == b["step"] == 4
    _assert_same_state(a, b)
    assert [r["step"] for r in read_stats(tmp_path / "part" / "stats.jsonl")] == [1, 2, 3, 4]


def test_sit_killed_between_micro_batches_resumes_bitwise(tmp_path, repa_store):
    common = {"optim.grad_accum": 4, "run.ckpt_every": 2}
    assert main(["train-sit", *sit_args(tmp_path, repa_store, exp="full", steps=4, **common)]) == 0
    part = sit_args(tmp_path, repa_store, exp="part", steps=4, **common)
    _kill_between_micro_batches("train-sit", part)
    assert main(["train-sit", *part]) == 0
    _assert_same_state(_state(tmp_path / "full"), _state(tmp_path / "part"), keys=("model", "ema", "opt"))


def test_a_nan_micro_batch_skips_the_whole_step(tmp_path):
    """Step 2's last micro-batch is NaN, the first is not: the step changes no tensor, nan_steps = 1."""
    common = {"optim.grad_accum": 2, "loss.gan_start": 0, "model.ema": "true", "run.ckpt_every": 1}
    assert main(["train-vae", *tiny_train_args(tmp_path, exp="a", steps=2, **common)]) == 0
    before = _state(tmp_path / "a")
    more = tiny_train_args(tmp_path, exp="a", steps=3, **common)
    assert main(["train-vae", *more, "--run.fault_nan_steps", "2"]) == 0
    after = _state(tmp_path / "a")
    assert after["step"] == 3 and float(after["nan_steps"]) == 1
    _assert_same_state(before, after)


def test_a_batch_that_does_not_split_is_one_line(tmp_path, capsys):
    args = tiny_train_args(tmp_path, steps=1, **{"optim.grad_accum": 3})  # batch 4
    assert main(["train-vae", *args]) == 2
    err = capsys.readouterr().err
    assert "--optim.batch_size 4" in err and "--optim.grad_accum" in err, err


# -- activation checkpointing -------------------------------------------------------------------------------


@pytest.mark.parametrize("align", ["sendvae", "repae"])
def test_vae_steps_with_checkpointing_are_the_steps_without(tmp_path, monkeypatch, align):
    """--model.grad_checkpointing recomputes the VAE encoder / decoder blocks, the mapper's blocks and
    (repae) the SiT's in the backward pass; 2 steps with every draw, LPIPS and the GAN give the same state."""
    import sendvae.align.mapper
    import sendvae.align.repae
    import sendvae.models.sit
    import sendvae.models.vae

    calls: dict[str, int] = {}
    modules = (sendvae.models.vae, sendvae.align.mapper, sendvae.models.sit, sendvae.align.repae)
    for module in modules:
        name, real = module.__name__.rsplit(".", 1)[1], module.checkpoint

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "checkpoint", counted)
    over = {"loss.gan_start": 0, "loss.align": align}
    assert main(["train-vae", *tiny_train_args(tmp_path, exp="plain", steps=2, **over)]) == 0
    assert not calls
    over["model.grad_checkpointing"] = "true"
    assert main(["train-vae", *tiny_train_args(tmp_path, exp="ckpt", steps=2, **over)]) == 0
    # the SiT's blocks in its own update; in the VAE's pass through the frozen SiT, its blocks as one segment
    heads = ("mapper",) if align == "sendvae" else ("sit", "repae")
    assert all(calls.get(name, 0) > 0 for name in ("vae", *heads)), calls
    # Measured: bitwise equal (the recomputed forward is the same arithmetic, the RNG state is restored).
    keys = ("model", "disc", "opt_g", "opt_d", "loss", "sit")
    _assert_same_state(_state(tmp_path / "plain"), _state(tmp_path / "ckpt"), keys=keys)


def test_the_old_checkpointing_name_is_refused_with_the_new_one(tmp_path, capsys):
    assert main(["train-vae", "--model.gradient_checkpointing", "true", "--dry-run"]) == 2
    assert "renamed to --model.grad_checkpointing" in capsys.readouterr().err
    saved = tmp_path / "config.json"
    saved.write_text('{"preset": "shapes-tiny", "model": {"gradient_checkpointing": true}}')
    assert main(["train-vae", "--config", str(saved), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.gradient_checkpointing was renamed to model.grad_checkpointing" in err, err
    assert main(["train-sit", "--model.grad_checkpointing", "true", "--dry-run"]) == 0


# -- bench --------------------------------------------------------------------------------------------------


def test_bench_reports_the_micro_batch_and_accumulation_it_ran(capsys):
    tiny = "--batch-size 4 --grad-accum 2 --grad-checkpointing --iters 1 --warmup 0 --json".split()
    sit = "train-sit --model SiT-S/2 --sit-depth 2 --sit-width 64 --teacher-features cached".split()
    vae = "train-vae --vae tiny-f8d4 --enc-type efficientnet-lite0 --resolution 64".split()
    for args in (sit, vae):
        assert main(["bench", *args, *tiny]) == 0
        out = capsys.readouterr().out
        (row,) = json.loads(out[out.index("[") :])
        assert (row["batch"], row["micro_batch"], row["grad_accum"]) == (4, 2, 2), row
        assert row["grad_checkpointing"] is True and row["img_s"] > 0
