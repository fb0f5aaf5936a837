"""`sendvae demo`: the whole pipeline on the embedded example, one resumable stage after another.

    pretrain  train a plain VAE (no alignment): what Send-VAE fine-tunes       -> ROOT/pretrain/export/vae
    vae       fine-tune it as a Send-VAE (mapper alignment to the bundled teacher) -> ROOT/vae/export/vae
    latents   encode the shapes into a latent store with teacher tokens      -> ROOT/latents
    sit       train a SiT with REPA on the store                             -> ROOT/sit/export/sit
    samples   class-conditional samples without and with CFG (ADM .npz)      -> ROOT/samples
    evaluate  FD_<teacher> and class accuracy of the samples, rFD / PSNR / SSIM / LPIPS of the VAE
    probe     linear attribute probes of the latents (Send-VAE, a random VAE, pixels)  -> ROOT/probe
    report    ROOT/report.html (self-contained) and ROOT/report.md

Each stage calls the library engine its command calls (train-vae's trainer, cache_latents, train-sit's
trainer, generate, the metrics, probe_models), and is recorded when it finishes (`pipeline.stages`), so
running the demo again continues where it stopped. The sizes per scale are in `pipeline.demo_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.report import probe_models
from ..config import to_dict
from ..data.caching import cache_latents, teacher_record
from ..data.embedded import resolve
from ..diffusion.generate import generate
from ..diffusion.sampling import SamplerConfig
from ..evaluation.judge import JudgeRecipe, load_judge
from ..evaluation.scoring import ImageSet, Scorer
from ..metrics.features import FeatureExtractor
from ..models.vae_io import load_vae
from ..runtime.distributed import resolve_device
from ..teachers.config import build_from_config
from ..train.export import export_run
from ..train.run import run_training
from ..train.sit import SiTTrainer
from ..train.vae import VAETrainer
from .demo_config import PERCEPTUAL, DemoConfig
from .demo_report import write_report
from .figures import save_image_grid
from .stages import Stages

# the config sections each stage depends on, with those of every stage before it (a rerun with other
# values of these is refused; later sections can change)
_DEPENDS = {
    "pretrain": ("seed", "pretrain_steps", "vae"),
    "vae": (),
    "latents": ("latents",),
    "sit": ("sit",),
    "samples": ("sample",),
    "evaluate": ("eval",),
    "probe": (),
}
_ORDER = tuple(_DEPENDS)


def stage_settings(cfg: DemoConfig, stage: str) -> dict[str, Any]:
    """The settings a stage's record is keyed by."""
    d = to_dict(cfg)
    return {k: d[k] for s in _ORDER[: _ORDER.index(stage) + 1] for k in _DEPENDS[s]}


def run_steps(trainer_cfg) -> int:
    """The steps of a stage's run: the demo trains for a fixed number (``--vae.optim.max_steps``, ...)."""
    steps = trainer_cfg.optim.max_steps
    if steps is None:
        raise ValueError("the demo's runs train for a fixed number of steps: set --vae.optim.max_steps and "
                         "--sit.optim.max_steps, not epochs")  # fmt: skip
    return int(steps)


