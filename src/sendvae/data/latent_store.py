"""The latent store: VAE posteriors of a dataset, cached once for the diffusion stage.

Layout of a store folder (written by `sendvae cache-latents`):
    ROOT/manifest.json               the VAE (weights fingerprint + config), dataset, shapes, shard list
                                     and the per-channel latent statistics; written last, by rank 0
    ROOT/plan.json                   settings of the run, to refuse resuming with another VAE or dataset
    ROOT/shard-00000.moments.npy     (n, 2 flips, 2 (mean, std), C, h, w) float32 (or float16)
    ROOT/shard-00000.labels.npy      int64 (n,)
    ROOT/shard-00000.features.npy    float16 (n, 2 flips, N tokens, D): teacher patch tokens (optional)
    ROOT/shard-00000.json            the shard's record (counts, sizes, float64 moment sums); its
                                     presence marks the shard as complete

Flip index 0 is the image, 1 its horizontal flip (encoded, not a flipped latent: the encoder is not
flip-equivariant). Training draws z = mean + std * eps every step (`draw_latents`), so the model sees
fresh posterior samples as in online encoding, at the cost of storing std beside mean.

Why float32 moments by default: the cache then equals the encoder's fp32 output bit for bit. float16
halves the size, but rounds the mean by up to 2^-11 of its magnitude (|mean| ~ 10 -> 5e-3), which
can exceed the posterior std of the low-KL VAEs used here (KL weight 1e-6); `--dtype fp16` is there
when disk matters more. Teacher tokens are float16: they are only a cosine target.

Latent statistics (per channel c, float64): mean_c = E[mu], var_c = E[mu^2 + sigma^2] - mean_c^2, the
exact moments of z ~ q(z|x) over all images, both flips and all positions, computed from the stored
values, so they are the statistics of exactly what the trainer draws.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from sendvae.models.latent_stats import LatentStats
from sendvae.runtime.checkpoint import atomic_write_bytes, atomic_write_json

# the manifest's schema and reader, re-exported: callers keep `latent_store.read_manifest`, `.PLAN_FILE`
from .store_manifest import FORMAT_VERSION, MANIFEST_FILE, PLAN_FILE, STORE_DTYPES, read_manifest

__all__ = [
    "FEATURE_DTYPE",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PLAN_FILE",
    "STAT_KEYS",
    "STORE_DTYPES",
    "LatentStore",
    "LatentStoreMismatchError",
    "bytes_per_image",
    "completed_shard",
    "default_shard_size",
    "draw_latents",
    "moment_sums",
    "random_flips",
    "read_manifest",
    "select_flip",
    "shard_stem",
    "state_fingerprint",
    "stats_from_sums",
    "vae_fingerprint",
    "write_shard",
]

FEATURE_DTYPE = np.float16
STAT_KEYS = ("latent_mean", "latent_std")  # VAE buffers left out of the fingerprint


class LatentStoreMismatchError(ValueError):
    """A latent store does not belong to the VAE (or settings) it is used with."""


# -- fingerprints and sizes ------------------------------------------------------------------------------


def state_fingerprint(module: nn.Module, skip: tuple[str, ...] = ()) -> str:
    """sha256 over a module's state-dict tensors, sorted by name, each as float32 (ints as they are).

    Names and shapes are hashed too. Casting to float32 makes the hash independent of the dtype the
    weights happen to be held in, as long as the values are the same.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if name in skip:
            continue
        t = t.detach().cpu()
        arr = (t.float() if t.is_floating_point() else t).contiguous().numpy()
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}\n".encode())
        h.update(arr.reshape(-1).view(np.uint8))
    return h.hexdigest()


def vae_fingerprint(vae: nn.Module) -> str:
    """Content hash of a VAE's weights (latent statistics buffers excluded: they do not change z)."""
    return state_fingerprint(vae, skip=STAT_KEYS)


def bytes_per_image(
    latent_shape: tuple[int, int, int], dtype: str = "fp32", tokens: int = 0, dim: int = 0
) -> dict[str, int]:
    """Payload bytes of one image: moments 2 x 2 x C x h x w x itemsize, label 8, features 2 x N x D x 2."""
    c, h, w = latent_shape
    sizes = {
        "moments": 2 * 2 * c * h * w * np.dtype(STORE_DTYPES[dtype]).itemsize,
        "label": 8,
        "features": 2 * tokens * dim * np.dtype(FEATURE_DTYPE).itemsize,
    }
    sizes["total"] = sum(sizes.values())
    return sizes


