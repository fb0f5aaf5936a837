"""`sendvae prepare` and the prepared format: bad files, equivalence, resume after a kill, workers."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sendvae import cli
from sendvae.commands import prepare as prepare_cmd
from sendvae.data.imagefolder import ImageFolderDataset
from sendvae.data.prepared import STOP_AFTER_ENV, prepare_dataset
from sendvae.data.prepared_dataset import PreparedDataset
from tests.test_imagefolder import LOOP_LAYOUTS, finish_within, make_loop_folder, skipped_link_warnings

RES = 32


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _good_folder(root: Path, per_class: int = 4) -> Path:
    """Three classes of valid images of assorted sizes and modes."""
    modes = ["RGB", "L", "RGBA", "P"]
    for c, name in enumerate(["c0", "c1", "c2"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = _noise(36 + 7 * i, 40 + 5 * c, seed=10 * c + i).convert(modes[(i + c) % 4])
            img.save(root / name / f"img{i}.png")
    return root


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    """A folder with one of each kind of problem file next to good ones."""
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    _noise(50, 40, 0).save(root / "a" / "ok1.jpg")
    _noise(60, 70, 1).save(root / "a" / "ok2.png")
    _noise(20, 24, 2).save(root / "a" / "small.png")  # short side 20 < 32: kept and upsampled
    buf = io.BytesIO()
    _noise(64, 64, 3).save(buf, "JPEG")
    (root / "a" / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "a" / "random.jpg").write_bytes(np.random.default_rng(4).bytes(500))
    (root / "a" / "empty.jpg").write_bytes(b"")
    _noise(48, 48, 5).convert("CMYK").save(root / "b" / "cmyk.jpg")
    _noise(48, 48, 6).convert("L").save(root / "b" / "gray.png")
    _noise(48, 48, 7).convert("RGBA").save(root / "b" / "rgba.png")
    _noise(48, 48, 8).convert("P").save(root / "b" / "pal.gif")
    _noise(48, 48, 9).convert("P").save(root / "b" / "pal.png")
    _noise(8, 8, 10).save(root / "b" / "tiny.png")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


def test_report_counts_every_bad_file(bad_folder, tmp_path):
    out = tmp_path / "out"
    rep = prepare_dataset(
        bad_folder, out, resolution=RES, shard_size=3, num_workers=0, min_size=16, progress=False
    )
    assert rep.num_items == 12 and rep.ok == 8 and rep.num_shards == 4
    assert rep.converted == {"CMYK": 1, "L": 1, "P": 2, "RGBA": 1}
    assert rep.upsampled == 1
    assert rep.skipped == {
        "empty": ["a/empty.jpg"],
        "too_small": ["b/tiny.png"],
        "truncated": ["a/trunc.jpg"],
        "unidentified": ["a/random.jpg"],
    }
    assert rep.ignored == ["b/notes.txt"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["skipped"] == rep.skipped and on_disk["converted"] == rep.converted and on_disk["ok"] == 8
    ds = PreparedDataset(out)
    assert len(ds) == 8 and ds.classes == ["a", "b"] and ds.resolution == RES
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    ds.verify()

    # min_size 0 (the default) keeps the 8x8 image, upsampled like ADM would.
    rep0 = prepare_dataset(
        bad_folder, tmp_path / "out0", resolution=RES, shard_size=3, num_workers=0, progress=False
    )
    assert rep0.ok == 9 and rep0.upsampled == 2 and "too_small" not in rep0.skipped


def test_prepared_pixels_equal_image_folder(tmp_path):
    src = _good_folder(tmp_path / "src")
    prepare_dataset(src, tmp_path / "out", resolution=RES, shard_size=5, num_workers=0, progress=False)
    ref, ds = ImageFolderDataset(src, RES), PreparedDataset(tmp_path / "out")
    assert len(ds) == len(ref) == 12 and ds.classes == ref.classes
    for i in range(len(ds)):
        (x, y), (xr, yr) = ds[i], ref[i]
        assert x.dtype == torch.uint8 and x.shape == (3, RES, RES) and y == yr
        assert torch.equal(x, xr), i
    assert torch.equal(ds[-1][0], ref[11][0])
    with pytest.raises(IndexError):
        ds[12]
    sub = PreparedDataset(tmp_path / "out", indices=[11, 0, 5])
    assert len(sub) == 3 and torch.equal(sub[0][0], ref[11][0]) and sub[2][1] == ref[5][1]


def _shard_files(out: Path) -> dict[str, tuple[int, int]]:
    """Name -> (inode, mtime_ns) of every shard file."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("shard-*"))}


