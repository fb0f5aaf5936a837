"""ADM center crop, RGB loading of every PIL mode, the image-folder scan (symlinks) and dataset."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sendvae.data.imagefolder import ImageFolderDataset, center_crop_adm, load_rgb, scan_image_folder


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# (w, h), resolution, sizes after each box halving, size after the bicubic resize, crop (left, top).
# Worked by hand: 1000x600 -> box 500x300 (300 < 512 stops) -> scale 256/300: 500 * 0.8533 = 426.7 -> 427.
CROP_CASES = [
    ((1000, 600), 256, [(500, 300)], (427, 256), (85, 0)),
    ((300, 513), 256, [], (256, 438), (0, 91)),  # 513 * 256/300 = 437.76 -> 438; (438-256)//2 = 91
    ((256, 256), 256, [], (256, 256), (0, 0)),
    ((100, 80), 256, [], (320, 256), (32, 0)),  # upsampled: scale 3.2
    ((2048, 1100), 256, [(1024, 550), (512, 275)], (477, 256), (110, 0)),  # 512 * 256/275 = 476.6
    ((64, 97), 32, [(32, 48)], (32, 48), (0, 8)),  # 32 * 32/32 = 32 exactly: resize to the same size
]


@pytest.mark.parametrize("size,res,halvings,resized,offset", CROP_CASES)
def test_center_crop_adm_matches_hand_computation(size, res, halvings, resized, offset):
    img = _noise(*size)
    ref = img
    for s in halvings:
        ref = ref.resize(s, resample=Image.BOX)
    ref = ref.resize(resized, resample=Image.BICUBIC)
    left, top = offset
    expected = np.asarray(ref)[top : top + res, left : left + res]

    out = center_crop_adm(img, res)
    assert out.size == (res, res)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_center_crop_identity_at_resolution():
    img = _noise(32, 32, seed=3)
    np.testing.assert_array_equal(np.asarray(center_crop_adm(img, 32)), np.asarray(img))


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("P", "PNG"), ("LA", "PNG")]
)
def test_load_rgb_converts_modes(tmp_path, mode, fmt):
    src = _noise(20, 16).convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(_save(src, fmt))
    img, note = load_rgb(path)
    assert img is not None and img.mode == "RGB" and img.size == (20, 16)
    assert note == mode
    if mode in ("L", "RGBA", "LA"):  # lossless formats: the conversion is PIL's own
        np.testing.assert_array_equal(np.asarray(img), np.asarray(src.convert("RGB")))


def test_load_rgb_16bit_keeps_top_byte(tmp_path):
    arr = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    Image.fromarray(arr).save(tmp_path / "x.png")
    img, note = load_rgb(tmp_path / "x.png")
    assert note.startswith("I") and img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img)[..., 0], (arr >> 8).astype(np.uint8))


def test_load_rgb_never_raises(tmp_path):
    jpg = _save(_noise(64, 64), "JPEG")
    files = {
        "empty.jpg": (b"", "empty"),
        "random.jpg": (np.random.default_rng(0).bytes(300), "unidentified"),
        "trunc.jpg": (jpg[: len(jpg) // 2], "truncated"),
    }
    for name, (data, reason) in files.items():
        (tmp_path / name).write_bytes(data)
        assert load_rgb(tmp_path / name) == (None, reason)
    img, note = load_rgb(tmp_path / "missing.jpg")
    assert img is None and note.startswith("unreadable")
    (tmp_path / "ok.jpg").write_bytes(jpg)
    img, note = load_rgb(tmp_path / "ok.jpg")
    assert img is not None and note == ""


def _make_classes(root, layout):
    for rel, (w, h) in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _noise(w, h, seed=len(rel)).save(root / rel)


def test_image_folder_labels_and_items(tmp_path):
    _make_classes(
        tmp_path,
        {"zebra/z1.png": (40, 36), "cat/b.png": (36, 40), "cat/a.JPEG": (50, 50), "dog/sub/d.png": (33, 64)},
    )
    (tmp_path / "dog" / "readme.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "stray.png").write_bytes(b"")  # files in root are ignored in the class layout
    ds = ImageFolderDataset(tmp_path, 32)
    assert ds.classes == ["cat", "dog", "zebra"]
    assert ds.samples == [("cat/a.JPEG", 0), ("cat/b.png", 0), ("dog/sub/d.png", 1), ("zebra/z1.png", 2)]
    assert sorted(ds.ignored) == ["dog/readme.txt", "stray.png"]
    x, y = ds[2]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y == 1
    ref = center_crop_adm(Image.open(tmp_path / "dog/sub/d.png").convert("RGB"), 32)
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), np.asarray(ref))


def test_flat_folder_gets_label_zero(tmp_path):
    root = tmp_path / "pics"
    _make_classes(root, {"b.png": (40, 40), "a.png": (48, 40)})
    ds = ImageFolderDataset(root, 32)
    assert ds.classes == ["pics"] and ds.samples == [("a.png", 0), ("b.png", 0)]
    assert [ds[i][1] for i in range(len(ds))] == [0, 0]


def test_empty_folder_and_bad_file_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found"):
        scan_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 32)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        ImageFolderDataset(tmp_path / "a" / "notes.txt", 32)
    (tmp_path / "a" / "bad.jpg").write_bytes(b"\x00" * 10)
    ds = ImageFolderDataset(tmp_path, 32)
    with pytest.raises(ValueError, match="none of the 1 images .* `sendvae prepare`"):
        ds[0]  # nothing readable to stand in for the bad file


def test_bad_images_are_replaced_through_dataloader_workers(tmp_path, caplog):
    """A truncated JPEG and a garbage .png: every batch arrives, each bad item is the next readable one
    (the same with 0 or 2 workers), and the skip is counted and named once."""
    _make_classes(
        tmp_path, {"a/a0.png": (40, 36), "a/a1.png": (36, 40), "b/b0.png": (50, 50), "b/z.png": (33, 64)}
    )
    jpg = _save(_noise(64, 64), "JPEG")
    (tmp_path / "a" / "b_trunc.jpg").write_bytes(jpg[: len(jpg) // 2])  # index 2, before b/b0.png
    (tmp_path / "b" / "garbage.png").write_bytes(
        np.random.default_rng(1).bytes(400)
    )  # index 4, before b/z.png
    ds = ImageFolderDataset(tmp_path, 32)
    assert len(ds) == 6 and ds.samples[2] == ("a/b_trunc.jpg", 0) and ds.samples[4] == ("b/garbage.png", 1)

    # Workers log in their own processes: a file handler reaches them (fork copies it), caplog does not.
    log_file = tmp_path / "workers.log"
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("sendvae.data.imagefolder")
    logger.addHandler(handler)
    try:
        loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
        batches = list(loader)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert len(batches) == 3
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 1, 1]
    assert torch.equal(x[2], x[3]) and torch.equal(x[4], x[5])  # the next readable image stands in
    assert not torch.equal(x[1], x[2])
    text = log_file.read_text()
    assert text.count("a/b_trunc.jpg (truncated)") == 1 and text.count("b/garbage.png (unidentified)") == 1
    assert ds.skipped == {}  # the parent process itself decoded nothing

    with caplog.at_level(logging.WARNING, logger="sendvae.data.imagefolder"):
        for _ in range(2):  # a second epoch neither warns again nor decodes the known-bad files
            x0, y0 = zip(*(ds[i] for i in range(len(ds))))
    assert torch.equal(torch.stack(x0), x) and list(y0) == y.tolist()  # same with 0 workers
    assert ds.skipped == {"a/b_trunc.jpg": "truncated", "b/garbage.png": "unidentified"}
    warned = [r.getMessage() for r in caplog.records if r.name == "sendvae.data.imagefolder"]
    assert len(warned) == 2 and "b_trunc.jpg" in warned[0] and "garbage.png" in warned[1]


# Symlink loops. layout -> (links: path -> target, the folder the three real images are in).
LOOP_LAYOUTS: dict[str, tuple[dict[str, str], str]] = {
    "up": ({"cls/up": ".."}, "cls"),
    "self": ({"cls/a": ".", "cls/b": "."}, "cls"),
    "flat-self": ({"a": ".", "b": "."}, "."),
}


def make_loop_folder(root: Path, layout: str) -> list[str]:
    """Three images and the symlinks of `layout` under root; returns the relative image paths."""
    links, folder = LOOP_LAYOUTS[layout]
    rels = [str(Path(folder, f"{i}.png")) for i in range(3)]
    _make_classes(root, {rel: (40, 36) for rel in rels})
    for link, target in links.items():
        (root / link).symlink_to(target, target_is_directory=True)
    return rels


def finish_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() in a daemon thread; a test fails, rather than hangs the suite, if it runs past `seconds`."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a symlink loop followed forever?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def skipped_link_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "reached again through a symlink" in r.getMessage()]


@pytest.mark.parametrize("layout", sorted(LOOP_LAYOUTS))
def test_symlink_loops_are_scanned_once(tmp_path, caplog, layout):
    rels = make_loop_folder(tmp_path, layout)
    ds = finish_within(5.0, lambda: ImageFolderDataset(tmp_path, 32))
    assert [rel for rel, _ in ds.samples] == rels and len(ds) == 3
    assert all(ds[i][0].shape == (3, 32, 32) for i in range(3))
    (warning,) = skipped_link_warnings(caplog)
    assert all(f"{link} (same folder as" in warning for link in LOOP_LAYOUTS[layout][0])


def test_symlinked_folders_elsewhere_are_followed(tmp_path, caplog):
    """A class folder that is a link to another disk, and a link to a subfolder elsewhere, both count;
    only a second link to the same real folder is skipped."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    _make_classes(elsewhere, {"cats/c0.png": (40, 36), "cats/c1.png": (36, 40), "more/m.png": (40, 40)})
    _make_classes(root, {"dogs/d0.png": (40, 36)})
    (root / "cats").symlink_to(elsewhere / "cats", target_is_directory=True)
    (root / "dogs" / "extra").symlink_to(elsewhere / "more", target_is_directory=True)
    ds = finish_within(5.0, lambda: ImageFolderDataset(root, 32))
    assert ds.classes == ["cats", "dogs"]
    assert ds.samples == [("cats/c0.png", 0), ("cats/c1.png", 0), ("dogs/d0.png", 1), ("dogs/extra/m.png", 1)]
    assert skipped_link_warnings(caplog) == []

    (root / "dogs" / "same_cats").symlink_to(elsewhere / "cats", target_is_directory=True)
    assert ImageFolderDataset(root, 32).samples == ds.samples  # the cats are not counted twice
    (warning,) = skipped_link_warnings(caplog)
    assert "dogs/same_cats (same folder as cats)" in warning
