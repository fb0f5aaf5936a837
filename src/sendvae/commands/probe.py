"""`sendvae probe`: latent-space analysis of VAEs by linear probes, uniformity and discrimination.

    sendvae probe --vae export/vae --vae tiny-f4d4 --pixels --data shapes --num-images 4000 \
        --resolution 64 --gfd vae=3.2 --gfd tiny-f4d4=9.1 --output probe-out

    sendvae probe --latents runs/latents --num-images 50000     # from a latent store, no encoder run

Features per model: the flattened posterior mean of the encoder, normalised per channel with the VAE's
latent statistics (a preset name builds a random-init encoder, the untrained baseline); `--pixels` adds
the raw image, area-downsampled to `--pixel-size`, as a baseline. `--latents STORE` reads the posterior
means of the un-flipped images from a `cache-latents` store instead, normalised with the store's
statistics; a store of the embedded shapes gets every shapes probe target (its images are shapes
0..N-1 of the store's seed), any other store its class labels. For every probe target of the dataset
(see sendvae.analysis.attributes) a linear probe is fitted and scored (sendvae.analysis.probes); the
class probe accuracy is the "semantic gap" measure; uniformity and discrimination are in
sendvae.analysis.measures. Writes OUTPUT/probe.{md,csv,json}, OUTPUT/groups.png and, given --gfd values
for >= 3 models, OUTPUT/gfd_scatter.png with Pearson r.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

NAME = "probe"
HELP = "linear attribute probes, semantic gap, uniformity and discrimination of VAE latents"
DATASETS = ("shapes", "fashion-mnist", "celeba", "awa2", "deepfashion")
PIXELS = "pixels"
CKNNA_IMAGES = 2000  # CKNNA uses m x m kernels: the first 2000 probe images


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vae",
        action="append",
        default=[],
        help="VAE folder, checkpoint or preset, optionally NAME=PATH (repeatable)",
    )
    p.add_argument(
        "--latents",
        action="append",
        default=[],
        help="latent store folder (from cache-latents), optionally NAME=PATH (repeatable)",
    )
    p.add_argument("--vae-config", help="VAE preset naming the architecture of checkpoints without config")
    p.add_argument("--pixels", action="store_true", help="add raw downsampled pixels as a baseline")
    p.add_argument("--pixel-size", type=int, default=16, help="pixel baseline side (default: %(default)s)")
    p.add_argument("--data", choices=DATASETS, default="shapes", help="dataset (default: %(default)s)")
    p.add_argument("--data-root", help="dataset folder (celeba, awa2, deepfashion; fashion-mnist optional)")
    p.add_argument("--num-images", type=int, default=4000, help="images to probe (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=64, help="image side (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=0, help="splits, subsets, PCA, mixtures (default: %(default)s)"
    )
    p.add_argument("--pca-dim", type=int, default=8, help="PCA dims for uniformity/discrimination")
    p.add_argument(
        "--teacher",
        default="efficientnet-lite0",
        help="teacher for the CKNNA alignment measure, or 'none' (default: the embedded %(default)s)",
    )
    p.add_argument("--teacher-weights", help="weights file/folder of --teacher (see `sendvae info`)")
    p.add_argument("--gfd", action="append", default=[], help="MODEL=VALUE: a model's gFID, for the scatter")
    p.add_argument(
        "--score", default="top5_recall", help="table column plotted against gFD (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="BLAS threads for the probe fits: small fits are fastest on one",
    )
    p.add_argument("--output", default="probe", help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")


# -- features --------------------------------------------------------------------------------------------


def split_source(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH or preset -> (its label, PATH)."""
    if "=" in spec and not Path(spec).exists():
        name, src = spec.split("=", 1)
        return name, src
    return model_label(spec), spec


def model_label(source: str) -> str:
    """A readable name: an export folder `<run>/export/vae` is named after its run."""
    path = Path(source)
    if path.is_dir():
        return path.parent.parent.name if path.name == "vae" and path.parent.name == "export" else path.name
    return path.stem if path.exists() else source


def _batches(dataset, indices: np.ndarray, batch_size: int):
    for s in range(0, len(indices), batch_size):
        idx = indices[s : s + batch_size].tolist()
        items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else [dataset[i] for i in idx]
        yield torch.stack([x for x, _ in items])  # (B, 3, H, W) uint8


@torch.no_grad()
def extract_features(
    source: str | torch.nn.Module, data, batch_size: int, device: torch.device, pixel_size: int = 16, bar=None
) -> np.ndarray:
    """(N, D) float32: flattened normalised posterior means of a VAE, or `PIXELS` downsampled images."""
    import torch.nn.functional as F

    from ..data.transforms import to_float

    out = []
    for x in _batches(data.dataset, data.indices, batch_size):
        x = to_float(x).to(device)  # (B, 3, H, W) in [-1, 1]
        if isinstance(source, str):
            f = F.interpolate(x, size=(pixel_size, pixel_size), mode="area")  # (B, 3, s, s)
        else:
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                z = source.encode(x).mean  # (B, C, h, w)
            f = source.normalize_latents(z.float())
        out.append(f.flatten(1).float().cpu().numpy())
        if bar is not None:
            bar.update(len(x))
    return np.concatenate(out)


def store_features(store, n: int) -> np.ndarray:
    """(n, C*h*w) float32: normalised posterior means of the first n un-flipped images of a store."""
    out = []
    for s in range(0, n, 4096):
        m = store.gather(np.arange(s, min(s + 4096, n)))  # (b, 2 flips, 2 [mean, std], C, h, w)
        out.append(store.stats.normalize(m[:, 0, 0].float()).flatten(1).numpy())
    return np.concatenate(out)