def test_killed_run_resumes_without_redoing_shards(tmp_path):
    src = _good_folder(tmp_path / "src", per_class=5)  # 15 images, shards of 2 -> 8 shards
    out = tmp_path / "out"
    code = (
        "import sys; from sendvae.data.prepared import prepare_dataset; "
        f"prepare_dataset(sys.argv[1], sys.argv[2], resolution={RES}, shard_size=2, num_workers=0, "
        "progress=False)"
    )
    env = {**os.environ, STOP_AFTER_ENV: "3"}
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out)], env=env, capture_output=True)
    assert proc.returncode == 75, proc.stderr.decode()[-2000:]
    assert not (out / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="run the same command again"):
        PreparedDataset(out)
    done = sorted(p.stem for p in out.glob("shard-*.json"))
    assert 3 <= len(done) < 8
    # What a kill in the middle of a shard leaves: a temporary file, and a data file without its record.
    (out / ".shard-00007.npy.12345.tmp").write_bytes(b"\x93NUMPY half written")
    pending = next(k for k in range(8) if f"shard-{k:05d}" not in done)
    (out / f"shard-{pending:05d}.npy").write_bytes(b"\x93NUMPY partial")
    before = {n: v for n, v in _shard_files(out).items() if n.split(".")[0] in done}

    rep = prepare_dataset(src, out, resolution=RES, shard_size=2, num_workers=0, progress=False)
    assert rep.shards_reused == len(done) and rep.shards_written == 8 - len(done)
    after = _shard_files(out)
    assert {n: after[n] for n in before} == before  # finished shards untouched (same inode and mtime)
    assert not list(out.glob(".*.tmp"))

    clean = tmp_path / "clean"
    prepare_dataset(src, clean, resolution=RES, shard_size=2, num_workers=0, progress=False)
    assert json.loads((out / "index.json").read_text()) == json.loads((clean / "index.json").read_text())
    a, b = PreparedDataset(out), PreparedDataset(clean)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(len(a)))

    with pytest.raises(ValueError, match="other settings"):
        prepare_dataset(src, out, resolution=40, shard_size=2, num_workers=0, progress=False)


def test_multi_worker_output_equals_single_worker(bad_folder, tmp_path):
    kw = dict(resolution=RES, shard_size=2, min_size=16, progress=False)
    r1 = prepare_dataset(bad_folder, tmp_path / "w0", num_workers=0, **kw)
    r2 = prepare_dataset(bad_folder, tmp_path / "w2", num_workers=2, **kw)
    assert r2.shards_written == r1.shards_written == 6
    assert (r1.skipped, r1.converted, r1.ok) == (r2.skipped, r2.converted, r2.ok)
    names = sorted(p.name for p in (tmp_path / "w0").glob("shard-*"))
    assert names == sorted(p.name for p in (tmp_path / "w2").glob("shard-*"))
    for n in names:
        assert (tmp_path / "w0" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes(), n
    assert (tmp_path / "w0" / "index.json").read_bytes() == (tmp_path / "w2" / "index.json").read_bytes()


def test_dataloader_with_two_workers(tmp_path):
    src = _good_folder(tmp_path / "src")
    prepare_dataset(src, tmp_path / "out", resolution=RES, shard_size=5, num_workers=0, progress=False)
    ds = PreparedDataset(tmp_path / "out")
    ds[0]  # map a shard in the parent: workers must not depend on it
    ds2 = pickle.loads(pickle.dumps(ds))  # what a spawn-started worker receives
    assert ds2._maps == {} and torch.equal(ds2[7][0], ds[7][0])
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (12, 3, RES, RES) and x.dtype == torch.uint8
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(12)]))
    assert y.tolist() == ds.labels.tolist()


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sendvae prepare"):
        PreparedDataset(tmp_path)
    src = _good_folder(tmp_path / "src", per_class=1)
    out = tmp_path / "out"
    prepare_dataset(src, out, resolution=RES, num_workers=0, progress=False)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        PreparedDataset(out)
    (out / "index.json").write_text(json.dumps(index))
    data = bytearray((out / "shard-00000.npy").read_bytes())
    data[-1] ^= 0xFF
    (out / "shard-00000.npy").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        PreparedDataset(out).verify()


