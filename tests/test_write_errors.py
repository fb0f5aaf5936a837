"""Every write path turns a full disk or an I/O error into one WriteError line; the old file survives."""

import errno
import os

import pytest
import torch

from sendvae.runtime import checkpoint as ckpt


class FailingFile:
    """A temp file whose writes fail with ``code`` after ``budget`` bytes (a disk filling up)."""

    def __init__(self, f, code: int, budget: int = 1000) -> None:
        self.f, self.code, self.left = f, code, budget

    def write(self, data) -> int:
        self.left -= len(data)
        if self.left < 0:
            raise OSError(self.code, os.strerror(self.code))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def failing_disk(monkeypatch):
    def make(code: int):
        real = os.fdopen
        monkeypatch.setattr(
            ckpt.os, "fdopen", lambda fd, mode="r", *a, **k: FailingFile(real(fd, mode, *a, **k), code)
        )

    return make


@pytest.mark.parametrize(
    "code, says", [(errno.ENOSPC, "the disk is full"), (errno.EIO, "input/output error")]
)
def test_torch_save_on_a_failing_disk(tmp_path, failing_disk, code, says):
    """torch.save's C++ writer reported a full disk as `RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos`, a traceback; the checkpoint writer names the cause."""
    path = tmp_path / "checkpoints" / "step-0000001.pt"
    ckpt.atomic_torch_save({"w": torch.ones(10)}, path)
    before = path.read_bytes()
    failing_disk(code)
    with pytest.raises(ckpt.WriteError, match=says) as e:
        ckpt.save_training_state(tmp_path, 1, {"w": torch.zeros(100_000)})
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes() == before and not list(path.parent.glob(".*.tmp"))


def test_safetensors_on_a_full_disk(tmp_path, monkeypatch):
    """safetensors' Rust writer reports `IoError(Os { code: 28, kind: StorageFull, ... })`."""

    def full(tensors, filename, metadata=None):
        raise Exception(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'
        )

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.WriteError, match="the disk is full"):
        ckpt.atomic_save_safetensors({"w": torch.ones(3)}, tmp_path / "model.safetensors")
    assert not list(tmp_path.glob(".*.tmp"))


def test_other_writer_errors_stay_what_they_are(tmp_path):
    """A bug in what is written (not the disk) is not dressed up as a disk problem."""
    with pytest.raises(TypeError):
        ckpt.atomic_write_bytes(tmp_path / "x", lambda f: f.write("text, not bytes"))
