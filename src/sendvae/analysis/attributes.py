"""Probe targets per dataset: the embedded shapes, Fashion-MNIST, CelebA, AwA2 and DeepFashion.

Each adapter returns `ProbeData`: a dataset yielding (uint8 image (3, H, W), class label), the image
indices used, the probe tasks (targets aligned with those indices) and class labels.

Files read (all user-provided; nothing is downloaded):
  CelebA       root/list_attr_celeba.txt (line 1: N, line 2: 40 names, then `file v1 ... v40` with
               v in {-1, 1}) and images in root/img_align_celeba/.
  AwA2         root/classes.txt (`1\tantelope`), root/predicate-matrix-binary.txt (50 rows of 85 0/1),
               optional root/predicates.txt; images in root/JPEGImages/<class>/. An image's attributes
               are its class's row.
  DeepFashion  root/Anno/list_attr_cloth.txt (line 1: A, line 2: header, then `name type`) and
               root/Anno/list_attr_img.txt (line 1: N, line 2: header, then `img/... v1 ... vA`,
               v in {-1, 0, 1}, positive = present); images under root/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.fashion_mnist import CLASSES, DEFAULT_ROOT, FashionMNIST
from ..data.imagefolder import center_crop_adm, load_rgb, pil_to_tensor
from ..data.shapes import ShapesDataset
from ..data.shapes_config import scene_config

# Shapes attributes probed one by one, by group; `rotation` is left out (ill-defined for symmetric shapes).
SHAPES_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": ("shape",),
    "colour": ("colour", "fill_r", "fill_g", "fill_b"),
    "position": ("x", "y"),
    "size": ("size",),
    "background": ("background", "background_colour"),
    "second object": ("second_shape", "second_colour", "second_size", "second_x", "second_y"),
    "occlusion": ("occluded_fraction",),
}
MULTILABEL_GROUP = "attributes (multi-label)"


class AttributeFileError(ValueError):
    """An attribute file is missing data, malformed, or does not match the images."""


@dataclass
class ProbeTask:
    """One probe target. multilabel: (N, A) bool; categorical: (N,) int64, -1 = does not apply;
    continuous: (N,) float64, NaN = does not apply."""

    name: str
    kind: str
    group: str
    target: np.ndarray
    labels: tuple[str, ...] = ()


@dataclass
class ProbeData:
    """Images (dataset[indices[i]] is image i) with probe targets and class labels (N,)."""

    name: str
    dataset: torch.utils.data.Dataset | None  # None: a latent store's labels, without images
    indices: np.ndarray
    tasks: list[ProbeTask]
    classes: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] = field(default=())


# -- file parsers ----------------------------------------------------------------------------------------


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"attribute file {path} not found")
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


def _values(rows: list[list[str]], allowed: set[int], path: Path, first: int) -> np.ndarray:
    """Rows of integer tokens -> (N, A) int8, each value in `allowed` (file lines numbered from `first`)."""
    try:
        v = np.array(rows, dtype=np.int64)
    except ValueError:
        bad = next(i for i, r in enumerate(rows) if not all(t.lstrip("-").isdigit() for t in r))
        raise AttributeFileError(
            f"{path}:{first + bad}: non-integer attribute values {rows[bad][:8]}"
        ) from None
    odd = ~np.isin(v, sorted(allowed))
    if odd.any():
        i, j = np.argwhere(odd)[0]
        raise AttributeFileError(
            f"{path}:{first + i}: value {v[i, j]} in column {j + 1}; binary attributes must be one of "
            f"{sorted(allowed)}"
        )
    return v.astype(np.int8)


def _table(lines: list[str], path: Path, width: int, start: int) -> tuple[list[str], list[list[str]]]:
    """`name v1 ... v_width` lines -> (names, value tokens); every line must have width + 1 tokens."""
    names, rows = [], []
    for i, ln in enumerate(lines):
        tok = ln.split()
        if len(tok) != width + 1:
            raise AttributeFileError(
                f"{path}:{start + i}: {len(tok) - 1} values, expected {width} (one per attribute name)"
            )
        names.append(tok[0])
        rows.append(tok[1:])
    return names, rows


def _count(lines: list[str], path: Path) -> int:
    try:
        return int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise AttributeFileError(f"{path}:1: expected the number of entries, got {lines[:1]}") from None


def read_celeba_attributes(path: str | Path) -> tuple[list[str], tuple[str, ...], np.ndarray]:
    """list_attr_celeba.txt -> (image file names, 40 attribute names, (N, 40) bool)."""
    path = Path(path)
    lines = _lines(path)
    n = _count(lines, path)
    if len(lines) < 2:
        raise AttributeFileError(f"{path}: no attribute-name line")
    names = tuple(lines[1].split())
    files, rows = _table(lines[2:], path, len(names), 3)
    if len(files) != n:
        raise AttributeFileError(f"{path}: the header says {n} images but {len(files)} rows follow")
    return files, names, _values(rows, {-1, 1}, path, 3) > 0


def read_awa2_attributes(root: str | Path) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """AwA2 root -> (50 class names, 85 predicate names, (50, 85) bool predicate matrix)."""
    root = Path(root)
    classes = tuple(ln.split()[-1] for ln in _lines(root / "classes.txt"))
    mpath = root / "predicate-matrix-binary.txt"
    rows = [ln.split() for ln in _lines(mpath)]
    if len(rows) != len(classes):
        raise AttributeFileError(
            f"{mpath} has {len(rows)} rows but {root / 'classes.txt'} lists {len(classes)} classes"
        )
    width = len(rows[0])
    bad = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if bad is not None:
        raise AttributeFileError(f"{mpath}:{bad + 1}: {len(rows[bad])} values, line 1 has {width}")
    ppath = root / "predicates.txt"
    preds = tuple(ln.split()[-1] for ln in _lines(ppath)) if ppath.exists() else ()
    if not preds:
        preds = tuple(f"predicate_{j}" for j in range(width))
    if len(preds) != width:
        raise AttributeFileError(f"{ppath} names {len(preds)} predicates, the matrix has {width} columns")
    return classes, preds, _values(rows, {0, 1}, mpath, 1) > 0


def read_deepfashion_attributes(root: str | Path) -> tuple[list[str], tuple[str, ...], np.ndarray]:
    """DeepFashion root (with Anno/) -> (image paths relative to root, A names, (N, A) bool)."""
    anno = Path(root) / "Anno"
    cpath, ipath = anno / "list_attr_cloth.txt", anno / "list_attr_img.txt"
    cloth = _lines(cpath)
    a = _count(cloth, cpath)
    names = tuple(" ".join(ln.split()[:-1]) for ln in cloth[2:])  # names may hold spaces; type is last
    if len(names) != a:
        raise AttributeFileError(f"{cpath}: the header says {a} attributes but {len(names)} rows follow")
    lines = _lines(ipath)
    n = _count(lines, ipath)
    files, rows = _table(lines[2:], ipath, a, 3)
    if len(files) != n:
        raise AttributeFileError(f"{ipath}: the header says {n} images but {len(files)} rows follow")
    return files, names, _values(rows, {-1, 0, 1}, ipath, 3) > 0


# -- datasets --------------------------------------------------------------------------------------------


class FileListDataset(torch.utils.data.Dataset):
    """Image files, ADM-cropped to `resolution`: (uint8 (3, res, res), label)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, resolution: int) -> None:
        self.paths, self.labels, self.resolution = paths, labels, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, note = load_rgb(self.paths[i])
        if img is None:
            raise FileNotFoundError(f"cannot read image {self.paths[i]}: {note}")
        return pil_to_tensor(center_crop_adm(img, self.resolution)), int(self.labels[i])


