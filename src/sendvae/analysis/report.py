"""The probe report: every probe and measure of each model, tables, plots, and the driver `probe_models`.

    from sendvae.analysis.report import probe_models

    report = probe_models("probe-out", vaes=["runs/vae/export/vae", "tiny-f4d4"], pixels=True)

For every probe target of the dataset (`analysis.attributes`) a linear probe is fitted and scored
(`analysis.probes`); the class probe accuracy is the "semantic gap" measure; uniformity, discrimination
and CKNNA are in `analysis.measures`; features come from `analysis.features`. Writes
OUTPUT/probe.{md,csv,json}, OUTPUT/groups.png and, given gFD values for >= 3 models,
OUTPUT/gfd_scatter.png with Pearson r (`sendvae probe` is a shell over `probe_models`).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.latent_store import LatentStore
from ..models.vae import VAE_CONFIGS
from ..models.vae_io import load_vae
from ..runtime.distributed import resolve_device
from .attributes import load_probe_data
from .features import (
    PIXELS,
    extract_features,
    split_source,
    store_features,
    store_probe_data,
    teacher_features,
)
from .measures import cknna, latent_measures, pearson_r
from .probes import PRIMARY_METRIC, make_split, run_probe, standardize

# -- analysis --------------------------------------------------------------------------------------------


def analyse(
    feats: np.ndarray,
    data,
    seed: int,
    pca_dim: int,
    bar=None,
    device: str | torch.device = "cpu",
    teacher: tuple[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Every probe and measure of one model's (N, D) features: {"tasks": {...}, "summary": {...}}.

    The probes are fitted on `device`; the uniformity and discrimination measures on the CPU."""
    split = make_split(len(feats), seed)
    x = standardize(feats, split.train, device)
    tasks: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[float]] = {}
    cache: dict[bytes, Any] = {}
    for t in data.tasks:
        tasks[t.name] = {"kind": t.kind, "group": t.group, **run_probe(t.kind, x, t.target, split, cache)}
        groups.setdefault(t.group, []).append(tasks[t.name][PRIMARY_METRIC[t.kind]])
        if bar is not None:
            bar.update(1)
    summary = {f"group:{g}": float(np.mean(v)) for g, v in groups.items()}
    ml = next((v for v in tasks.values() if v["kind"] == "multilabel"), None)
    if ml is not None:
        summary.update({k: ml[k] for k in ("f1_micro", "f1_macro", "top5_recall")})
    if data.num_classes > 1:
        summary["class_accuracy"] = run_probe("categorical", x, data.classes, split)["accuracy"]
    summary.update(latent_measures(feats, data.num_classes, pca_dim, seed))
    if teacher is not None:
        name, tf = teacher
        summary[f"cknna_{name}"] = cknna(feats[: len(tf)], tf)
    return {"tasks": tasks, "summary": summary}


def parse_gfd(items: Mapping[str, float] | Sequence[str], labels: list[str]) -> dict[str, float]:
    """gFD values by model name, from MODEL=VALUE items (--gfd) or a mapping; every name must be a model."""
    if isinstance(items, Mapping):
        items = [f"{k}={v}" for k, v in items.items()]
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ValueError(f"--gfd {item!r}: expected MODEL=VALUE, e.g. --gfd {labels[0]}=3.2")
        if name not in labels:
            raise ValueError(f"--gfd {item!r}: no model named {name!r}; models: {labels}")
    return out


# -- outputs ---------------------------------------------------------------------------------------------


def compare_with_baselines(results: dict[str, dict]) -> dict[str, dict[str, bool]]:
    """For each trained model, per attribute group: does it score above every baseline?

    Baselines are the models marked `"baseline": True` (raw pixels, random-init presets). Returns
    {model: {group: beats_all}}, empty without baselines or trained models.
    """
    base = [r for r in results.values() if r.get("baseline")]
    if not base:
        return {}
    out = {}
    for name, r in results.items():
        if r.get("baseline"):
            continue
        groups = [k for k in r["summary"] if k.startswith("group:")]
        out[name] = {
            g[len("group:") :]: all(r["summary"][g] > b["summary"].get(g, float("-inf")) for b in base)
            for g in groups
        }
    return out


