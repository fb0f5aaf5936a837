"""sendvae: semantic-disentangled VAEs (Send-VAE) and the latent diffusion models trained on them.

Public API (images are float tensors in [-1, 1], NCHW):
    sendvae.load_vae(path_or_preset)   -> AutoencoderKL with .encode(x) (posterior: .mean, .std, .sample()),
                                          .decode(z), .save_pretrained(dir), .latent_mean / .latent_std
    sendvae.load_teacher(name, weights=None, resolution=256) -> module: images -> patch tokens (B, N, D)
    sendvae.load_mapper(export_dir)    -> the Send-VAE mapper exported beside a trained VAE
    sendvae.load_sit(path)             -> a SiT from a train-sit export, or a REPA / REPA-E checkpoint
    sendvae.open_latents(root)         -> a latent store (cache-latents); .batches(n) -> (latent, label)
    sendvae.data                       -> datasets: ShapesDataset, ImageFolderDataset, PreparedDataset, ...
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "data", "load_mapper", "load_sit", "load_teacher", "load_vae", "open_latents"]


def __getattr__(name: str) -> Any:
    # Lazy: `import sendvae` stays cheap; the heavy modules load on first use.
    if name == "load_vae":
        from .models.vae_io import load_vae

        return load_vae
    if name == "load_teacher":
        from .teachers import load_teacher

        return load_teacher
    if name == "load_mapper":
        from .models.mapper import load_mapper

        return load_mapper
    if name == "load_sit":
        from .models.sit_io import load_sit

        return load_sit
    if name == "open_latents":
        from .data.latent_store import LatentStore

        return LatentStore
    if name == "data":
        from . import data

        return data
    raise AttributeError(f"module 'sendvae' has no attribute {name!r}")
