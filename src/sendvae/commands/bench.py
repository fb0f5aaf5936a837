"""sendvae bench: throughput and memory of a stage on this machine's device.

Benchmarks measure; tests never assert timings. Figures for BENCHMARKS.md come from here.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..config import device_arg, finite_float, nonnegative_int, positive_int

STDOUT_IS_DATA = True  # the JSON rows; log lines go to stderr
NAME = "bench"
HELP = "measure throughput and memory of a stage (vae, train-vae, train-sit, sample, evaluate, probe)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what",
        choices=["vae", "train-vae", "train-sit", "sample", "evaluate", "probe"],
        help="what to measure",
    )
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--vae", action="append", help="VAE preset(s) (default: f8d4 and f16d32)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="batch per step (default: per stage; vae: 64 on GPU, 2 on CPU)",
    )
    p.add_argument("--resolution", type=positive_int, default=256, help="image side in pixels")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="auto = bf16 autocast on GPU, fp32 on CPU",
    )
    p.add_argument("--iters", type=positive_int, default=5, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed iterations first")
    p.add_argument(
        "--enc-type", default="dinov2-vit-b", help="teacher for train-vae / train-sit (random weights)"
    )
    p.add_argument("--model", default="SiT-XL/2", help="train-sit: SiT size (SiT-XL/2, SiT-B/2, ...)")
    p.add_argument(
        "--teacher-features",
        action="append",
        choices=["cached", "online"],
        help="train-sit: teacher features cached in the store, or computed online (default: both)",
    )
    p.add_argument("--compile", action="store_true", help="train-sit: torch.compile the SiT")
    p.add_argument(
        "--grad-accum",
        type=positive_int,
        default=1,
        help="train-vae / train-sit: run --batch-size as this many micro-batches per optimizer step "
        "(the trainers' --optim.grad_accum; default: %(default)s)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="train-vae / train-sit: activation checkpointing (the trainers' --model.grad_checkpointing)",
    )
    p.add_argument("--sit-depth", type=positive_int, help="train-sit: override the depth (CPU smoke runs)")
    p.add_argument("--sit-width", type=positive_int, help="train-sit: override the width (CPU smoke runs)")
    p.add_argument(
        "--cfg-scale", type=finite_float, default=1.5, help="sample: guidance scale (1 = one pass per step)"
    )
    p.add_argument(
        "--steps", type=positive_int, default=250, help="sample: sampler steps of the implied 50k run"
    )
    p.add_argument(
        "--num-latents",
        type=positive_int,
        default=50_000,
        help="probe: latents to probe (default: %(default)s)",
    )
    p.add_argument(
        "--pr-features",
        type=nonnegative_int,
        default=0,
        help="evaluate: also time precision / recall (float16 as ADM, and float32) on this many fixed random "
        "2048-d features per set, and print both results (default: %(default)s, skip)",
    )
    p.add_argument(
        "--threads",
        type=thread_counts,
        default=None,
        help="evaluate: CPU thread counts to measure at, comma-separated (e.g. 1,2), one row and one "
        "ratio to pytorch-fid per count (default: torch's current count)",
    )
    p.add_argument("--json", action="store_true", help="print JSON rows")


def thread_counts(text: str) -> list[int]:
    """'1,2' -> [1, 2]: positive thread counts for `bench evaluate --threads`."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return counts


