"""The study's tables and plots: per variant mean and spread over seeds, the convergence curve, the
probe-vs-gFD scatter with Pearson r, and the verdict on the paper's ordering, computed, not written."""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.measures import pearson_r
from .study_config import StudyConfig

# column -> (what, lower is better)
COLUMNS = {
    "gfd": ("gFD at the end of SiT training, no guidance", True),
    "gfd_cfg": ("gFD with CFG", True),
    "class_accuracy_cfg": ("class accuracy of CFG samples", False),
    "rfd": ("rFD of the VAE", True),
    "psnr": ("PSNR of the VAE (dB)", False),
    "probe_score": ("attribute-probe score", False),
    "seg_miou": ("segmentation mIoU through the alignment head", False),
    "depth_delta1": ("depth delta<1.25 through the alignment head", False),
}


def _ms(v: tuple[float, float]) -> str:
    return "-" if math.isnan(v[0]) else f"{v[0]:.3f} +- {v[1]:.3f}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(cfg: StudyConfig, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """variant -> {column: (mean, std), "gfd_curve": [(mean, std) per eval step], "n": seeds}."""
    out: dict[str, dict[str, Any]] = {}
    for variant in cfg.variants:
        rs = [r for r in runs.values() if r["variant"] == variant]
        if not rs:
            continue
        row: dict[str, Any] = {"n": len(rs)}
        for col in COLUMNS:
            row[col] = _mean_std([_value(r, col) for r in rs])
        curves = np.array([r["gfd"] for r in rs])  # (seeds, eval points)
        row["gfd_curve"] = [_mean_std(list(curves[:, i])) for i in range(curves.shape[1])]
        out[variant] = row
    return out


def _value(run: dict[str, Any], col: str) -> float:
    if col == "gfd":
        return float(run["gfd"][-1])
    if col == "probe_score":
        return float(run["probe"][run["score"]])
    if col in ("seg_miou", "depth_delta1"):
        d = run.get("downstream") or {}
        return float(d.get("miou" if col == "seg_miou" else "delta1", float("nan")))
    return float(run[col])


def verdict(cfg: StudyConfig, agg: dict[str, dict[str, Any]], r: float | None) -> list[str]:
    """Does the paper's ordering hold here? One sentence per claim, from the numbers."""
    lines = []
    hero = cfg.claim
    if hero in agg and len(agg) > 1:
        for col, claim in (
            ("gfd", "the best (lowest) final gFD"),
            ("gfd_cfg", "the best gFD with CFG"),
            ("probe_score", f"the best attribute-probe score ({cfg.score})"),
        ):
            lower = COLUMNS[col][1]
            ranked = sorted(agg, key=lambda v: agg[v][col][0], reverse=not lower)  # best first
            (m, s), (bm, bs) = agg[hero][col], agg[ranked[0]][col]
            if ranked[0] != hero:
                lines.append(
                    f"{hero} does NOT have {claim}: {m:.3g} +- {s:.2g}; {ranked[0]} has {bm:.3g} +- {bs:.2g}."
                )
                continue
            runner = ranked[1]
            rm, rs = agg[runner][col]
            if agg[hero]["n"] < 2:
                margin = "one seed: no spread measured"
            else:
                margin = f"{'beyond' if abs(m - rm) > s + rs else 'within'} the seeds' standard deviations"
            lines.append(
                f"{hero} has {claim}: {m:.3g} +- {s:.2g} vs {runner} {rm:.3g} +- {rs:.2g} ({margin})."
            )
    if r is None:
        lines.append("Pearson r between probe score and gFD needs at least 3 runs.")
    else:
        strength = "a strong negative" if r <= -0.5 else "a weak negative" if r < 0 else "no negative"
        lines.append(
            f"Probe score vs final gFD over all runs: Pearson r = {r:.2f}, {strength} correlation "
            "(the paper: higher probe scores go with lower gFD)."
        )
    return lines


