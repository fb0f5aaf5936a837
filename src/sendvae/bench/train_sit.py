"""``sendvae bench train-sit``: one SiT + REPA training step as train-sit runs it, on synthetic data.

``batch`` is one optimizer step's, run as ``grad_accum`` micro-batches (the row says both); ``img_s`` counts
the images of optimizer steps. Two teacher modes: ``cached`` reads teacher tokens from memory (what a latent
store with features gives), ``online`` runs the teacher (random weights) on random images every step. The
step is the trainer's: draw latents, flow-matching + REPA loss under bf16 autocast, backward, clip, fused
AdamW, EMA.
MFU = model FLOPs per image (fwd + bwd, projector included) x img/s / the measured bf16 matmul rate.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from typing import Any

import torch

from ..diffusion.transport import TransportConfig, training_losses
from ..models.sit import SiT, flops_per_image, sized_sit_config
from ..runtime.hardware import measured_matmul_tflops
from ..teachers import build_teacher
from ..train.common import ema_update, fused_adamw, optimizer_step
from .timing import peak_gib, reset_peak, sync, time_fn


def bench_train_sit(
    model: str,
    device: torch.device,
    batch: int,
    dtype: torch.dtype | None,
    teacher: str,
    enc_type: str = "dinov2-vit-b",
    latent: tuple[int, int, int] = (4, 32, 32),
    compile: bool = False,
    iters: int = 5,
    warmup: int = 2,
    grad_accum: int = 1,
    grad_checkpointing: bool = False,
    **overrides,
) -> dict:
    """One optimizer step of ``batch`` images, run as ``grad_accum`` micro-batches (as train-sit's
    ``--optim.grad_accum``), with or without activation checkpointing."""
    if batch % grad_accum:
        raise ValueError(f"--batch-size {batch} must be divisible by --grad-accum {grad_accum}")
    micro = batch // grad_accum
    c, h, _ = latent
    tokens_dim = 768
    t_model = None
    if teacher == "online":
        t_model = build_teacher(enc_type, resolution=h * 8, random_init=True).to(device)
        tokens_dim = t_model.embed_dim
    size = {
        k: overrides.pop(k) for k in ("depth", "hidden_size", "num_heads", "encoder_depth") if k in overrides
    }
    cfg = sized_sit_config(
        model, size, input_size=h, in_channels=c, num_classes=1000, z_dims=(tokens_dim,), **overrides
    )
    net = SiT(cfg, grad_checkpointing=grad_checkpointing).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = fused_adamw(net.parameters(), 1e-4, (0.9, 0.999), 0.0)
    fwd = torch.compile(net) if compile else net

    def amp():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    tc = TransportConfig()
    n = cfg.num_tokens
    # latents as the store gives them: (B, 2 flips, 2 (mean, std), C, h, w) -> one draw per step
    z = torch.randn(batch, c, h, h, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    cached = torch.randn(batch, n, tokens_dim, device=device)
    images = torch.rand(batch, 3, h * 8, h * 8, device=device) * 2 - 1 if t_model is not None else None

    def step() -> None:
        for j in range(grad_accum):  # the trainer's micro-batches: every grad_accum-th row
            rows = slice(j, None, grad_accum)
            with amp():
                target = t_model(images[rows]) if t_model is not None and images is not None else cached[rows]
                out = training_losses(fwd, z[rows], y[rows], target, tc)
            (out["loss"] / grad_accum).backward()
        _, bad = optimizer_step(opt, net.parameters(), 1.0)
        ema_update(ema, net, 0.9999, bad)

    reset_peak(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    t = time_fn(step, device, warmup, iters)
    flops = flops_per_image(cfg, training=True)
    peak = measured_matmul_tflops(device)
    row: dict[str, Any] = {
        "model": model,
        "teacher": teacher,
        "batch": batch,
        "micro_batch": micro,
        "grad_accum": grad_accum,
        "grad_checkpointing": grad_checkpointing,
        "compile": compile,
        "params_m": round(net.num_params() / 1e6, 1),
        "img_s": batch / t,
        "step_ms": 1e3 * t,
        "first_step_s": first,
        "peak_gib": peak_gib(device),
        "gflop_per_img": flops / 1e9,
        "tflops": flops * batch / t / 1e12,
        "matmul_tflops": peak,
    }
    row["mfu"] = row["tflops"] / peak if peak else None
    if t_model is not None:

        def teacher_only() -> None:
            with torch.no_grad(), amp():
                t_model(images)

        row["teacher_ms"] = 1e3 * time_fn(teacher_only, device, 1, iters)
    return row
