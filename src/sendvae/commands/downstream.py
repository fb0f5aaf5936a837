"""`sendvae downstream train|eval|predict`: segmentation and depth heads read through the alignment head.

    sendvae downstream train --vae runs/shapes-tiny/export/vae --output-dir runs/heads
    sendvae downstream eval --vae runs/shapes-tiny/export/vae --heads runs/heads \
        --sit runs/shapes-tiny-sit --output-dir runs/downstream
    sendvae downstream predict --vae runs/shapes-tiny/export/vae --heads runs/heads --sit runs/shapes-tiny-sit

train: light heads (``--head linear|conv``) on the teacher's patch tokens of real shapes images, the teacher
the VAE's alignment head was aligned to (or ``--enc-type`` at ``--resolution`` without ``--vae``); writes
OUTPUT_DIR/heads.{safetensors,json}. eval: mIoU, foreground IoU, AbsRel and delta<1.25 on held-out shapes
for teacher features of real images, the alignment head's features of encoded real latents and, with
``--sit`` (a train-sit run folder or SiT export trained on this VAE's latents), of generated latents
(scored against the heads' reading of the decoded sample); writes OUTPUT_DIR/downstream.{md,json,png}.
predict: masks and depth maps of encoded (or, with ``--sit``, generated) latents, OUTPUT_DIR/predictions.
{npz,png}. The engine is `sendvae.evaluation.downstream`; this module reads the options and calls it.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import device_arg, nonnegative_int, positive_float, positive_int
from ..diffusion.sampling import SamplerConfig
from ..evaluation.downstream_heads import HEAD_KINDS
from .sample import add_sampler_arguments

NAME = "downstream"
HELP = "segmentation and depth heads on teacher features, read from latents through the alignment head"
ACTIONS = ("train", "eval", "predict")
NUM_IMAGES = {"train": 2000, "eval": 256, "predict": 16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ACTIONS, help="train the heads, score them, or predict maps")
    p.add_argument(
        "--vae",
        help="a train-vae export folder (export/vae) with an alignment head; train: the teacher to use",
    )
    p.add_argument("--heads", help="eval / predict: the folder `downstream train` wrote")
    p.add_argument("--sit", help="eval / predict: a train-sit run folder or SiT export for generated latents")
    p.add_argument(
        "--latent-stats",
        help="latent mean/std for a SiT that records none: a latent store, latents.json, or 'vae'",
    )
    p.add_argument("--enc-type", help="train without --vae: the teacher (default: the embedded one)")
    p.add_argument("--teacher-weights", help="weights file/folder of the teacher (default: the recorded one)")
    p.add_argument("--resolution", type=positive_int, default=64, help="train without --vae: image side")
    p.add_argument("--head", choices=HEAD_KINDS, default="linear", help="train: head architecture")
    p.add_argument("--head-steps", type=positive_int, default=300, help="train: optimizer steps")
    p.add_argument(
        "--lr", type=positive_float, default=1e-3, help="train: AdamW learning rate (cosine decay)"
    )
    p.add_argument(
        "--num-images",
        type=positive_int,
        help="images (default: train 2000, eval 256, predict 16)",
    )
    p.add_argument(
        "--grid-images", type=nonnegative_int, default=8, help="eval: columns of downstream.png (0: none)"
    )
    add_sampler_arguments(p, help_prefix="--sit sampler: ")  # as `sendvae sample` spells them
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="data seed of the heads, SiT seeds (default: 0)"
    )
    p.add_argument("--output-dir", default="downstream", help="output folder (default: %(default)s)")
    p.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..evaluation import downstream as ds

    n = args.num_images if args.num_images is not None else NUM_IMAGES[args.action]
    common = {"batch_size": args.batch_size, "seed": args.seed, "device": args.device}
    if args.action == "train":
        out = ds.train_downstream(
            args.output_dir, vae=args.vae, enc_type=args.enc_type, teacher_weights=args.teacher_weights,
            resolution=args.resolution, kind=args.head, num_images=n, steps=args.head_steps, lr=args.lr,
            **common,
        )  # fmt: skip
        print(f"wrote {out}")
        return 0
    if not args.vae or not args.heads:
        raise ValueError(
            f"downstream {args.action} needs --vae EXPORT and --heads DIR (from downstream train)"
        )
    sampler = SamplerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig)})
    opts = {"sit": args.sit, "sampler": sampler, "latent_stats": args.latent_stats,
            "teacher_weights": args.teacher_weights, "num_images": n, **common}  # fmt: skip
    if args.action == "predict":
        print(f"wrote {ds.predict_downstream(args.output_dir, args.vae, args.heads, **opts)}")
        return 0
    result = ds.evaluate_downstream(
        args.output_dir, args.vae, args.heads, grid_images=args.grid_images, **opts
    )
    print(ds.markdown_table(result))
    print(f"wrote {args.output_dir}/downstream.md, downstream.json, downstream.png")
    return 0
