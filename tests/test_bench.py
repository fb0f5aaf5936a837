"""Smoke runs of ``sendvae bench`` on tiny settings: the commands work and report what they promise."""

import json

from sendvae.cli import main

TINY = "--batch-size 2 --iters 1 --warmup 0 --json".split()


def _rows(out: str) -> list[dict]:
    return json.loads(out[out.index("[") :])


def test_bench_vae_reports_throughput(capsys):
    assert main(["bench", "vae", "--vae", "tiny-f8d4", "--resolution", "32", *TINY]) == 0
    out = capsys.readouterr().out
    assert "encode img/s" in out and "enc+dec+bwd img/s" in out
    row = _rows(out)[0]
    assert row["vae"] == "tiny-f8d4" and row["encode_img_s"] > 0 and row["train_img_s"] > 0


def test_bench_train_vae_reports_time_split(capsys):
    args = "train-vae --vae tiny-f8d4 --enc-type efficientnet-lite0 --resolution 64".split()
    assert main(["bench", *args, *TINY]) == 0
    row = _rows(capsys.readouterr().out)[0]
    for key in ("img_s", "teacher_ms", "vae_fwd_bwd_ms", "lpips_ms", "discriminator_ms", "optimizer_ms"):
        assert row[key] > 0, key


def test_bench_sample_and_evaluate(capsys):
    sit = "--model SiT-S/2 --sit-depth 1 --sit-width 64".split()
    assert main(["bench", "sample", *sit, "--steps", "10", *TINY]) == 0
    row = _rows(capsys.readouterr().out)[0]
    assert row["evals_per_call"] == 4 and row["ms_per_call"] > 0 and row["hours_for_50k"] > 0
    assert main(["bench", "evaluate", "--resolution", "64", *TINY]) == 0
    row = _rows(capsys.readouterr().out)[0]
    assert row["img_s"] > 0 and row["seconds_for_50k"] > 0


def test_bench_probe(capsys):
    assert (
        main(
            ["bench", "probe", "--vae", "tiny-f16d32", "--resolution", "64", "--num-latents", "300", "--json"]
        )
        == 0
    )
    row = _rows(capsys.readouterr().out)[0]
    assert row["feature_dim"] == 32 * 4 * 4 and row["num_latents"] == 300
    assert row["seconds"] >= row["categorical_s"] + row["continuous_s"] + row["multilabel_s"] > 0
