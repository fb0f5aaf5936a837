"""`sendvae study`: the alignment variants compared on generation, as the paper compares them (small scale).

    ROOT/pretrain                      the shared plain VAE (no alignment)
    ROOT/runs/<variant>-s<seed>/vae    fine-tuned from it with <variant>'s alignment
                              /latents its latent store (with teacher tokens for REPA)
                              /sit     the common SiT recipe on it; checkpoints kept at the eval points
                              /samples samples of every eval point
    ROOT/study.{md,csv,json}, gfd_vs_steps.png, probe_vs_gfd.png

Every step of every run is a recorded stage (`pipeline.stages`): an interrupted study continues with the
first unfinished stage. The stages are the demo's (`pipeline.demo`), run with each variant's config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import to_dict
from .demo import cache_stage, train_sit_stage, train_vae_stage
from .quality import Judge
from .stages import Stages
from .study_config import StudyConfig, paper_align_weight


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def _variant(cfg: StudyConfig, variant: str, seed: int):
    """The stages' config of one run: the study's base with the variant's alignment and the run's seed."""
    weight = paper_align_weight(variant, cfg.base.vae.align_weight)
    vae = dataclasses.replace(cfg.base.vae, align=variant, align_weight=weight)
    return dataclasses.replace(cfg.base, seed=seed, vae=vae)


def eval_steps(cfg: StudyConfig) -> list[int]:
    """The SiT steps scored: evenly spaced, the last at the end of training."""
    total, k = cfg.base.sit.steps, max(1, cfg.eval_points)
    every = max(1, total // k)  # the SiT stage checkpoints every this many steps
    return sorted({min(total, every * (i + 1)) for i in range(k - 1)} | {total})


def _score_sit(cfg: StudyConfig, root: Path, judge: Judge, progress: bool) -> dict[str, Any]:
    from ..diffusion.generate import generate
    from ..diffusion.sampling import SamplerConfig

    s = cfg.base.sample
    out: dict[str, Any] = {"steps": [], "gfd": [], "class_accuracy": []}
    for step in eval_steps(cfg):
        npz = generate(
            root / "sit",
            s.num_samples,
            SamplerConfig(steps=s.steps),
            root / "samples",
            train_steps=step,
            seed=0,
            label_sampling="equal",
            device=cfg.base.device,
            progress=progress,
        )
        with np.load(npz) as z:
            scores = judge.scores(torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2), z["arr_1"])
        out["steps"].append(step)
        out["gfd"].append(scores["fd"])
        out["class_accuracy"].append(scores["class_accuracy"])
    npz = generate(
        root / "sit",
        s.num_samples,
        SamplerConfig(steps=s.steps, cfg_scale=s.cfg_scale),
        root / "samples",
        seed=0,
        label_sampling="equal",
        device=cfg.base.device,
        progress=progress,
    )
    with np.load(npz) as z:
        guided = judge.scores(torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2), z["arr_1"])
    out["gfd_cfg"], out["class_accuracy_cfg"] = guided["fd"], guided["class_accuracy"]
    out["summary"] = (
        f"gFD {' -> '.join(f'{v:.1f}' for v in out['gfd'])} at SiT steps {out['steps']}; "
        f"CFG {s.cfg_scale:g}: gFD {guided['fd']:.1f}, class accuracy {guided['class_accuracy']:.0%}"
    )
    return out


def _score_vae(cfg: StudyConfig, root: Path, vae_export: str, judge: Judge, recon_set) -> dict[str, Any]:
    from ..analysis.report import probe_models
    from ..metrics.recon import ReconMetrics, reconstruct
    from ..models.vae_io import load_vae
    from ..runtime.distributed import resolve_device

    device = resolve_device(cfg.base.device)
    vae = load_vae(vae_export).to(device)
    metrics, recons = ReconMetrics(), []
    for x, y in reconstruct(vae, recon_set, cfg.base.eval.ref_images, 64, device):
        metrics.update(x, y)
        recons.append(y)
    rfd = judge.fd(torch.cat(recons))
    b = cfg.base
    probe = probe_models(
        root / "probe",
        vaes=[("vae", vae_export)],
        data="shapes",
        num_images=b.eval.attr_images,
        resolution=b.data.resolution,
        seed=0,
        shapes_scene=b.data.scene,
        teacher=None,
        device=b.device,
        progress=False,
        echo=False,
    )["results"]["vae"]["summary"]
    out = {"rfd": rfd, **metrics.result(), "probe": probe}
    out["summary"] = (
        f"rFD {rfd:.1f}, PSNR {out['psnr']:.2f} dB, "
        f"probe {cfg.score} {probe.get(cfg.score, float('nan')):.3f}"
    )
    return out


def _train_heads(cfg: StudyConfig, root: Path) -> dict[str, Any]:
    """Segmentation / depth heads on the teacher's tokens of real images (the study's scene and teacher)."""
    from ..analysis.downstream import train_downstream

    d = cfg.base.data
    n = cfg.base.eval.probe_train
    out = train_downstream(root / "heads", enc_type=d.teacher, resolution=d.resolution,
                           teacher_input=d.teacher_input, scene=d.scene, num_images=n, seed=1004,
                           device=cfg.base.device)  # fmt: skip
    return {
        "heads": str(out),
        "summary": f"downstream heads on the teacher tokens of {cfg.base.eval.probe_train} images",
    }


def _downstream(cfg: StudyConfig, variant: str, vae_export: str, heads: str) -> dict[str, Any]:
    """mIoU / AbsRel / delta<1.25 of the heads read through the variant's alignment head from encoded real
    images (NaN for a variant that exports no read-out head)."""
    from ..analysis.downstream import downstream_scores
    from ..train.alignment import ALIGNMENTS

    keys = ("miou", "fg_iou", "abs_rel", "delta1")
    if ALIGNMENTS[variant].load is None:
        return {**{k: float("nan") for k in keys}, "summary": "no read-out head exported"}
    s = downstream_scores(vae_export, heads, num_images=256, device=cfg.base.device)["scores"]
    out: dict[str, Any] = {k: float(s["vae-real"][k]) for k in keys}
    out["teacher_miou"] = float(s["teacher-real"]["miou"])
    out["summary"] = f"through its head: mIoU {out['miou']:.3f}, delta<1.25 {out['delta1']:.3f}"
    return out


def build_judge(cfg: StudyConfig) -> tuple[Judge, Any]:
    """The shared yardstick: FD reference and class probe on real images no run trains on, and the
    held-out images every VAE reconstructs."""
    from ..data.shapes import ShapesDataset, scene_config
    from ..metrics.features import FeatureExtractor
    from ..runtime.distributed import resolve_device
    from .quality import render

    d, e = cfg.base.data, cfg.base.eval

    def shapes(seed: int) -> ShapesDataset:
        return ShapesDataset(scene_config(d.scene, resolution=d.resolution, seed=seed))

    fx = FeatureExtractor(
        d.teacher, resolution=d.resolution, input_size=d.teacher_input, device=resolve_device(cfg.base.device)
    )
    probe_set = shapes(1002)
    judge = Judge(
        fx,
        render(shapes(1001), range(e.ref_images)),
        render(probe_set, range(e.probe_train)),
        render(probe_set, range(e.probe_train, e.probe_train + e.probe_test)),
    )
    return judge, shapes(1003)


def run_study(
    cfg: StudyConfig,
    output_dir: str | Path = "runs/study",
    *,
    progress: bool = False,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or continue) the study in `output_dir`; returns the aggregated results and writes the tables.

    report_only: run nothing; tabulate the runs that finished (an interrupted study's report so far).
    """
    from .study_report import write_study_report

    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    settings = to_dict(cfg)
    common = {"base": settings["base"]}
    st = Stages(root)
    if report_only and not (st.done("pretrain") and st.done("heads")):
        raise ValueError(f"{root}: no study has run here yet; run `sendvae study --output-dir {root}`")
    init = st.run("pretrain", lambda: train_vae_stage(cfg.base, root), common)["export"]
    judge, recon_set = build_judge(cfg)
    heads = st.run("heads", lambda: _train_heads(cfg, root), common)["heads"]
    st.echo(f"[judge] class probe on real images: {judge.real_accuracy:.0%} held-out accuracy")
    runs: dict[str, dict[str, Any]] = {}
    for seed in cfg.seeds:  # seed-major: a shortened study still has every variant
        for variant in cfg.variants:
            name = run_name(variant, seed)
            if report_only and not Stages(root / "runs" / name).done("downstream"):
                continue
            runs[name] = _one_run(
                cfg, root / "runs" / name, variant, seed, init, judge, recon_set, st, progress, heads
            )
    if not runs:
        raise ValueError(f"{root}: no run of the study has finished yet")
    return write_study_report(cfg, root, runs, judge.metric_name, judge.real_accuracy)


