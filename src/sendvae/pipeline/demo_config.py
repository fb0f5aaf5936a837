"""What `sendvae demo` runs, per scale (``--scale``): one typed config, a few named sizes.

Scales:
  cpu  the default: the whole pipeline in under 10 minutes on a 2-core CPU with no network.
  gpu  the same pipeline, larger (64 px full scenes, longer training, more samples): minutes on one GPU.
  ci   a reduced run for the test suite (every stage and every report figure, ~2 minutes on CPU);
       its models are too short-trained to generate recognisable shapes.

How the cpu scale was chosen (measured on the 2-core CPU; BENCHMARKS.md "sendvae demo"):
  * Fashion-MNIST at 32 px (`data.embedded`: resized, grey as RGB): real photographs whose 10 classes differ
    in silhouette, which a 4 x 8 x 8 latent and a minutes-long SiT carry; the procedural shapes' classes
    differ in outline details they do not (18% class accuracy there, 82-85% here with the same stages).
  * a plain VAE first, then the Send-VAE fine-tune from it, as the paper fine-tunes a trained VAE:
    from scratch, the alignment to the teacher holds the tiny VAE on grey blobs for hundreds of steps.
  * tiny-f4d4: 32 px -> 4 x 8 x 8 latents; after 1000 + 200 steps the judge reads 86% of its
    reconstructions of held-out images as their class (500 + 200: 85%; the real images: 91%). No LPIPS and no
    discriminator in the VAE loss: the ST-LPIPS and PatchGAN passes cost ~60% of a step at this size.
  * the teacher (embedded EfficientNet-Lite0) at 64 px input (stride-16 tokens on a 4 x 4 grid): the
    teacher is the most expensive network of every stage on CPU (128 px input runs 4x slower).
  * SiT-S/1 cut to 4 blocks x 128 wide on the 8 x 8 latent grid (64 tokens), REPA after block 2,
    batch 64, AdamW 1e-3 with warm-up, EMA 0.995, 1000 steps on a 2048-image store (CFG-4 class accuracy
    0.83 after 800 steps, 0.88 after 1200; 0.23-0.27 s a step).
  * sampling: 16 Euler steps (the judge's accuracy equals 32 steps' within 0.5 point, at half the time)
    and CFG 4 (class accuracy 0.82 / 0.84 / 0.85 at CFG 3 / 4 / 5, FD_judge 108 / 115 / 121: CFG 4 is
    the balance); 400 samples per setting.
  * the judge (`evaluation.judge`): 3 epochs on the 60000 training images, ~1 minute once per machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..align.names import NAMES, PAPER
from ..config import option
from ..data.embedded import EMBEDDED

# The perceptual metric of the demo and the study (evaluation.reconstruction: the key names the network): the
# bundled shift-tolerant LPIPS on AlexNet, offline and cheap at 32 px.
PERCEPTUAL = "stlpips_alex"

@dataclass
class DemoData:
    dataset: str = option(
        "fashion-mnist",
        "embedded dataset: fashion-mnist (real images; the shapes stand in where it is not installed) or "
        "shapes (procedural, with ground-truth attributes)",
        choices=EMBEDDED,
    )
    path: str | None = option(None, "Fashion-MNIST folder (default: the Debian package's)")
    resolution: int = option(32, "image side in pixels")
    scene: str = option(
        "simple",
        "shapes scene (full: textures and occluders; simple: one object)",
        choices=("full", "simple"),
    )
    teacher: str = option("efficientnet-lite0", "teacher: alignment, REPA targets, FD features, class probe")
    teacher_input: int = option(64, "teacher input side in pixels")


@dataclass
class DemoVAE:
    arch: str = option("tiny-f4d4", "VAE architecture preset")
    pretrain_steps: int = option(1000, "steps of the plain VAE (no alignment, no teacher) it starts from")
    steps: int = option(200, "fine-tuning steps with the alignment (the paper fine-tunes a trained VAE)")
    batch_size: int = option(16, "batch size")
    lr: float = option(2e-3, "learning rate")
    mapper_patch: int = option(2, "mapper patch size on the latent grid")
    align: str = option(PAPER, "alignment variant (train-vae --loss.align)", choices=NAMES)
    align_weight: float = option(1.0, "lambda_align")
    lpips_weight: float = option(0.0, "LPIPS weight in the loss")
    gan_start: int | None = option(None, "step the discriminator starts (none: no GAN)")


@dataclass
class DemoLatents:
    num_images: int = option(2048, "images encoded into the latent store (each with its flip)")


@dataclass
class DemoSiT:
    model: str = option("SiT-S/1", "SiT size and patch")
    depth: int = option(4, "blocks")
    width: int = option(128, "width")
    heads: int = option(4, "attention heads")
    encoder_depth: int = option(2, "REPA block")
    projector_dim: int = option(256, "REPA projector width")
    steps: int = option(1000, "training steps")
    batch_size: int = option(64, "batch size")
    lr: float = option(1e-3, "learning rate")
    warmup: int = option(50, "warm-up steps")
    ema: float = option(0.995, "EMA decay")
    proj_coeff: float = option(0.5, "REPA weight")


@dataclass
class DemoSample:
    num_samples: int = option(400, "samples per guidance setting (as many of each class)")
    steps: int = option(16, "Euler ODE steps")
    cfg_scale: float = option(4.0, "classifier-free guidance scale (also sampled without guidance)")
    guidance_high: float = option(1.0, "guidance for t <= this")


@dataclass
class DemoEval:
    ref_images: int = option(1000, "held-out real images for FD (and as many reconstructions)")
    probe_train: int = option(2000, "images the downstream heads train on (the shapes' masks and depth)")
    attr_images: int = option(2000, "images of the latent probes (class probe; shapes: attribute probes)")
    judge_images: int | None = option(None, "training images of the judge (none: the whole training split)")
    judge_epochs: int = option(3, "training epochs of the judge")


@dataclass
class DemoConfig:
    scale: str = option("cpu", "the scale this config started from")
    seed: int = option(0, "global seed (data order, initial weights, noise)")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    data: DemoData = option(DemoData(), "data and teacher")
    vae: DemoVAE = option(DemoVAE(), "stage vae: the Send-VAE")
    latents: DemoLatents = option(DemoLatents(), "stage latents: the latent store")
    sit: DemoSiT = option(DemoSiT(), "stage sit: SiT + REPA")
    sample: DemoSample = option(DemoSample(), "stage samples")
    eval: DemoEval = option(DemoEval(), "stages evaluate and probe")


def _gpu() -> DemoConfig:
    return DemoConfig(
        scale="gpu",
        data=DemoData(teacher_input=128),
        vae=DemoVAE(pretrain_steps=3000, steps=2000, batch_size=64, lpips_weight=0.1),
        latents=DemoLatents(num_images=20000),
        sit=DemoSiT(depth=8, width=256, encoder_depth=4, steps=8000, batch_size=256),
        sample=DemoSample(num_samples=4000, steps=64),
        eval=DemoEval(ref_images=5000, probe_train=5000, attr_images=5000),
    )


def _ci() -> DemoConfig:
    return DemoConfig(
        scale="ci",
        vae=DemoVAE(pretrain_steps=20, steps=10),
        latents=DemoLatents(num_images=256),
        sit=DemoSiT(steps=30, batch_size=32, warmup=5),
        sample=DemoSample(num_samples=64, steps=8),
        eval=DemoEval(ref_images=128, probe_train=192, attr_images=200, judge_images=4096, judge_epochs=1),
    )


SCALES = {"cpu": DemoConfig, "gpu": _gpu, "ci": _ci}


def demo_config(scale: str = "cpu") -> DemoConfig:
    """The config of a named scale (`SCALES`); change fields with `config.apply_overrides`."""
    if scale not in SCALES:
        raise ValueError(f"unknown demo scale {scale!r}; choose from {', '.join(SCALES)}")
    return SCALES[scale]()
