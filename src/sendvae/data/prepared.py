"""The prepared format: images decoded and cropped once, stored as memory-mappable shards.

Layout of a prepared folder OUT:
    OUT/index.json              format version, resolution, classes, num_images, shards (written last)
    OUT/shard-00000.npy         uint8 (N, 3, H, W): the images of shard 0, ADM-cropped
    OUT/shard-00000.labels.npy  int64 (N,): their labels
    OUT/shard-00000.json        the shard's record (counts, checksums, skipped files); its presence
                                marks the shard as complete
    OUT/plan.json               settings + fingerprint of the source list, to refuse a mismatched resume
    OUT/report.json             what was kept, converted and skipped, and why

Why NCHW: one image is one contiguous block of 3*H*W bytes either way, but NCHW is already the layout
a model takes, so a DataLoader worker returns the memory-mapped block with a single copy and no
transpose. Why a separate labels .npy (not an .npz): .npz members cannot be memory-mapped, and the
labels are small enough to read whole when a dataset opens.

Shard k always holds the sorted source items [k * shard_size, (k + 1) * shard_size), minus the ones
skipped, so its contents do not depend on the number of workers or on how often the run was
interrupted. Each file is written under a temporary name and renamed when complete; a rerun keeps
complete shards and discards temporary leftovers ("to resume, run the same command again").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from sendvae.data.imagefolder import IMG_EXTENSIONS, center_crop_adm, load_rgb, scan_image_folder

FORMAT_VERSION = 1
INDEX_FILE, PLAN_FILE, REPORT_FILE = "index.json", "plan.json", "report.json"
# Test hook: stop the process (os._exit) once this many shards were written in the current run.
STOP_AFTER_ENV = "SENDVAE_PREPARE_STOP_AFTER"


def default_shard_size(resolution: int) -> int:
    """About 192 MiB of pixels per shard (1024 images at 256 px, 256 at 512 px), at most 4096 images
    so that small images still spread over several workers."""
    return max(1, min(4096, (192 << 20) // (3 * resolution * resolution)))


def _shard_stem(k: int) -> str:
    return f"shard-{k:05d}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class _HashingWriter:
    """File wrapper that computes sha1 and size of what passes through write()."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha1, self.size = f, hashlib.sha1(), 0

    def write(self, b: bytes) -> int:
        self.sha1.update(b)
        self.size += len(b)
        return self.f.write(b)


