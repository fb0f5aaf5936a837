"""What `sendvae demo` runs, per scale (``--scale``): the trainers' own configs, a few named sizes.

The demo's config holds the configs of the stages it runs, in their commands' own vocabulary: ``vae`` is
train-vae's `TrainVAEConfig` of the alignment fine-tune (``--vae.loss.align``, ``--vae.optim.max_steps``,
``--vae.teacher.enc_type``, ``--vae.data.resolution``, ...; the plain pre-training runs the same config
with ``--loss.align none`` for ``pretrain_steps``), ``sit`` is train-sit's `TrainSiTConfig`
(``--sit.model.depth``, ``--sit.optim.max_steps``, ...). The demo sets only what it owns: each run's
folder, seed, device and logging cadence (`OWNED`); the embedded data is ``vae.data.name`` (fashion-mnist,
or shapes where it is not installed) at ``vae.data.resolution``. Its own sections are the
stages no command config describes: latents, sample, eval.

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

from ..align.names import PAPER
from ..config import option
from ..train.sit_config import PRESETS as SIT_PRESETS
from ..train.sit_config import TrainSiTConfig
from ..train.vae_config import PRESETS as VAE_PRESETS
from ..train.vae_config import TrainVAEConfig

# The fields of the trainers' configs the demo sets itself (so they are no options of `sendvae demo`): each
# run's folder, seed, device and logging cadence, the data folder (--data-path), the VAE a fine-tune starts
# from and the store and VAE a SiT reads.
_RUN = ("output_dir", "exp_name", "seed", "device", "log_every", "ckpt_every", "sample_every", "keep_ckpts")
OWNED = (
    *(f"{stage}.run.{k}" for stage in ("vae", "sit") for k in _RUN),
    "vae.data.path", "vae.model.vae_ckpt", "sit.data.store", "sit.model.vae",
)  # fmt: skip

# The perceptual metric of the demo and the study (evaluation.reconstruction: the key names the network): the
# bundled shift-tolerant LPIPS on AlexNet, offline and cheap at 32 px.
PERCEPTUAL = "stlpips_alex"


def demo_vae() -> TrainVAEConfig:
    """train-vae's config of the demo's Send-VAE fine-tune (cpu scale): the embedded preset, resized."""
    c = VAE_PRESETS.build("shapes-tiny")
    c.data.name, c.data.resolution, c.data.shapes_scene, c.data.num_workers = "fashion-mnist", 32, "simple", 0
    c.model.vae = "tiny-f4d4"
    c.teacher.enc_type, c.teacher.input_size = "efficientnet-lite0", 64
    c.mapper.patch_size = 2
    c.loss.align, c.loss.align_weight, c.loss.lpips_weight, c.loss.gan_weight = PAPER, 1.0, 0.0, 0.0
    c.optim.batch_size, c.optim.lr, c.optim.max_steps = 16, 2e-3, 200
    c.run.sample_every, c.run.keep_ckpts, c.run.stats_images = 0, 1, 256
    return c


def demo_sit() -> TrainSiTConfig:
    """train-sit's config of the demo's SiT (cpu scale): the embedded preset, resized."""
    c = SIT_PRESETS.build("shapes-tiny")
    m = c.model
    m.model, m.depth, m.hidden_size, m.num_heads = "SiT-S/1", 4, 128, 4
    m.encoder_depth, m.projector_dim, m.ema_decay = 2, 256, 0.995
    c.transport.proj_coeff = 0.5
    c.optim.batch_size, c.optim.lr, c.optim.warmup_steps, c.optim.max_steps = 64, 1e-3, 50, 1000
    c.run.sample_every, c.data.num_workers = 0, 0
    return c


@dataclass
class DemoLatents:
    num_images: int = option(2048, "images encoded into the latent store (each with its flip)", min=2)


@dataclass
class DemoSample:
    num_samples: int = option(400, "samples per guidance setting (as many of each class)", min=2)
    steps: int = option(16, "Euler ODE steps", min=1)
    cfg_scale: float = option(4.0, "classifier-free guidance scale (also sampled without guidance)")
    guidance_high: float = option(1.0, "guidance for t <= this", min=0, max=1)


@dataclass
class DemoEval:
    ref_images: int = option(1000, "held-out real images for FD (and as many reconstructions)", min=2)
    probe_train: int = option(2000, "images the downstream heads train on (the shapes' masks, depth)", min=2)
    attr_images: int = option(2000, "images of the latent probes (class probe; shapes: attributes)", min=2)
    judge_images: int | None = option(None, "training images of the judge (none: the training split)", min=1)
    judge_epochs: int = option(3, "training epochs of the judge", min=1)


@dataclass
class DemoConfig:
    scale: str = option("cpu", "the scale this config started from")
    seed: int = option(0, "global seed (data order, initial weights, noise)", min=0)
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    pretrain_steps: int = option(1000, "steps of the plain VAE (vae's config, no alignment) it tunes", min=1)
    vae: TrainVAEConfig = option(demo_vae(), "stage vae: train-vae's config of the alignment fine-tune")
    latents: DemoLatents = option(DemoLatents(), "stage latents: the latent store")
    sit: TrainSiTConfig = option(demo_sit(), "stage sit: train-sit's config")
    sample: DemoSample = option(DemoSample(), "stage samples")
    eval: DemoEval = option(DemoEval(), "stages evaluate and probe")


def _gpu() -> DemoConfig:
    cfg = DemoConfig(scale="gpu", pretrain_steps=3000)
    v, s = cfg.vae, cfg.sit
    v.teacher.input_size = 128
    v.optim.batch_size, v.optim.max_steps, v.loss.lpips_weight = 64, 2000, 0.1
    s.model.depth, s.model.hidden_size, s.model.encoder_depth = 8, 256, 4
    s.optim.batch_size, s.optim.max_steps = 256, 8000
    cfg.latents = DemoLatents(num_images=20000)
    cfg.sample = DemoSample(num_samples=4000, steps=64)
    cfg.eval = DemoEval(ref_images=5000, probe_train=5000, attr_images=5000)
    return cfg


def _ci() -> DemoConfig:
    cfg = DemoConfig(scale="ci", pretrain_steps=20)
    cfg.vae.optim.max_steps = 10
    s = cfg.sit.optim
    s.max_steps, s.batch_size, s.warmup_steps = 30, 32, 5
    cfg.latents = DemoLatents(num_images=256)
    cfg.sample = DemoSample(num_samples=64, steps=8)
    cfg.eval = DemoEval(ref_images=128, probe_train=192, attr_images=200, judge_images=4096, judge_epochs=1)
    return cfg


SCALES = {"cpu": DemoConfig, "gpu": _gpu, "ci": _ci}


def demo_config(scale: str = "cpu") -> DemoConfig:
    """The config of a named scale (`SCALES`); change fields with `config.apply_overrides`."""
    if scale not in SCALES:
        raise ValueError(f"unknown demo scale {scale!r}; choose from {', '.join(SCALES)}")
    return SCALES[scale]()
