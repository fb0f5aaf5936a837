"""`sendvae demo`: the whole pipeline on the embedded example in one command, and its report.

    sendvae demo                          # CPU, under 10 minutes, no network -> runs/demo/report.html
    sendvae demo --scale gpu --output-dir runs/demo-gpu
    sendvae demo --sit.optim.max_steps 2000   # any stage setting, in its command's words (see --help)

Runs on Fashion-MNIST (Debian's dataset-fashion-mnist; the procedural shapes where it is absent, said in
the first line). Trains a Send-VAE, caches latents, trains a SiT with REPA, samples with and without
guidance, evaluates (class accuracy and FD_<judge> by an independent CNN trained on the real images, FD in
the teacher's features as a secondary number, rFD, PSNR, SSIM, LPIPS) and probes the latents, then
writes OUTPUT_DIR/report.html (self-contained) and report.md. Run it again to continue after an
interruption: finished stages are skipped. The engine is `sendvae.pipeline.demo`.
"""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = "the whole pipeline on the embedded example (train, cache, SiT, sample, evaluate, probe, report)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import add_config_arguments, device_arg, nonnegative_int
    from ..pipeline.demo_config import OWNED, SCALES, DemoConfig, demo_config

    p.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default="cpu",
        help="cpu: < 10 min on 2 cores; gpu: larger, minutes on one GPU; ci: reduced, for tests "
        "(default: %(default)s)",
    )
    p.add_argument("--output-dir", default="runs/demo", help="demo folder (default: %(default)s)")
    p.add_argument("--seed", type=nonnegative_int, help="global seed (default: the scale's, 0)")
    p.add_argument("--device", type=device_arg, help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--data-path",
        help="Fashion-MNIST folder: its four IDX files (.gz or not), or torchvision's DIR/FashionMNIST/raw "
        "(default: the Debian package's /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="fetch Fashion-MNIST with torchvision into --data-path (default runs/fashion-mnist) when it is "
        "not installed (needs a network)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(
        p,
        DemoConfig,
        skip={"scale", "seed", "device", *OWNED},
        base=demo_config("cpu"),
        title="stage settings, each over the scale's value (defaults shown: cpu's)",
    )


def run(args: argparse.Namespace) -> int:
    from ..config import apply_overrides, format_config, overrides_from_args
    from ..pipeline.demo import run_demo
    from ..pipeline.demo_config import demo_config

    cfg = apply_overrides(demo_config(args.scale), overrides_from_args(args))
    if args.seed is not None:
        cfg.seed = args.seed
    if args.device is not None:
        cfg.device = args.device
    d = cfg.vae.data
    if args.data_path is not None:
        d.path = args.data_path
    if args.allow_download and d.name == "fashion-mnist":
        from ..data.embedded import download_fashion_mnist, fashion_mnist_found

        if fashion_mnist_found(d.path) is not None:
            d.path = str(download_fashion_mnist(d.path or "runs/fashion-mnist"))
    if args.dry_run:
        print(format_config(cfg))
        return 0
    out = run_demo(cfg, args.output_dir, progress=not args.no_progress)
    ev = out["stages"]["evaluate"]
    print(f"report: {out['report']}")
    print(f"demo: {ev['summary']}")
    return 0
