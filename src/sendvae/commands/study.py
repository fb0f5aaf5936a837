"""`sendvae study`: the alignment variants compared on generation at small scale (the paper's claim).

    sendvae study                                   # CPU: about 2 hours on 2 cores, resumable
    sendvae study --scale gpu --output-dir runs/study-gpu
    sendvae study --variants none,sendvae --seeds 0,1,2

Pre-trains one plain VAE, fine-tunes every variant from it for the same steps, trains the same SiT
recipe on each variant's latents, scores samples at several SiT steps (gFD in the bundled teacher's
features), the VAEs (rFD, PSNR, attribute probes), and correlates probe score with gFD. Writes
OUTPUT_DIR/study.{md,csv,json}, gfd_vs_steps.png and probe_vs_gfd.png. Run it again to continue after an
interruption. The engine is `sendvae.pipeline.study`.
"""

from __future__ import annotations

import argparse

from ..config import device_arg

NAME = "study"
HELP = "compare the alignment variants on generation: shared init, same SiT recipe, several seeds"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import add_config_arguments
    from ..pipeline.demo_config import OWNED
    from ..pipeline.study_config import SCALES, StudyConfig, study_config

    p.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default="cpu",
        help="cpu: ~2 h on 2 cores; gpu: < 25 min on one GPU; ci: seconds, for tests (default: %(default)s)",
    )
    p.add_argument("--output-dir", default="runs/study", help="study folder (default: %(default)s)")
    p.add_argument("--device", type=device_arg, help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--progress", action="store_true", help="progress bars of the sampling stages")
    p.add_argument(
        "--report-only", action="store_true", help="run nothing: tabulate the runs that finished so far"
    )
    add_config_arguments(
        p,
        StudyConfig,
        skip={"scale", "claim", "base.scale", "base.device", *(f"base.{k}" for k in OWNED)},
        base=study_config("cpu"),
        title="study settings, each over the scale's value (defaults shown: cpu's)",
    )


def run(args: argparse.Namespace) -> int:
    from ..config import apply_overrides, format_config, overrides_from_args
    from ..pipeline.study import run_study
    from ..pipeline.study_config import study_config

    cfg = apply_overrides(study_config(args.scale), overrides_from_args(args))
    if args.device is not None:
        cfg.base.device = args.device
    if args.dry_run:
        print(format_config(cfg))
        return 0
    report = run_study(cfg, args.output_dir, progress=args.progress, report_only=args.report_only)
    print(f"study: {args.output_dir}/study.md")
    for line in report["verdict"]:
        print(f"  {line}")
    return 0
