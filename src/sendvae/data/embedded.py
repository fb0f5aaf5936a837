"""The embedded example's images: Fashion-MNIST where it is installed, else the procedural shapes.

Fashion-MNIST (Debian / Ubuntu package ``dataset-fashion-mnist``, installed without network) is the
embedded *real* dataset: 70000 grey 28 px photographs of 10 garment classes. The pipelines feed it as

* 32 px, resized (bicubic, ``data.fashion_mnist``): 32 is 28 rounded up to a size every latent grid
  divides (f4 -> 8 x 8, f8 -> 4 x 4) and the teacher's stride-16 grid takes at 64 px input. The garment
  fills the frame, so every latent token describes it; padding 2 px instead would spend a quarter of an
  8 x 8 grid's tokens on the black border. Upsampling 28 -> 32 adds no detail and loses none.
* RGB, the grey copied to the three channels: the teacher, LPIPS, the Inception and every VAE preset take
  RGB, and a 3-channel input layer costs nothing that matters. The judge (``evaluation.judge``) reads the
  channel mean, so a faint colour cast of a generated image changes nothing there.

Splits, disjoint by construction:
  train      the 60000 training images: VAE, SiT and the judge train on them (``data_config``).
  reference  test images 0..4999: FD reference statistics and the class probe's held-out check.
  eval       test images 5000..9999: what the VAE reconstructs, and the "other real images" floor.
The shapes stand-in keeps the split names and draws each from its own seed (1001, 1002, 1003 + seed).

Where Fashion-MNIST is absent, `resolve` says so in one line (how to get it) and falls back to the shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig
from .fashion_mnist import CLASSES, DEFAULT_ROOT, FashionMNIST, find_fashion_mnist_files
from .shapes import ShapesDataset
from .shapes_config import scene_config

EMBEDDED = ("fashion-mnist", "shapes")
FMNIST_TEST_HALF = 5000  # test images per held-out part (reference | eval)
_SHAPES_SEED = {"train": 0, "reference": 1001, "probe": 1002, "eval": 1003, "judge": 1005}
INSTALL_HINT = (
    "install it with `apt-get install -y dataset-fashion-mnist` (sudo where you are not root), pass its "
    "folder with --data-path, or add --allow-download to fetch it with torchvision"
)


@dataclass(frozen=True)
class Embedded:
    """Which embedded dataset a pipeline runs on, resolved: name, folder (Fashion-MNIST), scene (shapes)."""

    name: str
    path: str | None
    resolution: int
    scene: str = "simple"
    note: str | None = None  # why the shapes stand in (None: the dataset asked for)

    @property
    def classes(self) -> tuple[str, ...]:
        if self.name == "fashion-mnist":
            return CLASSES
        return tuple(scene_config(self.scene).shapes)

    @property
    def description(self) -> str:
        if self.name == "fashion-mnist":
            return f"Fashion-MNIST ({self.resolution} px, grey as RGB, 10 garment classes)"
        return f"procedural shapes ({self.resolution} px, scene `{self.scene}`, {len(self.classes)} classes)"

    def data_config(self, num_images: int | None = None, seed: int = 0) -> DataConfig:
        """The training split as a ``DataConfig`` (its first `num_images` images; shapes: as many)."""
        if self.name == "fashion-mnist":
            return DataConfig("fashion-mnist", path=self.path, resolution=self.resolution, subset=num_images)
        return DataConfig(
            "shapes",
            resolution=self.resolution,
            shapes_length=num_images or 1_000_000,
            shapes_scene=self.scene,
        )

    def split(self, part: str, offset: int = 0) -> torch.utils.data.Dataset:
        """A held-out part (`reference`, `eval`, `probe`, `judge`) or `train`, as (uint8 (3, H, W), label).

        offset: shapes only, shifts the part's seed (a run's own draws); Fashion-MNIST's parts are fixed.
        """
        if part not in _SHAPES_SEED:
            raise ValueError(f"unknown split {part!r}; choose from {', '.join(_SHAPES_SEED)}")
        if self.name == "shapes":
            seed = _SHAPES_SEED[part] + offset
            return ShapesDataset(scene_config(self.scene, resolution=self.resolution, seed=seed))
        if part in ("train", "judge"):
            return FashionMNIST(self.path or DEFAULT_ROOT, "train", self.resolution)
        test = FashionMNIST(self.path or DEFAULT_ROOT, "test", self.resolution)
        # probe: the class probe's fit set, drawn from the reference half (the judge never sees test images)
        start = FMNIST_TEST_HALF if part == "eval" else 0
        return _Range(test, start, FMNIST_TEST_HALF)


class _Range(torch.utils.data.Dataset):
    def __init__(self, dataset, start: int, n: int) -> None:
        self.dataset, self.start, self.n = dataset, start, min(n, len(dataset) - start)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[self.start + i]


def fashion_mnist_found(path: str | os.PathLike | None) -> str | None:
    """None when both splits' IDX files are in `path` (default: the Debian folder), else why not."""
    root = Path(path or DEFAULT_ROOT)
    try:
        for split in ("train", "test"):
            find_fashion_mnist_files(root, split)
    except FileNotFoundError:
        return f"Fashion-MNIST not found in {root}"
    return None


def download_fashion_mnist(root: str | os.PathLike) -> Path:
    """Fetch Fashion-MNIST with torchvision into ROOT/FashionMNIST/raw (needs a network); returns ROOT."""
    from torchvision.datasets import FashionMNIST as TVFashionMNIST  # only for the opt-in download

    for train in (True, False):
        TVFashionMNIST(str(root), train=train, download=True)
    return Path(root)


def resolve(
    name: str, path: str | None, resolution: int, scene: str = "simple", fallback: bool = True
) -> Embedded:
    """The embedded dataset to run on: `name` when present; Fashion-MNIST missing -> the shapes with a note
    (fallback) or a one-line FileNotFoundError. A given `path` must hold Fashion-MNIST (no fallback)."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded dataset {name!r}; choose from {', '.join(EMBEDDED)}")
    if name == "shapes":
        return Embedded("shapes", None, resolution, scene)
    why = fashion_mnist_found(path)
    if why is None:
        # validate the files now (a truncated or foreign IDX file is one error line, not a wrong number)
        for split in ("train", "test"):
            FashionMNIST(path or DEFAULT_ROOT, split, resolution)
        return Embedded("fashion-mnist", str(Path(path or DEFAULT_ROOT)), resolution, scene)
    if path is not None or not fallback:
        raise FileNotFoundError(f"{why}: {INSTALL_HINT}")
    return Embedded(
        "shapes", None, resolution, scene, note=f"{why}, so this runs on the shapes; {INSTALL_HINT}"
    )