def _subset(total: int, n: int, seed: int) -> np.ndarray:
    """n of range(total), seeded, in increasing order (all of them if n >= total)."""
    if n >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def _check_files(paths: list[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} {what} images named in the attribute file are missing, "
            f"e.g. {missing[0]}; does the attribute file belong to these images?"
        )


def _varies(values: np.ndarray, kind: str) -> bool:
    """Whether an attribute can be probed: two classes among its valid values, or a spread."""
    if kind == "continuous":
        v = values[np.isfinite(values)]
        return v.size > 1 and float(v.std()) > 0
    return np.unique(values[values >= 0]).size > 1


def shapes_data(num_images: int, resolution: int, seed: int = 0, scene: str = "full") -> ProbeData:
    """Shapes images 0..N-1 (dataset seed `seed`, `scene`): grouped attributes plus the multi-label set."""
    ds = ShapesDataset(scene_config(scene, resolution=resolution, seed=seed))
    idx = np.arange(num_images)
    table, specs = ds.attribute_table(idx), {s.name: s for s in ds.attribute_specs}
    tasks = [
        ProbeTask(name, specs[name].kind, group, table[name], specs[name].classes)
        for group, names in SHAPES_GROUPS.items()
        for name in names
        if _varies(table[name], specs[name].kind)  # a scene without textures has no texture angle
    ]
    binary = ds.binary_attribute_table(idx)
    names = tuple(k for k in binary if np.unique(binary[k]).size > 1)
    target = np.stack([binary[k] for k in names], 1)  # (N, A)
    tasks.append(ProbeTask("binary attributes", "multilabel", MULTILABEL_GROUP, target, names))
    classes = table["shape"].astype(np.int64)
    return ProbeData("shapes", ds, idx, tasks, classes, ds.num_classes, ds.class_names)


