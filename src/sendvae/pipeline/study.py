"""`sendvae study`: the alignment variants compared on generation, as the paper compares them (small scale).

    ROOT/pretrain                      the shared plain VAE (no alignment)
    ROOT/stages/judge.json             the judge every run is scored by (`evaluation.judge`), and
    ROOT/reference.npz                 its FD reference statistics of held-out real images
    ROOT/runs/<variant>-s<seed>/vae    fine-tuned from it with <variant>'s alignment (rae: /pretrain, the
                                       RAE's decoder trained from scratch; study_config.py)
                              /latents its latent store (with teacher tokens for REPA)
                              /sit     the common SiT recipe on it; checkpoints kept at the eval points
                              /samples samples of every eval point (and with CFG at the end)
                              /scores.npz, recon.npz  the judge's features and hits of every sample and
                                       reconstruction, PSNR per image: what the intervals resample
    ROOT/study.{md,csv,json}, gfd_vs_steps.png, probe_vs_gfd.png

Every step of every run is a recorded stage (`pipeline.stages`): an interrupted study continues with the
first unfinished stage; `--report-only` tabulates the finished runs without running or writing anything
else. The stages are the demo's (`pipeline.demo`), run with each variant's config; the tables and the
intervals are `pipeline.study_report`'s.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..align import ALIGNMENTS
from ..align.names import paper_align_weight
from ..analysis.report import probe_models
from ..config import to_dict
from ..data.embedded import resolve
from ..diffusion.generate import generate
from ..diffusion.sampling import SamplerConfig
from ..evaluation.downstream import downstream_scores, train_downstream
from ..evaluation.judge import load_judge
from ..evaluation.scoring import ImageSet, Scorer
from ..metrics.features import FeatureExtractor
from ..metrics.recon import psnr
from ..models.vae_io import load_vae
from ..runtime.checkpoint import atomic_write_bytes
from ..runtime.distributed import resolve_device
from ..train.vae_config import PRESETS as VAE_PRESETS
from .demo import cache_stage, judge_recipe, run_steps, train_sit_stage, train_vae_stage
from .demo_config import PERCEPTUAL
from .stages import Stages
from .study_config import RAE, StudyConfig
from .study_report import write_study_report


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def _variant(cfg: StudyConfig, variant: str, seed: int):
    """The stages' config of one run: the study's base with the variant's alignment and the run's seed."""
    run = copy.deepcopy(cfg.base)
    run.seed, loss = seed, run.vae.loss
    if variant == RAE:  # the frozen teacher at 128 px (8 x 8 tokens) + rae-tiny, trained from scratch
        run.vae.model.vae, run.vae.teacher.input_size, loss.align = "rae-tiny", 128, "none"
        run.pretrain_steps += run_steps(run.vae)  # a VAE row's pre-training + fine-tune steps
        o, tiny = run.vae.optim, VAE_PRESETS.build("rae-tiny").optim  # the ViT decoder's optimizer settings
        o.lr, o.betas, o.warmup_steps = tiny.lr, tiny.betas, tiny.warmup_steps
        run.sit.transport.time_shift = "auto"
        return run
    loss.align, loss.align_weight = variant, paper_align_weight(variant, loss.align_weight)
    return run


def eval_steps(cfg: StudyConfig) -> list[int]:
    """The SiT steps scored: evenly spaced, the last at the end of training."""
    total, k = run_steps(cfg.base.sit), max(1, cfg.eval_points)
    every = max(1, total // k)  # the SiT stage checkpoints every this many steps
    return sorted({min(total, every * (i + 1)) for i in range(k - 1)} | {total})


def _save_scores(path: Path, **arrays: np.ndarray) -> None:

    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


def _judged(
    scorer: Scorer, images: torch.Tensor, labels: np.ndarray, teacher: bool = True
) -> tuple[dict[str, Any], dict]:
    """(scores, per-sample arrays): the judge's features and hits of every image, for the intervals."""
    feats, pred = scorer.judge.run(images)
    scores = scorer.samples(images, labels, teacher)
    return scores, {"feats": feats.astype(np.float32), "hits": pred == labels}


