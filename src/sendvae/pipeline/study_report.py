"""The study's tables and plots, with intervals: per variant the mean, the standard deviation over seeds and
a 95% interval (two-level bootstrap over seeds and samples, `evaluation.stats`); the paired difference of
each variant against `none` and against the claimed variant; the probe-vs-gFD correlation with its
interval; and the verdict, computed from the intervals (resolved or not, and what would resolve it).

Metrics (all in the judge's space, never the teacher's the VAEs align to; FD_<teacher> is a secondary
column): gFD = FD_<judge> of the samples at the end of SiT training (no guidance), gFD CFG, class accuracy
of the CFG samples (and without guidance), rFD = FD_<judge> of the VAE's reconstructions, PSNR.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ..evaluation.stats import FDToReference, Interval, bootstrap, mean_of, pearson_interval
from ..runtime.checkpoint import atomic_write_bytes, atomic_write_json
from .study_config import StudyConfig

# key -> (label, lower is better, per-sample array file and key prefix)
METRICS = {
    "gfd": ("gFD (end, no guidance)", True),
    "gfd_cfg": ("gFD (CFG)", True),
    "acc": ("class accuracy (end, no guidance)", False),
    "acc_cfg": ("class accuracy (CFG)", False),
    "rfd": ("rFD", True),
    "psnr": ("PSNR (dB)", False),
}
PAIRED = ("gfd", "acc_cfg", "rfd", "psnr")  # the paired differences reported against the baselines


def _arrays(run: dict[str, Any]) -> dict[str, np.ndarray]:
    """The run's per-sample arrays: scores.npz (samples) and recon.npz (reconstructions)."""
    d = Path(run["dir"])
    out: dict[str, np.ndarray] = {}
    with np.load(d / "scores.npz") as z:
        final = f"step{run['steps'][-1]}"
        out.update(
            gfd=z[f"{final}_feats"], acc=z[f"{final}_hits"], gfd_cfg=z["cfg_feats"], acc_cfg=z["cfg_hits"]
        )
        for s in run["steps"]:
            out[f"curve{s}"] = z[f"step{s}_feats"]
    with np.load(d / "recon.npz") as z:
        out.update(rfd=z["feats"], psnr=z["psnr"])
    return out


def _stat(key: str, fd: FDToReference):
    if key in ("gfd", "gfd_cfg", "rfd") or key.startswith("curve"):
        return fd
    return mean_of


def analyse(cfg: StudyConfig, runs: dict[str, dict[str, Any]], ref_stats, reps: int = 200) -> dict[str, Any]:
    """Intervals per variant and paired differences; `ref_stats` = (mu, sigma) of the judge's reference."""
    fd = FDToReference(*ref_stats)
    by_variant: dict[str, list[dict[str, np.ndarray]]] = {}
    seeds: dict[str, list[int]] = {}
    for r in sorted(runs.values(), key=lambda r: r["seed"]):
        by_variant.setdefault(r["variant"], []).append(_arrays(r))
        seeds.setdefault(r["variant"], []).append(r["seed"])
    variants = [v for v in cfg.variants if v in by_variant]
    out: dict[str, Any] = {"variants": {}, "paired": {}}
    with threadpool_limits(1):  # D x D products this small run faster on one BLAS thread
        for v in variants:
            row: dict[str, Any] = {"seeds": seeds[v]}
            for key in METRICS:
                row[key] = bootstrap([a[key] for a in by_variant[v]], _stat(key, fd), reps=reps).as_dict()
            steps = next(r["steps"] for r in runs.values() if r["variant"] == v)
            row["curve"] = [_mean_std([fd(a[f"curve{s}"]) for a in by_variant[v]]) for s in steps]
            row["steps"] = steps
            out["variants"][v] = row
        for base in dict.fromkeys(("none", cfg.claim)):
            if base not in by_variant:
                continue
            for v in variants:
                if v == base or seeds[v] != seeds[base] or f"{base} - {v}:{PAIRED[0]}" in out["paired"]:
                    continue  # paired only over the same seeds; each pair once
                for key in PAIRED:
                    mine, theirs = [a[key] for a in by_variant[v]], [a[key] for a in by_variant[base]]
                    iv = bootstrap(mine, _stat(key, fd), other=theirs, reps=reps)
                    n = len(by_variant[v][0][key])
                    s_need, n_need = iv.needed(len(seeds[v]), n)
                    out["paired"][f"{v} - {base}:{key}"] = {
                        **iv.as_dict(),
                        "variant": v,
                        "base": base,
                        "metric": key,
                        "resolved": iv.resolved,
                        "seeds_needed": s_need,
                        "samples_needed": n_need,
                    }
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _iv(d: dict[str, float], digits: int = 2) -> str:
    return (
        f"{d['mean']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}] (sd {d['std']:.{digits}f})"
    )