def default_shard_size(image_bytes: int) -> int:
    """About 256 MiB per shard, between 16 and 4096 images."""
    return int(max(16, min(4096, (256 << 20) // max(1, image_bytes))))


# -- shards ----------------------------------------------------------------------------------------------


def shard_stem(k: int) -> str:
    return f"shard-{k:05d}"


def _save_npy(path: Path, arr: np.ndarray) -> int:
    """np.save through a temp file + rename; returns the file size."""
    atomic_write_bytes(path, lambda f: np.lib.format.write_array(f, np.ascontiguousarray(arr)))
    return path.stat().st_size


def moment_sums(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel float64 sums of mu and mu^2 + sigma^2 over (n, flips, h, w), and the count."""
    m = moments.astype(np.float64)  # (n, 2, 2, C, h, w)
    mu, sd = m[:, :, 0], m[:, :, 1]  # (n, 2, C, h, w)
    axes = (0, 1, 3, 4)
    return mu.sum(axes), (mu * mu + sd * sd).sum(axes), mu.shape[0] * mu.shape[1] * mu.shape[3] * mu.shape[4]


def stats_from_sums(s1: np.ndarray, s2: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """mean = E[z], std = sqrt(E[z^2] - mean^2) per channel, in float64."""
    mean = s1 / count
    return mean, np.sqrt(np.maximum(s2 / count - mean * mean, 1e-24))


def write_shard(
    root: Path, k: int, start: int, stop: int, moments: np.ndarray, labels: np.ndarray,
    features: np.ndarray | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write shard k (source items [start, stop)) and, last, its record; returns the record."""
    stem = shard_stem(k)
    files = {"moments": f"{stem}.moments.npy", "labels": f"{stem}.labels.npy"}
    arrays = {"moments": moments, "labels": labels.astype(np.int64)}
    if features is not None:
        files["features"] = f"{stem}.features.npy"
        arrays["features"] = features
    sizes = {key: _save_npy(root / name, arrays[key]) for key, name in files.items()}
    s1, s2, count = moment_sums(moments)
    record = dict(
        shard=k, start=start, stop=stop, count=int(len(labels)), files=files, sizes=sizes,
        sum=s1.tolist(), sum_sq=s2.tolist(), sum_count=int(count),
    )  # fmt: skip
    atomic_write_json(record, root / f"{stem}.json")  # the commit marker
    return record


def completed_shard(root: Path, k: int, start: int, stop: int) -> dict[str, Any] | None:
    """Shard k's record if all its files are present with the recorded sizes, else None."""
    try:
        rec = json.loads((root / f"{shard_stem(k)}.json").read_text())
        ok = (rec["start"], rec["stop"]) == (start, stop) and all(
            (root / name).stat().st_size == rec["sizes"][key] for key, name in rec["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if ok else None


# -- reader ----------------------------------------------------------------------------------------------


def select_flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """x (B, 2, ...) -> (B, ...): entry flip[b] (0 = image, 1 = its mirror) of each sample."""
    return x[torch.arange(x.shape[0], device=x.device), flip.to(x.device).long()]


def random_flips(batch: int, device: torch.device | str, generator: torch.Generator | None = None):
    """(B,) int64 of 0/1, one fair coin per sample."""
    return torch.randint(0, 2, (batch,), generator=generator, device=device)


def draw_latents(
    batch_moments: torch.Tensor,
    flip_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """z = mean + std * eps for each sample's chosen flip: (B, 2, 2, C, h, w) -> (B, C, h, w) float32.

    flip_mask: (B,) bool/0-1 (None: a random flip per sample from `generator`); pass the same mask to
    `select_flip` for cached teacher tokens. Runs on the moments' device; raw (un-normalised) latents.
    """
    if batch_moments.ndim != 6 or batch_moments.shape[1:3] != (2, 2):
        raise ValueError(f"expected moments (B, 2, 2, C, h, w), got {tuple(batch_moments.shape)}")
    if flip_mask is None:
        flip_mask = random_flips(batch_moments.shape[0], batch_moments.device, generator)
    m = select_flip(batch_moments, flip_mask).float()  # (B, 2, C, h, w)
    mean, std = m[:, 0], m[:, 1]
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * eps


class LatentStore(Dataset):
    """A latent store as a dataset: (moments (2, 2, C, h, w), label), or with_features=True:
    (moments, teacher tokens (2, N, D) float16, label). Values come in the stored dtype, uncast.

    Shards are memory-mapped lazily, once per process (DataLoader workers map their own).
    """

    def __init__(self, root: str | os.PathLike, with_features: bool = False) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        for s in self.shards:
            for key, name in s["files"].items():
                p = self.root / name
                if not p.is_file() or p.stat().st_size != s["sizes"][key]:
                    raise FileNotFoundError(f"{p} is missing or has the wrong size; cache the latents again")
        if with_features and self.manifest["teacher"] is None:
            raise ValueError(
                f"{self.root} holds no teacher features; cache again with "
                "`sendvae cache-latents --enc-type NAME`"
            )
        self.with_features = with_features
        self._offsets = np.cumsum([0] + [s["count"] for s in self.shards])  # shard k: [off[k], off[k+1])
        self.labels = np.concatenate([self._check_arrays(k) for k in range(len(self.shards))])
        stats = self.manifest["latent_stats"]
        # exact moments over every image and its mirror (cache-latents); what a SiT trained here uses
        self.stats = LatentStats(
            tuple(stats["mean"]), tuple(stats["std"]), self.manifest["vae"]["fingerprint"]
        )
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._pid = os.getpid()

    def _check_arrays(self, k: int) -> np.ndarray:
        """Shard k's arrays agree with the manifest (count, shapes, dtypes, labels < num_classes): a store
        whose arrays say otherwise is refused, never read in part. Returns the shard's labels."""
        rec, m = self.shards[k], self.manifest
        count, (c, h, w) = rec["count"], m["latent_shape"]
        expected: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            "moments": ((count, 2, 2, c, h, w), np.dtype(STORE_DTYPES[m["dtype"]])),
            "labels": ((count,), np.dtype(np.int64)),
        }
        if m["teacher"] is not None:
            t = m["teacher"]
            expected["features"] = ((count, 2, t["tokens"], t["embed_dim"]), np.dtype(FEATURE_DTYPE))
        arrays = {}
        for key, (shape, dtype) in expected.items():
            p = self.root / rec["files"][key]
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise ValueError(f"{p} is not a readable .npy array ({e}); cache the latents again") from None
            if arr.shape != shape or (dtype is not None and arr.dtype != dtype):
                raise ValueError(
                    f"{p} holds {arr.dtype} {arr.shape}, but {self.root / MANIFEST_FILE} records "
                    f"{dtype} {shape} (shards[{k}].count {count}); cache the latents again"
                )
            arrays[key] = arr
        labels = np.array(arrays["labels"])
        n = self.num_classes
        if len(labels) and (labels.min() < 0 or labels.max() >= n):
            raise ValueError(
                f"{self.root / rec['files']['labels']} holds labels outside [0, {n}) (dataset.num_classes "
                f"of {self.root / MANIFEST_FILE}); cache the latents again"
            )
        return labels

    # -- metadata
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["dataset"]["num_classes"])

    @property
    def vae_fingerprint(self) -> str:
        return self.manifest["vae"]["fingerprint"]

    @property
    def feature_shape(self) -> tuple[int, int] | None:
        """(tokens, dim) of the cached teacher features, or None."""
        t = self.manifest["teacher"]
        return None if t is None else (t["tokens"], t["embed_dim"])

    def check_vae(self, vae_or_fingerprint: nn.Module | str) -> None:
        """Raise LatentStoreMismatchError unless the store was encoded by this VAE (same weights)."""
        fp = (
            vae_or_fingerprint if isinstance(vae_or_fingerprint, str) else vae_fingerprint(vae_or_fingerprint)
        )
        if fp != self.vae_fingerprint:
            src = self.manifest["vae"]["source"]
            raise LatentStoreMismatchError(
                f"latent store {self.root} was encoded by another VAE: store fingerprint "
                f"{self.vae_fingerprint} (from {src}), this VAE {fp}. Cache the latents again with this "
                f"VAE (`sendvae cache-latents --vae ...`) or use the VAE the store came from"
            )

    # -- access
    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _map(self, k: int, key: str) -> np.ndarray:
        if self._pid != os.getpid():  # a forked worker: map the files anew
            self._maps, self._pid = {}, os.getpid()
        if (k, key) not in self._maps:
            self._maps[k, key] = np.load(self.root / self.shards[k]["files"][key], mmap_mode="r")
        return self._maps[k, key]

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return k, i - int(self._offsets[k])

    def __getitem__(self, i: int) -> tuple:
        k, j = self._locate(int(i))
        moments = torch.from_numpy(np.array(self._map(k, "moments")[j]))  # (2, 2, C, h, w), a copy
        label = int(self.labels[int(self._offsets[k]) + j])
        if self.with_features:
            return moments, torch.from_numpy(np.array(self._map(k, "features")[j])), label
        return moments, label

    def gather(self, indices: Any, key: str = "moments") -> torch.Tensor:
        """Rows of many images at once, e.g. moments (B, 2, 2, C, h, w), read shard by shard."""
        idx, n = np.asarray(indices, dtype=np.int64), len(self)
        if idx.ndim != 1 or not len(idx):
            raise ValueError(f"gather needs a non-empty list of indices, got shape {idx.shape}")
        if idx.min() < -n or idx.max() >= n:
            raise IndexError(f"indices out of range for {n} images")
        idx = idx % n
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        first = self._map(int(shard[0]), key)
        out = np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            local = idx[sel] - self._offsets[k]
            order = np.argsort(local)  # increasing offsets: sequential reads in the map
            out[sel[order]] = self._map(int(k), key)[local[order]]
        return torch.from_numpy(out)

    def batches(
        self,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        epoch: int = 0,
        normalize: bool = True,
        drop_last: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (z (B, C, h, w) float32, labels (B,)) on `device`, shuffled by (seed, epoch).

        Each sample gets a random flip and fresh noise, drawn on the device; z is normalised with the
        store's statistics unless normalize=False.
        """
        device = torch.device(device)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        g = torch.Generator(device=device).manual_seed(seed * 100003 + epoch)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for b in range(0, stop, batch_size):
            idx = order[b : b + batch_size].numpy()
            moments = self.gather(idx).to(device, non_blocking=True)
            z = draw_latents(moments, generator=g)
            labels = torch.from_numpy(self.labels[idx]).to(device)
            yield (self.stats.normalize(z) if normalize else z), labels

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}