def _score_sit(cfg: StudyConfig, root: Path, scorer: Scorer, progress: bool) -> dict[str, Any]:
    """Samples at every eval point (no guidance) and at the end with CFG, judged; the per-sample features
    and hits go to ROOT/scores.npz (what the study's intervals resample)."""

    s = cfg.base.sample
    out: dict[str, Any] = {"steps": [], "gfd": [], "class_accuracy": [], "gfd_teacher": []}
    arrays: dict[str, np.ndarray] = {}
    sets = [(step, SamplerConfig(steps=s.steps)) for step in eval_steps(cfg)]
    sets.append((run_steps(cfg.base.sit), SamplerConfig(steps=s.steps, cfg_scale=s.cfg_scale)))
    for k, (step, sampler) in enumerate(sets):
        npz = generate(
            root / "sit",
            s.num_samples,
            sampler,
            root / "samples",
            train_steps=step,
            seed=0,
            label_sampling="equal",
            device=cfg.base.device,
            progress=progress,
        )
        images = ImageSet.from_npz(npz)
        final = step == run_steps(cfg.base.sit)  # FD_<teacher> (secondary) of the final sets only
        scores, per = _judged(scorer, images.images, images.labels, teacher=final)
        name = "cfg" if k == len(sets) - 1 else f"step{step}"
        arrays.update({f"{name}_feats": per["feats"], f"{name}_hits": per["hits"]})
        if k == len(sets) - 1:
            out["gfd_cfg"], out["class_accuracy_cfg"] = scores["fd_judge"], scores["class_accuracy"]
            out["gfd_teacher_cfg"] = scores.get("fd_teacher", float("nan"))
        else:
            out["steps"].append(step)
            out["gfd"].append(scores["fd_judge"])
            out["class_accuracy"].append(scores["class_accuracy"])
            out["gfd_teacher"].append(scores.get("fd_teacher", float("nan")))
    _save_scores(root / "scores.npz", **arrays)
    out["summary"] = (
        f"gFD {' -> '.join(f'{v:.2f}' for v in out['gfd'])} at SiT steps {out['steps']}, class accuracy "
        f"{out['class_accuracy'][-1]:.0%}; CFG {s.cfg_scale:g}: gFD {out['gfd_cfg']:.2f}, class accuracy "
        f"{out['class_accuracy_cfg']:.0%}"
    )
    return out


def _score_vae(cfg: StudyConfig, root: Path, vae_export: str, scorer: Scorer, emb) -> dict[str, Any]:
    """Reconstructions of the held-out images (rFD, class accuracy, PSNR per image to ROOT/recon.npz, SSIM)
    and the probe score of the latents."""

    device = resolve_device(cfg.base.device)
    vae = load_vae(vae_export).to(device)
    n = cfg.base.eval.ref_images
    scores, orig, rec = scorer.reconstructions(vae, emb.split("eval"), n, PERCEPTUAL, device=device)
    per_image = psnr(orig.images, rec.images).double().numpy()
    _, per = _judged(scorer, rec.images, rec.labels, teacher=False)
    _save_scores(root / "recon.npz", feats=per["feats"], hits=per["hits"], psnr=per_image)
    b = cfg.base
    probe = probe_models(
        root / "probe",
        vaes=[("vae", vae_export)],
        data=emb.name,
        data_root=emb.path,
        num_images=b.eval.attr_images,
        resolution=b.vae.data.resolution,
        seed=0,
        shapes_scene=b.vae.data.shapes_scene,
        teacher=None,
        device=b.device,
        progress=False,
        echo=False,
    )["results"]["vae"]["summary"]
    score = probe_score_name(cfg, emb)
    out = {
        "rfd": scores["fd_judge"],
        "rfd_teacher": scores.get("fd_teacher", float("nan")),
        "recon_class_accuracy": scores["class_accuracy"],
        "psnr": scores["psnr"],
        "ssim": scores["ssim"],
        PERCEPTUAL: scores[PERCEPTUAL],
        f"r{scorer.judge_metric}": scores[f"r{scorer.judge_metric}"],  # to the originals: standard rFD
        "probe": probe,
        "score": score,
    }
    out["summary"] = (
        f"rFD {out['rfd']:.2f}, class accuracy {out['recon_class_accuracy']:.0%}, PSNR {out['psnr']:.2f} dB, "
        f"probe {score} {probe.get(score, float('nan')):.3f}"
    )
    return out


