"""``sendvae train-sit``: SiT + REPA flow matching on a latent store (one CPU, or many GPUs under torchrun).

Per step: draw z = mean + std * eps for the image or its mirror (both cached), normalise with the
store's per-channel statistics, x_t = (1 - t) z + t eps, regress the velocity eps - z; REPA aligns the
tokens after block ``encoder_depth``, through the projector, with the cached teacher tokens of the same
flip. EMA of the weights every step (restored on resume). Same NaN handling, logging and resume as
train-vae (see ``train/common.py``); MFU = model FLOPs x img/s / the device's measured bf16 matmul rate.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

from ..data import build_dataset, to_float
from ..data.config import DataConfig
from ..data.latent_store import LatentStore, select_flip
from ..diffusion.sampling import euler_sample
from ..diffusion.transport import sample_t, training_losses
from ..models.latent_stats import LATENTS_FILE, LatentStats
from ..models.sit import SiT, flops_per_image, sit_config, sized_sit_config
from ..models.vae_io import load_vae
from ..runtime import checkpoint as ckpt
from ..runtime.distributed import DistInfo
from ..runtime.hardware import measured_matmul_tflops
from ..runtime.log import RunLogger
from ..teachers import resample_tokens
from ..teachers.config import build_from_config
from .common import (
    BufferGuard,
    accumulate_terms,
    autocast_dtype,
    ema_update,
    optimizer_step,
    setup_backends,
)
from .loop import TrainerBase
from .resume import FREE_SIT
from .sit_config import TrainSiTConfig
from .sit_fd import ProxyFD, ema_sampler

if TYPE_CHECKING:
    from .sit_fd import ProxyFD


def build_sit(cfg: TrainSiTConfig, store: LatentStore, z_dim: int | None) -> SiT:
    """The SiT for this store's latents; a size that does not fit them is a clear error."""
    m = cfg.model
    c, h, w = store.latent_shape
    if h != w:
        raise ValueError(f"SiT needs square latents; the store holds {c}x{h}x{w}")
    kw = {
        "input_size": h,
        "in_channels": c,
        "num_classes": 1 if m.unconditional else store.num_classes,
        "class_dropout_prob": m.class_dropout,
        "qk_norm": m.qk_norm,
        "projector_dim": m.projector_dim,
        "z_dims": (z_dim,) if z_dim else (),
        "time_shift": cfg.transport.shift_alpha(store.latent_shape),  # recorded: the samplers warp by it
        "head_depth": m.head_depth,
        "head_width": m.head_width,
        "head_num_heads": m.head_num_heads,
    }
    size = {k: getattr(m, k) for k in ("depth", "hidden_size", "num_heads") if getattr(m, k) is not None}
    size["encoder_depth"] = m.encoder_depth
    preset = sit_config(m.model)
    width, token = size.get("hidden_size", preset.hidden_size), c * preset.patch_size**2
    if width < token and not (m.head_depth and m.head_width >= token):  # RAE: width >= token dimension
        raise ValueError(
            f"--model {m.model} is {width} wide, narrower than the store's tokens ({c} channels x patch "
            f"{preset.patch_size}^2 = {token} values): use a wider model (--model.hidden_size >= {token}) or "
            f"a wide head (--model.head_depth 2 --model.head_width >= {token})"
        )
    try:
        mcfg = sized_sit_config(m.model, size, **kw)
    except ValueError as e:
        raise ValueError(f"--model {m.model} does not fit the store's {c}x{h}x{w} latents: {e}") from None
    return SiT(mcfg, grad_checkpointing=m.grad_checkpointing)


