"""What this machine's accelerator can do, measured: the denominator of MFU in the trainers and benchmarks."""

from __future__ import annotations

import time

import torch


def measured_matmul_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float | None:
    """bf16 dense matmul rate of this GPU, measured (the MFU denominator). None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12