def _cadence(run, steps: int, ckpt_every: int | None = None, keep: int = 1) -> None:
    """A stage run's logging and checkpoints: 30 log lines, a checkpoint every third (a third lost at most)"""
    run.log_every, run.ckpt_every = max(1, steps // 30), ckpt_every or max(1, steps // 3)
    run.sample_every, run.keep_ckpts = 0, keep


def vae_run_config(cfg: DemoConfig, root: Path, init: str | None = None):
    """train-vae's config of the demo's VAE: ``cfg.vae`` in ROOT/vae, fine-tuned from `init` (a VAE export);
    without `init`, the plain pre-training it starts from (ROOT/pretrain: no alignment, pretrain_steps)."""
    vc = copy.deepcopy(cfg.vae)
    vc.run.output_dir, vc.run.exp_name, vc.run.seed, vc.run.device = str(root), "vae", cfg.seed, cfg.device
    dc = embedded(cfg).data_config()
    vc.data.name, vc.data.path = dc.name, dc.path
    if init is None:  # the plain VAE the alignment starts from: no teacher in its steps
        vc.run.exp_name, vc.loss.align, vc.optim.max_steps = "pretrain", "none", cfg.pretrain_steps
    else:
        vc.model.vae_ckpt = init
    _cadence(vc.run, run_steps(vc))
    return vc


def sit_run_config(
    cfg: DemoConfig, root: Path, store: Path, vae: Path, ckpt_every: int | None = None, keep: int = 1
):
    """train-sit's config of the demo's SiT: ``cfg.sit`` in ROOT/sit on `store`, decoding with `vae`;
    checkpoints every `ckpt_every` steps (default: a third of the run), the last `keep` kept."""
    sc = copy.deepcopy(cfg.sit)
    sc.run.output_dir, sc.run.exp_name, sc.run.seed, sc.run.device = str(root), "sit", cfg.seed, cfg.device
    sc.data.store, sc.model.vae = str(store), str(vae)
    _cadence(sc.run, run_steps(sc), ckpt_every, keep)
    return sc


def embedded(cfg: DemoConfig):
    """The demo's data (`data.embedded`); `run_demo` has already replaced a missing Fashion-MNIST by the
    shapes, so here the dataset asked for must be there."""

    d = cfg.vae.data
    return resolve(d.name, d.path, d.resolution, d.shapes_scene, fallback=False)


def judge_recipe(cfg: DemoConfig):

    return JudgeRecipe(epochs=cfg.eval.judge_epochs, train_images=cfg.eval.judge_images)


# -- stages ------------------------------------------------------------------------------------------------


def train_vae_stage(cfg: DemoConfig, root: Path, init: str | None = None) -> dict[str, Any]:
    """The plain pre-training (init None, ROOT/pretrain) or the alignment fine-tune from `init` (ROOT/vae)."""

    vc = vae_run_config(cfg, root, init)
    last = run_training(vc, VAETrainer, export_run, echo=False).last
    rec, cos = last.get("rec", math.nan), last.get("cos", math.nan)
    what = f"plain {vc.model.vae} VAE" if init is None else f"{vc.loss.align} fine-tune"
    line = f"{what}, {vc.optim.max_steps} steps x {vc.optim.batch_size}: rec ({vc.loss.recon}) {rec:.4f}"
    return {
        "export": str(root / vc.run.exp_name / "export" / "vae"),
        "rec": rec,
        "cos": cos,
        "summary": line + (f", alignment cosine {cos:.3f}" if math.isfinite(cos) else ""),
    }


def cache_stage(cfg: DemoConfig, root: Path, vae_export: str, progress: bool) -> dict[str, Any]:

    vae = load_vae(vae_export)
    res = cfg.vae.data.resolution
    teacher = build_from_config(cfg.vae.teacher, res)
    data = embedded(cfg).data_config(cfg.latents.num_images)
    store = cache_latents(
        vae,
        data,
        root / "latents",
        teacher=teacher,
        teacher_info=teacher_record(teacher, res),
        seed=cfg.seed,
        vae_source=vae_export,
        device=cfg.device,
        progress=progress,
    )
    c, h, w = store.latent_shape
    tokens, dim = store.feature_shape or (0, 0)
    return {
        "store": str(root / "latents"),
        "summary": f"{len(store)} images (and flips) -> {c}x{h}x{w} latents + {tokens} x {dim} teacher "
        "tokens",
    }


def train_sit_stage(cfg: DemoConfig, root: Path, store: str, vae_export: str, **ckpts) -> dict[str, Any]:

    sc = sit_run_config(cfg, root, Path(store), Path(vae_export), **ckpts)
    last = run_training(sc, SiTTrainer, lambda tr: tr.export(), echo=False).last
    den, cos, m = last.get("denoise", math.nan), last.get("cos", math.nan), sc.model
    return {
        "run": str(root / "sit"),
        "denoise": den,
        "repa_cos": cos,
        "summary": f"{m.model} ({m.depth} x {m.hidden_size}) + REPA, {sc.optim.max_steps} steps x "
        f"{sc.optim.batch_size}: denoising loss {den:.4f}, REPA cosine {cos:.3f}",
    }


def sample_stage(cfg: DemoConfig, root: Path, sit_run: str, progress: bool) -> dict[str, Any]:

    out: dict[str, Any] = {"npz": {}}
    sc = cfg.sample
    for scale in dict.fromkeys((1.0, sc.cfg_scale)):
        sampler = SamplerConfig(steps=sc.steps, cfg_scale=scale, guidance_high=sc.guidance_high)
        npz = generate(
            sit_run,
            sc.num_samples,
            sampler,
            root / "samples",
            seed=cfg.seed,
            label_sampling="equal",
            device=cfg.device,
            progress=progress,
        )
        out["npz"][f"{scale:g}"] = str(npz)
    out["summary"] = f"{sc.num_samples} samples per setting, Euler ODE {sc.steps} steps, CFG " + " and ".join(
        out["npz"]
    )
    return out


def evaluate_stage(cfg: DemoConfig, root: Path, vae_export: str, samples: dict[str, str]) -> dict[str, Any]:
    """The judge's class accuracy and FD_<judge> (headline), FD_<teacher> (secondary) of held-out real
    images (the floor), the VAE's reconstructions (its ceiling) and the samples; PSNR / SSIM / LPIPS."""

    device = resolve_device(cfg.device)
    e, emb = cfg.eval, embedded(cfg)
    judge = load_judge(emb, judge_recipe(cfg), device=device)
    fx = FeatureExtractor.from_config(cfg.vae.teacher, cfg.vae.data.resolution, device)
    scorer = Scorer(judge, ImageSet.take(emb.split("reference"), e.ref_images), fx)
    held_out = emb.split("eval")  # images no stage trained on, other than the reference
    vae = load_vae(vae_export).to(device)
    recon, orig, rec = scorer.reconstructions(vae, held_out, e.ref_images, PERCEPTUAL, device)
    k = min(16, len(orig.images))
    save_image_grid(
        torch.cat([orig.images[:k], rec.images[:k]]), root / "figures" / "reconstructions.png", nrow=k
    )
    result: dict[str, Any] = {
        "dataset": emb.description,
        "judge": {
            "name": judge.name,
            "metric": judge.metric_name,
            "test_accuracy": judge.test_accuracy,
            "test_per_class": judge.test_per_class,
        },
        "teacher_metric": fx.metric_name,
        "classes": list(emb.classes),
        "num_classes": judge.num_classes,
        "real": scorer.samples(orig.images, orig.labels),
        "recon": recon,
        "samples": {},
    }
    for scale, path in samples.items():
        s = ImageSet.from_npz(path)
        result["samples"][scale] = scorer.samples(s.images, s.labels)
        acc = result["samples"][scale]["per_class"]
        labels = [f"{c} ({a:.0%})" for c, a in zip(emb.classes, acc)]
        save_class_grid(
            s.images, s.labels, judge.num_classes, root / "figures" / f"samples_cfg{scale}.png", labels
        )
    guided = result["samples"][f"{cfg.sample.cfg_scale:g}"]
    result["bar"] = {
        "samples' class accuracy >= 0.8": guided["class_accuracy"] >= 0.8,
        "reconstructions' class accuracy >= 0.85": recon["class_accuracy"] >= 0.85,
    }
    result["summary"] = (
        f"CFG {cfg.sample.cfg_scale:g}: class accuracy {guided['class_accuracy']:.0%} by the judge "
        f"(its test accuracy {judge.test_accuracy:.0%}, chance {1 / judge.num_classes:.0%}), "
        f"{judge.metric_name} {guided['fd_judge']:.2f}; reconstructions {recon['class_accuracy']:.0%}, "
        f"{judge.metric_name} {recon['fd_judge']:.2f}, PSNR {recon['psnr']:.2f} dB"
    )
    return result


def save_class_grid(
    images: torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    path: Path,
    row_labels: list[str] | None = None,
    per_row: int = 8,
):
    """One row per class: the first `per_row` samples of each (uint8 (N, 3, H, W)), rows labelled."""

    rows = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_row]
        row = images[idx]
        if len(row) < per_row:  # pad a short row with black
            row = torch.cat([row, torch.zeros(per_row - len(row), *images.shape[1:], dtype=images.dtype)])
        rows.append(row)
    save_image_grid(torch.cat(rows), path, nrow=per_row, row_labels=row_labels)