class LatentsWithImages(torch.utils.data.Dataset):
    """(moments, source image uint8 (3, H, W), label): the store plus the images it was encoded from,
    rebuilt from its manifest, for a teacher run online."""

    def __init__(self, store: LatentStore):

        info = store.manifest["dataset"]
        cfg = DataConfig(
            name=info["name"],
            path=info.get("path"),
            resolution=int(info["resolution"]),
            shapes_length=int(info["num_images"]),
            shapes_scene=info.get("scene", "full"),
        )
        self.store, self.images = store, build_dataset(cfg, seed=int(info.get("seed", 0)))
        if len(self.images) < len(store):
            raise ValueError(
                f"the store's source dataset has {len(self.images)} images, the store {len(store)}"
            )

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int):
        moments, label = self.store[i]
        return moments, self.images[i][0], label


class SiTTrainer(TrainerBase):
    resume_free = FREE_SIT

    def __init__(self, cfg: TrainSiTConfig, dist: DistInfo, run_dir: Path, logger: RunLogger):
        super().__init__(cfg, dist, run_dir, logger)
        dev = self.device
        setup_backends(dev, cfg.run.tf32)
        self.amp = autocast_dtype(cfg.run.precision, dev)
        if cfg.data.store is None:
            raise ValueError(
                "train-sit reads a latent store: pass --store DIR (made by `sendvae cache-latents`)"
            )
        self.repa = cfg.transport.proj_coeff > 0
        store = LatentStore(cfg.data.store)
        self.teacher = None
        if self.repa and cfg.teacher.enc_type:  # online: the teacher sees the store's source images each step
            res = int(store.manifest["resolution"])
            self.teacher = build_from_config(cfg.teacher, res, dev)
            feat = (math.prod(self.teacher.grid_size(res)), self.teacher.embed_dim)
        elif self.repa:
            if store.feature_shape is None:
                raise ValueError(
                    f"REPA needs teacher features, and {cfg.data.store} has none: cache the latents "
                    "again (`sendvae cache-latents --enc-type NAME`), run the teacher online "
                    "(--teacher.enc_type NAME), or train without REPA (--proj-coeff 0)"
                )
            feat = store.feature_shape
        self.store = LatentStore(cfg.data.store, with_features=self.repa and self.teacher is None)
        self.stats = self.record_latent_stats()
        self.vae = None
        if cfg.model.vae:
            self.vae = load_vae(cfg.model.vae, config=cfg.model.vae_config)
            self.store.check_vae(self.vae)
            self.vae = self.vae.to(dev).eval().requires_grad_(False)
        if cfg.eval.fd_every and self.vae is None:
            raise ValueError("--eval.fd_every needs the VAE that decodes the latents: pass --vae PATH")
        self._proxy_fd: ProxyFD | None = None  # built on first use, on the main process
        self.model = build_sit(cfg, self.store, feat[1] if self.repa else None).to(dev)
        self.model_cfg = self.model.config
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = self.adamw(self.model.parameters())
        self.max_steps = self.steps_for(len(self.store))
        self.feat_grid = None
        if self.repa and feat[0] != self.model_cfg.num_tokens:
            g = int(round(math.sqrt(feat[0])))
            if g * g != feat[0]:
                raise ValueError(f"cached teacher tokens ({feat[0]}) are not a square grid")
            self.feat_grid = (g, g)  # resampled to the SiT's token grid each step

        self.dataset = self.store if self.teacher is None else LatentsWithImages(self.store)
        self.resume()
        self.ddp = (
            DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
            if dist.distributed
            else self.model
        )
        self.fwd = torch.compile(self.ddp) if cfg.run.compile else self.ddp
        self.flops = flops_per_image(self.model_cfg, training=True)
        self.peak_tflops = measured_matmul_tflops(dev) if dist.is_main else None

    def record_latent_stats(self) -> LatentStats:
        """The statistics this SiT is trained with, written into its config (so into every checkpoint)
        before the first step: the store's exact moments unless ``--latents.mean/std`` name others."""
        lc, store = self.cfg.latents, self.store
        if (lc.mean is None) != (lc.std is None):
            raise ValueError("pass both --latents.mean and --latents.std, or neither (the store's)")
        if lc.mean is None:
            lc.mean, lc.std = store.stats.mean, store.stats.std
        if lc.vae_fingerprint is None:
            lc.vae_fingerprint = store.vae_fingerprint
        stats = LatentStats(lc.mean, lc.std, lc.vae_fingerprint)
        if stats.channels != store.latent_shape[0]:
            raise ValueError(
                f"--latents.mean/std give {stats.channels} channels, the store's latents have "
                f"{store.latent_shape[0]}"
            )
        return stats

    # -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model_config": self.model_cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
        }

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])

    # -----------------------------------------------------------------------------------------------------
    def step_noise(self, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """All randomness of one step, drawn for the GLOBAL batch from a (seed, step) generator; each
        micro-batch takes its rows (`micro_rows`: rank::world without accumulation, as the sampler splits the
        batch). Training is therefore the same for any number of processes and micro-batches, and a resumed
        run redraws exactly what an uninterrupted one would."""
        cfg, dev = self.cfg, self.device
        b = cfg.optim.batch_size
        g = torch.Generator(device=dev).manual_seed(cfg.run.seed * 1_000_003 + self.step)
        noise = {
            "t": sample_t(b, cfg.transport, dev, g, shift=self.model_cfg.time_shift),  # (B,), shifted
            "eps": torch.randn((b, *shape), generator=g, device=dev),  # flow-matching noise
            "z_eps": torch.randn((b, *shape), generator=g, device=dev),  # z = mean + std * z_eps
            "flip": torch.randint(0, 2, (b,), generator=g, device=dev),
            "drop": torch.rand(b, generator=g, device=dev) < cfg.model.class_dropout,
        }
        if not cfg.data.hflip:
            noise["flip"].zero_()
        return noise

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """One optimizer step; with ``--optim.grad_accum K`` over K micro-batches (train/loop.py), each loss
        scaled by 1 / K, DDP syncing the last. The SiT has no batch statistics: the update is the whole
        batch's, up to float rounding."""
        cfg = self.cfg
        k = self.accum
        noise = self.step_noise(tuple(self.store.latent_shape))
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        state = BufferGuard([self.model])
        terms: dict[str, torch.Tensor] = {}
        for j, micro in enumerate(self.micro_batches(batch)):
            self.seed_step(j)  # any draw outside step_noise (none today) is still a function of the step
            n = {name: v[self.micro_rows(j, rows_of_global=True)] for name, v in noise.items()}
            with self.no_sync(j, self.ddp):
                out = self.micro_loss(micro, n, poison=self.step in cfg.run.fault_nan_steps and j == k - 1)
                (out["loss"] / k if k > 1 else out["loss"]).backward()
            parts = {"loss": out["loss"], "denoise": out["denoise"]}
            if self.repa:
                parts["proj"] = out["proj"]
                parts["cos"] = -out["proj"]
            accumulate_terms(terms, parts, k)
            self.micro_done(j)
        norm, bad = optimizer_step(self.opt, self.model.parameters(), cfg.optim.grad_clip)
        state.restore(bad)
        ema_update(self.ema, self.model, cfg.model.ema_decay, found_inf=bad)
        return {**terms, "grad_norm": norm, "skipped": bad}

    def micro_loss(self, batch, n: dict[str, torch.Tensor], poison: bool = False) -> dict[str, torch.Tensor]:
        """Flow matching (+ REPA) on one micro-batch with its rows ``n`` of the step's draws.
        ``poison``: testing aid, the latents made NaN."""
        cfg, dev = self.cfg, self.device
        moments, labels = batch[0].to(dev, non_blocking=True), batch[-1].to(dev, non_blocking=True)
        m = select_flip(moments, n["flip"]).float()  # (B, 2 (mean, std), C, h, w)
        z = m[:, 0] + m[:, 1] * n["z_eps"] if cfg.data.sample_posterior else m[:, 0]
        z = self.stats.normalize(z)  # (B, C, h, w), what the SiT models
        if poison:
            z = z * float("nan")
        y = torch.zeros_like(labels) if cfg.model.unconditional else labels
        tokens = None
        if self.teacher is not None:  # online: the flipped source images through the teacher
            x = to_float(batch[1].to(dev, non_blocking=True))
            x = torch.where(n["flip"].bool()[:, None, None, None], x.flip(3), x)
            with torch.autocast(dev.type, dtype=self.amp) if self.amp is not None else nullcontext():
                tokens = self.teacher(x).float()  # (B, N, D), no grad
        elif self.repa:
            tokens = select_flip(batch[1].to(dev, non_blocking=True), n["flip"]).float()  # (B, N, D)
        if tokens is not None and self.feat_grid is not None:
            g = self.model_cfg.grid_size
            tokens = resample_tokens(tokens, self.feat_grid, (g, g))
        drop = n["drop"] if self.model_cfg.class_dropout_prob > 0 else None

        def model(x, t, y, **kw):  # the DDP/compiled SiT with this step's label dropout
            return self.fwd(x, t, y, force_drop_ids=drop, **kw)

        amp = torch.autocast(dev.type, dtype=self.amp) if self.amp is not None else nullcontext()
        with amp:
            return training_losses(model, z, y, tokens, cfg.transport, t=n["t"], noise=n["eps"])

    # -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def save_grid(self, n: int = 8, steps: int = 32) -> None:
        """EMA samples (Euler ODE, no guidance) decoded by the VAE, when one was given."""
        if not self.dist.is_main or self.vae is None:
            return
        g = torch.Generator(device=self.device).manual_seed(self.cfg.run.seed)
        c, h, w = self.store.latent_shape
        noise = torch.randn(n, c, h, w, generator=g, device=self.device)
        y = torch.arange(n, device=self.device) % self.model_cfg.num_classes
        z = euler_sample(self.ema, noise, y, null_class=self.model_cfg.num_classes, steps=steps)
        x = self.vae.decode(self.stats.denormalize(z)).float().clamp(-1, 1)
        out = self.run_dir / "samples" / f"sample-{self.step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        torchvision.utils.save_image(x.add(1).div(2).cpu(), out, nrow=n)

    def after_step(self) -> None:
        every = self.cfg.eval.fd_every
        if every and self.step % every == 0 and self.dist.is_main:
            self.log.stats(self.step, self.proxy_fd())

    @torch.no_grad()
    def proxy_fd(self) -> dict[str, float]:
        """{FD_<teacher>: value} of the EMA model now (sendvae.train.sit_fd)."""

        e = self.cfg.eval
        if self._proxy_fd is None:
            assert self.vae is not None  # __init__ requires the VAE when fd_every is set
            self._proxy_fd = ProxyFD(
                self.store, self.stats, self.vae, e.fd_samples, e.fd_teacher,
                self.device, seed=self.cfg.run.seed,
            )  # fmt: skip
        sample = ema_sampler(self.ema, self.model_cfg.num_classes, e.fd_steps, e.fd_cfg_scale)
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        with amp:
            return {self._proxy_fd.metric_name: self._proxy_fd(sample)}

    def train(self) -> None:
        n = sum(p.numel() for p in self.model.parameters()) / 1e6
        self.log.info(
            f"{self.model_cfg.describe()}: {n:.2f}M params; training from step {self.step} to "
            f"{self.max_steps}, global batch {self.cfg.optim.batch_size} = {self.dist.world_size} "
            f"process(es) x {self.accum} micro-batch(es) of {self.micro_batch}, autocast {self.amp}"
        )
        super().train()

    def extra_log(self, row: dict, img_per_s: float) -> None:
        row["tflops"] = self.flops * img_per_s / self.dist.world_size / 1e12  # achieved, per device
        if self.peak_tflops:
            row["mfu"] = row["tflops"] / self.peak_tflops

    def export(self) -> Path:
        """The EMA SiT (safetensors + config.json) with the latent statistics it was trained with."""
        out = self.run_dir / "export" / "sit"
        self.ema.save_pretrained(out)
        ckpt.atomic_write_json(
            {**self.stats.to_dict(), "null_class": self.model_cfg.num_classes}, out / LATENTS_FILE
        )
        return out
