"""Fashion-MNIST from its IDX files: a small real-image dataset that installs without network.

The Debian package `dataset-fashion-mnist` ships the four gzipped IDX files of the original release in
/usr/share/datasets/fashion-mnist/ (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz). The same names without .gz, and torchvision's
layout (root/FashionMNIST/raw/), are found too.

IDX format: 2 zero bytes, 1 byte element type (0x08 = uint8), 1 byte number of dimensions, then one
big-endian int32 per dimension, then the data in row-major order. So the magic number of the image
file is 0x00000803 (uint8, 3 dims: N, 28, 28) and of the label file 0x00000801 (uint8, 1 dim: N).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}  # fmt: skip
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


class IDXFormatError(ValueError):
    """A file is not a valid IDX file (bad magic number, unknown type, wrong length)."""


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw, detected from its first bytes) into a numpy array."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise IDXFormatError(f"{path}: corrupt gzip stream ({e}); download the file again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise IDXFormatError(
            f"{path}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; expected 0000 then a type byte "
            "(08 for uint8) and the number of dimensions, e.g. 00000803 for images, 00000801 for labels"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise IDXFormatError(
            f"{path}: IDX magic {raw[:4].hex()} says {ndim} dimensions, expected {expect_ndim} "
            f"(magic {0x800 + expect_ndim:08x}); is this the right file?"
        )
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4")) if ndim else ()
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise IDXFormatError(f"{path}: {len(raw)} bytes, but its header {shape} needs {expected}; truncated?")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_fashion_mnist_files(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(images, labels) IDX paths of a split; FileNotFoundError naming what was looked for."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose from {sorted(SPLIT_PREFIX)}")
    root, prefix = Path(root), SPLIT_PREFIX[split]
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = []
    for name in names:
        candidates = [d / (name + ext) for d in (root, root / "FashionMNIST" / "raw") for ext in (".gz", "")]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            raise FileNotFoundError(
                f"Fashion-MNIST {split} split not found: expected {names[0]}[.gz] and {names[1]}[.gz] in "
                f"{root}. On Debian/Ubuntu `apt-get install dataset-fashion-mnist` installs them in "
                f"{DEFAULT_ROOT}; or pass the folder that holds them."
            )
        found.append(hit)
    return found[0], found[1]


class FashionMNIST(Dataset):
    """Fashion-MNIST as (uint8 (3, res, res), label); 28 px resized with `interpolation`.

    rgb=False yields (1, res, res). Images are resized on access (a 28 px PIL resize is cheap).
    """

    def __init__(
        self,
        root: str | os.PathLike = DEFAULT_ROOT,
        split: str = "train",
        resolution: int = 32,
        rgb: bool = True,
        interpolation: str = "bicubic",
    ) -> None:
        if interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {interpolation!r}; choose from {sorted(_RESAMPLE)}")
        images_path, labels_path = find_fashion_mnist_files(root, split)
        self.images = read_idx(images_path, expect_ndim=3)  # (N, 28, 28) uint8
        self.labels = read_idx(labels_path, expect_ndim=1).astype(np.int64)  # (N,)
        if self.images.dtype != np.uint8 or len(self.images) != len(self.labels):
            raise IDXFormatError(
                f"{images_path} holds {self.images.dtype} {self.images.shape}, {labels_path} "
                f"{len(self.labels)} labels; expected uint8 images and one label per image"
            )
        self.root, self.split, self.resolution = Path(root), split, int(resolution)
        self.rgb, self.interpolation = rgb, interpolation
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]  # (28, 28)
        if img.shape != (self.resolution, self.resolution):
            pil = Image.fromarray(img)
            img = np.asarray(pil.resize((self.resolution, self.resolution), _RESAMPLE[self.interpolation]))
        x = torch.from_numpy(np.array(img))[None]  # (1, res, res)
        return (x.expand(3, -1, -1).contiguous() if self.rgb else x), int(self.labels[i])