def _save_npy_atomic(path: Path, arr: np.ndarray) -> tuple[int, str]:
    """np.save to a temporary name, fsync, rename; returns (size in bytes, sha1)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        np.lib.format.write_array(w, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return w.size, w.sha1.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Sources (a sorted list of items that any worker process can load by position) and the shard worker.


class FolderSource:
    """Image files of an ImageNet-style (or flat) folder, ADM-cropped at load time."""

    def __init__(self, root: str | os.PathLike, resolution: int, min_size: int = 0,
                 extensions: tuple[str, ...] = IMG_EXTENSIONS) -> None:  # fmt: skip
        self.root, self.resolution, self.min_size = Path(root), resolution, min_size
        self.samples, self.classes, self.ignored = scan_image_folder(self.root, extensions)
        self.description = f"imagefolder:{self.root.resolve()}"

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        return hashlib.sha1("".join(f"{p}\t{y}\n" for p, y in self.samples).encode()).hexdigest()

    def load(self, i: int) -> tuple[np.ndarray | None, int, str, str, bool]:
        """-> (uint8 (3, res, res) or None, label, name, note, upsampled); note as in `load_rgb`, or
        'too_small: ...'."""
        rel, label = self.samples[i]
        img, note = load_rgb(self.root / rel)
        if img is None:
            return None, label, rel, note, False
        if min(img.size) < self.min_size:
            return None, label, rel, f"too_small: {img.size[0]}x{img.size[1]} < {self.min_size}", False
        arr = np.asarray(center_crop_adm(img, self.resolution), dtype=np.uint8).transpose(2, 0, 1)
        return arr, label, rel, note, min(img.size) < self.resolution


class DatasetSource:
    """A map-style dataset that already yields (uint8 (3, res, res), label), e.g. Fashion-MNIST."""

    def __init__(self, dataset: Any, resolution: int, description: str) -> None:
        self.dataset, self.resolution, self.description = dataset, resolution, description
        self.classes = list(getattr(dataset, "classes", None) or getattr(dataset, "class_names", None) or [])
        self.ignored: list[str] = []

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> str:
        return hashlib.sha1(f"{self.description}\t{len(self.dataset)}".encode()).hexdigest()

    def load(self, i: int) -> tuple[np.ndarray | None, int, str, str, bool]:
        img, label = self.dataset[i]
        img = torch.as_tensor(img)
        want = (3, self.resolution, self.resolution)
        if img.dtype != torch.uint8 or tuple(img.shape) != want:
            raise ValueError(
                f"{self.description}[{i}] is {img.dtype} {tuple(img.shape)}, expected uint8 {want}"
            )
        return img.numpy(), int(label), str(i), "", False


_SOURCE: FolderSource | DatasetSource | None = None


def _init_worker(source: FolderSource | DatasetSource | None, pool_worker: bool = True) -> None:
    global _SOURCE
    _SOURCE = source
    if pool_worker:
        torch.set_num_threads(1)  # one process per core already


def _write_shard(task: tuple[str, int, int, int]) -> dict[str, Any]:
    """Load items [start, stop) of the worker's source and write shard k; returns its record."""
    folder, k, start, stop = task
    assert _SOURCE is not None  # set by _init_worker
    out, src, res = Path(folder), _SOURCE, _SOURCE.resolution
    images = np.empty((stop - start, 3, res, res), dtype=np.uint8)  # (N, 3, H, W)
    labels: list[int] = []
    converted: Counter[str] = Counter()
    skipped: dict[str, list[str]] = {}
    details: dict[str, str] = {}
    upsampled = 0
    for i in range(start, stop):
        arr, label, name, note, up = src.load(i)
        if arr is None:
            reason, _, detail = note.partition(": ")
            skipped.setdefault(reason, []).append(name)
            if detail:
                details[name] = detail
            continue
        upsampled += up
        if note:
            converted[note] += 1
        images[len(labels)] = arr
        labels.append(label)
    stem = _shard_stem(k)
    lab_size, lab_sha1 = _save_npy_atomic(out / f"{stem}.labels.npy", np.asarray(labels, dtype=np.int64))
    size, sha1 = _save_npy_atomic(out / f"{stem}.npy", images[: len(labels)])
    record = dict(
        shard=k, start=start, stop=stop, count=len(labels), file=f"{stem}.npy", size=size, sha1=sha1,
        labels=f"{stem}.labels.npy", labels_size=lab_size, labels_sha1=lab_sha1,
        converted=dict(sorted(converted.items())), upsampled=upsampled, skipped=skipped, details=details,
    )  # fmt: skip
    _write_json_atomic(out / f"{stem}.json", record)  # the commit marker, written last
    return record


