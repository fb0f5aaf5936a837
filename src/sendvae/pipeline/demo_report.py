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
        "32 px images of the simple scene (one object, flat background) instead of 64 px textured scenes "
        "with occluders: generation of those needs more SiT steps than 10 CPU minutes hold.",
        "the teacher at 64 px input (a 4 x 4 token grid): the teacher is the costliest network of every "
        "stage "
        "on a CPU; 128 px costs 4x.",
        "no LPIPS and no discriminator in the VAE loss (MSE + KL + alignment): they cost most of a VAE step "
        "at this size; reconstructions are therefore blurrier than a full recipe's.",
        "a 4-block, 128-wide SiT for 800 steps on a 2048-image store, and FD / class accuracy on "
        "hundreds of samples (FD is biased upwards at this sample size; compare numbers within the report).",
        "a VAE of 700 steps (500 plain + 200 aligned): its blur caps how recognisable any sample can be.",
    ],
    "gpu": [
        "64 px full scenes, LPIPS on, longer training and thousands of samples: still a toy next to the "
        "paper's ImageNet run, which needs a DINOv2 teacher and hundreds of GPU hours."
    ],
    "ci": [
        "a reduced run that exercises every stage and figure: its models are far too short-trained to "
        "generate shapes; only the mechanics are checked."
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


def write_report(cfg: DemoConfig, root: Path, rec: dict[str, Any]) -> tuple[Path, Path]:
    ev, figs = rec["evaluate"], root / "figures"
    name = ev["metric"]
    guided = f"{cfg.sample.cfg_scale:g}"
    d = cfg.data
    page = Page(f"sendvae demo ({cfg.scale} scale)")
    total = sum(r["seconds"] for r in rec.values())
    g = ev["samples"][guided]
    page.text(
        f"The whole pipeline on the embedded example: procedural shapes ({d.resolution} px, scene "
        f"`{d.scene}`, {ev['num_classes']} classes) and the bundled "
        f"{d.teacher} teacher, no downloads. Stage time {total / 60:.1f} min on {_machine()}."
    )
    page.heading("Result")
    bar = ev["bar"]
    page.text(
        f"- class-conditional samples with CFG {guided}: the class probe (fitted on real images, "
        f"{ev['probe_real_accuracy']:.0%} on held-out real ones) assigns the requested class to "
        f"{g['class_accuracy']:.0%} of them (chance {1 / ev['num_classes']:.1%}); bar >= 60%: "
        f"{'met' if bar['class_accuracy >= 0.6'] else 'NOT met'}\n"
        f"- their {name} is {g['fd']:.2f}, the reconstructions' {ev['recon']['fd']:.2f} "
        f"({g['fd'] / max(ev['recon']['fd'], 1e-9):.1f}x); bar <= 3x: "
        f"{'met' if bar['sample FD <= 3 x recon FD'] else 'NOT met'}\n"
        f"- the ceiling: samples are decoded by the VAE, and the probe assigns "
        f"{ev['recon']['class_accuracy']:.0%} of its reconstructions of real images to their class"
    )
    if not bar["class_accuracy >= 0.6"]:
        page.text(
            "The class bar is not met at this scale. Its ceiling is the reconstructions' class accuracy: the "
            "probe, fitted on sharp real images, misreads the VAE's blur even where a person sees the shape. "
            "What it would take: a sharper VAE (the LPIPS and PatchGAN terms, thousands of steps: "
            "`--vae.lpips_weight 0.1 --vae.gan_start 1000 --vae.steps 3000`) and a SiT trained for more "
            "steps (`--sit.steps 4000`), an hour on this CPU; `--scale gpu` runs that in minutes on one GPU.",
            note=True,
        )
    page.table(
        ["stage", "seconds", "summary"],
        [[k, f"{r['seconds']:.0f}", r["summary"]] for k, r in rec.items()],
        "Stages (each recorded in stages/<name>.json; a rerun continues after the last finished one)",
    )

    page.heading("Reconstructions")
    page.figure(
        figs / "reconstructions.png",
        "Held-out real images (top row) and the VAE's reconstructions from the posterior mean (bottom row)",
        "`sendvae demo`, stage evaluate (the VAE of stage vae)",
    )
    page.heading("Class-conditional samples")
    for scale in ev["samples"]:
        what = "without guidance" if scale == "1" else f"with classifier-free guidance {scale}"
        page.figure(
            figs / f"samples_cfg{scale}.png",
            f"SiT samples {what}: one row per class (circle, triangle, square, pentagon, hexagon, star, "
            f"cross, heart), {cfg.sample.steps}-step Euler ODE, decoded by the demo VAE",
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
                    (f"{cfg.vae.align} fine-tune", [s + cfg.vae.pretrain_steps for s in ft_steps], ft_rec),
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
    rows = [
        [
            "held-out real images",
            _f(ev["real"]["fd"], 2),
            _f(ev["real"].get("class_accuracy")),
            "-",
            "-",
            "-",
        ],
        [
            "reconstructions",
            _f(ev["recon"]["fd"], 2),
            _f(ev["recon"].get("class_accuracy")),
            _f(ev["recon"]["psnr"], 2),
            _f(ev["recon"]["ssim"]),
            _f(ev["recon"].get("lpips")),
        ],
    ]
    for scale, s in ev["samples"].items():
        rows.append([f"samples, CFG {scale}", _f(s["fd"], 2), _f(s["class_accuracy"]), "-", "-", "-"])
    page.table(
        ["images", name, "class accuracy", "PSNR (dB)", "SSIM", "LPIPS (alex)"],
        rows,
        f"{name}: Frechet distance of the teacher's pooled features against {cfg.eval.ref_images} held-out "
        f"real images (the FID formula in the teacher's space, not FID). Class accuracy: the linear probe "
        f"on the same features.",
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
        f"Linear probes of the ground-truth attributes from the latents of {cfg.eval.attr_images} images "
        "(accuracy / R^2 / micro F1 by group; see probe/probe.md)",
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
        f"- `sendvae cache-latents --vae {root / 'vae' / 'export' / 'vae'} --enc-type {d.teacher} ...`\n"
        f"- `sendvae train-sit --config {root / 'sit' / 'config.json'}`\n"
        f"- `sendvae sample --exp-path {root / 'sit'} --cfg-scale {guided} "
        f"--num-samples {cfg.sample.num_samples}`\n"
        f"- `sendvae probe --vae {root / 'vae' / 'export' / 'vae'} --pixels --data shapes`"
    )
    html, md = root / "report.html", root / "report.md"
    page.write(html, md)
    return html, md