def _digits(key: str) -> int:
    return 3 if key.startswith("acc") else 2


def _needed(p: dict[str, Any]) -> str:
    s, n = p["seeds_needed"], p["samples_needed"]
    if not math.isfinite(s):
        return "no measurable difference"
    what = f"~{math.ceil(s)} seeds"
    return what + (f" or ~{math.ceil(n)} samples per run" if n is not None and math.isfinite(n) else "")


def verdict(cfg: StudyConfig, analysis: dict[str, Any], r: tuple[float, float, float]) -> list[str]:
    """One sentence per comparison, from the intervals: resolved (the 95% interval of the paired difference
    excludes 0) or not, with what would resolve it."""
    lines = []
    for p in analysis["paired"].values():
        label, lower = METRICS[p["metric"]]
        d = p["mean"]
        better = (d < 0) == lower
        interval = f"{d:+.3g} [{p['low']:+.3g}, {p['high']:+.3g}]"
        if p["resolved"]:
            lines.append(
                f"{p['variant']} vs {p['base']}, {label}: {interval}, resolved: {p['variant']} is "
                f"{'better' if better else 'worse'}."
            )
        else:
            lines.append(
                f"{p['variant']} vs {p['base']}, {label}: {interval}, NOT resolved (the interval "
                f"holds 0); resolving a difference this size needs {_needed(p)}."
            )
    rv, lo, hi = r
    if math.isnan(rv):
        lines.append("Pearson r between probe score and gFD needs at least 3 runs.")
    else:
        sign = "negative" if hi < 0 else "positive" if lo > 0 else "unresolved (the interval holds 0)"
        lines.append(
            f"Probe score vs final gFD over all runs: Pearson r = {rv:.2f} [{lo:.2f}, {hi:.2f}], {sign} "
            "(the paper: higher probe scores go with lower gFD, a negative r)."
        )
    return lines


