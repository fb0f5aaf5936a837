"""``--loss.align repae`` (align/repae.py): REPA-E's end-to-end step on the embedded data, on CPU.

The VAE and the SiT both train, the two losses reach only their own model (checked on the gradients),
kill / resume is bitwise, a NaN batch changes nothing, both exports load and sample, bad sizes are one line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sendvae
from sendvae.align import ALIGNMENTS, AlignInputs
from sendvae.align.repae import JOINT_LOGGED, STATE_KEY
from sendvae.cli import main
from sendvae.data import to_float
from sendvae.data.latent_store import vae_fingerprint
from sendvae.models.latent_stats import LatentStats
from sendvae.runtime import checkpoint as ckpt
from sendvae.runtime.log import read_stats

from .conftest import tiny_train_args
from .test_reliability import _assert_same_state, _tensors

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
REPAE = {"loss.align": "repae", "loss.align_weight": 1.5}  # REPA-E's lambda_align
NORM = ("head.norm.running_mean", "head.norm.running_var", "head.norm.stats_set")  # the latent BatchNorm
ALL_STATE = ("model", "disc", "opt_g", "opt_d", "loss", "ema", STATE_KEY)


def _args(tmp_path, exp="run", steps=3, **overrides):
    return tiny_train_args(tmp_path, exp=exp, steps=steps, **{**REPAE, **overrides})


def _states(run) -> dict[int, dict]:
    return {step: ckpt.load_checkpoint(path) for step, path in ckpt.list_checkpoints(run)}


def _trainer(tmp_path, **overrides):
    """A repae VAETrainer on the embedded data without LPIPS and GAN (only the terms under test)."""
    from sendvae.commands.train_vae import add_arguments, resolve_config
    from sendvae.runtime.distributed import DistInfo
    from sendvae.runtime.log import RunLogger
    from sendvae.train.vae import VAETrainer

    p = argparse.ArgumentParser()
    add_arguments(p)
    cheap = {"loss.lpips_weight": 0, "loss.gan_weight": 0, **overrides}
    cfg = resolve_config(p.parse_args(_args(tmp_path, **cheap)))
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    return VAETrainer(cfg, dist, tmp_path / "run", RunLogger(None, False))


def _batch(tr, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    items = [tr.dataset[i] for i in range(n)]
    return torch.stack([im for im, _ in items]), torch.tensor([y for _, y in items])


# ---------------------------------------------------------------------------------------------------------
# Both models train; the export gives a VAE and a SiT that sample


def test_repae_trains_both_models_and_exports_both(tmp_path):
    run = tmp_path / "run"
    assert main(["train-vae", *_args(tmp_path, steps=3, **{"run.ckpt_every": 1, "run.keep_ckpts": 0})]) == 0
    rows = read_stats(run / "stats.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("align", "cos", "rec", "kl", "grad_norm", *JOINT_LOGGED):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(r["align"] == pytest.approx(-r["cos"]) for r in rows)  # REPA's -mean cosine

    states = _states(run)
    first, last = states[1], states[3]
    # the VAE, the SiT (and its EMA) and the latent BatchNorm all moved from step 1 to step 3
    for part, key in (("model", "vae.encoder.conv_in.weight"), ("model", "vae.decoder.conv_out.weight")):
        assert not torch.equal(first[part][key], last[part][key]), key
    sit_first, sit_last = first[STATE_KEY], last[STATE_KEY]
    for key in ("blocks.0.attn.qkv.weight", "projectors.0.0.weight", "x_embedder.proj.weight"):
        assert not torch.equal(sit_first["model"][key], sit_last["model"][key]), key
        assert not torch.equal(sit_first["ema"][key], sit_last["ema"][key]), key
    assert last[STATE_KEY]["model"]["final_layer.linear.weight"].abs().sum() > 0  # zero at init (adaLN-Zero)
    assert not torch.equal(first["model"][NORM[0]], last["model"][NORM[0]])
    # the SiT is no part of the VAE's model or optimizer: the model holds only the BatchNorm of the head
    assert {k for k in last["model"] if k.startswith("head.")} == set(NORM)
    vae_params = sum(1 for k in last["model"] if k.startswith("vae.") and "latent_" not in k)
    assert len(last["opt_g"]["param_groups"][0]["params"]) == vae_params

    # export/vae and export/sit, paired: the SiT records the BatchNorm's statistics and this VAE
    vae = sendvae.load_vae(str(run / "export" / "vae"))
    sit = sendvae.load_sit(str(run / "export" / "sit"))
    for k, v in sit.state_dict().items():
        assert torch.equal(v, last[STATE_KEY]["ema"][k]), k
    latents = json.loads((run / "export" / "sit" / "latents.json").read_text())
    mean, var = last["model"][NORM[0]], last["model"][NORM[1]]
    torch.testing.assert_close(torch.tensor(latents["latent_mean"]), mean)
    torch.testing.assert_close(torch.tensor(latents["latent_std"]), (var + 1e-4).sqrt())
    assert latents["vae_fingerprint"] == vae_fingerprint(vae)
    assert latents["null_class"] == sit.config.num_classes == 8  # the shapes' classes
    assert sit.config.z_dims and sit.config.encoder_depth == 2  # shapes-tiny's SiT, with its projector

    # the run folder samples with its newest checkpoint (the VAE in the same file, the BN's statistics)
    from sendvae.diffusion.sit_source import load_sit_run

    loaded = load_sit_run(run)
    assert loaded.stats is not None and loaded.stats.same_values(LatentStats.from_dict(latents))
    assert loaded.vae is not None and loaded.vae.endswith("step-0000003.pt")
    common = ["--num-samples", "2", "--batch-size", "2", "--steps", "2", "--no-progress"]
    for source in (["--exp-path", str(run)], ["--model", str(run / "export" / "sit"), "--vae",
                                              str(run / "export" / "vae")]):  # fmt: skip
        out = tmp_path / f"samples-{source[0][2:]}"
        assert main(["sample", *source, *common, "--output-dir", str(out)]) == 0
        (npz,) = out.glob("*.npz")
        assert np.load(npz)["arr_0"].shape == (2, 32, 32, 3)


# ---------------------------------------------------------------------------------------------------------
# The two losses reach only their own model


def test_vae_alignment_loss_reaches_the_vae_only(tmp_path):
    tr = _trainer(tmp_path)
    images, labels = _batch(tr)
    x = to_float(images)
    cond = tr.cotrained.draw(labels, x.shape[0])
    _, _, z, pred = tr.model(x, cond)
    align, _ = tr.alignment.loss(AlignInputs(pred, tr.teacher_tokens(x)), tr.cfg.loss)
    align.backward()
    sit = tr.cotrained.sit
    assert all(p.grad is None for p in sit.parameters()), "the SiT is frozen for the VAE's alignment loss"
    enc = [p.grad for p in tr.model.vae.encoder.parameters()]
    assert all(g is not None for g in enc) and sum(float(g.norm()) for g in enc) > 0
    assert all(p.grad is None for p in tr.model.vae.decoder.parameters())  # the alignment reads z only


def test_sit_loss_reaches_the_sit_only(tmp_path):
    tr = _trainer(tmp_path)
    images, labels = _batch(tr)
    x = to_float(images)
    cond = tr.cotrained.draw(labels, x.shape[0])
    _, _, z, _ = tr.model(x, cond)
    assert z.requires_grad  # z is attached to the VAE: only the update's detach keeps the VAE out
    before = {k: v.clone() for k, v in tr.cotrained.sit.state_dict().items()}
    terms, bad = tr.cotrained.step([(z, cond, tr.teacher_tokens(x))], skip=torch.zeros(()))
    assert float(bad) == 0 and set(terms) == set(JOINT_LOGGED) == set(ALIGNMENTS["repae"].cotrained_logged)
    assert all(p.grad is None for p in tr.model.parameters()), "the SiT's loss reached the VAE"
    after = tr.cotrained.sit.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the update was applied


def test_each_models_gradient_comes_from_its_own_loss_in_a_training_step(tmp_path):
    """Over one full train_step, every VAE and every SiT parameter receives a gradient exactly once: the
    VAE's from the generator's backward, the SiT's from its own (a leak would make it twice)."""
    tr = _trainer(tmp_path)
    calls: dict[str, int] = {}

    def counter(name):
        def hook(grad):
            calls[name] = calls.get(name, 0) + 1

        return hook

    vae = {f"vae.{n}": p for n, p in tr.model.vae.named_parameters() if p.requires_grad}
    sit = {f"sit.{n}": p for n, p in tr.cotrained.sit.named_parameters()}
    handles = [p.register_hook(counter(n)) for n, p in {**vae, **sit}.items()]
    try:
        terms = tr.train_step(list(_batch(tr)))
    finally:
        for h in handles:
            h.remove()
    assert float(terms["skipped"]) == 0
    assert {n: calls.get(n, 0) for n in vae} == dict.fromkeys(vae, 1)
    assert {n: calls.get(n, 0) for n in sit} == dict.fromkeys(sit, 1)


