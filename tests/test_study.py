"""`sendvae study` at its reduced scale: one shared init, a run per (variant, seed), tables, verdict."""

import json
import math

import numpy as np
import pytest

from sendvae.cli import main
from sendvae.pipeline.study_config import study_config
from sendvae.pipeline.study_report import analyse, verdict

from .test_demo import evaluate_recon


@pytest.mark.slow
def test_study_runs_every_variant_from_one_init_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "--scale", "ci", "--output-dir", str(out), "--device", "cpu"]
    assert main(argv) == 0
    for name in ("study.md", "study.csv", "study.json", "gfd_vs_steps.png", "probe_vs_gfd.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    report = json.loads((out / "study.json").read_text())
    assert set(report["runs"]) == {"none-s0", "sendvae-s0"}
    for run in report["runs"].values():
        assert run["steps"] == [6, 12] and len(run["gfd"]) == 2  # scored at each eval point
        assert all(math.isfinite(v) for v in [*run["gfd"], run["gfd_cfg"], run["rfd"], run["psnr"]])
    row = report["analysis"]["variants"]["sendvae"]["gfd"]
    assert row["low"] <= row["mean"] <= row["high"]
    assert "sendvae - none:gfd" in report["analysis"]["paired"]
    assert report["judge"]["metric"] in ("FD_fmnist-cnn", "FD_shapes-cnn")
    # both fine-tunes start from the one shared VAE
    for name in ("none-s0", "sendvae-s0"):
        cfg = json.loads((out / "runs" / name / "vae" / "config.json").read_text())
        assert cfg["model"]["vae_ckpt"] == str(out / "pretrain" / "export" / "vae")
        assert cfg["loss"]["align"] == name.split("-")[0]
    # `sendvae evaluate --recon` on a run's VAE gives the study's reconstruction numbers (one engine)
    data = "fashion-mnist" if report["judge"]["metric"] == "FD_fmnist-cnn" else "shapes"
    run = report["runs"]["sendvae-s0"]
    m = evaluate_recon(
        tmp_path / "recon.json", out / "runs" / "sendvae-s0" / "vae" / "export" / "vae", data, 64
    )
    for key in ("psnr", "ssim", "stlpips_alex", f"r{report['judge']['metric']}"):
        assert m[key] == pytest.approx(run[key], rel=1e-6, abs=1e-9), key
    md = (out / "study.md").read_text()
    assert "| none |" in md and "| sendvae |" in md and "## Verdict" in md and "## Paired differences" in md
    capsys.readouterr()
    assert main(argv) == 0  # a rerun loads every finished stage
    err = capsys.readouterr().err
    assert "[pretrain] done earlier" in err and "[judge] done earlier" in err
    assert err.count("] done earlier") == 2 + 2 * 6  # pretrain, judge + (vae ... downstream) x 2
    # an interrupted study's report so far: only the finished runs, and nothing run or rewritten
    import shutil

    shutil.rmtree(out / "runs" / "sendvae-s0" / "stages")
    kept = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert main([*argv, "--report-only"]) == 0
    assert set(json.loads((out / "study.json").read_text())["runs"]) == {"none-s0"}
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == kept
    assert "] ..." not in capsys.readouterr().err  # no stage ran
    assert main(["study", "--scale", "ci", "--output-dir", str(tmp_path / "empty"), "--report-only"]) != 0
    assert not (tmp_path / "empty").exists()


def _fake_run(root, variant, seed, acc, fd_shift, rng):
    """A finished run's record and per-sample arrays: hits with rate `acc`, features N(fd_shift, 1)."""
    d = root / f"{variant}-s{seed}"
    d.mkdir(parents=True)
    n = 500
    hits = rng.random(n) < acc
    feats = rng.normal(fd_shift, 1.0, (n, 4)).astype(np.float32)
    np.savez(d / "scores.npz", step10_feats=feats, step10_hits=hits, cfg_feats=feats, cfg_hits=hits)
    np.savez(d / "recon.npz", feats=feats, hits=hits, psnr=rng.normal(20 + fd_shift, 1.0, n))
    return {
        "variant": variant,
        "seed": seed,
        "dir": str(d),
        "steps": [10],
        "gfd": [0.0],
        "probe": {"class_accuracy": acc},
        "score": "class_accuracy",
    }


def test_intervals_and_verdict_read_the_numbers_not_the_hopes(tmp_path):
    cfg = study_config("ci")
    cfg.variants, cfg.seeds = ("none", "repa", "sendvae"), (0, 1, 2)
    rng = np.random.default_rng(0)
    runs = {}
    for seed in cfg.seeds:  # sendvae clearly worse than none in accuracy; repa indistinguishable from none
        for v, acc, shift in (("none", 0.8, 0.0), ("repa", 0.8, 0.0), ("sendvae", 0.5, 1.0)):
            runs[f"{v}-s{seed}"] = _fake_run(tmp_path, v, seed, acc, shift, rng)
    ref = (np.zeros(4), np.eye(4))
    out = analyse(cfg, runs, ref, reps=100)
    worse = out["paired"]["sendvae - none:acc_cfg"]
    assert worse["resolved"] and worse["high"] < 0 and worse["mean"] == pytest.approx(-0.3, abs=0.05)
    gfd = out["paired"]["sendvae - none:gfd"]
    assert gfd["resolved"] and gfd["low"] > 0  # FD 4 * 1^2 further from the reference
    same = out["paired"]["repa - none:acc_cfg"]
    assert not same["resolved"] and same["seeds_needed"] > 3
    lines = verdict(cfg, out, (0.9, 0.5, 0.99))
    assert any(
        line.startswith("sendvae vs none, class accuracy (CFG)") and "resolved: sendvae is worse" in line
        for line in lines
    )
    assert any(
        line.startswith("repa vs none, class accuracy (CFG)") and "NOT resolved" in line for line in lines
    )
    assert "positive" in lines[-1]


def test_each_variant_trains_with_its_papers_alignment_weight():
    from sendvae.pipeline.study import _variant
    from sendvae.train.vae_config import PRESETS

    cfg = study_config("cpu")
    weights = {v: _variant(cfg, v, 1).vae.loss.align_weight for v in cfg.variants}
    assert weights["vf"] == PRESETS.build("vavae-f16d32").loss.align_weight == 0.1  # VA-VAE
    assert weights["repae"] == PRESETS.build("repae-f16d32").loss.align_weight == 1.5  # REPA-E
    assert weights["sendvae"] == weights["repa"] == weights["none"] == 1.0
    assert _variant(cfg, "vf", 1).seed == 1 and _variant(cfg, "vf", 1).vae.loss.align == "vf"
    assert cfg.base.vae.loss.align == "sendvae"  # the base is not changed by a run's config
