"""Exports of a VAE training run: the VAE (diffusers layout + our config + latent statistics) and the mapper.

export/vae/config.json, diffusion_pytorch_model.safetensors, sendvae.json   (AutoencoderKL.save_pretrained)
export/vae/mapper.safetensors, mapper.json                                  (the alignment head, if any)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import from_dict, to_dict
from ..data import to_float
from ..models.mapper import Mapper, MapperConfig
from ..models.vae import AutoencoderKL
from ..runtime.checkpoint import atomic_save_safetensors, atomic_write_json


@torch.no_grad()
def latent_statistics(
    vae: AutoencoderKL,
    dataset,
    num_images: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of z ~ q(z|x) over the first ``num_images`` images (float64 sums)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = min(num_images, len(dataset))
    s1 = s2 = None
    count = 0
    was = vae.training
    vae.eval()
    for start in range(0, n, batch_size):
        x = torch.stack([dataset[i][0] for i in range(start, min(n, start + batch_size))])
        post = vae.encode(to_float(x.to(device)))
        z = (post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=device)).double()
        s1 = z.sum((0, 2, 3)) if s1 is None else s1 + z.sum((0, 2, 3))
        s2 = z.pow(2).sum((0, 2, 3)) if s2 is None else s2 + z.pow(2).sum((0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    vae.train(was)
    mean = s1 / count
    std = (s2 / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.float().cpu(), std.float().cpu()


def save_mapper(mapper: nn.Module, out_dir: Path, meta: dict) -> None:
    atomic_save_safetensors(dict(mapper.state_dict()), out_dir / "mapper.safetensors")
    atomic_write_json(meta, out_dir / "mapper.json")


def load_mapper(export_dir: str | Path) -> Mapper:
    """Load the mapper exported beside a VAE (``export/vae``)."""
    from ..runtime.weights import read_weights

    d = Path(export_dir)
    meta_path = d / "mapper.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no mapper.json in {d}: this VAE was exported without an alignment mapper")
    meta = json.loads(meta_path.read_text())
    m = Mapper(
        meta["latent_channels"],
        tuple(meta["latent_grid"]),
        meta["teacher_dim"],
        tuple(meta["teacher_grid"]),
        from_dict(MapperConfig, meta["config"]),
    )
    m.load_state_dict(read_weights(d / "mapper.safetensors", "mapper weights"))
    return m.eval()


def export_run(trainer) -> Path:
    """Export the trained VAE (EMA weights when kept) with fresh latent statistics, and the mapper."""
    cfg = trainer.cfg
    out = trainer.run_dir / "export" / "vae"
    vae = trainer.ema if trainer.ema is not None else trainer.model.vae
    mean, std = latent_statistics(
        vae, trainer.dataset, cfg.run.stats_images, device=trainer.device, seed=cfg.run.seed
    )
    vae.set_latent_stats(mean, std)
    vae.save_pretrained(out)
    head = trainer.model.head
    if isinstance(head, Mapper):
        res = cfg.data.resolution
        save_mapper(
            head,
            out,
            {
                "latent_channels": trainer.model.vae.latent_channels,
                "latent_grid": list(trainer.model.vae.latent_grid(res)),
                "teacher_dim": trainer.teacher.embed_dim,
                "teacher_grid": list(trainer.teacher.grid_size(res)),
                "teacher": cfg.teacher.enc_type,
                "resolution": res,
                "config": to_dict(head.config) if hasattr(head, "config") else to_dict(cfg.mapper),
            },
        )
    return out
