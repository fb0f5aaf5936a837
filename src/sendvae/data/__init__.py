"""Datasets. Every dataset yields ``(image uint8 (3, H, W), label int)``; see ``transforms``.

ShapesDataset(resolution=64, seed=0)       the embedded procedural dataset (no files needed), with
                                           ground-truth attributes, masks and depth maps
ImageFolderDataset(root, resolution)       ImageNet-style class folders, ADM center crop
PreparedDataset(root)                      the output of ``sendvae prepare`` (memory-mapped shards)
FashionMNIST(root, split, resolution)      Fashion-MNIST IDX files
build_dataset(cfg)                         any of the above from a ``DataConfig`` (``data.config``)
"""

from __future__ import annotations

import torch

from .config import DataConfig
from .fashion_mnist import FashionMNIST
from .imagefolder import ImageFolderDataset, center_crop_adm
from .prepared import prepare_dataset
from .prepared_dataset import PreparedDataset
from .shapes import ShapesDataset
from .shapes_config import ATTRIBUTES, ShapesConfig, scene_config
from .transforms import to_float, to_uint8

__all__ = [
    "ATTRIBUTES",
    "DataConfig",
    "FashionMNIST",
    "ImageFolderDataset",
    "PreparedDataset",
    "ShapesConfig",
    "ShapesDataset",
    "build_dataset",
    "center_crop_adm",
    "prepare_dataset",
    "to_float",
    "to_uint8",
]


def build_dataset(cfg, seed: int = 0):
    """Dataset for a ``DataConfig`` (fields: name, path, resolution, shapes_length, shapes_scene, subset)."""
    ds = _build_dataset(cfg, seed)
    n = getattr(cfg, "subset", None)
    if n is None or cfg.name == "shapes":
        return ds
    if n < 1 or n > len(ds):
        raise ValueError(f"--data.subset {n}: the dataset has {len(ds)} images; pass 1..{len(ds)} or none")
    return FirstN(ds, n)


class FirstN(torch.utils.data.Dataset):
    """The first `n` items of a dataset, its class names kept (``classes`` / ``class_names``)."""

    def __init__(self, dataset, n: int) -> None:
        self.dataset, self.n = dataset, int(n)
        for attr in ("classes", "class_names", "num_classes", "resolution"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.dataset[i % self.n]


def _build_dataset(cfg, seed: int = 0):
    if cfg.name == "shapes":
        scene = getattr(cfg, "shapes_scene", "full")
        return ShapesDataset(
            scene_config(scene, resolution=cfg.resolution, seed=seed, length=cfg.shapes_length)
        )
    if cfg.path is None:
        raise ValueError(f"dataset {cfg.name!r} needs its folder: pass --data-path DIR")
    if cfg.name == "imagefolder":
        return ImageFolderDataset(cfg.path, cfg.resolution)
    if cfg.name == "prepared":
        ds = PreparedDataset(cfg.path)
        if ds.resolution != cfg.resolution:
            raise ValueError(
                f"prepared dataset {cfg.path} is at {ds.resolution} px but training asks for "
                f"{cfg.resolution} px; "
                f"pass --resolution {ds.resolution}, or prepare again with `sendvae prepare ... --resolution "
                f"{cfg.resolution}`"
            )
        return ds
    if cfg.name == "fashion-mnist":
        return FashionMNIST(cfg.path, "train", cfg.resolution)
    raise ValueError(f"unknown dataset {cfg.name!r}; choose shapes, prepared, imagefolder or fashion-mnist")
