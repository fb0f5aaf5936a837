"""Datasets. Every dataset yields ``(image uint8 (3, H, W), label int)``; see ``transforms``.

ShapesDataset(resolution=64, seed=0)       the embedded procedural dataset (no files needed), with
                                           ground-truth attributes, masks and depth maps
ImageFolderDataset(root, resolution)       ImageNet-style class folders, ADM center crop
PreparedDataset(root)                      the output of ``sendvae prepare`` (memory-mapped shards)
FashionMNIST(root, split, resolution)      Fashion-MNIST IDX files
build_dataset(cfg)                         any of the above from a ``DataConfig`` (``data.config``)
"""

from __future__ import annotations

from .config import DataConfig
from .fashion_mnist import FashionMNIST
from .imagefolder import ImageFolderDataset, center_crop_adm
from .prepared import PreparedDataset, prepare_dataset
from .shapes import ATTRIBUTES, ShapesConfig, ShapesDataset, scene_config
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
    """Dataset for a ``DataConfig`` (fields: name, path, resolution, shapes_length, shapes_scene)."""
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