def probe_score_name(cfg: StudyConfig, emb) -> str:
    """The probe score the study correlates with gFD: the linear class probe's accuracy on Fashion-MNIST
    latents, the attribute probes' top-5 recall on the shapes (their ground-truth attributes)."""
    if cfg.score != "auto":
        return cfg.score
    return "class_accuracy" if emb.name == "fashion-mnist" else "top5_recall"


def _train_heads(cfg: StudyConfig, root: Path) -> dict[str, Any]:
    """Segmentation / depth heads on the teacher's tokens of real images (the study's scene and teacher)."""

    d, t = cfg.base.vae.data, cfg.base.vae.teacher
    n = cfg.base.eval.probe_train
    out = train_downstream(
        root / "heads",
        enc_type=t.enc_type,
        resolution=d.resolution,
        teacher_input=t.input_size,
        scene=d.shapes_scene,
        num_images=n,
        seed=1004,
        device=cfg.base.device,
    )
    return {
        "heads": str(out),
        "summary": f"downstream heads on the teacher tokens of {cfg.base.eval.probe_train} images",
    }


def _downstream(cfg: StudyConfig, variant: str, vae_export: str, heads: str | None) -> dict[str, Any]:
    """mIoU / AbsRel / delta<1.25 of the heads read through the variant's alignment head from encoded real
    images (NaN for a variant that exports no read-out head)."""

    keys = ("miou", "fg_iou", "abs_rel", "delta1")
    if heads is None:
        return {**{k: float("nan") for k in keys}, "summary": "no downstream task on this dataset"}
    if variant not in ALIGNMENTS or ALIGNMENTS[variant].load is None:  # (rae: no head)
        return {**{k: float("nan") for k in keys}, "summary": "no read-out head exported"}
    s = downstream_scores(vae_export, heads, num_images=256, device=cfg.base.device)["scores"]
    out: dict[str, Any] = {k: float(s["vae-real"][k]) for k in keys}
    out["teacher_miou"] = float(s["teacher-real"]["miou"])
    out["summary"] = f"through its head: mIoU {out['miou']:.3f}, delta<1.25 {out['delta1']:.3f}"
    return out


def build_scorer(cfg: StudyConfig, emb) -> Scorer:
    """The shared yardstick: the judge (trained once per machine on the real training split) with its FD
    reference on held-out real images no run trains on, and the teacher's FD as a secondary column."""

    v, device = cfg.base.vae, resolve_device(cfg.base.device)
    judge = load_judge(emb, judge_recipe(cfg.base), device=device)
    fx = FeatureExtractor.from_config(v.teacher, v.data.resolution, device)
    return Scorer(judge, ImageSet.take(emb.split("reference"), cfg.base.eval.ref_images), fx)


