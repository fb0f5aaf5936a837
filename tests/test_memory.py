"""The memory estimate of ``train-vae|train-sit --dry-run`` (train/memory.py): the CPU tracker counts what it
should, the estimate matches the peak of a real step, and the report splits the batch and plans GPUs."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from sendvae.cli import main
from sendvae.commands.train_vae import add_arguments, resolve_config
from sendvae.runtime.distributed import DistInfo
from sendvae.runtime.log import RunLogger
from sendvae.train.memory import (
    GIB,
    Allocated,
    LiveTensorBytes,
    MemoryEstimate,
    RestingState,
    describe,
    estimate_train_vae,
    measure,
    smallest_accum,
)
from sendvae.train.vae import VAETrainer


def _config(tmp_path, tiny_args, **overrides):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return resolve_config(p.parse_args(tiny_args(tmp_path, **overrides)))


def test_live_tensor_bytes_counts_new_storages_until_freed():
    lin = torch.nn.Linear(1000, 1000, bias=False)  # 4 MB of weights, made before the mode: not counted
    x = torch.randn(64, 1000)
    with LiveTensorBytes() as live:
        y = torch.relu(lin(x))  # kept for the backward: relu's output (the matmul's is freed), 256 kB
        assert live.now == 64 * 1000 * 4
        view = y.t()[:10]  # a view: no new storage
        z = x.clone()  # 256 kB more ...
        z.add_(1.0)  # ... and in place: nothing more
        assert live.now == 2 * 64 * 1000 * 4
        del z
        assert live.now == 64 * 1000 * 4
        y.square().sum().backward()  # the weight's gradient, 4 MB, stays
        del y, view
        assert live.now == 1000 * 1000 * 4
        # at the peak: the gradient, two (64, 1000) activations, the loss and its gradient seed (4 B each)
        assert live.peak == 1000 * 1000 * 4 + 2 * 64 * 1000 * 4 + 8


def _dry_run(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err  # the config alone on stdout, the report on stderr


def test_dry_run_reports_the_batch_split_and_measures_only_when_asked(tmp_path, tiny_args, capsys):
    args = [*tiny_args(tmp_path, **{"optim.grad_accum": 2}), "--dry-run"]
    cfg, err = _dry_run(capsys, ["train-vae", *args])
    assert cfg["optim"]["grad_accum"] == 2
    assert "global batch 4 = 1 process(es) x 2 micro-batch(es) of 2 (--optim.grad_accum 2)" in err
    assert "--memory-estimate yes" in err and "GiB" not in err  # on a CPU: not measured by default
    _, err = _dry_run(capsys, ["train-vae", *args, "--memory-estimate", "yes"])
    for line in (
        "weights and buffers: teacher",
        "optimizer states: opt_g",
        "the step's peak",
        "total",
        "how:",
    ):
        assert line in err, line
    assert "80 GiB" in err
    _, err = _dry_run(
        capsys, ["train-sit", "--preset", "shapes-tiny", "--dry-run", "--memory-estimate", "yes"]
    )
    assert "not made" in err and "--store" in err


def test_estimate_matches_the_peak_of_a_real_step(tmp_path, tiny_args):
    """The estimate for micro-batch 8, extrapolated from steps of 1 and 2 images, against a trainer built and
    stepped with 8 images under the same tracker (what the estimate leaves out is outside the tracker too)."""
    cfg = _config(tmp_path, tiny_args, **{"optim.batch_size": 8, "loss.gan_start": 0})
    est = estimate_train_vae(cfg)
    assert est.sizes[1] <= 8  # the line is found at or below the run's micro-batch
    with Allocated(torch.device("cpu")) as a:
        tr = VAETrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), tmp_path / "run", RunLogger(None, False))
        batch = torch.stack([tr.dataset[i][0] for i in range(8)])
        for _ in range(2):  # the first step makes the optimizer states
            tr.train_step(batch)
            tr.step += 1
        peak = a.peak()
    # Measured: equal to the byte (the resting state is measured the same way, and on CPU the step's peak is
    # exactly linear in the micro-batch); the bound leaves room for a kernel whose workspace is not.
    assert abs(est.total(8, 1) - peak) < 0.02 * peak, (est.total(8, 1), peak)
    assert est.resting.trained > 0 and est.per_image > 0


class _FlatThenLinear:
    """A trainer whose step peaks at max(5 MB, 1 MB x images): the optimizer's part, then activations."""

    def __init__(self) -> None:
        self.cfg = SimpleNamespace(optim=SimpleNamespace(batch_size=1))
        self.dataset = [torch.zeros(1)] * 4
        self.step, self.device, self.weights = 0, torch.device("cpu"), torch.zeros(250_000)  # 1 MB at rest

    def train_step(self, batch):
        n = self.cfg.optim.batch_size
        torch.empty(max(5_000_000, 1_000_000 * n), dtype=torch.uint8)


def test_measure_finds_the_line_past_the_optimizers_peak():
    """Steps of 1, 2, 4 images all peak at the flat 5 MB, then 8, 16, 32 on the line: the estimate is the
    line (through 4 and 8 it would be 0.75 MB per image, 11 MB at 12 images instead of 12)."""
    est = measure(_FlatThenLinear, torch.device("cpu"), target=64)

    def mb(n: int):  # n MB and a few bytes of batches
        return pytest.approx(n * 1e6, rel=1e-3)

    assert est.sizes == (16, 32) and est.per_image == mb(1) and est.step_peak(64) == mb(64)
    assert est.step_peak(1) == mb(16)  # below the line's sizes: the smaller measured peak, an upper bound
    assert est.resting.total == mb(1)
    assert measure(_FlatThenLinear, torch.device("cpu"), target=2).sizes == (1, 2)  # never past the run's


def test_plan_picks_the_smallest_accumulation_that_fits():
    # 10 GiB at rest, 1 GiB fixed in the step, 1 GiB per image; DDP buckets of 2 GiB with several processes
    est = MemoryEstimate(
        "cuda:0", "bfloat16", RestingState(10 * GIB, trained=2 * GIB), (1, 2), (2 * GIB, 3 * GIB)
    )
    assert est.per_image == GIB and est.fixed == GIB
    assert est.total(32, 1) == 43 * GIB and est.total(32, 8) == 45 * GIB
    # 80 GiB x 0.9 = 72: one process fits a micro-batch of 61; 8 processes of 24 GiB (21.6) one of 8
    assert est.largest_micro(80, 1) == 61 and est.largest_micro(24, 8) == 8
    assert smallest_accum(est, 1024, 1, 80) == 32  # 1024 / 32 = 32 <= 61; 16 (64) is too large
    assert smallest_accum(est, 1024, 8, 24) == 16  # 128 / 16 = 8
    assert smallest_accum(est, 1024, 8, 12) is None  # 10.8 GiB: not even one image beside 12 GiB
    report = describe(est, 1024, 4, 8)
    assert "global batch 1024 = 8 process(es) x 4 micro-batch(es) of 32" in report
    assert "DDP gradient buckets" in report