def test_source_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", resolution=RES, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 images"):
        prepare_dataset(tmp_path / "bad", tmp_path / "out2", resolution=RES, num_workers=0, progress=False)


@pytest.mark.parametrize("layout", sorted(LOOP_LAYOUTS))
def test_symlink_loops_are_prepared_once(tmp_path, caplog, layout):
    make_loop_folder(tmp_path / "src", layout)
    run = lambda: prepare_dataset(
        tmp_path / "src", tmp_path / "out", resolution=RES, num_workers=0, progress=False
    )
    rep = finish_within(5.0, run)
    assert (
        rep.num_items == rep.ok == 3 and rep.num_skipped == 0 and len(PreparedDataset(tmp_path / "out")) == 3
    )
    (warning,) = skipped_link_warnings(caplog)
    assert all(f"{link} (same folder as" in warning for link in LOOP_LAYOUTS[layout][0])


def test_cli_bad_paths_are_one_line(tmp_path, capsys):
    """Exit 2 and one `sendvae prepare: error: ...` line naming the problem, never a traceback."""
    src = _good_folder(tmp_path / "src", per_class=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "file").write_text("x")
    cases = {
        (src, tmp_path / "file"): "is an existing file, not a folder; pass a new folder as OUT",
        (src, tmp_path / "file" / "out"): "cannot create the output folder",
        (tmp_path / "nope", tmp_path / "o1"): "nope does not exist",
        (tmp_path / "file", tmp_path / "o2"): "is a file, not a folder",
        (tmp_path / "empty", tmp_path / "o3"): "no images found",
    }
    for (a, b), expected in cases.items():
        assert cli.main(["prepare", str(a), str(b), "--workers", "0", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sendvae prepare: error: ") and expected in err, err
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "o1").exists()


class _TinyDataset(torch.utils.data.Dataset):
    classes = ["even", "odd"]

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int):
        return torch.full((3, RES, RES), 30 * i, dtype=torch.uint8), i % 2


def test_prepare_from_a_dataset(tmp_path):
    rep = prepare_dataset(_TinyDataset(), tmp_path / "out", resolution=RES, shard_size=3, num_workers=2,
                          progress=False, source_name="tiny")  # fmt: skip
    ds = PreparedDataset(tmp_path / "out")
    assert rep.ok == 7 and ds.classes == ["even", "odd"]
    assert all(torch.equal(ds[i][0], _TinyDataset()[i][0]) and ds[i][1] == i % 2 for i in range(7))


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    prepare_cmd.add_arguments(p)
    return p.parse_args(argv)


def test_cli(tmp_path, bad_folder, capsys):
    args = _parse([str(bad_folder), str(tmp_path / "out"), "--resolution", "32", "--workers", "0",
                   "--min-size", "16", "--no-progress"])  # fmt: skip
    assert prepare_cmd.run(args) == 0
    text = capsys.readouterr().out
    assert "prepared 8/12 images" in text and "truncated: a/trunc.jpg" in text
    assert (tmp_path / "out" / "report.json").is_file()
    for bad in ("30", "33", "abc"):
        with pytest.raises(SystemExit):
            _parse(["a", "b", "--resolution", bad])
    assert _parse(["a", "b", "--resolution", "40"]).resolution == 40


def test_cli_shapes_source(tmp_path):
    pytest.importorskip("sendvae.data.shapes")
    args = _parse(["-", str(tmp_path / "out"), "--data", "shapes", "--resolution", "32",
                   "--num-images", "6", "--workers", "0", "--no-progress"])  # fmt: skip
    assert prepare_cmd.run(args) == 0
    ds = PreparedDataset(tmp_path / "out")
    from sendvae.data.shapes import ShapesDataset
    from sendvae.data.shapes_config import ShapesConfig

    ref = ShapesDataset(ShapesConfig(resolution=32, seed=0, length=6))
    assert ds.classes == list(ref.class_names)
    assert len(ds) == 6 and all(torch.equal(ds[i][0], ref[i][0]) and ds[i][1] == ref[i][1] for i in range(6))
