"""sendvae: semantic-disentangled VAEs (Send-VAE) and the latent diffusion models trained on them.

Public API (images are float tensors in [-1, 1], NCHW):
    sendvae.load_vae(path_or_preset)   -> AutoencoderKL with .encode(x) (posterior: .mean, .std, .sample()),
                                          .decode(z), .save_pretrained(dir), .latent_mean / .latent_std
    sendvae.load_teacher(name, weights=None, resolution=256) -> module: images -> patch tokens (B, N, D)
    sendvae.load_mapper(export_dir)    -> the Send-VAE mapper exported beside a trained VAE
    sendvae.load_sit(path)             -> a SiT from a train-sit export, or a REPA / REPA-E checkpoint
    sendvae.open_latents(root)         -> a latent store (cache-latents); .batches(n) -> (latent, label)
    sendvae.data                       -> datasets: ShapesDataset, ImageFolderDataset, PreparedDataset, ...
    sendvae.cache_latents(vae, data_cfg, out)  -> encode a dataset into a latent store (sendvae cache-latents)
    sendvae.generate(sit_source, n, sampler_cfg, out) -> samples as an ADM .npz (sendvae sample)
    sendvae.probe_models(out, vaes=...)        -> attribute probes and latent measures (sendvae probe)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "__version__",
    "cache_latents",
    "data",
    "generate",
    "load_mapper",
    "load_sit",
    "load_teacher",
    "load_vae",
    "open_latents",
    "probe_models",
]

# name -> (module, attribute), imported on first use so that `import sendvae` stays cheap
_LAZY = {
    "load_vae": (".models.vae_io", "load_vae"),
    "load_teacher": (".teachers", "load_teacher"),
    "load_mapper": (".align.mapper", "load_mapper"),
    "load_sit": (".models.sit_io", "load_sit"),
    "open_latents": (".data.latent_store", "LatentStore"),
    "cache_latents": (".data.caching", "cache_latents"),
    "generate": (".diffusion.generate", "generate"),
    "probe_models": (".analysis.report", "probe_models"),
}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "data":
        return importlib.import_module(".data", __name__)
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module, __name__), attr)
    raise AttributeError(f"module 'sendvae' has no attribute {name!r}")
