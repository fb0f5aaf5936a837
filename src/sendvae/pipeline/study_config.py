"""What `sendvae study` runs, per scale (``--scale``): the paper's comparison, scaled down.

Design (Send-VAE Sec. 4, at toy scale): one plain VAE is pre-trained once (no alignment); from that
same initialisation every variant is fine-tuned for the same number of steps with its own alignment
(`--loss.align`: none = the plain fine-tune, repa = the MLP on the clean latent, vf = VA-VAE's VF loss,
sendvae = mapper + noise injection, reals, repae); then the same SiT recipe trains on each variant's
latent store, and its samples are scored at several points of SiT training (convergence speed, not
only the end point). Every (variant, seed) pair is one run; the seed changes the fine-tune's and the
SiT's random draws, not the shared initialisation.

Compute: each fine-tune takes `base.vae.steps` steps of the same batch size. For `repae`, which also
trains a SiT beside the VAE, that SiT is extra work inside the fine-tune (its VAE steps cost ~1.2x a
sendvae step on CPU, BENCHMARKS.md); the SiT that is scored is, as for every variant, a fresh one
trained by the common recipe on the variant's cached latents (REPA-E's own protocol for its E2E-VAE).

`rae` (RAE, arXiv 2510.11690; models/rae.py) is a row beside the aligned VAEs, not a fine-tune: the study's
teacher, frozen, is its encoder, at 128 px input so that its latent (112 x 8 x 8) has the VAEs' 8 x 8 grid
and the same SiT sees as many tokens (equal SiT compute: the same blocks, steps and batch; only its patch
embedding and output layer read and write 112 channels instead of 4, a few hundredths of a block); RAE's
time shift (`--transport.time_shift auto`: alpha = sqrt(112 x 64 / 4096) = 1.32) is its recipe's, free.
It trains only a decoder (rae-tiny, from scratch, the VAEs' loss), and its tokenizer compute is counted in
optimizer steps at the same batch: pre-training + fine-tune steps of a VAE (every VAE row has both behind it)
are the RAE decoder's steps; the encoder is never trained (its forward pass is its whole cost, measured with
the step). The REPA targets of its SiT come from the same teacher at the same 128 px (the VAEs' from 64 px),
and its class probe reads 7168 latent dimensions where a VAE's reads 256: the representation it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..align.names import NAMES, PAPER
from ..config import option
from .demo_config import DemoConfig, DemoEval, DemoLatents, DemoSample, demo_config

# Every alignment variant (align/names.py, the registry's order); each fine-tune uses its own paper's
# lambda_align (align.names.paper_align_weight: VA-VAE 0.1 with the adaptive weight, REPA-E 1.5, the
# others 1.0); none keeps base.vae.align_weight (unused: no alignment term). Then the RAE row.
RAE = "rae"
VARIANTS = (*NAMES, RAE)


def _known(variants: tuple[str, ...]) -> str | None:
    unknown = [v for v in variants if v not in VARIANTS]
    return f"unknown {unknown}; choose from {', '.join(VARIANTS)}" if unknown else None


@dataclass
class StudyConfig:
    scale: str = option("cpu", "the scale this config started from")
    variants: tuple[str, ...] = option(
        VARIANTS,
        "variants compared (train-vae --loss.align; rae: the frozen-encoder RAE), comma-separated",
        check=_known,
    )
    seeds: tuple[int, ...] = option((0, 1, 2), "seeds: one fine-tune + SiT per (variant, seed)", min=0)
    eval_points: int = option(3, "SiT checkpoints scored (evenly spaced, the last at the end)", min=1)
    score: str = option(
        "auto",
        "probe score correlated with the final gFD (auto: the linear class probe's accuracy on "
        "Fashion-MNIST, the attribute probes' top5_recall on the shapes)",
    )
    claim: str = option(PAPER, "the variant whose claims the verdict checks (the paper's)")
    # the stages' settings (pretrain_steps: the shared VAE; vae.optim.max_steps: every fine-tune;
    # vae.loss.align and align_weight are each variant's)
    base: DemoConfig = option(DemoConfig(), "the stages' settings")


def _cpu() -> StudyConfig:
    # Fashion-MNIST with the demo's VAE and SiT (pipeline.demo_config, cpu), measured on 2 cores: the shared
    # pre-training ~70 s and the judge 38 s once; per run a 200-step fine-tune ~20 s, caching 11 s, the SiT
    # cut to 450 steps ~105 s, 4 sample sets of 2000 (steps 150 / 300 / 450 without guidance, 450 with CFG
    # 4) at 8 Euler steps ~95 s, reconstructions, judge and probes ~15 s: ~4 min, 18 runs in ~80 min.
    # Cut to fit 2 hours: the SiT steps (450, not the demo's 1000), the Euler steps (8, not 16).
    # The rae row costs more before its SiT: 1200 decoder steps and caching through the teacher at 128 px,
    # 428 s + 182 s against a VAE row's 30 s + 24 s, its whole run 1119 s against 683 s, measured on a
    # contended machine that ran the SiT stage 3x slower than the quiet one (BENCHMARKS.md, RAE): an
    # estimated ~6 min per seed quiet, ~100 min for the study with it.
    base = demo_config("cpu")
    base.scale = "study-cpu"
    base.sit.optim.max_steps = 450
    base.sample = DemoSample(num_samples=2000, steps=8)
    base.eval = DemoEval(ref_images=2000, probe_train=2000, attr_images=2000)
    return StudyConfig(scale="cpu", base=base)


def _gpu() -> StudyConfig:
    base = demo_config("cpu")
    base.scale, base.pretrain_steps = "study-gpu", 3000
    v, s = base.vae, base.sit
    v.optim.batch_size, v.optim.max_steps, v.loss.lpips_weight = 64, 2000, 0.1
    s.model.depth, s.model.hidden_size = 6, 256
    s.optim.batch_size, s.optim.max_steps = 256, 6000
    base.latents = DemoLatents(num_images=20000)
    base.sample = DemoSample(num_samples=5000)
    base.eval = DemoEval(ref_images=5000, probe_train=5000, attr_images=5000)
    return StudyConfig(scale="gpu", eval_points=5, seeds=(0, 1, 2, 3, 4), base=base)


def _ci() -> StudyConfig:
    base = demo_config("cpu")
    base.scale, base.pretrain_steps = "study-ci", 8
    base.vae.optim.max_steps = 6
    s = base.sit.optim
    s.max_steps, s.batch_size, s.warmup_steps = 12, 16, 2
    base.latents = DemoLatents(num_images=128)
    base.sample = DemoSample(num_samples=32, steps=4)
    base.eval = DemoEval(ref_images=64, probe_train=160, attr_images=120, judge_images=4096, judge_epochs=1)
    return StudyConfig(scale="ci", variants=("none", PAPER), seeds=(0,), eval_points=2, base=base)


SCALES = {"cpu": _cpu, "gpu": _gpu, "ci": _ci}


def study_config(scale: str = "cpu") -> StudyConfig:
    if scale not in SCALES:
        raise ValueError(f"unknown study scale {scale!r}; choose from {', '.join(SCALES)}")
    return SCALES[scale]()
