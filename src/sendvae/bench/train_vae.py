"""``sendvae bench train-vae``: one Send-VAE training step, end to end and split by component.

The end-to-end figure is the trainer's own ``train_step`` (generator + discriminator update). The split
times each component alone, synchronised, on the same inputs: teacher forward; VAE + mapper forward and
backward (L1, KL, alignment); LPIPS forward + backward; discriminator (generator term + its own update);
the two optimizer steps. The parts need not add up to the whole exactly (overlap, caching).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..config import apply_overrides
from ..losses.cosine import cosine_alignment_loss
from ..runtime.distributed import DistInfo
from ..runtime.log import RunLogger
from ..train.vae import VAETrainer
from ..train.vae_config import PRESETS
from .timing import fmt_row, peak_gib, reset_peak, time_fn


def bench_train_vae(
    vae: str,
    enc_type: str,
    device: torch.device,
    batch: int,
    resolution: int,
    dtype: torch.dtype | None,
    iters: int = 5,
    warmup: int = 2,
    grad_accum: int = 1,
    grad_checkpointing: bool = False,
) -> dict:
    """The end-to-end step is one optimizer step of ``batch`` images in ``grad_accum`` micro-batches (the
    trainer's ``--optim.grad_accum``); the component split times one micro-batch."""
    import tempfile

    overrides = {
        "model.vae": vae,
        "teacher.enc_type": enc_type,
        "teacher.random_init": True,
        "loss.lpips_random_init": True,  # the paper's LPIPS-VGG cost, without its weight files
        "data.name": "shapes",
        "data.resolution": resolution,
        "optim.batch_size": batch,
        "optim.grad_accum": grad_accum,
        "model.grad_checkpointing": grad_checkpointing,
        "optim.max_steps": 10**9,
        "run.precision": "bf16" if dtype is not None else "fp32",
    }
    if enc_type == "efficientnet-lite0":  # the embedded teacher: the small mapper of shapes-tiny
        tiny = PRESETS.build("shapes-tiny")
        for k in ("hidden_dim", "num_heads", "projector_dim", "patch_size", "grid_mismatch"):
            overrides[f"mapper.{k}"] = getattr(tiny.mapper, k)
        overrides["teacher.input_size"] = tiny.teacher.input_size
    cfg = apply_overrides(PRESETS.build("sendvae-f16d32"), overrides)
    dist = DistInfo(0, 1, 0, device)
    with tempfile.TemporaryDirectory() as tmp:
        tr = VAETrainer(cfg, dist, __import__("pathlib").Path(tmp), RunLogger(None, is_main=False))
    x8 = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device=device)
    x = x8[: tr.micro_batch].float() / 127.5 - 1  # the components: one micro-batch
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    model, teacher, lpips, disc, opt_d = tr.model, tr.teacher, tr.loss.lpips, tr.disc, tr.opt_d
    # the sendvae-f16d32 preset trains with all of them
    assert teacher is not None and lpips is not None and disc is not None and opt_d is not None

    def full() -> None:
        tr.train_step(x8)

    def t_teacher() -> None:
        with amp:
            teacher(x)

    target = tr.teacher_tokens(x)

    def t_vae() -> None:
        with amp:
            recon, post, z, pred = model(x)
        loss = (recon.float() - x).abs().mean() + 1e-6 * post.kl().mean()
        if pred is not None:
            loss = loss + cosine_alignment_loss(pred, target)[0]
        loss.backward()
        model.zero_grad(set_to_none=True)

    r = x.clone().requires_grad_(True)

    def t_lpips() -> None:
        with amp:
            d = lpips(r, x).float().mean()
        d.backward()
        r.grad = None

    def t_disc() -> None:
        with amp:
            g = -disc(r).float().mean()
        g.backward()
        r.grad = None
        with amp:
            d = torch.relu(1 - disc(x).float()).mean() + torch.relu(1 + disc(r.detach()).float()).mean()
        d.backward()
        disc.zero_grad(set_to_none=True)

    def t_opt() -> None:
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        for p in disc.parameters():
            p.grad = torch.zeros_like(p)
        tr.opt_g.step()
        opt_d.step()

    reset_peak(device)
    t_full = time_fn(full, device, warmup, iters)
    mem = peak_gib(device)
    split = {
        name: time_fn(fn, device, 1, iters)
        for name, fn in [
            ("teacher", t_teacher),
            ("vae_fwd_bwd", t_vae),
            ("lpips", t_lpips),
            ("discriminator", t_disc),
            ("optimizer", t_opt),
        ]
    }
    return {
        "vae": vae,
        "teacher": enc_type,
        "batch": batch,
        "micro_batch": tr.micro_batch,
        "grad_accum": grad_accum,
        "grad_checkpointing": grad_checkpointing,
        "resolution": resolution,
        "img_s": batch / t_full,
        "step_ms": 1e3 * t_full,
        "peak_gib": mem,
        **{f"{k}_ms": 1e3 * v for k, v in split.items()},
    }


def print_train_vae(rows: list[dict]) -> None:
    widths = [10, 19, 6, 8, 9, 9, 11, 11, 9, 8, 9]
    print(
        fmt_row(
            [
                "vae",
                "teacher",
                "batch",
                "img/s",
                "step ms",
                "peak GiB",
                "teacher ms",
                "vae f+b ms",
                "lpips ms",
                "disc ms",
                "optim ms",
            ],
            widths,
        )
    )
    for r in rows:
        mem = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(
            fmt_row(
                [
                    r["vae"],
                    r["teacher"],
                    f"{r['micro_batch']}x{r['grad_accum']}" if r["grad_accum"] > 1 else r["batch"],
                    f"{r['img_s']:.1f}",
                    f"{r['step_ms']:.0f}",
                    mem,
                    f"{r['teacher_ms']:.0f}",
                    f"{r['vae_fwd_bwd_ms']:.0f}",
                    f"{r['lpips_ms']:.0f}",
                    f"{r['discriminator_ms']:.0f}",
                    f"{r['optimizer_ms']:.0f}",
                ],
                widths,
            )
        )
