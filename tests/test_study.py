"""`sendvae study` at its reduced scale: one shared init, a run per (variant, seed), tables, verdict."""

import json
import math

import pytest

from sendvae.cli import main
from sendvae.pipeline.study_config import study_config
from sendvae.pipeline.study_report import aggregate, verdict


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
    # both fine-tunes start from the one shared VAE
    for name in ("none-s0", "sendvae-s0"):
        cfg = json.loads((out / "runs" / name / "vae" / "config.json").read_text())
        assert cfg["model"]["vae_ckpt"] == str(out / "pretrain" / "export" / "vae")
        assert cfg["loss"]["align"] == name.split("-")[0]
    md = (out / "study.md").read_text()
    assert "| none |" in md and "| sendvae |" in md and "## Verdict" in md
    capsys.readouterr()
    assert main(argv) == 0  # a rerun loads every finished stage
    err = capsys.readouterr().err
    assert "[pretrain] done earlier" in err
    assert err.count("] done earlier") == 2 + 2 * 6  # pretrain, heads + (vae ... downstream) x 2
    # an interrupted study's report so far: only the finished runs
    import shutil

    shutil.rmtree(out / "runs" / "sendvae-s0" / "stages")
    assert main([*argv, "--report-only"]) == 0
    assert set(json.loads((out / "study.json").read_text())["runs"]) == {"none-s0"}
    assert main(["study", "--scale", "ci", "--output-dir", str(tmp_path / "empty"), "--report-only"]) != 0


def _run(variant, seed, gfd, probe):
    return {"variant": variant, "seed": seed, "gfd": [gfd + 10, gfd], "steps": [1, 2], "gfd_cfg": gfd,
            "class_accuracy_cfg": 0.5, "rfd": 1.0, "psnr": 20.0, "probe": {"top5_recall": probe},
            "score": "top5_recall"}  # fmt: skip


def test_verdict_reads_the_numbers_not_the_hopes():
    cfg = study_config("ci")
    cfg.variants = ("none", "sendvae")
    runs = {f"{v}-s{s}": _run(v, s, g + s, p) for v, g, p in (("none", 10.0, 0.5), ("sendvae", 20.0, 0.7))
            for s in (0, 1)}  # fmt: skip
    agg = aggregate(cfg, runs)
    assert agg["none"]["gfd"] == (10.5, pytest.approx(0.7071, abs=1e-4))
    lines = verdict(cfg, agg, r=0.9)
    assert lines[0].startswith("sendvae does NOT have the best (lowest) final gFD")
    assert "sendvae has the best attribute-probe score" in lines[2]
    assert "no negative correlation" in lines[3]


def test_each_variant_trains_with_its_papers_alignment_weight():
    from sendvae.pipeline.study import _variant
    from sendvae.train.vae_config import PRESETS

    cfg = study_config("cpu")
    weights = {v: _variant(cfg, v, 1).vae.align_weight for v in cfg.variants}
    assert weights["vf"] == PRESETS.build("vavae-f16d32").loss.align_weight == 0.1  # VA-VAE
    assert weights["repae"] == PRESETS.build("repae-f16d32").loss.align_weight == 1.5  # REPA-E
    assert weights["sendvae"] == weights["repa"] == weights["none"] == 1.0
    assert _variant(cfg, "vf", 1).seed == 1 and _variant(cfg, "vf", 1).vae.align == "vf"
