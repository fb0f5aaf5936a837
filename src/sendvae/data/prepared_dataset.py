"""A prepared folder (`data.prepared`: index.json + memory-mappable shards) read back as a dataset."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .prepared import FORMAT_VERSION, INDEX_FILE, PLAN_FILE


def read_index(root: str | os.PathLike) -> dict[str, Any]:
    """Parse and check OUT/index.json."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        hint = (
            " (an interrupted run: run the same command again)" if (Path(root) / PLAN_FILE).exists() else ""
        )
        raise FileNotFoundError(
            f"{root} is not a prepared dataset: {INDEX_FILE} is missing{hint}; create one with "
            "`sendvae prepare SRC OUT`"
        )
    index = json.loads(path.read_text())
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: prepared format version {index.get('format_version')!r} is not supported by this "
            f"sendvae (it reads version {FORMAT_VERSION}); prepare the dataset again with this version"
        )
    return index


class PreparedDataset(Dataset):
    """A prepared folder as a dataset: (uint8 tensor (3, H, W), label).

    Shards are memory-mapped lazily, once per process, so the dataset is cheap to pickle and safe to
    use with many DataLoader workers (each worker maps the shards it touches; the page cache is shared).
    indices: an optional subset (positions into the full dataset).
    """

    def __init__(self, root: str | os.PathLike, indices: Any = None) -> None:
        self.root = Path(root)
        index = read_index(self.root)
        self.resolution: int = index["resolution"]
        self.classes: list[str] = index["classes"]
        self.shards: list[dict[str, Any]] = index["shards"]
        for s in self.shards:
            path = self.root / s["file"]
            if not path.is_file() or path.stat().st_size != s["size"]:
                raise FileNotFoundError(f"shard {path} is missing or has the wrong size; prepare again")
        self._offsets = np.cumsum([0] + [s["count"] for s in self.shards])  # shard k: [off[k], off[k+1])
        self.labels = np.concatenate([np.load(self.root / s["labels"]) for s in self.shards]).astype(np.int64)
        if len(self.labels) != self._offsets[-1]:
            raise ValueError(
                f"{self.root}: labels hold {len(self.labels)} entries, index says {self._offsets[-1]}"
            )
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        if (
            self.indices is not None
            and len(self.indices)
            and not (0 <= self.indices.min() and self.indices.max() < len(self.labels))
        ):
            raise IndexError(f"indices must lie in [0, {len(self.labels)})")
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    @property
    def num_classes(self) -> int:
        return max(len(self.classes), 1)

    def __len__(self) -> int:
        return len(self.labels) if self.indices is None else len(self.indices)

    def _shard(self, k: int) -> np.ndarray:
        if self._pid != os.getpid():  # a forked worker: map the files anew
            self._maps, self._pid = {}, os.getpid()
        if k not in self._maps:
            self._maps[k] = np.load(self.root / self.shards[k]["file"], mmap_mode="r")  # (N, 3, H, W)
        return self._maps[k]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        g = int(i % n if self.indices is None else self.indices[i])
        k = int(np.searchsorted(self._offsets, g, side="right")) - 1
        img = np.array(self._shard(k)[g - self._offsets[k]])  # copy out of the read-only map
        return torch.from_numpy(img), int(self.labels[g])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def verify(self) -> None:
        """Recompute every shard's sha1 and compare with the index; raises ValueError on a mismatch."""
        bad = []
        for s in self.shards:
            h = hashlib.sha1()
            with open(self.root / s["file"], "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            if h.hexdigest() != s["sha1"]:
                bad.append(s["file"])
        if bad:
            raise ValueError(f"{self.root}: checksum mismatch in {', '.join(bad)}; prepare again")
