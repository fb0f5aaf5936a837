"""Weights are data: no loader runs code from a file, and every bad file is one clear error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sendvae.runtime.weights import WeightsError, read_torchscript_tensors, read_weights
from sendvae.teachers import TEACHERS, TeacherWeightsError, build_teacher

# A TorchScript module whose __setstate__ writes a file when the archive is loaded by torch.jit.load.
# Built in a subprocess (TorchScript needs the class source on disk).
_EVIL = textwrap.dedent(
    """
    import sys
    from typing import Tuple
    import torch

    class Evil(torch.nn.Module):
        def __init__(self, marker: str):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
            self.path = marker
        def forward(self, x):
            return x @ self.weight
        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
            return (self.weight, self.path, self.training)
        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
            self.weight = state[0]
            self.path = state[1]
            self.training = state[2]
            torch.ops.aten.save(self.weight, self.path)  # the payload: writes a file

    torch.jit.script(Evil(sys.argv[2])).save(sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def evil_archive(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("evil")
    script, archive, marker = d / "make_evil.py", d / "ViT-L-14.pt", d / "MARKER"
    script.write_text(_EVIL)
    subprocess.run([sys.executable, str(script), str(archive), str(marker)], check=True, capture_output=True)
    return archive, marker


def test_the_payload_is_real(evil_archive):
    """Control: torch.jit.load on the archive does write the marker (in a subprocess, then removed)."""
    archive, marker = evil_archive
    subprocess.run([sys.executable, "-c", f"import torch; torch.jit.load({str(archive)!r})"], check=True)
    assert marker.exists()
    marker.unlink()


@pytest.fixture
def no_jit(monkeypatch, evil_archive):
    """Any call of torch.jit.load from our code would also leave a marker and fail the test."""
    archive, marker = evil_archive

    def refuse(*a, **k):
        marker.write_text("torch.jit.load was called")
        raise AssertionError("torch.jit.load called on a weights file")

    monkeypatch.setattr(torch.jit, "load", refuse)
    marker.unlink(missing_ok=True)
    yield archive, marker
    assert not marker.exists(), "loading the archive ran its code"


def test_torchscript_read_as_data(no_jit):
    archive, marker = no_jit
    tensors = read_weights(archive)
    assert list(tensors) == ["0"]  # the custom __getstate__ tuple: positional names
    assert torch.equal(tensors["0"], torch.arange(6.0).view(2, 3))


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_every_teacher_loader_refuses_without_running_code(no_jit, name):
    archive, _ = no_jit
    if TEACHERS[name].kind == "vit":
        kw = {"model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}
    else:
        kw = {}
    with pytest.raises(TeacherWeightsError):
        build_teacher(name, weights=archive, resolution=32, **kw)


def test_every_other_loader_reads_without_running_code(no_jit, tmp_path):
    from sendvae.losses.lpips import LPIPS
    from sendvae.metrics.inception import load_fid_inception
    from sendvae.models.sit_io import load_sit
    from sendvae.models.vae_io import load_vae
    from sendvae.runtime.checkpoint import load_checkpoint

    archive, _ = no_jit
    for load in (
        lambda: load_vae(archive),
        lambda: load_sit(archive),
        lambda: load_fid_inception(archive),
        lambda: LPIPS(weights=archive),
    ):
        with pytest.raises((ValueError, FileNotFoundError)):
            load()
    assert set(load_checkpoint(archive)) == {"0"}  # the training-state reader also reads it as data


def test_state_dict_names_match_torchscript(tmp_path):
    """A plain scripted module: the record walk gives exactly its state_dict (names and values)."""
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    path = tmp_path / "m.pt"
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(m), str(path))
    got = read_torchscript_tensors(path)
    ref = m.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# -- one clear line for every bad file --------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    torch.save({"w": torch.ones(64, 64)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    files = {
        "garbage.safetensors": b"\x00\x01not a safetensors file" * 10,
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": b"hello world" * 50,
        "empty.pth": b"",
    }
    out = {}
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
        out[name] = tmp_path / name

    class Payload:  # a pickle that would run code with a full unpickler
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"w": torch.ones(2)}, "x": Payload()}, tmp_path / "pickle.pt")
    out["pickle.pt"] = tmp_path / "pickle.pt"
    return out


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(WeightsError) as e:
            read_weights(path, "--vae-ckpt")
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "--vae-ckpt" in msg, (name, msg)
    assert "pwned" not in capsys.readouterr().out
    with pytest.raises(WeightsError, match="does not exist"):
        read_weights(tmp_path / "missing.pt")
    with pytest.raises(WeightsError, match="is a folder"):
        read_weights(tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--model", "{bad}", "--output-dir", "{out}", "--num-samples", "2"],
        ["evaluate", "--make-ref", "{out}/ref.npz", "--data", "shapes", "--num-images", "4",
         "--inception-weights", "{bad}"],
        ["train-vae", "--preset", "shapes-tiny", "--output-dir", "{out}", "--vae-ckpt", "{bad}",
         "--max-steps", "1"],
        ["train-vae", "--preset", "shapes-tiny", "--output-dir", "{out}", "--disc-pretrained-ckpt", "{bad}",
         "--max-steps", "1"],
        ["train-vae", "--preset", "shapes-tiny", "--output-dir", "{out}", "--loss.lpips_weights", "{bad}",
         "--max-steps", "1"],
    ],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["garbage.safetensors", "truncated.pt", "pickle.pt"])
def test_cli_weight_options_print_one_line(tmp_path, capsys, argv, kind):
    from sendvae.cli import main

    bad = _bad_files(tmp_path)[kind]
    if kind == "garbage.safetensors" and "--loss.lpips_weights" in argv:
        pytest.skip("LPIPS weights are .pth files")
    args = [a.format(bad=bad, out=tmp_path / "out") for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0], err


def test_crafted_checkpoint_in_a_run_folder_is_one_line(tmp_path, capsys):
    from sendvae.cli import main

    from .conftest import tiny_train_args

    bad = _bad_files(tmp_path)["pickle.pt"]
    (tmp_path / "out" / "run" / "checkpoints").mkdir(parents=True)
    bad.rename(tmp_path / "out" / "run" / "checkpoints" / "step-0000001.pt")
    assert main(["train-vae", *tiny_train_args(tmp_path / "out", steps=2)]) == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "can be read" in err[0], err
