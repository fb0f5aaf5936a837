"""`sendvae sample`: class-conditional samples of a SiT, decoded by its VAE, as an ADM .npz for evaluation.

    sendvae sample --exp-path runs/sit-xl2 --mode sde --steps 250 --cfg-scale 2.5 --guidance-high 0.75
    torchrun --nproc_per_node 8 -m sendvae.commands.sample --model export/sit --vae export/vae ...

Image i uses seed + i (its own generator), so the samples do not depend on the batch size or the number
of processes. Rank r makes images r, r + world, ...; every batch is written atomically to
OUTPUT/<name>.parts/ and skipped when the command runs again (resume); rank 0 merges the parts into
OUTPUT/<name>.npz (arr_0 uint8 (N, H, W, 3), arr_1 labels) and a grid of the first 64 as <name>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diffusion.sampling import SamplerConfig, sample
from ..models.latent_stats import LatentStats
from ..runtime import checkpoint as ckpt

NAME = "sample"
HELP = "sample a SiT with an ODE/SDE sampler and CFG into an ADM .npz (resumable, multi-process)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--exp-path", help="a train-sit run folder (its checkpoints, config and latent store)")
    src.add_argument("--model", help="a SiT export folder, or a SiT / REPA / REPA-E checkpoint file")
    p.add_argument("--train-steps", type=int, help="with --exp-path: the checkpoint step (default: latest)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--vae", help="VAE folder, checkpoint or preset (default: the run's --model.vae)")
    p.add_argument("--vae-config", help="VAE preset naming the architecture of a checkpoint without config")
    p.add_argument(
        "--latent-stats",
        help="latent mean/std for a SiT that records none (REPA / REPA-E / SiT checkpoints): a latent store, "
        "a latents.json or stats file, or 'vae' for the VAE's own; our runs use the ones they were trained "
        "with",
    )
    p.add_argument("--num-samples", type=int, default=50000, help="images to make (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch, per process")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i; labels are drawn from seed")
    p.add_argument(
        "--label-sampling",
        choices=("random", "equal"),
        default="random",
        help="random labels, or equal: as many of each class (shuffled)",
    )
    for f in dataclasses.fields(SamplerConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=type(f.default),
            default=f.default,
            choices=f.metadata.get("choices"),
            help=f"{f.metadata['help']} (default: %(default)s)",
        )
    p.add_argument("--output", default="samples", help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show Python tracebacks for errors")


# -- model, VAE and latent statistics ----------------------------------------------------------------------


def _stats_from(path: str | Path) -> LatentStats:
    """Latent statistics from a latent store folder, a SiT export folder or a stats file (json / tensors)."""
    from ..data.latent_store import LatentStore
    from ..models.vae_io import load_latent_stats

    path = Path(path)
    if (path / "manifest.json").exists():
        return LatentStore(path).stats
    if path.is_dir():
        path = path / "latents.json"
    if path.suffix == ".json" and path.is_file():
        return LatentStats.from_dict(json.loads(path.read_text()))
    mean, std = load_latent_stats(path)
    return LatentStats.from_tensors(mean, std)


def _trained_stats(cfg: dict[str, Any]) -> LatentStats | None:
    """The statistics a train-sit config recorded at step 0 (None for a run made before they were)."""
    lat = cfg.get("latents") or {}
    if lat.get("mean") is None or lat.get("std") is None:
        return None
    return LatentStats(tuple(lat["mean"]), tuple(lat["std"]), lat.get("vae_fingerprint"))


def _from_train_state(raw: dict[str, Any], weights: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A SiT from a train-sit checkpoint (keys model, ema, model_config, config) and the run's settings."""
    from ..models.sit import SiT, SiTConfig

    model = SiT(SiTConfig.from_dict(raw["model_config"]))
    model.load_state_dict(raw[weights])
    cfg = raw.get("config") or {}
    info = {
        "vae": (cfg.get("model") or {}).get("vae"),
        "vae_config": (cfg.get("model") or {}).get("vae_config"),
        "stats": _trained_stats(cfg),
        "stats_from": "the checkpoint's config (latents.*)",
    }
    return model, info


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The SiT, and what its source says: name, source, vae, vae_config, stats (the trained ones or None)."""
    from ..models.sit_io import load_sit

    if args.model:
        path = Path(args.model)
        info = {"name": path.name if path.is_dir() else path.stem, "source": str(path.resolve())}
        raw = None
        if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
            with torch.serialization.safe_globals([argparse.Namespace]):  # REPA keeps its args in one
                raw = ckpt.load_checkpoint(path)
        if isinstance(raw, dict) and "model_config" in raw:  # our trainer's checkpoint
            model, more = _from_train_state(raw, args.weights)
            return model, {**info, **more}
        model = load_sit(path, weights=args.weights)
        stats, where = None, str(path)
        if path.is_dir() and (path / "latents.json").exists():  # our export
            stats, where = _stats_from(path), str(path / "latents.json")
        return model, {**info, "vae": None, "stats": stats, "stats_from": where}
    run = Path(args.exp_path)
    found = dict(ckpt.list_checkpoints(run))
    if not found:
        raise FileNotFoundError(f"{run} holds no checkpoints/step-*.pt; is it a train-sit run folder?")
    step = args.train_steps if args.train_steps is not None else max(found)
    if step not in found:
        raise FileNotFoundError(f"{run} has no checkpoint of step {step}; it has steps {sorted(found)}")
    model, info = _from_train_state(ckpt.load_checkpoint(found[step]), args.weights)
    return model, {
        **info,
        "name": f"{run.name}-{step:07d}-{args.weights}",
        "source": str(found[step].resolve()),
    }


def resolve_stats(trained: LatentStats | None, given: str | None, vae, source: str) -> LatentStats:
    """The statistics to decode with: exactly the ones the SiT was trained with; never a guess.

    ``given`` (--latent-stats: a store, export or stats file, or "vae" for the VAE's own) is for SiTs
    that carry none (REPA / REPA-E / SiT checkpoints); for our own runs it must agree with the trained ones.
    """
    if given is not None:
        if given == "vae":
            explicit = LatentStats.from_tensors(vae.latent_mean, vae.latent_std)
        else:
            explicit = _stats_from(given)
        if trained is not None and not trained.same_values(explicit):
            raise ValueError(
                f"--latent-stats {given} differs from the statistics this SiT was trained with "
                f"({source}); drop --latent-stats"
            )
        return trained or explicit
    if trained is None:
        raise ValueError(
            f"{source} does not record the latent statistics its SiT was trained with: pass "
            "--latent-stats STORE_OR_FILE (the latent store it was trained on, or a latents.json), or "
            "--latent-stats vae for the VAE's own"
        )
    return trained


def load_vae_and_stats(args: argparse.Namespace, info: dict[str, Any]):
    """(VAE, LatentStats); the VAE is checked against the latents' fingerprint when it is known."""
    from ..data.latent_store import vae_fingerprint
    from ..models.vae_io import load_vae

    vae_src = args.vae or info.get("vae")
    if not vae_src:
        raise ValueError("which VAE decodes these latents? the run names none: pass --vae PATH_OR_PRESET")
    torch.manual_seed(0)  # a preset (random weights; tests) is then the same VAE in every process
    vae = load_vae(vae_src, config=args.vae_config or info.get("vae_config")).requires_grad_(False)
    stats = resolve_stats(info.get("stats"), args.latent_stats, vae, info.get("stats_from", info["source"]))
    fp = stats.vae_fingerprint
    if fp is not None and fp != vae_fingerprint(vae):
        raise ValueError(
            f"the VAE {vae_src} is not the one the SiT's latents came from (its statistics name VAE "
            f"weights {fp[:12]}..., this VAE has {vae_fingerprint(vae)[:12]}...); pass the right --vae"
        )
    if stats.channels != vae.latent_channels:
        c = vae.latent_channels
        raise ValueError(f"latent statistics for {stats.channels} channels, the VAE has {c}")
    return vae, stats


# -- labels, names and parts ---------------------------------------------------------------------------------


def make_labels(n: int, num_classes: int, seed: int, mode: str) -> torch.Tensor:
    """(n,) int64, the same for any number of processes: uniform at random, or each class n / K times
    (i % K, shuffled by a seeded permutation)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "equal":
        return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    return torch.randint(0, num_classes, (n,), generator=g)


def output_name(model_name: str, cfg: SamplerConfig, seed: int, n: int, labels: str) -> str:
    name = f"samples_{model_name}_{cfg.tag()}_{cfg.precision}_seed{seed}_n{n}"
    return name + ("_eq" if labels == "equal" else "")


def _write_part(path: Path, **arrays: np.ndarray) -> None:
    ckpt.atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def _done_indices(parts: Path) -> set[int]:
    done: set[int] = set()
    for f in parts.glob("part-*.npz"):
        with np.load(f) as z:
            done.update(z["indices"].tolist())
    return done


def merge_parts(parts: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """All parts -> (images (n, H, W, 3) uint8, labels (n,)); every index must be present."""
    images = labels = None
    seen = np.zeros(n, dtype=bool)
    for f in sorted(parts.glob("part-*.npz")):
        with np.load(f) as z:
            idx = z["indices"]
            if images is None:
                images = np.zeros((n, *z["images"].shape[1:]), dtype=np.uint8)
                labels = np.zeros(n, dtype=np.int64)
            images[idx], labels[idx], seen[idx] = z["images"], z["labels"], True
    missing = np.flatnonzero(~seen)
    if len(missing):
        raise RuntimeError(
            f"{len(missing)} samples missing from {parts} (e.g. {missing[:10].tolist()}); run again"
        )
    return images, labels


def save_grid(images: np.ndarray, path: Path, nrow: int = 8) -> None:
    import torchvision

    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float().div(255)  # (n, 3, H, W)
    buf = io.BytesIO()
    torchvision.utils.save_image(x, buf, format="png", nrow=nrow)
    ckpt.atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


# -- the command ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.transforms import to_uint8
    from ..runtime.distributed import barrier, broadcast_object, cleanup, init_distributed

    scfg = SamplerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig)})
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be >= 1")
    dist = init_distributed(args.device)
    try:
        model, info = load_model(args)
        model = model.to(dist.device).eval().requires_grad_(False)
        vae, stats = load_vae_and_stats(args, info)
        vae = vae.to(dist.device)
        mc = model.config
        n = args.num_samples
        labels_all = make_labels(n, mc.num_classes, args.seed, args.label_sampling)
        out = Path(args.output)
        name = output_name(info["name"], scfg, args.seed, n, args.label_sampling)
        final, parts = out / f"{name}.npz", out / f"{name}.parts"
        if final.exists():
            if dist.is_main:  # finish what a run killed after writing the .npz left undone
                if not (out / f"{name}.png").exists():
                    with np.load(final) as f:
                        save_grid(f["arr_0"][:64], out / f"{name}.png")
                shutil.rmtree(parts, ignore_errors=True)
                print(f"{final} exists; nothing to do")
            return 0
        settings = {
            "model": info["source"], "weights": args.weights, "vae": str(args.vae or info.get("vae")),
            "sampler": dataclasses.asdict(scfg), "seed": args.seed, "num_samples": n,
            "label_sampling": args.label_sampling,
        }  # fmt: skip
        error = None
        if dist.is_main:
            parts.mkdir(parents=True, exist_ok=True)
            ckpt.sweep_temp_files(out, parts)  # leftovers of a killed write
            sfile = parts / "settings.json"
            if sfile.exists() and json.loads(sfile.read_text()) != settings:
                error = f"{parts} holds samples made with other settings; delete it or use another --output"
            else:
                ckpt.atomic_write_json(settings, sfile)
        error = broadcast_object(error)
        if error:
            raise ValueError(error)
        barrier()

        done = _done_indices(parts)
        todo = [i for i in range(dist.rank, n, dist.world_size) if i not in done]
        if dist.is_main:
            print(
                f"{name}: {n} samples ({n - len(done)} to make) by {dist.world_size} process(es), "
                f"{mc.describe()}",
                flush=True,
            )
        bar = tqdm(total=len(todo), unit="img", desc="sample", disable=args.no_progress or not dist.is_main)
        for b in range(0, len(todo), args.batch_size):
            idx = todo[b : b + args.batch_size]
            y = labels_all[idx].to(dist.device)
            z = sample(model, y, [args.seed + i for i in idx], scfg)  # (B, C, h, w), normalised latents
            with torch.no_grad():
                x = vae.decode(stats.denormalize(z)).float()  # (B, 3, H, W) in [-1, 1]
            bad = [i for i, ok in zip(idx, x.flatten(1).isfinite().all(1).tolist()) if not ok]
            if bad:
                raise FloatingPointError(f"non-finite samples at indices {bad[:20]} (seeds seed + index)")
            images = to_uint8(x.clamp(-1, 1)).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
            _write_part(
                parts / f"part-{idx[0]:07d}.npz",
                images=images,
                labels=y.cpu().numpy(),
                indices=np.asarray(idx, dtype=np.int64),
            )
            bar.update(len(idx))
        bar.close()
        barrier()  # every part is on disk
        if dist.is_main:
            images, labels = merge_parts(parts, n)
            save_grid(images, out / f"{name}.png")  # before the .npz, whose presence means "done"
            ckpt.atomic_write_bytes(final, lambda f: np.savez(f, arr_0=images, arr_1=labels))
            shutil.rmtree(parts)
            print(f"wrote {final} {images.shape} and {name}.png", flush=True)
        barrier()
    finally:
        cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sendvae.commands.sample ...` (the same as `sendvae sample ...`)."""
    from ..cli import run_command

    return run_command(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