# ---------------------------------------------------------------------------------------------------------
# Reliability: resume, NaN batch


def test_kill_and_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    common = {"run.ckpt_every": 3}
    assert main(["train-vae", *_args(tmp_path, exp="full", steps=6, **common)]) == 0
    part = _args(tmp_path, exp="part", steps=6, **common)
    r = subprocess.run(
        [sys.executable, "-m", "sendvae.cli", "train-vae", *part, "--run.fault_exit_step", "4"],
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr[-3000:]  # died after step 4; the newest checkpoint is step 3
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "part")] == [3]
    assert main(["train-vae", *part]) == 0
    a, b = _states(tmp_path / "full")[6], _states(tmp_path / "part")[6]
    assert a["step"] == b["step"] == 6 and STATE_KEY in a
    assert _tensors(a[STATE_KEY])  # the SiT's model, EMA and optimizer are compared below
    _assert_same_state(a, b, keys=ALL_STATE)


def test_nan_batch_changes_no_state(tmp_path):
    """A NaN batch at step 2 skips the VAE, discriminator and SiT updates and restores the BatchNorm."""
    common = {"loss.gan_start": 0, "run.ckpt_every": 1}
    assert main(["train-vae", *_args(tmp_path, exp="a", steps=2, **common)]) == 0
    before = _states(tmp_path / "a")[2]
    more = _args(tmp_path, exp="a", steps=3, **common)
    assert main(["train-vae", *more, "--run.fault_nan_steps", "2"]) == 0
    after = _states(tmp_path / "a")[3]
    assert float(after["nan_steps"]) == 1
    _assert_same_state(before, after, keys=ALL_STATE)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line that names the problem and what to do


@pytest.mark.parametrize(
    "extra, words",
    [
        # 40 px -> 10x10 latents: patch 4 does not divide them
        (["--resolution", "40", "--sit.model", "SiT-S/4"], ("--sit.model SiT-S/4", "SiT-S/1, SiT-S/2")),
        # 32 px -> 8x8 latents -> 4x4 SiT/2 tokens; the teacher's grid is 8x8
        (["--sit.grid_mismatch", "error"], ("4x4", "8x8", "--sit.model SiT-S/1", "resample_teacher")),
        (["--sit.encoder_depth", "9"], ("encoder_depth", "1..depth=4", "--sit.")),
    ],
)
def test_bad_sizes_are_one_line_errors(tmp_path, capsys, extra, words):
    assert main(["train-vae", *_args(tmp_path, steps=1), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run" / "config.json").exists()