def _one_run(cfg, rdir: Path, variant: str, seed: int, init: str, judge: Judge, recon_set, st: Stages,
             progress: bool, heads: str) -> dict[str, Any]:  # fmt: skip
    """Fine-tune, cache, SiT, scores of one (variant, seed), each a recorded stage of the run's folder."""
    name = run_name(variant, seed)
    rst = Stages(rdir, echo=lambda line: st.echo(f"{name} {line}"))
    key = {"base": to_dict(cfg)["base"], "variant": variant, "seed": seed}
    sit_key = {**key, "eval_points": cfg.eval_points}
    run_cfg = _variant(cfg, variant, seed)
    vae = rst.run("vae", lambda: train_vae_stage(run_cfg, rdir, init), key)["export"]
    store = rst.run("latents", lambda: cache_stage(run_cfg, rdir, vae, progress), key)["store"]
    every = eval_steps(cfg)[0]  # checkpoints at the eval points, all kept
    rst.run("sit", lambda: train_sit_stage(run_cfg, rdir, store, vae, ckpt_every=every,
                                           keep=cfg.eval_points + 1), sit_key)  # fmt: skip
    gen = rst.run("scores", lambda: _score_sit(cfg, rdir, judge, progress), sit_key)
    vae_scores = rst.run("vae-scores", lambda: _score_vae(cfg, rdir, vae, judge, recon_set), key)
    down = rst.run("downstream", lambda: _downstream(cfg, variant, vae, heads), key)
    return {"variant": variant, "seed": seed, **_strip(gen), **_strip(vae_scores),
            "downstream": _strip(down)}  # fmt: skip


def _strip(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ("summary", "settings", "seconds")}
