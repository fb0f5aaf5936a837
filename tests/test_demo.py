"""`sendvae demo` end to end at its reduced scale: every report image and metric; resume between stages."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from sendvae.cli import main
from sendvae.pipeline.stages import STOP_AFTER_ENV, Stages, StageSettingsError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STAGES = ["pretrain", "vae", "latents", "sit", "samples", "evaluate", "probe"]


def _finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, float):
        yield obj


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes_after_a_kill(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--scale", "ci", "--output-dir", str(out), "--device", "cpu", "--no-progress"]
    # killed right after the sit stage was recorded
    r = subprocess.run([sys.executable, "-m", "sendvae.cli", *argv], env={**ENV, STOP_AFTER_ENV: "sit"},
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 3, r.stderr[-2000:]
    assert sorted(p.stem for p in (out / "stages").glob("*.json")) == ["latents", "pretrain", "sit", "vae"]
    assert not (out / "report.html").exists()
    vae_ckpts = {p: p.stat().st_mtime_ns for p in (out / "vae" / "checkpoints").glob("*.pt")}
    sit_export = (out / "sit" / "export" / "sit" / "model.safetensors").stat().st_mtime_ns

    assert main(argv) == 0  # continues: the finished stages are loaded, not run
    err = capsys.readouterr().err
    for name in ("pretrain", "vae", "latents", "sit"):
        assert f"[{name}] done earlier" in err
    for name in ("samples", "evaluate", "probe"):
        assert f"[{name}] done earlier" not in err and f"[{name}] ..." in err
    assert {p: p.stat().st_mtime_ns for p in vae_ckpts} == vae_ckpts
    assert (out / "sit" / "export" / "sit" / "model.safetensors").stat().st_mtime_ns == sit_export

    # the report: every figure exists, is inlined in the HTML and linked from the Markdown
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(figures) >= 5
    for rel in figures:
        assert (out / rel).is_file() and (out / rel).stat().st_size > 1000, rel
    assert html.count("data:image/png;base64,") == len(figures)
    assert "src='http" not in html and 'src="http' not in html  # self-contained
    for name in ("reconstructions", "samples_cfg1", "samples_cfg4", "curves"):
        assert f"figures/{name}.png" in md
    # every metric finite
    ev = json.loads((out / "stages" / "evaluate.json").read_text())
    for key in ("fd_judge", "fd_teacher", "class_accuracy"):
        for scale in ("1", "4"):
            assert math.isfinite(ev["samples"][scale][key])
    for key in ("fd_judge", "fd_teacher", "class_accuracy", "psnr", "ssim", "stlpips_alex"):
        assert math.isfinite(ev["recon"][key])
    assert len(ev["samples"]["4"]["per_class"]) == ev["num_classes"]
    # the judge (a 1-epoch ci recipe here) reads real images far above chance, noise-like samples not
    assert ev["judge"]["metric"] in ("FD_fmnist-cnn", "FD_shapes-cnn") and ev["judge"]["test_accuracy"] > 0.6
    assert ev["real"]["class_accuracy"] > 0.6 and ev["real"]["fd_judge"] < ev["samples"]["1"]["fd_judge"]
    # `sendvae evaluate --recon` on the demo's VAE and held-out images gives the demo's numbers (one engine)
    data = "fashion-mnist" if ev["judge"]["metric"] == "FD_fmnist-cnn" else "shapes"
    m = evaluate_recon(tmp_path / "recon.json", out / "vae" / "export" / "vae", data, n=128)
    for key in ("psnr", "ssim", "stlpips_alex", f"r{ev['judge']['metric']}"):
        assert m[key] == pytest.approx(ev["recon"][key], rel=1e-6, abs=1e-9), key
    probe = json.loads((out / "stages" / "probe.json").read_text())
    assert set(probe["results"]) == {"sendvae-vae", "random-tiny-f4d4", "pixels"}
    assert all(math.isfinite(v) for v in _finite_numbers(probe["results"]))

    # a third run does nothing but rewrite the report; other settings for a finished stage are refused
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert all(f"[{name}] done earlier" in err for name in STAGES)
    assert main([*argv, "--vae.optim.max_steps", "31"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert "stage 'pretrain' finished earlier with other settings (vae)" in lines[-1]
    assert not any("Traceback" in line for line in lines)


def evaluate_recon(out_json, vae, data: str, n: int) -> dict:
    """`sendvae evaluate --recon` as the demo and the study score reconstructions at their ci scale: the
    held-out eval split, ST-LPIPS-alex, the judge's rFD (its 1-epoch ci recipe, from the cache)."""
    argv = ["evaluate", "--recon", "--vae", str(vae), "--data", data, "--split", "eval", "--resolution", "32",
            "--num-images", str(n), "--perceptual", "stlpips_alex", "--judge", "--judge-epochs", "1",
            "--judge-images", "4096", "--device", "cpu", "--output-json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out_json.read_text())


def test_stage_records_refuse_other_settings(tmp_path):
    st = Stages(tmp_path, echo=lambda line: None)
    calls = []
    rec = st.run("a", lambda: calls.append(1) or {"summary": "ok", "value": 1.5}, {"n": 3})
    assert rec["value"] == 1.5 and calls == [1]
    assert st.run("a", lambda: calls.append(2) or {"summary": "x"}, {"n": 3})["value"] == 1.5
    assert calls == [1]  # loaded, not run again
    with pytest.raises(StageSettingsError, match="stage 'a' finished earlier with other settings \\(n\\)"):
        st.run("a", lambda: {"summary": "x"}, {"n": 4})


@pytest.mark.slow
def test_gpu_scale_builds_every_stage(tmp_path):
    """The --scale gpu configuration (LPIPS, an 8 x 256 SiT, 128 px teacher), cut to a few steps on CPU."""
    small = {"--pretrain_steps": 2, "--vae.optim.max_steps": 2, "--latents.num_images": 32,
             "--sit.optim.max_steps": 2, "--sit.optim.batch_size": 8, "--sample.num_samples": 16,
             "--sample.steps": 2, "--eval.ref_images": 16,
             "--eval.probe_train": 48, "--eval.attr_images": 40, "--eval.judge_images": 1024,
             "--eval.judge_epochs": 1}  # fmt: skip
    argv = ["demo", "--scale", "gpu", "--output-dir", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main([*argv, *[str(s) for kv in small.items() for s in kv]]) == 0
    ev = json.loads((tmp_path / "stages" / "evaluate.json").read_text())
    assert (tmp_path / "report.html").is_file() and math.isfinite(ev["recon"]["psnr"])
    cfg = json.loads((tmp_path / "sit" / "config.json").read_text())
    assert cfg["model"]["depth"] == 8 and cfg["model"]["hidden_size"] == 256
    vae = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert vae["loss"]["lpips_weight"] == 0.1 and vae["teacher"]["input_size"] == 128


def test_report_page_inlines_every_figure_and_refuses_a_missing_one(tmp_path):
    import torch

    from sendvae.pipeline.figures import save_image_grid
    from sendvae.pipeline.report_page import Page

    img = tmp_path / "figures" / "grid.png"
    save_image_grid(torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), img, nrow=2)
    page = Page("t")
    page.text("a `code` <b>not html</b>")
    page.figure(img, "a grid", "`sendvae demo`")
    page.table(["k", "v"], [["fd", "1.5"], ["x", "1.0 +- 0.1"]])
    page.write(tmp_path / "r.html", tmp_path / "r.md")
    html = (tmp_path / "r.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "&lt;b&gt;not html&lt;/b&gt;" in html
    assert "<code>code</code>" in html and html.count("class='num'") == 2
    assert "](figures/grid.png)" in (tmp_path / "r.md").read_text()
    # a path with markup stays text in the Markdown too (as in the HTML), and a cell's | does not split it
    page = Page("t")
    page.text("written to runs/<b>x</b> and `sendvae demo --output-dir runs/<b>x</b>`")
    page.table(["k", "v"], [["a|b", "1"]])
    page.write(tmp_path / "s.html", tmp_path / "s.md")
    md = (tmp_path / "s.md").read_text()
    assert "runs/&lt;b&gt;x&lt;/b&gt; and `sendvae demo --output-dir runs/<b>x</b>`" in md
    assert "| a\\|b | 1 |" in md
    with pytest.raises(FileNotFoundError, match="was not written"):
        page.figure(tmp_path / "missing.png", "x", "y")


def test_a_data_path_without_fashion_mnist_is_one_line(tmp_path, capsys):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # not images
    argv = ["demo", "--scale", "ci", "--output-dir", str(tmp_path / "out"), "--data-path", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Fashion-MNIST not found" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out" / "stages").exists()