def load_probe_data(
    name: str, root: str | None, num_images: int, resolution: int, seed: int = 0, scene: str = "full"
) -> ProbeData:
    """The images and probe targets of dataset `name` (shapes, fashion-mnist, celeba, awa2, deepfashion);
    `scene`: the shapes scene."""
    if name == "shapes":
        return shapes_data(num_images, resolution, seed, scene)
    if name == "fashion-mnist":
        ds = FashionMNIST(root or DEFAULT_ROOT, split="test", resolution=resolution)
        idx = _subset(len(ds), num_images, seed)
        y = ds.labels[idx]
        tasks = [ProbeTask("class", "categorical", "class", y, CLASSES)]
        return ProbeData(name, ds, idx, tasks, y, len(CLASSES), CLASSES)
    if root is None:
        raise ValueError(
            f"--data {name} needs --data-path (the folder holding its images and attribute files)"
        )
    root_p = Path(root)
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    if name == "celeba":
        files, names, attrs = read_celeba_attributes(root_p / "list_attr_celeba.txt")
        paths, labels, class_names = [root_p / "img_align_celeba" / f for f in files], None, ()
    elif name == "deepfashion":
        files, names, attrs = read_deepfashion_attributes(root_p)
        paths, labels, class_names = [root_p / f for f in files], None, ()
    elif name == "awa2":
        class_names, names, matrix = read_awa2_attributes(root_p)
        paths, lab = [], []
        for k, c in enumerate(class_names):
            found = sorted((root_p / "JPEGImages" / c).glob("*.jpg"))
            paths += found
            lab += [k] * len(found)
        if not paths:
            raise FileNotFoundError(f"no images in {root_p / 'JPEGImages'}/<class>/*.jpg")
        labels = np.array(lab, np.int64)
        attrs = matrix[labels]  # (N, 85): each image inherits its class's predicates
    else:
        raise ValueError(f"unknown dataset {name!r}; choose shapes, fashion-mnist, celeba, awa2, deepfashion")
    idx = _subset(len(paths), num_images, seed)
    _check_files([paths[i] for i in idx], name)
    labels = labels if labels is not None else np.zeros(len(paths), np.int64)
    file_ds = FileListDataset(paths, labels, resolution)
    tasks = [ProbeTask("binary attributes", "multilabel", MULTILABEL_GROUP, attrs[idx], names)]
    if class_names:
        tasks.append(ProbeTask("class", "categorical", "class", labels[idx], class_names))
    k = len(class_names) or 1
    return ProbeData(name, file_ds, idx, tasks, labels[idx], k, tuple(class_names))