def _plots(cfg: StudyConfig, runs: dict[str, dict[str, Any]], agg: dict, root: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, row in agg.items():
        steps = next(r["steps"] for r in runs.values() if r["variant"] == variant)
        m = [c[0] for c in row["gfd_curve"]]
        s = [c[1] for c in row["gfd_curve"]]
        ax.errorbar(steps, m, yerr=s, marker="o", capsize=3, label=variant)
    ax.set_xlabel("SiT training steps")
    ax.set_ylabel(f"gFD ({metric}), no guidance")
    ax.set_title(
        f"Convergence of the same SiT recipe per VAE variant ({len(cfg.seeds)} seeds, mean +- std)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "gfd_vs_steps.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for variant in agg:
        rs = [r for r in runs.values() if r["variant"] == variant]
        ax.scatter([_value(r, "gfd") for r in rs], [_value(r, "probe_score") for r in rs], label=variant)
    ax.set_xlabel(f"final gFD ({metric}), no guidance")
    ax.set_ylabel(f"attribute probe {cfg.score}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "probe_vs_gfd.png", dpi=120)
    plt.close(fig)


def write_study_report(
    cfg: StudyConfig, root: Path, runs: dict[str, dict[str, Any]], metric: str, probe_accuracy: float
) -> dict[str, Any]:
    for r in runs.values():
        r["score"] = cfg.score
    agg = aggregate(cfg, runs)
    xs = [_value(r, "probe_score") for r in runs.values()]
    ys = [_value(r, "gfd") for r in runs.values()]
    r_val = pearson_r(xs, ys)[0] if len(runs) >= 3 else None
    if r_val is not None and not math.isfinite(r_val):
        r_val = None
    lines = verdict(cfg, agg, r_val)
    _plots(cfg, runs, agg, root, metric)

    steps = next(iter(runs.values()))["steps"]
    header = [
        "variant",
        "seeds",
        *[f"gFD@{s}" for s in steps],
        "gFD CFG",
        "class acc CFG",
        "rFD",
        "PSNR",
        cfg.score,
        "seg mIoU",
        "depth d<1.25",
    ]
    rows = []
    for variant, row in agg.items():
        cells = [variant, str(row["n"])] + [f"{m:.1f} +- {s:.1f}" for m, s in row["gfd_curve"]]
        cells += [
            f"{row['gfd_cfg'][0]:.1f} +- {row['gfd_cfg'][1]:.1f}",
            f"{row['class_accuracy_cfg'][0]:.2f} +- {row['class_accuracy_cfg'][1]:.2f}",
            f"{row['rfd'][0]:.1f} +- {row['rfd'][1]:.1f}",
            f"{row['psnr'][0]:.2f} +- {row['psnr'][1]:.2f}",
            f"{row['probe_score'][0]:.3f} +- {row['probe_score'][1]:.3f}",
            _ms(row["seg_miou"]),
            _ms(row["depth_delta1"]),
        ]
        rows.append(cells)
    md = [
        f"# sendvae study ({cfg.scale} scale)",
        "",
        f"gFD = {metric}: Frechet distance in the bundled teacher's pooled features against held-out real "
        f"images ({cfg.base.eval.ref_images}), from {cfg.base.sample.num_samples} samples (as many of each "
        f"class); the FID formula in another feature space, not FID. Class probe on real images: "
        f"{probe_accuracy:.0%} held-out accuracy. Mean +- standard deviation over seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    md += ["| " + " | ".join(c) + " |" for c in rows]
    md += [
        "",
        "## Verdict",
        "",
        *[f"- {line}" for line in lines],
        "",
        "![gFD vs SiT steps](gfd_vs_steps.png)",
        "",
        "![probe score vs gFD](probe_vs_gfd.png)",
        "",
    ]
    (root / "study.md").write_text("\n".join(md))
    with open(root / "study.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "run",
                "variant",
                "seed",
                *[f"gfd@{s}" for s in steps],
                "gfd_cfg",
                "class_accuracy_cfg",
                "rfd",
                "psnr",
                cfg.score,
                "seg_miou",
                "depth_delta1",
            ]
        )
        for name, r in runs.items():
            w.writerow(
                [
                    name,
                    r["variant"],
                    r["seed"],
                    *[f"{v:.4f}" for v in r["gfd"]],
                    f"{r['gfd_cfg']:.4f}",
                    f"{r['class_accuracy_cfg']:.4f}",
                    f"{r['rfd']:.4f}",
                    f"{r['psnr']:.4f}",
                    f"{_value(r, 'probe_score'):.4f}",
                    f"{_value(r, 'seg_miou'):.4f}",
                    f"{_value(r, 'depth_delta1'):.4f}",
                ]
            )
    report = {
        "config": json.loads(json.dumps(cfg, default=lambda o: o.__dict__)),
        "metric": metric,
        "runs": runs,
        "aggregate": agg,
        "pearson_r": r_val,
        "verdict": lines,
        "machine": platform.platform(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (root / "study.json").write_text(json.dumps(report, indent=2))
    return report
