"""The features a probe reads: VAE posterior means, latent-store means, raw pixels, teacher features.

Features per model: the flattened posterior mean of the encoder, normalised per channel with the VAE's
latent statistics (a preset name builds a random-init encoder, the untrained baseline); `PIXELS` is the
raw image, area-downsampled, as a baseline. A latent store gives the posterior means of its un-flipped
images, normalised with the store's statistics; a store of the embedded shapes gets every shapes probe
target (its images are shapes 0..N-1 of the store's seed), any other store its class labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from ..data.transforms import to_float
from ..metrics.features import FeatureExtractor
from .attributes import ProbeData, ProbeTask, shapes_data

if TYPE_CHECKING:
    from ..models.vae import AutoencoderKL

PIXELS = "pixels"
CKNNA_IMAGES = 2000  # CKNNA uses m x m kernels: the first 2000 probe images


def split_source(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare PATH or preset -> (its label, PATH)."""
    if "=" in spec and not Path(spec).exists():
        name, src = spec.split("=", 1)
        return name, src
    return model_label(spec), spec


def model_label(source: str) -> str:
    """A readable name: an export folder `<run>/export/vae` is named after its run."""
    path = Path(source)
    if path.is_dir():
        return path.parent.parent.name if path.name == "vae" and path.parent.name == "export" else path.name
    return path.stem if path.exists() else source


def _batches(dataset, indices: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    for s in range(0, len(indices), batch_size):
        idx = indices[s : s + batch_size].tolist()
        items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else [dataset[i] for i in idx]
        yield torch.stack([x for x, _ in items])  # (B, 3, H, W) uint8


@torch.no_grad()
def extract_features(
    source: str | torch.nn.Module, data, batch_size: int, device: torch.device, pixel_size: int = 16, bar=None
) -> np.ndarray:
    """(N, D) float32: flattened normalised posterior means of a VAE, or `PIXELS` downsampled images."""
    import torch.nn.functional as F

    out = []
    for x in _batches(data.dataset, data.indices, batch_size):
        x = to_float(x).to(device)  # (B, 3, H, W) in [-1, 1]
        if isinstance(source, str):
            f = F.interpolate(x, size=(pixel_size, pixel_size), mode="area")  # (B, 3, s, s)
        else:
            vae = cast("AutoencoderKL", source)  # a VAE module: encode and normalize_latents
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                z = vae.encode(x).mean  # (B, C, h, w)
            f = vae.normalize_latents(z.float())
        out.append(f.flatten(1).float().cpu().numpy())
        if bar is not None:
            bar.update(len(x))
    return np.concatenate(out)


def store_features(store, n: int) -> np.ndarray:
    """(n, C*h*w) float32: normalised posterior means of the first n un-flipped images of a store."""
    out = []
    for s in range(0, n, 4096):
        m = store.gather(np.arange(s, min(s + 4096, n)))  # (b, 2 flips, 2 [mean, std], C, h, w)
        out.append(store.stats.normalize(m[:, 0, 0].float()).flatten(1).numpy())
    return np.concatenate(out)


def store_probe_data(stores: list, num_images: int):
    """The images and probe targets of images 0..n-1 of latent stores that all hold the same images.

    A shapes store gets every shapes target (its images can also be rendered for --vae / --pixels);
    any other store its class labels only, with no images.
    """
    infos = [st.manifest["dataset"] for st in stores]
    keys = {(d["name"], d.get("seed"), d.get("path"), d["resolution"]) for d in infos}
    if len(keys) > 1:
        raise ValueError(
            f"the latent stores hold different images: {sorted(map(str, keys))}; probe each alone"
        )
    info, n = infos[0], min(num_images, *(len(st) for st in stores))
    if info["name"] == "shapes":
        return shapes_data(n, info["resolution"], info.get("seed", 0), info.get("scene", "full"))
    labels = stores[0].labels[:n].astype(np.int64)
    k = int(stores[0].num_classes)
    tasks = [ProbeTask("class", "categorical", "class", labels)] if k > 1 else []
    return ProbeData(info["name"], None, np.arange(n), tasks, labels, k, tuple(info.get("classes") or ()))


def teacher_features(
    data, name: str, weights: str | None, resolution: int, batch_size: int, device
) -> np.ndarray:
    """(n, D) pooled teacher features of the first CKNNA_IMAGES probe images."""
    fx = FeatureExtractor(name, weights, resolution=resolution, device=device, batch_size=batch_size)
    idx = data.indices[:CKNNA_IMAGES]
    return np.concatenate([fx.features(x).cpu().numpy() for x in _batches(data.dataset, idx, batch_size)])