def store_probe_data(stores: list, num_images: int):
    """The images and probe targets of images 0..n-1 of latent stores that all hold the same images.

    A shapes store gets every shapes target (its images can also be rendered for --vae / --pixels);
    any other store its class labels only, with no images.
    """
    from ..analysis.attributes import ProbeData, ProbeTask, shapes_data

    infos = [st.manifest["dataset"] for st in stores]
    keys = {(d["name"], d.get("seed"), d.get("path"), d["resolution"]) for d in infos}
    if len(keys) > 1:
        raise ValueError(
            f"the latent stores hold different images: {sorted(map(str, keys))}; probe each alone"
        )
    info, n = infos[0], min(num_images, *(len(st) for st in stores))
    if info["name"] == "shapes":
        return shapes_data(n, info["resolution"], info.get("seed", 0))
    labels = stores[0].labels[:n].astype(np.int64)
    k = int(stores[0].num_classes)
    tasks = [ProbeTask("class", "categorical", "class", labels)] if k > 1 else []
    return ProbeData(info["name"], None, np.arange(n), tasks, labels, k, tuple(info.get("classes") or ()))


def teacher_features(
    data, name: str, weights: str | None, resolution: int, batch_size: int, device
) -> np.ndarray:
    """(n, D) pooled teacher features of the first CKNNA_IMAGES probe images."""
    from ..metrics.features import FeatureExtractor

    fx = FeatureExtractor(name, weights, resolution=resolution, device=device, batch_size=batch_size)
    idx = data.indices[:CKNNA_IMAGES]
    return np.concatenate([fx.features(x).cpu().numpy() for x in _batches(data.dataset, idx, batch_size)])


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
    from ..analysis.measures import cknna, latent_measures
    from ..analysis.probes import PRIMARY_METRIC, make_split, run_probe, standardize

    split = make_split(len(feats), seed)
    x = standardize(feats, split.train, device)
    tasks, groups, cache = {}, {}, {}
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


def parse_gfd(items: list[str], labels: list[str]) -> dict[str, float]:
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

    from ..analysis.measures import pearson_r

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


# -- the command -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from ..analysis.attributes import load_probe_data
    from ..data.latent_store import LatentStore
    from ..models.vae import VAE_CONFIGS
    from ..models.vae_io import load_vae

    stores = {name: LatentStore(path) for name, path in map(split_source, args.latents)}
    named = [split_source(s) for s in args.vae] + ([(PIXELS, PIXELS)] if args.pixels else [])
    named += [(name, st) for name, st in stores.items()]
    if not named:
        raise ValueError(
            "nothing to probe: pass --vae PATH_OR_PRESET, --latents STORE (both repeatable) and/or --pixels"
        )
    labels, sources = [n for n, _ in named], [s for _, s in named]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two models share a name: {labels}; name them with --vae/--latents NAME=PATH")
    gfd = parse_gfd(args.gfd, labels)
    if args.num_images < 10:
        raise ValueError("--num-images must be >= 10")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if stores:
        data = store_probe_data(list(stores.values()), args.num_images)
        resolution = next(iter(stores.values())).manifest["dataset"]["resolution"]
        if data.dataset is None and len(stores) < len(sources):
            raise ValueError(
                f"the images of a {data.name} latent store are not at hand for --vae / --pixels; "
                "probe the stores alone, or cache the other VAEs' latents too and pass them with --latents"
            )
    else:
        data = load_probe_data(args.data, args.data_root, args.num_images, args.resolution, args.seed)
        resolution = args.resolution
    n = len(data.indices)
    teacher = None
    if args.teacher != "none" and data.dataset is not None and n >= 16:
        tf = teacher_features(data, args.teacher, args.teacher_weights, resolution, args.batch_size, device)
        teacher = (args.teacher, tf)
    print(
        f"probe: {len(sources)} model(s) on {n} {data.name} images at {resolution} px, {device}", flush=True
    )
    bar = tqdm(total=len(sources) * (n + len(data.tasks)), desc="probe", disable=args.no_progress)
    results = {}
    for label, src in zip(labels, sources):
        if isinstance(src, LatentStore):
            feats = store_features(src, n)
            bar.update(n)
        else:
            if src == PIXELS:
                model = PIXELS
            else:
                torch.manual_seed(args.seed)  # a preset's random init is the same on every run
                model = load_vae(src, config=args.vae_config).to(device).eval().requires_grad_(False)
            feats = extract_features(model, data, args.batch_size, device, args.pixel_size, bar)
        with threadpool_limits(args.threads):  # the same thread count gives the same numbers
            found = analyse(feats, data, args.seed, args.pca_dim, bar, device, teacher)
        results[label] = {
            "source": str(src.root) if isinstance(src, LatentStore) else src,
            "baseline": src == PIXELS or (isinstance(src, str) and src in VAE_CONFIGS),
            "feature_dim": feats.shape[1],
            **found,
        }
    bar.close()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(args, k) for k in ("seed", "pca_dim", "pixel_size")}
    meta.update(data=data.name, num_images=n, resolution=resolution)
    cols = write_tables(results, out, meta)
    plot_groups(results, out / "groups.png")
    if gfd:
        if args.score not in cols:
            raise ValueError(f"--score {args.score!r} is not a table column; columns: {cols}")
        scores = {k: r["summary"][args.score] for k, r in results.items()}
        stats = plot_gfd(scores, gfd, args.score, out / "gfd_scatter.png")
        report = json.loads((out / "probe.json").read_text())
        report["gfd"] = {"values": gfd, "score": args.score, **stats}
        (out / "probe.json").write_text(json.dumps(report, indent=2))
    print((out / "probe.md").read_text(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sendvae.commands.probe ...` (the same as `sendvae probe ...`)."""
    from ..cli import run_command

    return run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