def run(args: argparse.Namespace) -> int:
    from ..bench.timing import device_name, fmt_row
    from ..runtime.distributed import resolve_device

    dev = resolve_device(args.device)
    gpu = dev.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and gpu) else None
    print(f"device: {device_name(dev)}; autocast: {dtype}; torch {torch.__version__}")
    rows = []
    if args.what == "vae":
        from ..bench.vae import bench_vae

        batch = args.batch_size or (64 if gpu else 2)
        for name in args.vae or ["f8d4", "f16d32"]:
            rows.append(bench_vae(name, dev, batch, args.resolution, dtype, args.iters, args.warmup))
        widths = [10, 6, 5, 8, 12, 12, 18, 9]
        print(
            fmt_row(
                [
                    "vae",
                    "batch",
                    "res",
                    "params",
                    "encode img/s",
                    "enc peak GiB",
                    "enc+dec+bwd img/s",
                    "peak GiB",
                ],
                widths,
            )
        )
        for r in rows:
            mem = lambda v: "-" if v is None else f"{v:.2f}"
            print(
                fmt_row(
                    [
                        r["vae"],
                        r["batch"],
                        r["resolution"],
                        f"{r['params_m']}M",
                        f"{r['encode_img_s']:.3g}",
                        mem(r["encode_peak_gib"]),
                        f"{r['train_img_s']:.3g}",
                        mem(r["train_peak_gib"]),
                    ],
                    widths,
                )
            )
    elif args.what == "sample":
        from ..bench.sample_eval import bench_sample

        size = {}
        if args.sit_depth:
            size["depth"] = args.sit_depth
        if args.sit_width:
            size.update(hidden_size=args.sit_width, num_heads=max(1, args.sit_width // 64))
        batch = args.batch_size or (256 if gpu else 2)
        r = bench_sample(
            args.model,
            dev,
            batch,
            dtype,
            args.cfg_scale,
            args.steps,
            iters=args.iters,
            warmup=args.warmup,
            compile=args.compile,
            **size,
        )
        rows.append(r)
        floor = "" if r["floor_ms"] is None else f", FLOP floor {r['floor_ms']:.0f} ms ({r['vs_floor']:.2f}x)"
        print(
            f"{r['model']} batch {r['batch']} cfg {r['cfg_scale']}: {r['ms_per_call']:.1f} ms per call of "
            f"{r['evals_per_call']} evaluations{floor}; 50k samples x {r['steps']} steps: "
            f"{r['hours_for_50k']:.2f} h"
        )
    elif args.what == "evaluate":
        from ..bench.sample_eval import bench_evaluate, bench_precision_recall

        batch = args.batch_size or (500 if gpu else 4)
        for threads in args.threads or [None]:
            r = bench_evaluate(dev, batch, args.resolution, args.iters, args.warmup, threads=threads)
            rows.append(r)
            print(
                f"FID Inception at {r['resolution']} px, batch {r['batch']}, {r['threads']} CPU thread(s): "
                f"{r['img_s']:.1f} img/s (fastest round {r['img_s_best']:.1f}); "
                f"50k images: {r['seconds_for_50k']:.0f} s"
            )
            if r["vs_pytorch_fid"] is None:
                print("pytorch-fid is not installed: no comparison")
            else:
                print(
                    f"pytorch-fid InceptionV3 (pool_3 block), same weights and uint8 images: "
                    f"{r['pytorch_fid_img_s']:.1f} img/s (fastest round {r['pytorch_fid_img_s_best']:.1f}); "
                    f"time ours / pytorch-fid {r['vs_pytorch_fid']:.3f} (median of {r['rounds']} "
                    f"interleaved rounds), {r['vs_pytorch_fid_best']:.3f} (fastest rounds)"
                )
        if args.pr_features:
            r = bench_precision_recall(dev, args.pr_features)
            rows.append(r)
            print(
                f"precision / recall, {r['pr_features']} vs {r['pr_features']} random 2048-d features: "
                + "; ".join(
                    f"{d} {r[f'precision_{d}']:.4f} / {r[f'recall_{d}']:.4f} in {r[f'pr_{d}_s']:.1f} s"
                    for d in ("float16", "float32")
                )
            )
    elif args.what == "probe":
        from ..bench.probe import bench_probe

        for name in args.vae or ["f16d32"]:
            r = bench_probe(name, dev, args.num_latents, args.resolution)
            rows.append(r)
            parts = ", ".join(
                f"{k[:-2]} {v:.1f} s" for k, v in r.items() if k.endswith("_s") and k != "seconds"
            )
            print(
                f"probe {r['num_latents']} latents of {name} at {args.resolution} px "
                f"({r['feature_dim']} dims), {r['num_probes']} probes + measures: "
                f"{r['seconds']:.1f} s ({parts})"
            )
    elif args.what == "train-sit":
        from ..bench.train_sit import bench_train_sit

        batch = args.batch_size or (256 if gpu else 2)
        over = {}
        if args.sit_depth:
            over["depth"] = args.sit_depth
            over["encoder_depth"] = min(args.sit_depth, 8)
        if args.sit_width:
            over.update(hidden_size=args.sit_width, num_heads=max(1, args.sit_width // 64))
        for mode in args.teacher_features or ["cached", "online"]:
            rows.append(
                bench_train_sit(
                    args.model,
                    dev,
                    batch,
                    dtype,
                    mode,
                    args.enc_type,
                    compile=args.compile,
                    iters=args.iters,
                    warmup=args.warmup,
                    grad_accum=args.grad_accum,
                    grad_checkpointing=args.grad_checkpointing,
                    **over,
                )
            )
        for r in rows:
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
            print(
                f"{r['model']} batch {r['batch']} ({r['grad_accum']} micro-batch(es) of {r['micro_batch']}"
                f"{', checkpointing' if r['grad_checkpointing'] else ''}) teacher {r['teacher']}: "
                f"{r['img_s']:.1f} img/s, "
                f"{r['step_ms']:.0f} ms/step, first step {r['first_step_s']:.1f} s, peak {peak}, "
                f"{r['tflops']:.1f} TFLOP/s, MFU {mfu} (params {r['params_m']}M, "
                f"{r['gflop_per_img']:.1f} GFLOP/img fwd+bwd)"
            )
    else:
        from ..bench.train_vae import bench_train_vae, print_train_vae

        batch = args.batch_size or (32 if gpu else 2)
        for name in args.vae or ["f16d32"]:
            rows.append(
                bench_train_vae(
                    name,
                    args.enc_type,
                    dev,
                    batch,
                    args.resolution,
                    dtype,
                    args.iters,
                    args.warmup,
                    grad_accum=args.grad_accum,
                    grad_checkpointing=args.grad_checkpointing,
                )  # fmt: skip
            )
        print_train_vae(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0
