"""Config of ``sendvae train-vae``: one dataclass per component, and the named presets.

Presets (``--preset``):
  shapes-tiny            the embedded default: procedural shapes at 64 px, a tiny f4d16 VAE (MSE), the bundled
                         EfficientNet-Lite0 teacher; finishes in minutes on a 2-core CPU, no downloads.
  sendvae-f16d32         the paper's recipe (Send-VAE, Sec. 3): init from VA-VAE f16d32, DINOv2-B,
                         1 mapper block, noise injection, L1 + LPIPS + KL 1e-6 + PatchGAN 0.1 from step 0,
                         global batch 1024, AdamW lr 3e-4, 80 epochs of ImageNet 256. LPIPS is the
                         standard LPIPS-VGG (torchvision VGG16 trunk + lpips heads, files on disk).
  sendvae-f8d4           the same from SD-VAE f8d4 (patch 2 in the mapper).
  vavae-f16d32           VA-VAE's VF loss baseline (DINOv2-L, margins 0.5 / 0.25, adaptive weight x 0.1).
  repa-align-f16d32      direct REPA-style alignment baseline: an MLP projector on the clean latent.
  reals-f16d32           ReaLS (arXiv 2502.00359): an MLP to the teacher's patch tokens and to its pooled
                         global feature, two cosine terms, the KL weight balanced against them (the preset).
  repae-f16d32           REPA-E (arXiv 2504.10483, align/repae.py): from VA-VAE f16d32, the VAE aligned
                         through a SiT-XL/1's first 8 blocks (lambda_align 1.5) while the SiT trains beside
                         it (REPA 0.5), latent BatchNorm, lr 1e-4 for VAE, SiT and discriminator, batch 256,
                         400k steps.
  repae-f8d4             the same from SD-VAE f8d4 with SiT-XL/2 (REPA-E's README command).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..align.mapper import MapperConfig
from ..align.names import NAMES, PAPER, alignment_help, paper_align_weight
from ..align.repae import JointSiTConfig
from ..config import PresetRegistry, option, positive, unit_interval
from ..data.config import DataConfig
from ..data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from ..teachers.config import TeacherConfig
from .common import RunConfig, batch_size_option, grad_accum_option


@dataclass
class ModelConfig:
    vae: str = option(
        "f16d32",
        "VAE architecture preset (see `sendvae info`), or an RAE decoder (rae-vit-b, rae-vit-l, rae-vit-xl, "
        "rae-tiny): the frozen --teacher.* encoder's patch tokens as latents and this ViT decoder "
        "(train/rae.py)",
    )
    vae_ckpt: str | None = option(None, "initial VAE weights: LDM .ckpt, diffusers folder, or .pt state dict")
    disc_ckpt: str | None = option(None, "initial PatchGAN discriminator weights")
    disc_ndf: int = option(64, "discriminator base width", min=1)
    disc_layers: int = option(3, "discriminator depth", min=0)
    ema: bool = option(False, "keep an EMA of the VAE weights (exported instead of the raw weights)")
    ema_decay: float = option(0.9999, "EMA decay per step", min=0, max=1)
    grad_checkpointing: bool = option(
        False,
        "activation checkpointing: recompute the blocks of the VAE encoder / decoder, the mapper and (repae) "
        "the SiT in the backward pass (less memory, ~1 more forward)",
    )
    sample_posterior: bool = option(True, "decode z ~ q(z|x) (True) or the posterior mean (False)")
    rae_noise_tau: float = option(
        0.8,
        "RAE: the decoder reads z + sigma eps in training, one sigma per image of scale tau (0: off)",
        min=0,
    )
    rae_noise: str = option(
        "halfnormal",
        "RAE: sigma ~ |N(0, tau^2)| (halfnormal: the paper) or U(0, tau) (uniform: RAE's public code)",
        choices=("halfnormal", "uniform"),
    )


@dataclass
class LossConfig:
    align: str = option(PAPER, alignment_help(), choices=NAMES)  # align/
    align_weight: float = option(1.0, "lambda_align", min=0)
    vf_margin_cos: float = option(0.5, "VF loss: cosine margin m_c", min=0)
    vf_margin_dist: float = option(0.25, "VF loss: distance-matrix margin m_d", min=0)
    vf_adaptive: bool = option(
        True, "VF loss: adaptive weight ||grad nll|| / ||grad vf|| at the encoder output"
    )
    reals_patch_weight: float = option(1.0, "ReaLS: weight of the patch-level cosine term", min=0)
    reals_global_weight: float = option(
        1.0, "ReaLS: weight of the global cosine term (vs the teacher's pooled feature)", min=0
    )
    recon: str = option("l1", "reconstruction loss", choices=("l1", "mse"))
    recon_weight: float = option(1.0, "reconstruction weight", min=0)
    lpips_weight: float = option(1.0, "perceptual (LPIPS) weight; 0 disables", min=0)
    lpips_variant: str = option(
        "stlpips",
        "lpips: the standard metric (Zhang et al. v0.1; torchvision ImageNet trunk + lpips lin heads, "
        "files on disk); stlpips: the shift-tolerant ST-LPIPS bundled with stlpips-pytorch",
        choices=("stlpips", "lpips"),
    )
    lpips_net: str = option("vgg", "LPIPS trunk", choices=("vgg", "alex"))
    lpips_weights: str | None = option(
        None,
        "LPIPS v0.1 lin heads vgg.pth / alex.pth (variant lpips; default: the installed lpips package's)",
    )
    lpips_trunk_weights: str | None = option(
        None,
        "torchvision ImageNet trunk vgg16-397923af.pth / alexnet-owt-7be5be79.pth (variant lpips; "
        "default: torch's hub cache)",
    )
    lpips_random_init: bool = option(False, "random LPIPS weights (tests and benchmarks only)")
    kl_weight: float = option(
        1e-6, "KL weight (KL summed over latent elements, averaged over the batch)", min=0
    )
    gan_weight: float = option(0.1, "generator adversarial weight; 0 disables the discriminator", min=0)
    gan_start: int = option(0, "step at which the discriminator and the adversarial term start", min=0)
    gan_adaptive: bool = option(
        False, "taming's adaptive weight ||grad nll|| / ||grad g|| at the decoder output"
    )
    lecam_weight: float = option(0.0, "LeCam regularisation weight for the discriminator", min=0)
    disc_loss: str = option("hinge", "discriminator loss", choices=("hinge", "non_saturating"))


@dataclass
class OptimConfig:
    batch_size: int = batch_size_option(1024)
    grad_accum: int = grad_accum_option()
    lr: float = option(3e-4, "AdamW learning rate for the VAE and mapper", check=positive)
    disc_lr: float | None = option(None, "discriminator learning rate (default: lr)", check=positive)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", check=unit_interval)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0)
    warmup_steps: int = option(0, "linear learning-rate warm-up steps", min=0)
    grad_clip: float = option(1.0, "max gradient norm (0 disables clipping)", min=0)
    epochs: float | None = option(
        80.0, "training length in epochs of the dataset (if max_steps is unset)", check=positive
    )
    max_steps: int | None = option(None, "training length in steps (overrides epochs)", min=1)
    freeze_decoder: bool = option(False, "train only the encoder (+ mapper)")


@dataclass
class TrainVAEConfig:
    preset: str = option("custom", "name of the preset this config started from")
    run: RunConfig = option(RunConfig(), "run")
    data: DataConfig = option(DataConfig(), "data")
    model: ModelConfig = option(ModelConfig(), "model")
    teacher: TeacherConfig = option(TeacherConfig(), "teacher")
    mapper: MapperConfig = option(MapperConfig(), "mapper")
    loss: LossConfig = option(LossConfig(), "loss")
    sit: JointSiTConfig = option(JointSiTConfig(), "the SiT trained beside the VAE by --loss.align repae")
    optim: OptimConfig = option(OptimConfig(), "optim")


PRESETS = PresetRegistry("train-vae")


@PRESETS.register("sendvae-f16d32")
def _sendvae_f16d32() -> TrainVAEConfig:
    cfg = TrainVAEConfig(preset="sendvae-f16d32")
    cfg.data.name, cfg.data.resolution = "prepared", 256
    cfg.model.vae = "f16d32"
    # Standard LPIPS-VGG (Zhang et al. 2018, v0.1: torchvision's VGG16 ImageNet trunk vgg16-397923af.pth +
    # the lpips package's weights/v0.1/vgg.pth heads), weight 1: the perceptual term of the Send-VAE paper's
    # L_VAE and of REPA-E's configs/l1_lpips_kl_gan.yaml (LPIPS on VGG16, as in LDM/taming). No VGG weights
    # install offline, so the trunk file is the user's; without it the run stops before training and
    # names both files (builders.build_lpips_for).
    cfg.loss.lpips_variant, cfg.loss.lpips_net = "lpips", "vgg"
    return cfg


@PRESETS.register("sendvae-f8d4")
def _sendvae_f8d4() -> TrainVAEConfig:
    cfg = _sendvae_f16d32()
    cfg.preset = "sendvae-f8d4"
    cfg.model.vae = "f8d4"
    return cfg


@PRESETS.register("vavae-f16d32")
def _vavae() -> TrainVAEConfig:
    cfg = _sendvae_f16d32()
    cfg.preset = "vavae-f16d32"
    cfg.loss.align = "vf"
    cfg.loss.align_weight = paper_align_weight("vf", cfg.loss.align_weight)  # 0.1, with the adaptive weight
    cfg.teacher.enc_type = "dinov2-vit-l"
    return cfg


@PRESETS.register("repa-align-f16d32")
def _repa_align() -> TrainVAEConfig:
    cfg = _sendvae_f16d32()
    cfg.preset = "repa-align-f16d32"
    cfg.loss.align = "repa"
    cfg.mapper.depth, cfg.mapper.noise = 0, False
    return cfg


@PRESETS.register("reals-f16d32")
def _reals() -> TrainVAEConfig:
    cfg = _sendvae_f16d32()
    cfg.preset = "reals-f16d32"
    cfg.loss.align = "reals"
    cfg.mapper.depth, cfg.mapper.noise = 0, False  # ReaLS aligns the clean latent through an MLP
    cfg.loss.reals_patch_weight = cfg.loss.reals_global_weight = 1.0
    # The KL weight ReaLS balances against the alignment (its Figure 5: too little KL and too much both
    # raise FID). The value it settles on is not recorded in our references (REFERENCE.md, section 7),
    # so the default is the LDM / REPA-E convention of this recipe, 1e-6 with the KL summed over latent
    # elements and averaged over the batch (REFERENCE.md, section 1); sweep --loss.kl_weight to
    # reproduce the figure's trade-off.
    cfg.loss.kl_weight = 1e-6
    return cfg


@PRESETS.register("repae-f16d32")
def _repae_f16d32() -> TrainVAEConfig:
    # REPA-E's train_repae.py with its README command (End2End-Diffusion/REPA-E): --vae-align-proj-coeff
    # 1.5, --proj-coeff 0.5, --bn-momentum 0.1, --encoder-depth 8, DINOv2-B, batch 256, 400k steps, lr 1e-4
    # (--learning-rate, --vae-learning-rate, --disc-learning-rate), configs/l1_lpips_kl_gan.yaml (L1 +
    # LPIPS 1 + KL 1e-6 + GAN 0.1 from step 0, as sendvae-f16d32); SiT-XL/1 on the f16d32 VAEs.
    cfg = _sendvae_f16d32()
    cfg.preset = "repae-f16d32"
    cfg.loss.align = "repae"
    cfg.loss.align_weight = paper_align_weight("repae", cfg.loss.align_weight)  # 1.5
    cfg.sit.model, cfg.sit.encoder_depth, cfg.sit.proj_coeff, cfg.sit.lr = "SiT-XL/1", 8, 0.5, 1e-4
    cfg.optim.batch_size, cfg.optim.lr, cfg.optim.disc_lr = 256, 1e-4, None
    cfg.optim.epochs, cfg.optim.max_steps = None, 400_000
    return cfg


@PRESETS.register("repae-f8d4")
def _repae_f8d4() -> TrainVAEConfig:
    cfg = _repae_f16d32()
    cfg.preset = "repae-f8d4"
    cfg.model.vae, cfg.sit.model = "f8d4", "SiT-XL/2"  # 32x32 latents, patch 2: 256 tokens
    return cfg


@PRESETS.register("shapes-tiny")
def _shapes_tiny() -> TrainVAEConfig:
    # Everything sized for a 2-core CPU and a few minutes, from scratch (there is no pretrained VAE to
    # start from offline): a 64 px image -> tiny f4 VAE -> 16x16x4 latent, the token grid of f16 at 256 px.
    cfg = TrainVAEConfig(preset="shapes-tiny")
    cfg.run.log_every, cfg.run.ckpt_every, cfg.run.sample_every = 25, 250, 250
    cfg.run.stats_images = 512
    cfg.data.name, cfg.data.resolution, cfg.data.num_workers = "shapes", 64, 1
    # 16 latent channels leave room for appearance beside the aligned semantics (as d32 does at f16)
    cfg.model.vae = "tiny-f4d16"
    cfg.model.disc_ndf, cfg.model.disc_layers = 32, 2
    cfg.teacher.enc_type = "efficientnet-lite0"
    cfg.teacher.input_size = 128  # stride-16 features on an 8x8 grid
    cfg.mapper.hidden_dim, cfg.mapper.num_heads, cfg.mapper.projector_dim = 128, 4, 256
    # patch 2: 16x16 latent -> 8x8 tokens = the teacher grid; at other resolutions the teacher tokens are
    # resampled to the mapper's grid instead of failing.
    cfg.mapper.patch_size, cfg.mapper.grid_mismatch = 2, "resample_teacher"
    # From scratch, LPIPS at full weight paints colour fringes for the first hundreds of steps; a light
    # perceptual term and a late, small discriminator keep the short run about reconstruction + alignment.
    # The bundled ST-LPIPS (stlpips-pytorch ships trunk and heads): the LPIPS that runs with no files given.
    cfg.loss.lpips_variant, cfg.loss.lpips_net, cfg.loss.lpips_weight = "stlpips", "alex", 0.1
    # MSE, not L1: on flat-coloured objects over textured backgrounds, L1 lets a small VAE trade the
    # object's colour for background texture (500 steps: reconstructions of one hue); MSE weighs the
    # large colour errors more and keeps the colours (measured: BENCHMARKS.md).
    cfg.loss.recon = "mse"
    cfg.loss.gan_start = 300
    cfg.optim.batch_size, cfg.optim.lr = 8, 2e-3
    cfg.optim.epochs, cfg.optim.max_steps = None, 500
    # --loss.align repae: train-sit's shapes-tiny SiT (4 blocks, 128 wide, patch 2: 8x8 tokens at 64 px, the
    # teacher grid; resampled at other resolutions), REPA after block 2
    s = cfg.sit
    s.model, s.depth, s.hidden_size, s.num_heads = "SiT-S/2", 4, 128, 4
    s.encoder_depth, s.projector_dim, s.lr, s.ema_decay = 2, 256, 3e-4, 0.99
    s.grid_mismatch = "resample_teacher"
    return cfg


# ImageNet train images per epoch at RAE's global batch 512: ceil(1281167 / 512)
_RAE_STEPS_PER_EPOCH = 2503


@PRESETS.register("rae-dinov2-b")
def _rae_dinov2_b() -> TrainVAEConfig:
    # RAE's stage 1 (Zheng et al., arXiv 2510.11690; bytetriper/RAE: configs/stage1/training/
    # DINOv2-B_decXL.yaml, configs/decoder/ViTXL/config.json, src/train_stage1.py, src/stage1/rae.py):
    # the frozen DINOv2-B/14 with registers at 224 px (Dinov2withNorm, normalize=True: its last LayerNorm
    # without affine; the 1 cls + 4 register tokens dropped) -> 768 x 16 x 16; a ViT-XL decoder (1152 wide,
    # 28 blocks, 16 heads, MLP 4096) to 16 x 16 patches of 256 px; noise tau 0.8; 16 epochs of ImageNet,
    # global batch 512, AdamW lr 2e-4, betas (0.9, 0.95), wd 0, no gradient clipping, EMA 0.9978;
    # L1 + LPIPS 1.0 + GAN 0.75 times the adaptive weight at the decoder's last layer (decoder_pred, clamped
    # at 1e4), the GAN from epoch 8. The DINOv2 file is the user's (--teacher-weights
    # dinov2_vitb14_reg4_pretrain.pth), as for every ViT teacher.
    # Where ours differs: RAE's L1 is on [0, 1] pixels, ours on [-1, 1], hence recon_weight 0.5 (the same
    # balance against LPIPS); RAE warms the lr up over 1 epoch then decays it cosine to 2e-5, our trainer
    # warms up and stays constant; RAE's discriminator is a frozen DINO-S/8 with trainable heads and DiffAug
    # (updated from epoch 6), ours the PatchGAN with hinge losses for both sides (RAE's generator term is
    # the non-saturating one); the latent normalisation is per channel (RAE's stat.pt: per channel and
    # position), measured over --run.stats_images training images before the decoder trains.
    cfg = TrainVAEConfig(preset="rae-dinov2-b")
    cfg.data.name, cfg.data.resolution = "prepared", 256
    cfg.model.vae, cfg.model.rae_noise_tau, cfg.model.rae_noise = "rae-vit-xl", 0.8, "halfnormal"
    cfg.model.ema, cfg.model.ema_decay = True, 0.9978
    cfg.teacher.enc_type = "dinov2-vit-b-reg"  # 224 px input for 256 px images (the teacher's rule)
    cfg.loss.align = "none"  # the latent is the teacher's representation: nothing to align
    cfg.loss.recon, cfg.loss.recon_weight = "l1", 0.5
    cfg.loss.lpips_variant, cfg.loss.lpips_net, cfg.loss.lpips_weight = "lpips", "vgg", 1.0
    cfg.loss.kl_weight = 0.0  # a frozen encoder's KL is 0 anyway
    cfg.loss.gan_weight, cfg.loss.gan_adaptive, cfg.loss.disc_loss = 0.75, True, "hinge"
    cfg.loss.gan_start = 8 * _RAE_STEPS_PER_EPOCH
    o = cfg.optim
    o.batch_size, o.lr, o.disc_lr, o.betas, o.weight_decay = 512, 2e-4, 2e-4, (0.9, 0.95), 0.0
    o.grad_clip, o.warmup_steps, o.epochs, o.max_steps = 0.0, _RAE_STEPS_PER_EPOCH, 16.0, None
    return cfg


@PRESETS.register("rae-tiny")
def _rae_tiny() -> TrainVAEConfig:
    # The RAE on the embedded example, CPU minutes: Fashion-MNIST at 32 px, the bundled EfficientNet-Lite0
    # as the frozen encoder (stride-16 features at 128 px input: 112 x 8 x 8 latents, 64 tokens as the
    # demo's tiny-f4d4 VAE gives; a SiT on them must be >= 112 wide at patch 1), the rae-tiny decoder
    # (128 wide, 4 blocks, 4 x 4 patches). The loss as RAE's, scaled down as shapes-tiny's: L1, a light
    # bundled ST-LPIPS, and a late adaptive-weight PatchGAN. Measured: BENCHMARKS.md, "RAE".
    cfg = TrainVAEConfig(preset="rae-tiny")
    cfg.run.log_every, cfg.run.ckpt_every, cfg.run.sample_every = 25, 250, 250
    cfg.run.stats_images = 2048
    cfg.data.name, cfg.data.resolution, cfg.data.num_workers = "fashion-mnist", 32, 1
    cfg.data.path = FASHION_MNIST_ROOT  # the Debian package's folder (apt-get install dataset-fashion-mnist)
    cfg.model.vae, cfg.model.rae_noise_tau = "rae-tiny", 0.8
    cfg.model.disc_ndf, cfg.model.disc_layers = 32, 2
    cfg.teacher.enc_type, cfg.teacher.input_size = "efficientnet-lite0", 128
    cfg.loss.align = "none"
    cfg.loss.recon, cfg.loss.kl_weight = "l1", 0.0
    cfg.loss.lpips_variant, cfg.loss.lpips_net, cfg.loss.lpips_weight = "stlpips", "alex", 0.1
    cfg.loss.gan_weight, cfg.loss.gan_adaptive, cfg.loss.gan_start = 0.1, True, 300
    cfg.optim.batch_size, cfg.optim.lr, cfg.optim.betas = 16, 1e-3, (0.9, 0.95)
    cfg.optim.warmup_steps, cfg.optim.epochs, cfg.optim.max_steps = 20, None, 500
    return cfg