def _plots(cfg: StudyConfig, runs: dict, analysis: dict, root: Path, metric: str, score: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, row in analysis["variants"].items():
        m = [c[0] for c in row["curve"]]
        s = [c[1] for c in row["curve"]]
        ax.errorbar(row["steps"], m, yerr=s, marker="o", capsize=3, label=variant)
    ax.set_xlabel("SiT training steps")
    ax.set_ylabel(f"gFD ({metric}), no guidance")
    n_seeds = max(len(row["seeds"]) for row in analysis["variants"].values())
    ax.set_title(f"The same SiT recipe per VAE variant ({n_seeds} seeds, mean +- sd)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "gfd_vs_steps.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for variant in analysis["variants"]:
        rs = [r for r in runs.values() if r["variant"] == variant]
        ax.scatter([r["gfd"][-1] for r in rs], [r["probe"].get(score, math.nan) for r in rs], label=variant)
    ax.set_xlabel(f"final gFD ({metric}), no guidance")
    ax.set_ylabel(f"probe {score}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "probe_vs_gfd.png", dpi=120)
    plt.close(fig)


def write_study_report(
    cfg: StudyConfig, root: Path, runs: dict[str, dict[str, Any]], judge: dict[str, Any]
) -> dict[str, Any]:
    """study.md / .csv / .json and the two plots in ROOT from the finished runs; returns the json content."""
    if not runs:
        raise ValueError(f"{root}: no run of the study has finished yet")
    with np.load(root / "reference.npz") as z:
        ref = (z["mu"], z["sigma"])
    analysis = analyse(cfg, runs, ref)
    score = next(iter(runs.values()))["score"]
    xs = [r["probe"].get(score, math.nan) for r in runs.values()]
    ys = [r["gfd"][-1] for r in runs.values()]
    r_val = pearson_interval(xs, ys)
    lines = verdict(cfg, analysis, r_val)
    metric = judge["metric"]
    _plots(cfg, runs, analysis, root, metric, score)

    header = [
        "variant",
        "seeds",
        *[lab for lab, _ in METRICS.values()],
        f"probe {score}",
        f"gFD {judge.get('teacher_metric') or 'teacher'} (secondary)",
    ]
    md = [
        f"# sendvae study ({cfg.scale} scale): {judge.get('dataset', '')}",
        "",
        f"gFD / rFD = {metric}: Frechet distance in the penultimate features of the judge "
        f"`{judge['name']}` (a small CNN trained from scratch on the real training images, "
        f"{judge['test_accuracy']:.1%} on held-out test images; not the teacher the VAEs align to) against "
        f"{cfg.base.eval.ref_images} held-out real images; {cfg.base.sample.num_samples} samples per set (as "
        f"many of each class), {cfg.base.eval.ref_images} reconstructions. Class accuracy: the fraction of "
        "class-conditional samples the judge reads as the class asked for. Cells: mean over seeds [95% "
        "interval, two-level bootstrap over seeds and samples] (sd over seeds).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for v, row in analysis["variants"].items():
        rs = [r for r in runs.values() if r["variant"] == v]
        probe = _mean_std([r["probe"].get(score, math.nan) for r in rs])
        teacher = _mean_std([r["gfd_teacher"][-1] for r in rs])
        cells = [v, str(len(row["seeds"]))] + [_iv(row[k], _digits(k)) for k in METRICS]
        cells += [f"{probe[0]:.3f} (sd {probe[1]:.3f})", f"{teacher[0]:.2f} (sd {teacher[1]:.2f})"]
        md.append("| " + " | ".join(cells) + " |")
    md += [
        "",
        "## Paired differences (variant - baseline; same seeds, same sample noise)",
        "",
        "| comparison | metric | difference [95% interval] | resolved | what would resolve it |",
        "|---|---|---|---|---|",
    ]
    for p in analysis["paired"].values():
        d = _digits(p["metric"])
        md.append(
            f"| {p['variant']} - {p['base']} | {METRICS[p['metric']][0]} | {p['mean']:+.{d}f} "
            f"[{p['low']:+.{d}f}, {p['high']:+.{d}f}] | {'yes' if p['resolved'] else 'no'} | "
            f"{'-' if p['resolved'] else _needed(p)} |"
        )
    curve_steps = next(iter(analysis["variants"].values()))["steps"]
    md += [
        "",
        f"## gFD during SiT training (mean (sd) over seeds at steps {curve_steps})",
        "",
        "| variant | " + " | ".join(f"step {s}" for s in curve_steps) + " |",
        "|---|" + "---|" * len(curve_steps),
    ]
    for v, row in analysis["variants"].items():
        md.append(f"| {v} | " + " | ".join(f"{m:.2f} ({s:.2f})" for m, s in row["curve"]) + " |")
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
    atomic_write_bytes(root / "study.md", lambda f: f.write("\n".join(md).encode()))

    buf = io.StringIO()
    w = csv.writer(buf)
    steps = next(iter(runs.values()))["steps"]
    w.writerow(
        [
            "run",
            "variant",
            "seed",
            *[f"gfd@{s}" for s in steps],
            *[f"class_accuracy@{s}" for s in steps],
            "gfd_cfg",
            "class_accuracy_cfg",
            "rfd",
            "recon_class_accuracy",
            "psnr",
            "ssim",
            score,
        ]
    )
    for name, r in runs.items():
        w.writerow(
            [
                name,
                r["variant"],
                r["seed"],
                *[f"{v:.4f}" for v in r["gfd"]],
                *[f"{v:.4f}" for v in r["class_accuracy"]],
                f"{r['gfd_cfg']:.4f}",
                f"{r['class_accuracy_cfg']:.4f}",
                f"{r['rfd']:.4f}",
                f"{r['recon_class_accuracy']:.4f}",
                f"{r['psnr']:.4f}",
                f"{r['ssim']:.4f}",
                f"{r['probe'].get(score, math.nan):.4f}",
            ]
        )
    atomic_write_bytes(root / "study.csv", lambda f: f.write(buf.getvalue().encode()))
    report = {
        "config": json.loads(json.dumps(cfg, default=lambda o: o.__dict__)),
        "judge": judge,
        "metric": metric,
        "score": score,
        "runs": runs,
        "analysis": analysis,
        "pearson_r": {"r": r_val[0], "low": r_val[1], "high": r_val[2]},
        "verdict": lines,
        "machine": platform.platform(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_json(json.loads(json.dumps(report, default=_json_default)), root / "study.json")
    return report


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Interval):
        return o.as_dict()
    raise TypeError(type(o))