def _completed_record(out: Path, k: int, start: int, stop: int) -> dict[str, Any] | None:
    """The record of shard k if all its files are present with the recorded sizes, else None."""
    try:
        rec = json.loads((out / f"{_shard_stem(k)}.json").read_text())
        ok = (rec["start"], rec["stop"]) == (start, stop) and all(
            (out / rec[f]).stat().st_size == rec[s] for f, s in (("file", "size"), ("labels", "labels_size"))
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if ok else None


# ----------------------------------------------------------------------------------------------------
# Writer.


@dataclasses.dataclass
class PrepareReport:
    """What `prepare_dataset` did. `skipped` maps a reason to the files skipped for it."""

    out: str
    source: str
    resolution: int
    num_items: int = 0
    ok: int = 0
    converted: dict[str, int] = dataclasses.field(default_factory=dict)
    upsampled: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    details: dict[str, str] = dataclasses.field(default_factory=dict)
    ignored: list[str] = dataclasses.field(default_factory=list)
    num_shards: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    seconds: float = 0.0

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        conv = ", ".join(f"{m}: {n}" for m, n in self.converted.items()) or "none"
        skip = ", ".join(f"{r}: {len(v)}" for r, v in self.skipped.items()) or "none"
        return (
            f"prepared {self.ok}/{self.num_items} images at {self.resolution}px into {self.out} "
            f"({self.num_shards} shards: {self.shards_written} written, {self.shards_reused} kept) "
            f"in {self.seconds:.1f}s\n  converted to RGB: {conv}; upsampled: {self.upsampled}\n"
            f"  skipped: {skip}; non-image files ignored: {len(self.ignored)}"
        )


def prepare_dataset(
    src: str | os.PathLike | Dataset,
    out: str | os.PathLike,
    resolution: int = 256,
    shard_size: int | None = None,
    num_workers: int | None = None,
    min_size: int = 0,
    progress: bool = True,
    source_name: str | None = None,
) -> PrepareReport:
    """Decode, convert to RGB, ADM-crop and shard a source into `out`; resumable; returns the report.

    src: an image folder (class subfolders, or a flat folder of images with label 0), or a map-style
    dataset yielding (uint8 (3, resolution, resolution), label) (then `source_name` identifies it for
    resuming). Bad files are skipped and listed, never fatal; so are images whose short side is below
    `min_size` (default 0: keep everything and upsample, as ADM does). num_workers: processes
    (default: all cores; 0 or 1 runs in this process).
    """
    t0 = time.time()
    out, shard_size = Path(out), int(shard_size or default_shard_size(resolution))
    if out.exists() and not out.is_dir():  # checked before the (long) scan of the source
        raise ValueError(
            f"output {out} is an existing file, not a folder; pass a new folder as OUT (or the folder of an "
            "earlier run of the same command, to resume it)"
        )
    if isinstance(src, (str, os.PathLike)):
        source: FolderSource | DatasetSource = FolderSource(src, resolution, min_size)
    else:
        source = DatasetSource(src, resolution, source_name or type(src).__name__)
    n, num_shards = len(source), -(-len(source) // shard_size)
    plan = dict(
        format_version=FORMAT_VERSION, resolution=resolution, shard_size=shard_size, min_size=min_size,
        source=source.description, num_items=n, items_sha1=source.fingerprint(),
    )  # fmt: skip
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a parent is a file, or no write permission
        raise ValueError(f"cannot create the output folder {out}: {e.strerror or e}; pass another OUT") from e
    if (out / PLAN_FILE).exists():
        old = json.loads((out / PLAN_FILE).read_text())
        diff = [f"{key}: {old.get(key)!r} -> {v!r}" for key, v in plan.items() if old.get(key) != v]
        if diff:
            raise ValueError(
                f"{out} holds a preparation with other settings or sources ({'; '.join(diff)}); "
                "use a new output folder or delete this one"
            )
    _write_json_atomic(out / PLAN_FILE, plan)
    for tmp in out.glob(".*.tmp"):  # leftovers of an interrupted run
        tmp.unlink()

    spans = [(k, k * shard_size, min(n, (k + 1) * shard_size)) for k in range(num_shards)]
    records = {k: r for k, a, b in spans if (r := _completed_record(out, k, a, b)) is not None}
    tasks = [(str(out), k, a, b) for k, a, b in spans if k not in records]
    reused = len(records)
    stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
    num_workers = min(os.cpu_count() or 1, 32) if num_workers is None else num_workers
    num_workers = max(0, min(num_workers, len(tasks)))

    bar = tqdm(total=n, initial=sum(b - a for k, a, b in spans if k in records), unit="img",
               desc="prepare", disable=not progress, smoothing=0.05)  # fmt: skip
    pool = None
    results: Iterator[dict[str, Any]]
    try:
        if num_workers > 1:
            pool = mp.get_context().Pool(num_workers, initializer=_init_worker, initargs=(source,))
            results = pool.imap_unordered(_write_shard, tasks)
        else:
            _init_worker(source, pool_worker=False)
            results = map(_write_shard, tasks)
        for written, rec in enumerate(results, start=1):
            records[rec["shard"]] = rec
            bar.update(rec["stop"] - rec["start"])
            if stop_after and written >= stop_after:
                if pool is not None:
                    pool.terminate()
                os._exit(75)
    finally:
        _init_worker(None, pool_worker=False)
        bar.close()
        if pool is not None:  # all results are in, or an error/interrupt: stop the workers either way
            pool.terminate()
            pool.join()

    report = PrepareReport(out=str(out), source=source.description, resolution=resolution, num_items=n,
                           ignored=list(source.ignored), num_shards=num_shards,
                           shards_written=len(tasks), shards_reused=reused)  # fmt: skip
    converted: Counter = Counter()
    for k in range(num_shards):
        rec = records[k]
        report.ok += rec["count"]
        report.upsampled += rec["upsampled"]
        converted.update(rec["converted"])
        for reason, files in rec["skipped"].items():
            report.skipped.setdefault(reason, []).extend(files)
        report.details.update(rec["details"])
    report.converted = dict(sorted(converted.items()))
    report.skipped = dict(sorted(report.skipped.items()))
    if report.ok == 0:
        raise ValueError(f"none of the {n} images in {src} could be used: {report.summary()}")
    index = dict(
        format_version=FORMAT_VERSION, layout="NCHW", dtype="uint8", label_dtype="int64",
        resolution=resolution, num_images=report.ok, classes=list(source.classes), source=source.description,
        shards=[{key: records[k][key] for key in ("file", "labels", "count", "size", "sha1")}
                for k in range(num_shards)],
    )  # fmt: skip
    report.seconds = time.time() - t0
    _write_json_atomic(out / REPORT_FILE, dataclasses.asdict(report))
    _write_json_atomic(out / INDEX_FILE, index)
    return report
