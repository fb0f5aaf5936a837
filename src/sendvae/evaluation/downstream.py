"""Segmentation and depth from latents through the alignment head (``sendvae downstream``; ReaLS's tasks).

    heads = train_downstream("runs/heads", vae="runs/shapes-tiny/export/vae")     # on teacher features
    scores = downstream_scores("runs/shapes-tiny/export/vae", "runs/heads", sit="runs/shapes-tiny-sit")

The heads (evaluation/downstream_heads.py) are trained on the frozen teacher's patch tokens of real shapes
images (indices 0 .. n - 1), the teacher being the one the VAE's alignment head was aligned to (read from
its export). They are scored on held-out images (indices from EVAL_START: no training run sees them)
with three feature sources:

  teacher-real   f(x): the teacher's tokens of the real image, against the rendered truth (the ceiling).
  vae-real       h(E(x)): the alignment head's tokens of the encoded image (the posterior mean), against
                 the rendered truth: how much of the task the latent carries through the head.
  vae-generated  h(z) for latents z sampled by a SiT trained on this VAE's latents (``sit``), against
                 the heads' reading of the teacher's tokens of the decoded sample, heads(f(D(z))): a
                 generated image has no ground truth, so this scores whether the latent's features say
                 what the image it decodes to shows (agreement, not accuracy).
  constant       background everywhere at the background's depth, against the rendered truth: the floor
                 a head must beat (objects cover a small part of each image).

The head's tokens are resampled to the teacher grid when its grid differs (``resample_tokens``). Every
variant with an exported head works (sendvae, reals, repa, vf: `align.load_exported_head`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..align import load_exported_head
from ..data.shapes import ShapesDataset
from ..data.shapes_config import scene_config
from ..data.shapes_render import DEPTH_BACKGROUND
from ..data.transforms import to_float
from ..diffusion.generate import make_labels
from ..diffusion.sampling import SamplerConfig, sample
from ..diffusion.sit_source import load_sit_source, load_vae_and_stats
from ..models.vae_io import load_vae
from ..runtime.checkpoint import atomic_write_bytes, atomic_write_json
from ..runtime.distributed import resolve_device
from ..teachers import DEFAULT_TEACHER, build_teacher, resample_tokens
from .downstream_heads import SegDepthMeter, load_heads, save_heads, shapes_targets, train_heads

if TYPE_CHECKING:
    from ..align import ExportedHead
    from ..diffusion.sampling import SamplerConfig
    from ..teachers import Teacher

SOURCES = ("teacher-real", "vae-real", "vae-generated", "constant")
REFERENCES = {
    "teacher-real": ("f(x), real x", "rendered truth"),
    "vae-real": ("h(E(x)), real x", "rendered truth"),
    "vae-generated": ("h(z), z from the SiT", "heads on f(D(z))"),
    "constant": ("none: background, depth 1", "rendered truth"),
}
EVAL_START = 500_000  # held-out shapes indices: heads train on 0 .. n - 1, training runs see far fewer
# class colours of the grid: background black, then one distinct colour per shape class
PALETTE = torch.tensor([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]) / 255  # fmt: skip


def _device(device: str | torch.device) -> torch.device:
    return resolve_device(str(device))


def build_heads_teacher(meta: dict[str, Any], weights: str | None, device: torch.device) -> Teacher:
    """The teacher `meta` names (an alignment head's or the heads' json): name, input size, weights."""
    size = meta.get("teacher_input_size")
    opts = {"input_size": size} if size else {}
    teacher = build_teacher(
        meta["teacher"], weights=weights or meta.get("teacher_weights"), resolution=meta["resolution"], **opts
    )
    return teacher.to(device)


@torch.no_grad()
def _teacher_tokens(teacher: Teacher, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    out = [
        teacher(to_float(images[s : s + batch_size].to(device))).cpu()
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(out)  # (N, n, D)


def train_downstream(
    output_dir: str | Path,
    *,
    vae: str | Path | None = None,
    enc_type: str | None = None,
    teacher_weights: str | None = None,
    resolution: int = 64,
    kind: str = "linear",
    num_images: int = 2000,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "auto",
    scene: str = "full",
    teacher_input: int | None = None,
) -> Path:
    """Train heads on teacher tokens of shapes 0 .. num_images - 1 -> OUTPUT/heads.{safetensors,json}.

    vae: a train-vae export folder: the teacher (name, input size, weights) and resolution its alignment
    head was aligned to; else ``enc_type`` (default: the embedded teacher) at ``resolution``, with input
    side ``teacher_input`` (default: the teacher's rule). scene: the shapes scene
    (`data.shapes_config.SCENES`).
    """
    if num_images < 1 or steps < 1 or batch_size < 1:
        raise ValueError("--num-images, --head-steps and --batch-size must be >= 1")
    dev = _device(device)
    if vae is not None:
        head_meta = load_exported_head(vae).meta
        if enc_type is not None and enc_type != head_meta["teacher"]:
            raise ValueError(
                f"--enc-type {enc_type}: the VAE {vae} was aligned to {head_meta['teacher']}; drop one"
            )
        keys = ("teacher", "teacher_input_size", "teacher_weights", "resolution")
        meta: dict[str, Any] = {k: head_meta.get(k) for k in keys}
        meta["teacher_weights"] = teacher_weights or meta["teacher_weights"]  # the weights used
    else:
        meta = {
            "teacher": enc_type or DEFAULT_TEACHER,
            "teacher_input_size": teacher_input,
            "teacher_weights": teacher_weights,
            "resolution": resolution,
        }
    teacher = build_heads_teacher(meta, teacher_weights, dev)
    res = int(meta["resolution"])
    grid = teacher.grid_size(res)
    ds = ShapesDataset(scene_config(scene, resolution=res, seed=seed))
    images, seg, depth = shapes_targets(ds, range(num_images))
    tokens = _teacher_tokens(teacher, images, batch_size, dev)
    heads, logs = train_heads(
        tokens, seg, depth, grid, ds.num_classes + 1, kind, steps, batch_size, lr, seed, dev
    )
    meta.update(
        teacher_dim=teacher.embed_dim,
        class_names=["background", *ds.class_names],
        data="shapes",
        scene=scene,
        data_seed=seed,
        num_images=num_images,
        head_steps=steps,
        lr=lr,
        final_loss=logs,
    )
    return save_heads(heads, output_dir, meta)


def check_compatible(ex: ExportedHead, hmeta: dict[str, Any], vae_src: str, heads_src: str) -> None:
    """The VAE's alignment head must target the teacher, grid and resolution the heads were trained on."""
    mine = (ex.meta["teacher"], ex.meta["teacher_dim"], list(ex.meta["teacher_grid"]), ex.meta["resolution"])
    theirs = (hmeta["teacher"], hmeta["feature_dim"], list(hmeta["grid"]), hmeta["resolution"])
    if mine != theirs:
        raise ValueError(
            f"the heads {heads_src} were trained on {theirs[0]} tokens (dim {theirs[1]}, grid {theirs[2]}, "
            f"{theirs[3]} px) but the VAE {vae_src} is aligned to {mine[0]} (dim {mine[1]}, grid {mine[2]}, "
            f"{mine[3]} px); train heads for it: sendvae downstream train --vae {vae_src}"
        )


def _head_tokens(ex: ExportedHead, z: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return resample_tokens(ex.tokens(z), ex.token_grid, grid)  # (B, N, D) on the heads' grid


class _Generated:
    """Latents z (raw, as the VAE decodes them) of a SiT trained on this VAE's latents; image i: seed + i."""

    def __init__(
        self, sit_source, vae, latent_stats, sampler: SamplerConfig | None, seed: int, device, res: int
    ):
        self.sit = load_sit_source(sit_source)
        _, self.stats = load_vae_and_stats(self.sit, vae, latent_stats=latent_stats)  # checks the VAE
        self.model = self.sit.model.to(device).eval().requires_grad_(False)
        mc = self.model.config
        shape = (mc.in_channels, mc.input_size, mc.input_size)
        want = (vae.latent_channels, *vae.latent_grid(res))
        if shape != want:
            raise ValueError(
                f"the SiT {sit_source} makes latents {shape}; this VAE's are {want}: pass a SiT "
                "trained on this VAE's latents with --sit"
            )
        self.sampler, self.seed, self.device = sampler or SamplerConfig(), seed, device

    def batch(self, start: int, n: int) -> torch.Tensor:
        labels = make_labels(start + n, self.model.config.num_classes, self.seed, "random")[start:]
        seeds = [self.seed + i for i in range(start, start + n)]
        return self.stats.denormalize(sample(self.model, labels.to(self.device), seeds, self.sampler))


@torch.no_grad()
def run_downstream(
    vae_export: str | Path,
    heads_dir: str | Path,
    *,
    sit: str | Path | None = None,
    num_images: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    sampler: SamplerConfig | None = None,
    latent_stats: str | None = None,
    teacher_weights: str | None = None,
    device: str | torch.device = "auto",
    preview: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The scores of every source (and the first `preview` images with their predictions, for a grid)."""
    if num_images < 1 or batch_size < 1:
        raise ValueError("--num-images and --batch-size must be >= 1")
    dev = _device(device)
    ex = load_exported_head(vae_export)  # ValueError when the VAE has no alignment head
    heads, hmeta = load_heads(heads_dir)
    check_compatible(ex, hmeta, str(vae_export), str(heads_dir))
    ex.head.to(dev)
    heads = heads.to(dev)
    res, grid = int(hmeta["resolution"]), heads.grid
    teacher = build_heads_teacher(hmeta, teacher_weights, dev)
    vae = load_vae(vae_export).to(dev).requires_grad_(False)
    gen = _Generated(sit, vae, latent_stats, sampler, seed, dev, res) if sit is not None else None
    ds = ShapesDataset(
        scene_config(hmeta.get("scene", "full"), resolution=res, seed=hmeta.get("data_seed", 0))
    )
    meters = {s: SegDepthMeter(heads.num_classes) for s in SOURCES if s != "vae-generated" or gen}
    shown: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, t: torch.Tensor) -> None:
        have = sum(len(x) for x in shown.get(name, []))
        if have < preview:
            shown.setdefault(name, []).append(t[: preview - have].cpu())

    for s in range(0, num_images, batch_size):
        n = min(batch_size, num_images - s)
        images, seg, depth = shapes_targets(ds, range(EVAL_START + s, EVAL_START + s + n))
        x = to_float(images.to(dev))  # (B, 3, H, W) in [-1, 1]
        z = vae.encode(x).mean  # (B, C, h, w)
        seg, depth = seg.to(dev), depth.to(dev)
        out = {
            "teacher-real": heads.predict(teacher(x), (res, res)),
            "vae-real": heads.predict(_head_tokens(ex, z, grid), (res, res)),
        }
        for name, t in (("image", images), ("truth-mask", seg), ("truth-depth", depth)):
            keep(name, t)
        meters["constant"].update(torch.zeros_like(seg), torch.full_like(depth, DEPTH_BACKGROUND), seg, depth)
        for name, (m, d) in out.items():
            meters[name].update(m, d, seg, depth)
            keep(f"{name}-mask", m)
            keep(f"{name}-depth", d)
        if gen is not None:
            zg = gen.batch(s, n)  # (B, C, h, w)
            xg = vae.decode(zg).float().clamp(-1, 1)
            ref_m, ref_d = heads.predict(teacher(xg), (res, res))
            m, d = heads.predict(_head_tokens(ex, zg, grid), (res, res))
            meters["vae-generated"].update(m, d, ref_m, ref_d)
            keep("generated", ((xg + 1) * 127.5).round().to(torch.uint8))
            for name, t in (
                ("reference-mask", ref_m),
                ("reference-depth", ref_d),
                ("vae-generated-mask", m),
                ("vae-generated-depth", d),
            ):
                keep(name, t)
    scores = {name: meter.result() for name, meter in meters.items()}
    meta = {
        "vae": str(vae_export),
        "align": ex.alignment.name,
        "heads": str(heads_dir),
        "head_kind": hmeta["kind"],
        "teacher": hmeta["teacher"],
        "resolution": res,
        "num_images": num_images,
        "eval_start": EVAL_START,
        "sit": str(sit) if sit is not None else None,
        "sampler": gen.sampler.tag() if gen is not None else None,
    }
    return {"scores": scores, "meta": meta}, {k: torch.cat(v) for k, v in shown.items()}


def downstream_scores(vae_export: str | Path, heads_dir: str | Path, **kwargs) -> dict[str, Any]:
    """{"scores": {source: {miou, fg_iou, abs_rel, delta1}}, "meta": {...}}; options as `run_downstream`."""
    return run_downstream(vae_export, heads_dir, **kwargs)[0]


# ---------------------------------------------------------------------------------------------------------
# Table and grid


def colour_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, H, W) class map -> (B, 3, H, W) in [0, 1]; background black."""
    return PALETTE[seg.long().cpu() % len(PALETTE)].permute(0, 3, 1, 2)


def grey_depth(depth: torch.Tensor) -> torch.Tensor:
    """(B, H, W) depth -> (B, 3, H, W): near bright, the background (depth 1) black."""
    return (1 - depth.float().cpu()).clamp(0, 1)[:, None].expand(-1, 3, -1, -1)


def grid_rows(shown: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The grid's rows, top to bottom, as (name, (n, 3, H, W) in [0, 1])."""
    rows = [("image", shown["image"].float() / 255)]
    for name in ("truth", "teacher-real", "vae-real", "generated", "reference", "vae-generated"):
        if name == "generated" and name in shown:
            rows.append((name, shown[name].float() / 255))
        elif f"{name}-mask" in shown:
            rows += [(f"{name} mask", colour_mask(shown[f"{name}-mask"]))]
            rows += [(f"{name} depth", grey_depth(shown[f"{name}-depth"]))]
    return rows


def save_grid_png(shown: dict[str, torch.Tensor], path: Path) -> list[str]:
    """One column per image, one row per map (`grid_rows`); returns the row names."""
    import torchvision

    rows = grid_rows(shown)
    n = len(rows[0][1])
    torchvision.utils.save_image(torch.cat([r[:n] for _, r in rows]), path, nrow=n, padding=1)
    return [name for name, _ in rows]


def _fmt(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| source | features | compared with | mIoU | fg IoU | AbsRel | delta<1.25 |", "|" + "---|" * 7]
    for name, s in result["scores"].items():
        feats, ref = REFERENCES[name]
        lines.append(
            f"| {name} | {feats} | {ref} | {_fmt(s['miou'])} | {_fmt(s['fg_iou'])} | "
            f"{_fmt(s['abs_rel'])} | {_fmt(s['delta1'])} |"
        )
    return "\n".join(lines)


def evaluate_downstream(
    output_dir: str | Path, vae_export: str | Path, heads_dir: str | Path, *, grid_images: int = 8, **kwargs
) -> dict[str, Any]:
    """Scores -> OUTPUT/downstream.{json,md} and the grid OUTPUT/downstream.png."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result, shown = run_downstream(vae_export, heads_dir, preview=grid_images, **kwargs)
    rows = save_grid_png(shown, out / "downstream.png") if grid_images > 0 else []
    m = result["meta"]
    sampler = f" ({m['sampler']})" if m["sampler"] else ""
    text = (
        f"# Downstream segmentation and depth: {m['vae']} ({m['align']} head)\n\n{markdown_table(result)}\n\n"
        f"{m['num_images']} held-out shapes images at {m['resolution']} px (indices from "
        f"{m['eval_start']}), {m['head_kind']} heads on {m['teacher']} ({m['heads']}); SiT: "
        f"{m['sit'] or 'none'}{sampler}.\n"
    )
    if rows:
        text += f"\ndownstream.png rows, top to bottom: {', '.join(rows)}.\n"
    atomic_write_json({**result, "grid_rows": rows}, out / "downstream.json")
    atomic_write_bytes(out / "downstream.md", lambda f: f.write(text.encode()))
    return result


def predict_downstream(
    output_dir: str | Path, vae_export: str | Path, heads_dir: str | Path, *, num_images: int = 16, **kwargs
) -> Path:
    """Masks and depth maps of real (encoded) or, with ``sit``, generated latents through the alignment head:
    OUTPUT/predictions.npz (images uint8 (N, H, W, 3), masks uint8 (N, H, W), depths float32 (N, H, W))
    and OUTPUT/predictions.png (rows: image, mask, depth)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, shown = run_downstream(vae_export, heads_dir, num_images=num_images, preview=num_images, **kwargs)
    src = "vae-generated" if "generated" in shown else "vae-real"
    images = shown["generated" if src == "vae-generated" else "image"]
    masks, depths = shown[f"{src}-mask"], shown[f"{src}-depth"]
    path = out / "predictions.npz"
    arrays = {
        "images": images.permute(0, 2, 3, 1).numpy(),
        "masks": masks.numpy().astype(np.uint8),
        "depths": depths.float().numpy(),
    }
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    save_grid_png({"image": images, f"{src}-mask": masks, f"{src}-depth": depths}, out / "predictions.png")
    return path