def write_tables(results: dict[str, dict], out: Path, meta: dict[str, Any]) -> list[str]:
    """probe.md, probe.csv (one row per model) and probe.json (everything). Returns the columns."""
    cols = list(dict.fromkeys(k for r in results.values() for k in r["summary"]))
    rows = [[name] + [r["summary"].get(c, float("nan")) for c in cols] for name, r in results.items()]
    with open(out / "probe.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", *cols])
        w.writerows([[row[0], *(f"{v:.4f}" for v in row[1:])] for row in rows])
    md = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += ["| " + " | ".join([row[0], *(f"{v:.4f}" for v in row[1:])]) + " |" for row in rows]
    md += [
        "",
        "group:* = mean test score of the group's probes (accuracy for categorical, R^2 for continuous, "
        "micro F1 for multi-label). uniformity_gini: lower is more uniform. gmm_loglik_per_dim: higher is "
        "more clustered (held-out, PCA-whitened).",
    ]
    verdict = compare_with_baselines(results)
    if verdict:
        names = ", ".join(k for k, r in results.items() if r.get("baseline"))
        md += ["", f"## Against the baselines ({names})", "", "| model | beats every baseline on | not on |"]
        md += ["|---|---|---|"]
        for name, groups in verdict.items():
            yes = ", ".join(g for g, ok in groups.items() if ok) or "-"
            no = ", ".join(g for g, ok in groups.items() if not ok) or "-"
            md.append(f"| {name} | {yes} | {no} |")
            results[name]["beats_baselines"] = groups
    (out / "probe.md").write_text(
        f"# sendvae probe: {meta['data']}, {meta['num_images']} images\n\n" + "\n".join(md) + "\n"
    )
    (out / "probe.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return cols


def plot_groups(results: dict[str, dict], path: Path) -> None:
    """Grouped bars: one group of bars per attribute group, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(k for r in results.values() for k in r["summary"] if k.startswith("group:")))
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
    for j, (name, r) in enumerate(results.items()):
        vals = [r["summary"].get(g, np.nan) for g in groups]
        ax.bar(np.arange(len(groups)) + j * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [g[len("group:") :] for g in groups], rotation=30)
    ax.set_ylabel("probe score (acc / R^2 / micro F1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gfd(scores: dict[str, float], gfd: dict[str, float], score: str, path: Path) -> dict[str, float]:
    """Scatter of probe score vs gFD; Pearson r when >= 3 models have both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in gfd if n in scores]
    x, y = [gfd[n] for n in names], [scores[n] for n in names]
    stats = {}
    if len(names) >= 3:
        stats["pearson_r"], stats["p_value"] = pearson_r(x, y)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(x, y)
    for n, a, b in zip(names, x, y):
        ax.annotate(n, (a, b), fontsize=8)
    ax.set_xlabel("gFD")
    ax.set_ylabel(score)
    if stats:
        ax.set_title(f"Pearson r = {stats['pearson_r']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return stats


# -- the driver ------------------------------------------------------------------------------------------


def _named(spec: str | tuple[str, Any]) -> tuple[str, Any]:
    return split_source(spec) if isinstance(spec, str) else (spec[0], spec[1])


def probe_models(
    output_dir: str | os.PathLike = "probe",
    *,
    vaes: Sequence[str | tuple[str, str | torch.nn.Module]] = (),
    latents: Sequence[str | tuple[str, str]] = (),
    pixels: bool = False,
    data: str = "shapes",
    data_root: str | None = None,
    num_images: int = 4000,
    resolution: int = 64,
    seed: int = 0,
    shapes_scene: str = "full",
    pca_dim: int = 8,
    pixel_size: int = 16,
    teacher: str | None = "efficientnet-lite0",
    teacher_weights: str | None = None,
    gfd: Mapping[str, float] | Sequence[str] = (),
    score: str = "top5_recall",
    batch_size: int = 64,
    threads: int = 1,
    vae_config: str | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    echo: bool = True,
) -> dict[str, Any]:
    """Probe VAEs (load_vae specs, 'NAME=SPEC', or (name, module) pairs), latent stores ('NAME=PATH' or
    paths) and raw pixels on the same images; writes the report to `output_dir` and returns it
    (the content of probe.json: meta, results per model, gfd).

    data / data_root / num_images / resolution / shapes_scene: the probe images
    (`analysis.attributes.load_probe_data`);
    with latent stores, their images instead. teacher: for CKNNA, or None / "none". gfd: gFID per model
    for the scatter of `score` (a table column) against it. threads: BLAS threads of the probe fits.
    echo: print the table.
    """
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    stores = {name: LatentStore(path) for name, path in map(_named, latents)}
    named = [_named(s) for s in vaes] + ([(PIXELS, PIXELS)] if pixels else [])
    named += [(name, st) for name, st in stores.items()]
    if not named:
        raise ValueError(
            "nothing to probe: pass --vae PATH_OR_PRESET, --store STORE (both repeatable) and/or --pixels"
        )
    labels, sources = [n for n, _ in named], [s for _, s in named]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two models share a name: {labels}; name them with --vae/--store NAME=PATH")
    gfd = parse_gfd(gfd, labels)
    if num_images < 10:
        raise ValueError("--num-images must be >= 10")
    device = resolve_device(str(device))
    if stores:
        probe_data = store_probe_data(list(stores.values()), num_images)
        resolution = next(iter(stores.values())).manifest["dataset"]["resolution"]
        if probe_data.dataset is None and len(stores) < len(sources):
            raise ValueError(
                f"the images of a {probe_data.name} latent store are not at hand for --vae / --pixels; "
                "probe the stores alone, or cache the other VAEs' latents too and pass them with --store"
            )
    else:
        probe_data = load_probe_data(data, data_root, num_images, resolution, seed, shapes_scene)
    n = len(probe_data.indices)
    cknna_teacher = None
    if teacher not in (None, "none") and probe_data.dataset is not None and n >= 16:
        tf = teacher_features(probe_data, teacher, teacher_weights, resolution, batch_size, device)
        cknna_teacher = (teacher, tf)
    if echo:
        print(f"probe: {len(sources)} model(s) on {n} {probe_data.name} images at {resolution} px, {device}",
              flush=True)  # fmt: skip
    bar = tqdm(total=len(sources) * (n + len(probe_data.tasks)), desc="probe", disable=not progress)
    results = {}
    for label, src in zip(labels, sources):
        if isinstance(src, LatentStore):
            feats = store_features(src, n)
            bar.update(n)
        else:
            model: str | torch.nn.Module
            if isinstance(src, torch.nn.Module):
                model = src.to(device).eval().requires_grad_(False)
            elif src == PIXELS:
                model = PIXELS
            else:
                torch.manual_seed(seed)  # a preset's random init is the same on every run
                model = load_vae(src, config=vae_config).to(device).eval().requires_grad_(False)
            feats = extract_features(model, probe_data, batch_size, device, pixel_size, bar)
        with threadpool_limits(threads):  # the same thread count gives the same numbers
            found = analyse(feats, probe_data, seed, pca_dim, bar, device, cknna_teacher)
        if isinstance(src, LatentStore):
            source = str(src.root)
        else:
            source = "module" if isinstance(src, torch.nn.Module) else src
        results[label] = {
            "source": source,
            "baseline": isinstance(src, str) and (src == PIXELS or src in VAE_CONFIGS),
            "feature_dim": feats.shape[1],
            **found,
        }
    bar.close()

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"seed": seed, "pca_dim": pca_dim, "pixel_size": pixel_size}
    meta.update(data=probe_data.name, num_images=n, resolution=resolution)
    cols = write_tables(results, out, meta)
    plot_groups(results, out / "groups.png")
    if gfd:
        if score not in cols:
            raise ValueError(f"--score {score!r} is not a table column; columns: {cols}")
        scores = {k: r["summary"][score] for k, r in results.items()}
        stats = plot_gfd(scores, gfd, score, out / "gfd_scatter.png")
        report = json.loads((out / "probe.json").read_text())
        report["gfd"] = {"values": gfd, "score": score, **stats}
        (out / "probe.json").write_text(json.dumps(report, indent=2))
    if echo:
        print((out / "probe.md").read_text(), flush=True)
    return json.loads((out / "probe.json").read_text())
