"""Networks: the VAE family, the PatchGAN discriminator, SiT (the alignment heads are in align/)."""

from .discriminator import NLayerDiscriminator, load_discriminator
from .sit import SIT_MODELS, SiT, SiTConfig, flops_per_image, sit_config
from .sit_io import infer_sit_config, load_sit
from .vae import VAE_CONFIGS, AutoencoderKL, DiagonalGaussian, VAEConfig
from .vae_io import CheckpointMismatchError, load_vae

__all__ = [
    "SIT_MODELS",
    "VAE_CONFIGS",
    "AutoencoderKL",
    "CheckpointMismatchError",
    "DiagonalGaussian",
    "NLayerDiscriminator",
    "SiT",
    "SiTConfig",
    "VAEConfig",
    "flops_per_image",
    "infer_sit_config",
    "load_discriminator",
    "load_sit",
    "load_vae",
    "sit_config",
]