def run_study(
    cfg: StudyConfig,
    output_dir: str | Path = "runs/study",
    *,
    progress: bool = False,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or continue) the study in `output_dir`; returns the aggregated results and writes the tables.

    report_only: run nothing, write nothing but the tables: tabulate the runs whose every stage finished
    (an interrupted study's report so far; it may run beside the study that fills the folder).
    """

    root = Path(output_dir)
    st = Stages(root)
    d = cfg.base.vae.data
    emb = resolve(d.name, d.path, d.resolution, d.shapes_scene)
    if emb.note:
        st.echo(f"[data] {emb.note}")
        cfg = copy.deepcopy(cfg)
        cfg.base.vae.data.name = "shapes"
    if report_only:
        if not (st.done("pretrain") and st.done("judge")):
            raise ValueError(f"{root}: no study has run here yet; run `sendvae study --output-dir {root}`")
        runs = {name: rec for name, rec in _finished_runs(cfg, root).items()}
        if not runs:
            raise ValueError(f"{root}: no run of the study has finished yet")
        return write_study_report(cfg, root, runs, st.load("judge"))
    root.mkdir(parents=True, exist_ok=True)
    with st.lock():
        st.echo(f"[data] {emb.description}")
        common = {"base": to_dict(cfg)["base"]}
        init = st.run("pretrain", lambda: train_vae_stage(cfg.base, root), common)["export"]
        scorer = build_scorer(cfg, emb)
        judge = st.run("judge", lambda: _judge_stage(scorer, emb, root), common)
        if judge["fingerprint"] != scorer.judge.fingerprint:
            raise ValueError(f"{root}: scored by another judge ({judge['name']}); use another --output-dir")
        heads = None
        if emb.name == "shapes":  # the downstream tasks are the shapes' masks and depth maps
            heads = st.run("heads", lambda: _train_heads(cfg, root), common)["heads"]
        for seed in cfg.seeds:  # seed-major: a shortened study still has every variant
            for variant in cfg.variants:
                rdir = root / "runs" / run_name(variant, seed)
                _one_run(cfg, rdir, variant, seed, init, scorer, emb, st, progress, heads)
        return write_study_report(cfg, root, _finished_runs(cfg, root), judge)


def _judge_stage(scorer: Scorer, emb, root: Path) -> dict[str, Any]:
    """Record the judge every run is scored by, and its reference statistics (ROOT/reference.npz)."""
    j = scorer.judge
    assert j.ref_stats is not None  # set by the Scorer
    _save_scores(root / "reference.npz", mu=j.ref_stats[0], sigma=j.ref_stats[1])
    return {
        "name": j.name,
        "metric": j.metric_name,
        "test_accuracy": j.test_accuracy,
        "test_per_class": j.test_per_class,
        "fingerprint": j.fingerprint,
        "teacher_metric": scorer.teacher_metric,
        "dataset": emb.description,
        "summary": f"{j.name}: {j.test_accuracy:.1%} on held-out test images",
    }


RUN_STAGES = ("vae", "latents", "sit", "scores", "vae-scores", "downstream")


def _finished_runs(cfg: StudyConfig, root: Path) -> dict[str, dict[str, Any]]:
    """{run name: its record} of every (variant, seed) whose stages all finished (read only)."""
    runs = {}
    for seed in cfg.seeds:
        for variant in cfg.variants:
            name = run_name(variant, seed)
            rst = Stages(root / "runs" / name)
            if all(rst.done(k) for k in RUN_STAGES):
                rec: dict[str, Any] = {"variant": variant, "seed": seed, "dir": str(root / "runs" / name)}
                for k in ("scores", "vae-scores"):
                    rec.update(_strip(rst.load(k)))
                rec["downstream"] = _strip(rst.load("downstream"))
                runs[name] = rec
    return runs


def _one_run(
    cfg,
    rdir: Path,
    variant: str,
    seed: int,
    init: str,
    scorer: Scorer,
    emb,
    st: Stages,
    progress: bool,
    heads: str | None,
) -> None:
    """Fine-tune, cache, SiT, scores of one (variant, seed), each a recorded stage of the run's folder."""
    name = run_name(variant, seed)
    rst = Stages(rdir, echo=lambda line: st.echo(f"{name} {line}"))
    key = {"base": to_dict(cfg)["base"], "variant": variant, "seed": seed}
    sit_key = {**key, "eval_points": cfg.eval_points}
    run_cfg = _variant(cfg, variant, seed)
    with rst.lock():
        start = None if variant == RAE else init  # the RAE trains its decoder from scratch (ROOT/pretrain)
        vae = rst.run("vae", lambda: train_vae_stage(run_cfg, rdir, start), key)["export"]
        store = rst.run("latents", lambda: cache_stage(run_cfg, rdir, vae, progress), key)["store"]
        every = eval_steps(cfg)[0]  # checkpoints at the eval points, all kept
        rst.run(
            "sit",
            lambda: train_sit_stage(run_cfg, rdir, store, vae, ckpt_every=every, keep=cfg.eval_points + 1),
            sit_key,
        )
        rst.run("scores", lambda: _score_sit(cfg, rdir, scorer, progress), sit_key)
        rst.run("vae-scores", lambda: _score_vae(cfg, rdir, vae, scorer, emb), key)
        rst.run("downstream", lambda: _downstream(cfg, variant, vae, heads), key)


def _strip(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ("summary", "settings", "seconds")}
