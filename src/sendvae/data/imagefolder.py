"""ImageNet-style image folders with the ADM center crop.

`center_crop_adm` is the preprocessing of guided-diffusion (ADM) and DiT: the reference batches and
every ImageNet FID number of the field are computed on images cropped this way, so it is reproduced
exactly (box-filter halving, then one bicubic resize of the short side, then a center crop). Two
things it deliberately does not do, because the reference does not: JPEG draft decoding (faster, but
different pixels) and EXIF orientation.

`load_rgb` is the one place where a file becomes an RGB image. It never raises for a bad file: it
returns the reason instead, so `sendvae prepare` and the dataset below can skip and count bad files.

`scan_image_folder` is the one listing of an image folder (the dataset and `sendvae prepare` both use
it). It follows symlinks, since a class folder linked to another disk is ordinary, but enters each real
directory once: a link back up the tree (`cls/up -> ..`) or to itself (`a -> .`) would otherwise
multiply the images or never end.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp",
)  # fmt: skip


def center_crop_adm(img: Image.Image, resolution: int) -> Image.Image:
    """ADM/DiT center crop of an RGB image to (resolution, resolution).

    1. While the short side is >= 2 * resolution, halve both sides (floor) with a box filter: a cheap,
       alias-free reduction.
    2. Bicubic resize so the short side equals resolution: scale = resolution / short side, new size
       round(x * scale) per side (so the long side rounds, the short side lands exactly).
    3. Crop the centre: offsets ((h - res) // 2, (w - res) // 2).
    Images smaller than `resolution` are upsampled by step 2.
    """
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize(
        (round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.Resampling.BICUBIC
    )
    w, h = img.size
    top, left = (h - resolution) // 2, (w - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit grayscale keeps its top 8 bits (PIL's own conversion clips)."""
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    with warnings.catch_warnings():
        # Palette images with transparency warn on conversion; dropping alpha is what ADM does.
        warnings.simplefilter("ignore")
        return img.convert("RGB")


def load_rgb(path: str | os.PathLike) -> tuple[Image.Image | None, str]:
    """Read one image file as RGB; never raises for a bad file.

    Returns (image, note):
      - (RGB image, "")       the file was already RGB;
      - (RGB image, mode)     converted from `mode` ("L", "CMYK", "RGBA", "P", ...);
      - (None, reason)        unusable: "empty", "unidentified" (not an image), "truncated",
                              "decode_error: <message>" or "unreadable: <message>".
    """
    try:
        if os.path.getsize(path) == 0:
            return None, "empty"
        with Image.open(path) as im:
            im.load()  # decode now, inside the try: truncation only shows up here
            mode = im.mode
            rgb = im.copy() if mode == "RGB" else _to_rgb(im)
    except UnidentifiedImageError:
        return None, "unidentified"
    except OSError as e:
        msg = str(e)
        if "truncated" in msg.lower() or "broken data stream" in msg:
            return None, "truncated"
        if isinstance(e, (FileNotFoundError, PermissionError)):
            return None, f"unreadable: {msg}"
        return None, f"decode_error: {msg}"
    except Exception as e:  # malformed headers raise ValueError, SyntaxError, struct.error, ...
        return None, f"decode_error: {type(e).__name__}: {e}"
    return rgb, "" if mode == "RGB" else mode


def _is_image(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions) and not name.startswith(".")


class _DirWalk:
    """Directories under one root, following symlinks, each real directory (st_dev, st_ino) once.

    A directory met again (a symlink loop, or two links to one place) is skipped and remembered in
    `skipped` as (path, the path it was first entered by). Among siblings, real folders are claimed
    before symlinks, so the link is what gets skipped when a link and its target sit side by side.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: dict[tuple[int, int], Path] = {}
        self.skipped: list[tuple[Path, Path]] = []
        self.claim([root])

    def claim(self, dirs: list[Path]) -> list[Path]:
        """The directories of `dirs` not entered before (order kept), now marked as entered."""
        keep = set()
        for d in sorted(dirs, key=os.path.islink):  # stable: real folders first, then links
            try:
                st = os.stat(d)
            except OSError:  # vanished or unreadable: os.walk could not list it either
                continue
            key = (st.st_dev, st.st_ino)
            if key in self.seen:
                self.skipped.append((d, self.seen[key]))
            else:
                self.seen[key] = d
                keep.add(d)
        return [d for d in dirs if d in keep]

    def files(self, top: Path) -> Iterator[Path]:
        """Every file under `top` (claimed already), depth first, names sorted at each level."""
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            # Pruning in place is how os.walk (top-down) is told not to descend.
            dirnames[:] = [d.name for d in self.claim([Path(dirpath, n) for n in sorted(dirnames)])]
            for name in sorted(filenames):
                yield Path(dirpath, name)

    def warn_skipped(self) -> None:
        if not self.skipped:
            return

        def rel(p: Path) -> str:
            return str(p.relative_to(self.root))

        shown = ", ".join(f"{rel(d)} (same folder as {rel(first)})" for d, first in self.skipped[:5])
        more = f", ... ({len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
        log.warning(
            "image folder %s: skipped %d folder(s) reached again through a symlink (a loop or a duplicate "
            "link), each scanned once: %s%s",
            self.root, len(self.skipped), shown, more,
        )  # fmt: skip


def _walk_images(folder: Path, extensions: tuple[str, ...], walk: _DirWalk) -> tuple[list[Path], list[Path]]:
    """All files under folder, split into (images by extension, other files)."""
    images: list[Path] = []
    others: list[Path] = []
    for path in walk.files(folder):
        (images if _is_image(path.name, extensions) else others).append(path)
    return images, others


def scan_image_folder(
    root: str | os.PathLike, extensions: tuple[str, ...] = IMG_EXTENSIONS
) -> tuple[list[tuple[str, int]], list[str], list[str]]:
    """Find the images of a folder; returns (samples, classes, ignored).

    Two layouts:
      - class folders (ImageNet train/val): root/<class>/**/<image>; labels index the sorted folder
        names; files directly in root are ignored;
      - a flat folder of images (no subfolder holds an image): every image gets label 0 and
        classes == [root's name].
    samples: (path relative to root, label), by label, then depth first with names sorted at each level,
    so the order is the same on every machine. ignored: relative paths of files that are not images by
    their extension.
    """
    root = Path(root)
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(
            f"image folder {root} {problem}; give a folder of class subfolders or a flat folder of images"
        )
    walk = _DirWalk(root)
    # Every class folder is claimed before any is walked, so a link from one class into another is the
    # duplicate that gets skipped, not the other class.
    subdirs = walk.claim(sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    per_class = [(d.name, *_walk_images(d, extensions, walk)) for d in subdirs]
    walk.warn_skipped()
    per_class = [(name, imgs, others) for name, imgs, others in per_class if imgs]
    top_files = sorted(f for f in root.iterdir() if f.is_file())
    if per_class:
        classes = [name for name, _, _ in per_class]
        samples = [
            (str(p.relative_to(root)), label) for label, (_, imgs, _) in enumerate(per_class) for p in imgs
        ]
        ignored = [str(p.relative_to(root)) for _, _, others in per_class for p in others]
        ignored += [f.name for f in top_files]
    else:
        classes = [root.resolve().name]
        samples = [(f.name, 0) for f in top_files if _is_image(f.name, extensions)]
        ignored = [f.name for f in top_files if not _is_image(f.name, extensions)]
    if not samples:
        raise FileNotFoundError(
            f"no images found in {root} (looked for {', '.join(extensions)} in class subfolders "
            "root/<class>/... or directly in root)"
        )
    return samples, classes, ignored


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class ImageFolderDataset(Dataset):
    """Images from class subfolders (or a flat folder), ADM-cropped; yields (uint8 (3, res, res), label).

    Reads and crops every image on each access; for training at scale, run `sendvae prepare` once and
    use `PreparedDataset`.

    A bad file never stops a run: item i is then the next readable item (i + 1, i + 2, ..., wrapping
    around), image and label together. The stand-in depends on i alone, so a batch is the same for any
    number of DataLoader workers and on a resumed run. Each process (every worker has its own copy)
    counts its skips in `skipped` ({relative path: reason}) and names a file in a warning the first
    time it meets it; `sendvae prepare` lists all of them at once.
    """

    def __init__(
        self, root: str | os.PathLike, resolution: int, extensions: tuple[str, ...] = IMG_EXTENSIONS
    ) -> None:
        self.root = Path(root)
        self.resolution = int(resolution)
        self.samples, self.classes, self.ignored = scan_image_folder(self.root, tuple(extensions))
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        for j in range(i % n, i % n + n):
            rel, label = self.samples[j % n]
            if rel in self.skipped:  # known bad in this process: don't decode it again
                continue
            img, note = load_rgb(self.root / rel)
            if img is not None:
                return pil_to_tensor(center_crop_adm(img, self.resolution)), label
            self.skipped[rel] = note
            log.warning(
                "skipping bad image %s (%s): the next readable image stands in for it (%d skipped so far "
                "in this process); `sendvae prepare` lists every bad file",
                self.root / rel, note, len(self.skipped),
            )  # fmt: skip
        raise ValueError(
            f"none of the {n} images in {self.root} can be read (e.g. {rel}: {self.skipped[rel]}); "
            "run `sendvae prepare`, which reports every bad file and why"
        )