def probe_stage(cfg: DemoConfig, root: Path, vae_export: str, progress: bool) -> dict[str, Any]:

    report = probe_models(
        root / "probe",
        vaes=[(f"{cfg.vae.loss.align}-vae", vae_export), (f"random-{cfg.vae.model.vae}", cfg.vae.model.vae)],
        pixels=True,
        data=embedded(cfg).name,
        data_root=embedded(cfg).path,
        num_images=cfg.eval.attr_images,
        resolution=cfg.vae.data.resolution,
        seed=cfg.seed,
        shapes_scene=cfg.vae.data.shapes_scene,
        teacher=None,
        device=cfg.device,
        progress=progress,
        echo=False,
    )
    summary = {k: r["summary"] for k, r in report["results"].items()}
    key, what = (
        ("top5_recall", "attribute top-5 recall")
        if embedded(cfg).name == "shapes"
        else ("class_accuracy", "linear class probe accuracy")
    )
    scores = ", ".join(f"{k} {s.get(key, float('nan')):.3f}" for k, s in summary.items())
    return {"results": summary, "summary": f"{what}: {scores}"}


# -- the driver ------------------------------------------------------------------------------------------


def run_demo(
    cfg: DemoConfig, output_dir: str | Path = "runs/demo", *, progress: bool = True
) -> dict[str, Any]:
    """Run (or continue) the demo in `output_dir`; returns {stage: record} and writes the report."""

    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    st = Stages(root)
    d = cfg.vae.data
    emb = resolve(d.name, d.path, d.resolution, d.shapes_scene)
    if emb.note:  # Fashion-MNIST is not installed: say so first, run the shapes
        st.echo(f"[data] {emb.note}")
        cfg = copy.deepcopy(cfg)
        cfg.vae.data.name = "shapes"
    with st.lock():
        st.echo(f"[data] {emb.description}")
        rec: dict[str, Any] = {}
        rec["pretrain"] = st.run(
            "pretrain", lambda: train_vae_stage(cfg, root), stage_settings(cfg, "pretrain")
        )
        init = rec["pretrain"]["export"]
        rec["vae"] = st.run("vae", lambda: train_vae_stage(cfg, root, init), stage_settings(cfg, "vae"))
        vae_export = rec["vae"]["export"]
        rec["latents"] = st.run(
            "latents", lambda: cache_stage(cfg, root, vae_export, progress), stage_settings(cfg, "latents")
        )
        rec["sit"] = st.run(
            "sit",
            lambda: train_sit_stage(cfg, root, rec["latents"]["store"], vae_export),
            stage_settings(cfg, "sit"),
        )
        rec["samples"] = st.run(
            "samples",
            lambda: sample_stage(cfg, root, rec["sit"]["run"], progress),
            stage_settings(cfg, "samples"),
        )
        rec["evaluate"] = st.run(
            "evaluate",
            lambda: evaluate_stage(cfg, root, vae_export, rec["samples"]["npz"]),
            stage_settings(cfg, "evaluate"),
        )
        rec["probe"] = st.run(
            "probe", lambda: probe_stage(cfg, root, vae_export, progress), stage_settings(cfg, "probe")
        )
        html, md = write_report(cfg, root, rec, note=emb.note)
        st.echo(f"[report] {html} and {md}")
    return {"stages": rec, "report": str(html), "config": dataclasses.asdict(cfg), "note": emb.note}
