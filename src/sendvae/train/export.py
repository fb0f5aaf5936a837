"""Exports of a VAE training run: the VAE (diffusers layout + our config + latent statistics) and its head.

export/vae/config.json, diffusion_pytorch_model.safetensors, sendvae.json   (AutoencoderKL.save_pretrained)
export/vae/mapper.safetensors, mapper.json                                  (the alignment head, if any:
export/vae/reals_head.*, vf_projector.*                                       the variant's files)
export/sit/model.safetensors, config.json, latents.json      (--loss.align repae: the SiT trained beside it)

What is exported beside the VAE is the alignment variant's (``Alignment.export``, align/); every
head's json carries `head_meta` (the variant, the latent and token grids, the teacher it was aligned to),
and `align.load_exported_head` reads any of them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data import to_float
from ..models.vae import AutoencoderKL

if TYPE_CHECKING:
    from ..teachers import Teacher
    from .vae_config import TrainVAEConfig


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
    assert s1 is not None and s2 is not None  # at least one image
    mean = s1 / count
    std = (s2 / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.float().cpu(), std.float().cpu()


def head_meta(cfg: TrainVAEConfig, vae: AutoencoderKL, teacher: Teacher, token_grid: tuple[int, int]) -> dict:
    """What every exported alignment head records: the variant, its grids, and the teacher it was aligned
    to (name, input size, weights), so that downstream heads can be trained on the same teacher."""
    res = cfg.data.resolution
    return {
        "align": cfg.loss.align,
        "latent_channels": vae.latent_channels,
        "latent_grid": list(vae.latent_grid(res)),
        "teacher_dim": teacher.embed_dim,
        "teacher_grid": list(teacher.grid_size(res)),
        "token_grid": list(token_grid),
        "teacher": cfg.teacher.enc_type,
        "teacher_input_size": cfg.teacher.input_size,
        "teacher_weights": cfg.teacher.weights,
        "resolution": res,
    }


def export_run(trainer) -> Path:
    """Export the trained VAE (EMA weights when kept) with fresh latent statistics, what the alignment
    variant exports beside it (``Alignment.export``: the mapper, or nothing), and the model trained beside
    the VAE next to export/vae (``Alignment.cotrained``: REPA-E's SiT in export/sit)."""
    cfg = trainer.cfg
    out = trainer.run_dir / "export" / "vae"
    vae = trainer.ema if trainer.ema is not None else trainer.model.vae
    mean, std = latent_statistics(
        vae, trainer.dataset, cfg.run.stats_images, device=trainer.device, seed=cfg.run.seed
    )
    vae.set_latent_stats(mean, std)
    vae.save_pretrained(out)
    head, alignment = trainer.model.head, trainer.alignment
    if head is not None and alignment.export is not None:
        res = cfg.data.resolution
        grid = alignment.token_grid(head) or trainer.teacher.grid_size(res)
        grid = (grid, grid) if isinstance(grid, int) else grid
        alignment.export(head, out, head_meta(cfg, trainer.model.vae, trainer.teacher, grid))
    if trainer.cotrained is not None:  # the model trained beside the VAE (REPA-E: export/sit), paired with it
        trainer.log.info(f"exported the co-trained model to {trainer.cotrained.export(out.parent, vae)}")
    return out
