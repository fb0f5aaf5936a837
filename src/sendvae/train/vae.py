"""``sendvae train-vae``: Send-VAE training loop (one CPU process, or many GPUs under torchrun).

Per step: generator update (VAE + mapper, all loss terms), then discriminator update; with
``--optim.grad_accum K`` both accumulate over K micro-batches first (`VAETrainer.train_step`). To resume,
run the same command again: the newest checkpoint in the run folder restores models, EMA,
optimizers, LeCam state and step; the data position and every random draw follow from the step (see
train/loop.py).

No host syncs in the hot loop: metrics accumulate on the device and are read every ``log_every``
steps; a non-finite gradient norm skips the optimizer step on the device (the fused AdamW
``found_inf`` mechanism, as under a GradScaler) and is counted, and the buffers the forward pass moved
(the mapper's LatentNorm, the PatchGAN's BatchNorm, LeCam) are put back, so a NaN batch changes no state.
A skipped generator step skips the discriminator step too; the step counts once in ``nan_steps``.

A variant with a model trained beside the VAE (``Alignment.cotrained``; REPA-E's SiT) draws what its head
reads beside z before the forward pass and takes its own update on the detached latents after the
discriminator's (skipped with the generator's); it is checkpointed under its ``state_key``.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import torch
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

from ..align import alignment_for
from ..data import build_dataset, to_float
from ..losses.vae_loss import VAELoss
from ..models.rae import RAE
from ..models.vae import AutoencoderKL
from ..runtime.distributed import DistInfo
from ..runtime.log import RunLogger
from ..teachers import resample_tokens
from .builders import (
    build_disc,
    build_head,
    build_lpips_for,
    build_teacher_for,
    build_vae_for,
    check_lpips_for,
)
from .common import (
    BufferGuard,
    accumulate_terms,
    autocast_dtype,
    ema_update,
    optimizer_step,
    setup_backends,
)
from .loop import TrainerBase
from .resume import FREE_VAE
from .vae_config import TrainVAEConfig
from .vae_model import SendVAEModel


class VAETrainer(TrainerBase):
    resume_free = FREE_VAE
    model: SendVAEModel

    def __init__(self, cfg: TrainVAEConfig, dist: DistInfo, run_dir: Path, logger: RunLogger):
        super().__init__(cfg, dist, run_dir, logger)
        dev = self.device
        check_lpips_for(cfg)  # missing LPIPS files: one line before anything is built
        setup_backends(dev, cfg.run.tf32)
        self.amp = autocast_dtype(cfg.run.precision, dev)
        self.cl = cfg.run.channels_last and dev.type == "cuda"

        self.dataset = build_dataset(cfg.data, seed=cfg.run.seed)
        self.max_steps = self.steps_for(len(self.dataset))

        vae = build_vae_for(cfg, logger, device=dev)  # an RAE (--model.vae rae-*) measures statistics on dev
        # --loss.align, chosen once: its entry decides on the teacher, the head, the loss and the export
        self.alignment = alignment_for(cfg)
        self.teacher = build_teacher_for(cfg, dev) if self.alignment.needs_teacher else None
        # an RAE has no alignment head (train/rae.py refuses --loss.align for it)
        head = build_head(cfg, vae, self.teacher, logger=logger) if isinstance(vae, AutoencoderKL) else None
        grid = self.alignment.token_grid(head) if head is not None else None
        self.cotrained = self.alignment.cotrained(head) if head is not None else None
        self.model = SendVAEModel(vae, head, cfg.model.sample_posterior, grid).to(dev)
        if cfg.model.grad_checkpointing:  # the VAE encoder / decoder blocks and the mapper's blocks
            for m in self.model.modules():
                if hasattr(m, "grad_checkpointing"):
                    setattr(m, "grad_checkpointing", True)  # noqa: B010 (nn.Module's typing hides the flag)
        if cfg.optim.freeze_decoder:
            assert isinstance(vae, AutoencoderKL)  # an RAE refuses the option (train/rae.py)
            for p in list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters()):
                p.requires_grad_(False)
        if self.cl:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(vae).requires_grad_(False).eval() if cfg.model.ema else None
        # the layers the adaptive weights differentiate: the decoder's output conv and the encoder's (an RAE:
        # its decoder's output linear, and no encoder layer, the encoder being frozen)
        self.enc_last: torch.Tensor | None
        self.dec_last, self.enc_last = (
            vae.last_layers()
            if isinstance(vae, RAE)
            else (vae.decoder.conv_out.weight, vae.encoder.conv_out.weight)
        )

        use_gan = cfg.loss.gan_weight > 0
        self.disc = build_disc(cfg).to(dev) if use_gan else None
        lpips = build_lpips_for(cfg)
        lpips = lpips.to(dev) if lpips is not None else None
        self.loss = VAELoss(cfg.loss, lpips, self.disc, self.alignment).to(dev)

        o = cfg.optim
        g_params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = self.adamw(g_params)
        self.opt_d = None
        if self.disc is not None:
            self.opt_d = self.adamw(self.disc.parameters(), o.disc_lr or o.lr)

        self.resume()

        self.ddp_model: torch.nn.Module = self.model
        self.ddp_disc = self.disc
        if dist.distributed:
            ids = [dev.index] if dev.type == "cuda" else None
            self.ddp_model = DDP(self.model, device_ids=ids, find_unused_parameters=False)
            if self.disc is not None:
                self.ddp_disc = DDP(self.disc, device_ids=ids, broadcast_buffers=False)
        self.fwd = torch.compile(self.ddp_model) if cfg.run.compile else self.ddp_model

    # -----------------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict:
        st = {
            "model": self.model.state_dict(),
            "vae_config": self.model.vae.config.to_dict(),  # lets load_vae() read this file directly
            "opt_g": self.opt_g.state_dict(),
            "loss": self.loss.state_dict(),
        }
        if self.disc is not None:
            assert self.opt_d is not None  # made with the discriminator
            st["disc"] = self.disc.state_dict()
            st["opt_d"] = self.opt_d.state_dict()
        if self.ema is not None:
            st["ema"] = self.ema.state_dict()
        if self.cotrained is not None:
            st[self.cotrained.state_key] = self.cotrained.state_dict()
        return st

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.loss.load_state_dict(st["loss"], strict=False)
        if self.disc is not None and "disc" in st:
            assert self.opt_d is not None  # made with the discriminator
            self.disc.load_state_dict(st["disc"])
            self.opt_d.load_state_dict(st["opt_d"])
        if self.ema is not None and "ema" in st:
            self.ema.load_state_dict(st["ema"])
        if self.cotrained is not None:
            self.cotrained.load_state_dict(st[self.cotrained.state_key])

    # -----------------------------------------------------------------------------------------------------
    # One step

    def micro_inputs(self, batch, micro: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A micro-batch of uint8 images (or (images, labels)) -> (x in [-1, 1] flipped at random, labels)."""
        cfg, dev = self.cfg, self.device
        labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        x = to_float(batch.to(dev, non_blocking=True))
        if self.step in cfg.run.fault_nan_steps and micro == self.accum - 1:  # testing aid: a corrupt batch
            x = x * float("nan")
        if cfg.data.hflip:
            flip = torch.rand(x.shape[0], device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """One generator + discriminator update on a batch of uint8 images (or (images, labels)).

        With ``--optim.grad_accum K`` the batch runs as K micro-batches (train/loop.py): each one's generator
        loss, then its discriminator loss, scaled by 1 / K and backpropagated (DDP syncs on the last); then
        the generator's optimizer step and EMA, the discriminator's, and the co-trained model's update on the
        micro-batches' detached latents. A non-finite gradient in any micro-batch skips the whole step.
        For a loss that is a mean over the batch this is the large batch's update, up to float rounding.
        What is not: statistics of the micro-batch as a batch, namely the PatchGAN's BatchNorm (per process
        under DDP already; its running statistics move K times a step, unused in training), the mapper's
        running LatentNorm and REPA-E's latent BatchNorm (batch statistics pooled over the processes' micro-
        batch, not over the whole batch; REPA-E's running statistics, which the VAE's pass reads, move K times
        a step), the LeCam EMAs (K updates), and the adaptive weights (VF loss, ``--loss.gan_adaptive``:
        gradient norms of each micro-batch's terms).
        """
        cfg = self.cfg
        k = self.accum
        gan_on = self.disc is not None and self.step >= cfg.loss.gan_start
        for g in self.opt_g.param_groups:
            g["lr"] = self.lr_at(self.step)
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        g_state = BufferGuard([self.model])  # LatentNorm statistics move in the forward pass
        d_state = BufferGuard([self.disc, self.loss])  # BatchNorm (also in the generator's D pass), LeCam
        terms: dict[str, torch.Tensor] = {}
        co_parts = []  # (sg(z), cond, target) of each micro-batch, for the co-trained model's update
        vae = self.model.vae
        for j, micro in enumerate(self.micro_batches(batch)):
            self.seed_step(j)  # flips, posterior samples and mapper noise: functions of (seed, step, rank, j)
            x, labels = self.micro_inputs(micro, j)
            # what the head reads beside z, from the co-trained model (REPA-E: the SiT's t, noise and labels)
            cond = self.cotrained.draw(labels, x.shape[0]) if self.cotrained is not None else None

            # ---- generator: VAE + alignment head
            if self.disc is not None:
                self.disc.requires_grad_(False)
            with self.no_sync(j, self.ddp_model):
                with amp:  # the losses too: LPIPS and the discriminator read the bf16 reconstruction
                    recon, posterior, z, pred = self.fwd(x, cond)
                    target = self.teacher_tokens(x) if self.teacher is not None else None
                    loss, g_terms = self.loss.generator(  # every term reduced in fp32 (losses/vae_loss.py)
                        x,
                        recon,
                        posterior,
                        pred,
                        target,
                        gan_on,
                        dec_last=self.dec_last,
                        enc_last=self.enc_last,
                    )
                (loss / k if k > 1 else loss).backward()
            accumulate_terms(terms, g_terms, k)

            # ---- discriminator, on this micro-batch's reals and sg(reconstructions)
            if gan_on:
                assert self.disc is not None and self.ddp_disc is not None  # gan_on
                self.disc.requires_grad_(True)
                with self.no_sync(j, self.ddp_disc):
                    with amp:
                        d_loss, d_terms = self.loss.discriminator(self.ddp_disc, x, recon)
                    (d_loss / k if k > 1 else d_loss).backward()
                accumulate_terms(terms, d_terms, k)
            if self.cotrained is not None:
                assert target is not None  # a co-trained model comes with a head, hence a teacher
                co_parts.append((z.detach(), cond, target))
            self.micro_done(j)

        gnorm, bad = optimizer_step(self.opt_g, self.model.parameters(), cfg.optim.grad_clip)
        g_state.restore(bad)
        terms["grad_norm"] = gnorm
        if self.ema is not None:
            ema_update(self.ema, vae, cfg.model.ema_decay, found_inf=bad)
        if gan_on:
            assert self.disc is not None and self.opt_d is not None  # gan_on
            dnorm, bad = optimizer_step(self.opt_d, self.disc.parameters(), cfg.optim.grad_clip, skip=bad)
            terms["d_grad_norm"] = dnorm
        d_state.restore(bad)

        # ---- the model trained beside the VAE, on sg(z)
        if self.cotrained is not None:
            co_terms, bad = self.cotrained.step(co_parts, skip=bad)
            terms.update(co_terms)
        terms["skipped"] = bad  # 1 when the generator, the discriminator or a co-trained update was skipped
        return terms

    @property
    def teacher_grid(self) -> tuple[int, int]:
        assert self.teacher is not None  # only asked when there is a teacher
        return self.teacher.grid_size(self.cfg.data.resolution)  # a tuple already

    def teacher_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher patch tokens (B, N, D) on the alignment head's token grid (resampled if it differs)."""
        assert self.teacher is not None  # called only with a teacher
        target = self.teacher(x)  # no grad inside
        grid = self.model.token_grid
        if grid is not None and tuple(grid) != self.teacher_grid:
            target = resample_tokens(target, self.teacher_grid, grid)
        return target

    # -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def save_grid(self, n: int = 8) -> None:
        """Originals (top row) and reconstructions from the posterior mean (bottom row) of fixed images."""
        if not self.dist.is_main:
            return
        fixed = torch.stack([self.dataset[i][0] for i in range(min(n, len(self.dataset)))])
        vae = self.ema if self.ema is not None else self.model.vae
        was = vae.training
        vae.eval()
        x = to_float(fixed.to(self.device))
        recon = vae.decode(vae.encode(x).mean).float().clamp(-1, 1)
        vae.train(was)
        out = self.run_dir / "samples" / f"recon-{self.step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid = torch.cat([x, recon], 0).add(1).div(2)
        torchvision.utils.save_image(grid.cpu(), out, nrow=x.shape[0])

    def train(self) -> None:
        self.log.info(
            f"training from step {self.step} to {self.max_steps} (global batch {self.cfg.optim.batch_size}"
            f" = {self.dist.world_size} process(es) x {self.accum} micro-batch(es) of {self.micro_batch}, "
            f"device {self.device}, autocast {self.amp})"
        )
        super().train()
