"""The demo's report: ROOT/report.html (self-contained) and ROOT/report.md, from the stage records."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any

import torch

from ..runtime.log import read_stats
from .demo_config import DemoConfig
from .figures import plot_curves, series
from .report_page import Page

TRADES = {
    "cpu": [
        "Fashion-MNIST at 32 px with a 4 x 8 x 8 latent: the garments' silhouettes survive, their print "
        "and texture mostly do not (the judge reads ~85% of the reconstructions as their class, 91% of real "
        "images).",
        "the teacher at 64 px input (a 4 x 4 token grid): the teacher is the costliest network of every "
        "stage on a CPU; 128 px costs 4x.",
        "no LPIPS and no discriminator in the VAE loss (MSE + KL + alignment): they cost most of a VAE step "
        "at this size; reconstructions are therefore blurrier than a full recipe's.",
        "a 4-block, 128-wide SiT for 1000 steps on a 2048-image store, 16 Euler steps, and FD / class "
        "accuracy on hundreds of samples (FD is biased upwards at this sample size; compare numbers within "
        "the report).",
    ],
    "gpu": [
        "LPIPS on, longer training, a wider SiT and thousands of samples: still a toy next to the paper's "
        "ImageNet run, which needs a DINOv2 teacher and hundreds of GPU hours."
    ],
    "ci": [
        "a reduced run that exercises every stage and figure: its models are far too short-trained to "
        "generate garments; only the mechanics are checked."
    ],
}


def _f(v: Any, digits: int = 3) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _machine() -> str:
    dev = "GPU " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {torch.get_num_threads()} threads, {dev}, torch {torch.__version__}"


def write_report(
    cfg: DemoConfig, root: Path, rec: dict[str, Any], note: str | None = None
) -> tuple[Path, Path]:
    ev, figs = rec["evaluate"], root / "figures"
    jm, tm, judge = ev["judge"]["metric"], ev["teacher_metric"], ev["judge"]
    guided = f"{cfg.sample.cfg_scale:g}"
    d, teacher = cfg.vae.data, cfg.vae.teacher.enc_type
    page = Page(f"sendvae demo ({cfg.scale} scale)")
    if note:
        page.text(f"{note}.", note=True)
    total = sum(r["seconds"] for r in rec.values())
    g, r = ev["samples"][guided], ev["recon"]
    page.text(
        f"The whole pipeline on the embedded example: {ev['dataset']} and the bundled "
        f"{teacher} teacher, no downloads. Stage time {total / 60:.1f} min on {_machine()}. "
        f"The samples are judged by `{judge['name']}`, a small CNN trained from scratch on the real training "
        f"images (not the teacher the VAE aligns to)."
    )
    page.heading("Result")
    bar = ev["bar"]
    met_samples = "met" if bar["samples' class accuracy >= 0.8"] else "NOT met"
    met_recon = "met" if bar["reconstructions' class accuracy >= 0.85"] else "NOT met"
    page.text(
        f"- the judge reads {judge['test_accuracy']:.1%} of held-out real test images as their class (its "
        f"ceiling; chance {1 / ev['num_classes']:.0%})\n"
        f"- class-conditional samples with CFG {guided}: {g['class_accuracy']:.1%} show the class asked for; "
        f"bar >= 80%: {met_samples}\n"
        f"- the VAE's reconstructions of held-out images: {r['class_accuracy']:.1%} read as their class; "
        f"bar >= 85%: {met_recon}\n"
        f"- {jm}: samples {g['fd_judge']:.2f}, reconstructions {r['fd_judge']:.2f}, other real images "
        f"{ev['real']['fd_judge']:.2f} (the floor at this sample size)"
    )
    if not all(bar.values()):
        page.text(
            "A bar is not met at this scale. The reconstructions cap every sample (they are decoded by the "
            "same VAE); what it would take: a sharper VAE (more steps, `--vae.optim.max_steps`, the LPIPS "
            "term `--vae.loss.lpips_weight 0.1`) and a longer SiT (`--sit.optim.max_steps`); `--scale gpu` "
            "runs that in minutes "
            "on one GPU.",
            note=True,
        )
    page.table(
        ["stage", "seconds", "summary"],
        [[k, f"{v['seconds']:.0f}", v["summary"]] for k, v in rec.items()],
        "Stages (each recorded in stages/<name>.json; a rerun continues after the last finished one)",
    )

    page.heading("Reconstructions")
    page.figure(
        figs / "reconstructions.png",
        "Held-out real images (top row) and the VAE's reconstructions from the posterior mean (bottom row)",
        "`sendvae demo`, stage evaluate (the VAE of stage vae)",
    )
    page.heading("Class-conditional samples")
    per_class = ", ".join(ev["classes"])
    for scale in ev["samples"]:
        what = "without guidance" if scale == "1" else f"with classifier-free guidance {scale}"
        acc = ev["samples"][scale]["per_class"]
        page.figure(
            figs / f"samples_cfg{scale}.png",
            f"SiT samples {what}: one row per class ({per_class}), {cfg.sample.steps}-step Euler ODE, "
            f"decoded by the demo VAE. The judge's accuracy per row: "
            + ", ".join(f"{c} {a:.0%}" for c, a in zip(ev["classes"], acc)),
            f"`sendvae demo`, stage samples (`sendvae sample --exp-path {root / 'sit'} --cfg-scale {scale}`)",
        )

    page.heading("Training curves")
    vae_rows, sit_rows = read_stats(root / "vae" / "stats.jsonl"), read_stats(root / "sit" / "stats.jsonl")
    pre_rows = read_stats(root / "pretrain" / "stats.jsonl")
    ft_steps, ft_rec = series(vae_rows, "rec")
    plot_curves(
        [
            (
                "VAE reconstruction (MSE)",
                [
                    ("plain pre-training", *series(pre_rows, "rec")),
                    (f"{cfg.vae.loss.align} fine-tune", [s + cfg.pretrain_steps for s in ft_steps], ft_rec),
                ],
            ),
            ("VAE alignment: mean token cosine", [("mapper vs teacher", *series(vae_rows, "cos"))]),
            ("SiT denoising loss", [("velocity MSE", *series(sit_rows, "denoise"))]),
            ("SiT REPA: mean token cosine", [("projector vs teacher", *series(sit_rows, "cos"))]),
        ],
        figs / "curves.png",
    )
    page.figure(
        figs / "curves.png",
        "Loss and alignment curves of the two training stages (logged means between log steps)",
        f"`sendvae demo`, stages pretrain, vae and sit (their stats.jsonl in {root})",
    )

    page.heading("Metrics")
    lp = next((k for k in r if "lpips" in k), None)

    def scored(what: str, s: dict[str, Any]) -> list[str]:
        return [what, _f(s["class_accuracy"]), _f(s["fd_judge"], 2), _f(s["fd_teacher"], 2)]

    rows = [
        scored("held-out real images", ev["real"]) + ["-", "-", "-"],
        scored("reconstructions", r) + [_f(r["psnr"], 2), _f(r["ssim"]), _f(r[lp]) if lp else "-"],
    ]
    rows += [scored(f"samples, CFG {scale}", s) + ["-", "-", "-"] for scale, s in ev["samples"].items()]
    page.table(
        ["images", f"class accuracy ({judge['name']})", jm, f"{tm} (secondary)", "PSNR (dB)", "SSIM"]
        + [lp or "LPIPS"],
        rows,
        f"{jm}: Frechet distance of the judge's penultimate features against {cfg.eval.ref_images} "
        f"held-out real images (the FID formula in the judge's space, not FID); {tm}: the same in the "
        "teacher's pooled features (the space the VAE is aligned to, so it favours aligned models). Class "
        "accuracy: the fraction the judge reads as the class asked for (its own test accuracy "
        f"{judge['test_accuracy']:.1%}).",
    )

    page.heading("Attribute probes")
    probe = rec["probe"]["results"]
    cols = [c for c in next(iter(probe.values())) if c.startswith("group:")] + [
        "top5_recall",
        "class_accuracy",
    ]
    cols = [c for c in dict.fromkeys(cols) if any(c in s for s in probe.values())]
    page.table(
        ["latent", *[c.removeprefix("group:") for c in cols]],
        [[k, *[_f(s.get(c, float("nan"))) for c in cols]] for k, s in probe.items()],
        (
            f"Linear probes of the ground-truth attributes from the latents of {cfg.eval.attr_images} images "
            "(accuracy / R^2 / micro F1 by group; see probe/probe.md)"
        )
        if d.name == "shapes"
        else (
            f"Linear class probe from the latents of {cfg.eval.attr_images} held-out images (accuracy; "
            "top-5 recall of the class; see probe/probe.md)"
        ),  # fmt: skip
    )
    page.figure(
        root / "probe" / "groups.png",
        "Probe scores per attribute group and model",
        f"`sendvae demo`, stage probe (`sendvae probe --vae {root / 'vae' / 'export' / 'vae'} --pixels`)",
    )

    page.heading("What this scale trades")
    page.text("\n".join(f"- {t}" for t in TRADES.get(cfg.scale, [])))
    page.heading("The same stages as separate commands")
    page.text(
        f"- `sendvae train-vae --config {root / 'vae' / 'config.json'}`\n"
        f"- `sendvae cache-latents --vae {root / 'vae' / 'export' / 'vae'} --enc-type {teacher} ...`\n"
        f"- `sendvae train-sit --config {root / 'sit' / 'config.json'}`\n"
        f"- `sendvae sample --exp-path {root / 'sit'} --cfg-scale {guided} "
        f"--num-samples {cfg.sample.num_samples}`\n"
        f"- `sendvae probe --vae {root / 'vae' / 'export' / 'vae'} --pixels --data {d.name}`"
    )
    html, md = root / "report.html", root / "report.md"
    page.write(html, md)
    return html, md
