"""Fuzzing the boundary: malformed command lines for every command, and malformed saved configs, latent
stores, stage records, export folders and weight archives in every format read. Each case must end with
exit code 2, exactly one stderr line, no traceback, and no file changed in the folder of inputs.

`CASES` (command -> cases) and `FORMATS` (format -> cases) are plain data, so the same cases can be run
against any version of the package (`run_case`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendvae.cli import main

from .test_torchscript_archives import FOUR, Deep, Record, Storage, Tensor, archive
from .test_untrusted_readers import make_store

# -- the inputs ---------------------------------------------------------------------------------------------


def build_world(w: Path) -> None:
    """Every malformed input the cases name, under one folder (hashed before and after each case)."""
    w.mkdir(parents=True, exist_ok=True)
    (w / "folder").mkdir()
    (w / "notjson.json").write_text("{not json")
    (w / "list.json").write_text("[1, 2]")
    (w / "text.txt").write_text("hello")
    # weights, each format
    torch.save({"w": torch.ones(64, 64)}, w / "good.pt")
    good = (w / "good.pt").read_bytes()
    (w / "truncated.pt").write_bytes(good[: len(good) // 2])
    (w / "garbage.pt").write_bytes(b"hello world" * 50)
    (w / "empty.pth").write_bytes(b"")
    (w / "list.pt").write_bytes(_torch_bytes([1, 2, 3]))
    (w / "pickle.pt").write_bytes(pickle.dumps({"w": _Payload()}))
    (w / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    (w / "huge-header.safetensors").write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    (w / "bad-header.safetensors").write_bytes((20).to_bytes(8, "little") + b'{"w": {"dtype": 3}}   ')
    bad_scripts = {
        "ts-oob.pt": Record({"w": Tensor(Storage("0", 4), size=(100,))}),
        "ts-negative.pt": Record({"w": Tensor(Storage("0", 4), offset=-1)}),
        "ts-strings.pt": Record({"w": Tensor(Storage("0", 4), size="12", stride="11")}),
        "ts-build.pt": Record({"w": Tensor(Storage("0", 4), state=(Storage("0", 4), 0, (1 << 20,), (1,)))}),
        "ts-setitem.pt": Record({"w": Tensor(Storage("0", 4), items=iter([(0, 9.0)]))}),
        "ts-deep.pt": Record({"w": Deep(Tensor(Storage("0", 4)), 20_000)}),
        "ts-short.pt": Record({"w": Tensor(Storage("0", 8))}),
    }
    for name, root in bad_scripts.items():
        archive(w / name, root, {"0": FOUR})
    archive(w / "ts-bomb.pt", Record({"w": Tensor(Storage("0", 4))}), {"0": bytes(16 << 20)}, deflate=True)
    # npz sample batches
    (w / "notzip.npz").write_bytes(b"PK\x03\x04 torn")
    np.savez(w / "float.npz", arr_0=np.zeros((4, 32, 32, 3), dtype=np.float32))
    np.savez(w / "shape.npz", arr_0=np.zeros((4, 32), dtype=np.uint8))
    np.savez(w / "objects.npz", arr_0=np.array([{"a": 1}], dtype=object))
    with zipfile.ZipFile(w / "no-arr.npz", "w") as zf:
        zf.writestr("other.npy", b"")
    # saved configs
    for name, cfg in {
        "cfg-precision.json": {"preset": "shapes-tiny", "run": {"precision": "fp64"}},
        "cfg-ema.json": {"preset": "shapes-tiny", "model": {"ema": "false"}},
        "cfg-recon.json": {"preset": "shapes-tiny", "loss": {"recon": "l3"}},
        "cfg-preset.json": {"preset": "nope"},
        "cfg-aid.json": {"preset": "shapes-tiny", "run": {"fault_exit_step": 1}},
        "cfg-batch.json": {"optim": {"batch_size": 0}},
        "cfg-section.json": {"run": 3},
        "cfg-format.json": {"format": 99},
        "cfg-unknown.json": {"bogus": 1},
    }.items():
        (w / name).write_text(json.dumps(cfg))
    # latent stores
    for name, edit in STORE_EDITS.items():
        root = w / f"store-{name}"
        m = make_store(root)
        edit(m, root)
        (root / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))
    # export folders
    from sendvae.models.vae import VAE_CONFIGS, AutoencoderKL

    vae = w / "vae-nokey"
    AutoencoderKL(VAE_CONFIGS["tiny-f4d4"]).save_pretrained(vae)
    (vae / "sendvae.json").unlink()
    cfg = json.loads((vae / "config.json").read_text())
    del cfg["block_out_channels"]
    (vae / "config.json").write_text(json.dumps(cfg))
    vae = w / "vae-badrecord"
    AutoencoderKL(VAE_CONFIGS["tiny-f4d4"]).save_pretrained(vae)
    (vae / "sendvae.json").write_text(json.dumps({"format_version": 1, "config": {"ch": "16"}}))
    (w / "heads").mkdir()
    (w / "heads" / "heads.json").write_text(json.dumps({"kind": "linear"}))
    (w / "sit-export").mkdir()
    (w / "sit-export" / "model.safetensors").write_bytes(b"")
    (w / "sit-export" / "config.json").write_text(
        json.dumps({"format": "sendvae.SiT", "config": {"depth": "x"}})
    )
    # crafted training states in run folders
    for name, state in {
        "state-list": [1, 2],
        "state-nokeys": {"model": {}},
        "state-badcfg": {"model_config": 3},
    }.items():
        (w / name / "checkpoints").mkdir(parents=True)
        torch.save(state, w / name / "checkpoints" / "step-0000001.pt")
    # stage records
    for name, text in {
        "stage-json": "{broken",
        "stage-list": "[1]",
        "stage-nosummary": '{"settings": {}}',
    }.items():
        (w / name / "stages").mkdir(parents=True)
        (w / name / "stages" / "pretrain.json").write_text(text)


class _Payload:  # a pickle that would run code under a full unpickler
    def __reduce__(self):
        return (print, ("pwned",))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _set_path(m, root, key, value):
    m["shards"][0]["files"][key] = value


STORE_EDITS = {
    "parent": lambda m, r: _set_path(m, r, "labels", "../store-count-low/shard-00000.labels.npy"),
    "absolute": lambda m, r: _set_path(m, r, "labels", str(r / "shard-00000.labels.npy")),
    "count-low": lambda m, r: m["shards"][0].update(count=3),
    "count-high": lambda m, r: m["shards"][0].update(count=60),
    "no-stats": lambda m, r: m.pop("latent_stats"),
    "labels": lambda m, r: m["dataset"].update(num_classes=1),
    "shape": lambda m, r: m.update(latent_shape=[2, 4, 8]),
    "types": lambda m, r: m.update(resolution="16"),
    "shards": lambda m, r: m.update(shards={"0": 1}),
    "not-npy": lambda m, r: (r / "shard-00000.labels.npy").write_bytes(b"\x93NUMPY garbage"),
    "list": lambda m, r: m.clear(),  # {} : format_version missing
}

# -- the cases ----------------------------------------------------------------------------------------------

DRY = "--dry-run"
TV = ["train-vae", "--output-dir", "{out}"]
TS = ["train-sit", "--preset", "shapes-tiny", "--output-dir", "{out}", "--max-steps", "1"]
SAMPLE = ["sample", "--output-dir", "{out}", "--num-samples", "2", "--device", "cpu"]
EVAL = ["evaluate", "--device", "cpu", "--num-images", "4"]

# command -> (case id, argv); {w}: the inputs folder, {out}: a fresh output folder
CASES: dict[str, list[tuple[str, list[str]]]] = {
    "info": [("unknown-option", ["info", "--bogus"])],
    "train-vae": [
        ("batch-0", [*TV, "--batch-size", "0", DRY]),
        ("batch-neg", [*TV, "--batch-size", "-4", DRY]),
        ("batch-text", [*TV, "--batch-size", "many", DRY]),
        ("log-every-0", [*TV, "--run.log_every", "0", DRY]),
        ("ckpt-every-neg", [*TV, "--run.ckpt_every", "-1", DRY]),
        ("device", [*TV, "--device", "banana", DRY]),
        ("lr-nan", [*TV, "--lr", "nan", DRY]),
        ("recon-choice", [*TV, "--loss.recon", "l3", DRY]),
        ("bool-text", [*TV, "--model.ema", "maybe", DRY]),
        ("betas-one", [*TV, "--optim.betas", "0.9", DRY]),
        ("preset", [*TV, "--preset", "nope", DRY]),
        ("max-steps-0", [*TV, "--max-steps", "0", DRY]),
        ("unknown-flag", [*TV, "--optim.bogus", "1", DRY]),
        *[
            (f"config-{n}", [*TV, "--config", f"{{w}}/cfg-{n}.json", DRY])
            for n in ("precision", "ema", "recon", "preset", "aid", "batch", "section", "format", "unknown")
        ],
        ("config-missing", [*TV, "--config", "{w}/none.json", DRY]),
        ("config-notjson", [*TV, "--config", "{w}/notjson.json", DRY]),
        ("config-list", [*TV, "--config", "{w}/list.json", DRY]),
        ("config-folder", [*TV, "--config", "{w}/folder", DRY]),
    ],  # fmt: skip
    "train-sit": [
        ("batch-0", [*TS, "--batch-size", "0", DRY]),
        ("logit-std-0", [*TS, "--transport.logit_std", "0", DRY]),
        ("fd-samples-1", [*TS, "--eval.fd_samples", "1", DRY]),
        ("std-neg", [*TS, "--latents.std", "1,-1", DRY]),
        ("model-choice", [*TS, "--model", "SiT-Q/3", DRY]),
        ("store-missing", [*TS, "--store", "{w}/none"]),
        ("store-file", [*TS, "--store", "{w}/text.txt"]),
        *[(f"store-{n}", [*TS, "--store", f"{{w}}/store-{n}"]) for n in STORE_EDITS],
    ],
    "sample": [
        ("num-samples-0", [*SAMPLE[:3], "--num-samples", "0", "--model", "{w}/sit-export"]),
        ("batch-neg", [*SAMPLE, "--batch-size", "-1", "--model", "{w}/sit-export"]),
        ("steps-0", [*SAMPLE, "--steps", "0", "--model", "{w}/sit-export"]),
        ("cfg-text", [*SAMPLE, "--cfg-scale", "big", "--model", "{w}/sit-export"]),
        ("guidance-2", [*SAMPLE, "--guidance-low", "2", "--model", "{w}/sit-export"]),
        ("mode", [*SAMPLE, "--mode", "xyz", "--model", "{w}/sit-export"]),
        ("device", [*SAMPLE[:-2], "--device", "banana", "--model", "{w}/sit-export"]),
        ("model-missing", [*SAMPLE, "--model", "{w}/none.pt"]),
        ("model-folder", [*SAMPLE, "--model", "{w}/folder"]),
        ("model-export", [*SAMPLE, "--model", "{w}/sit-export"]),
        *[
            (f"model-{n}", [*SAMPLE, "--model", f"{{w}}/{n}"])
            for n in ("garbage.safetensors", "truncated.pt", "pickle.pt", "list.pt", "ts-oob.pt")
        ],
        *[
            (f"run-{n}", [*SAMPLE, "--exp-path", f"{{w}}/{n}"])
            for n in ("state-list", "state-nokeys", "state-badcfg", "folder")
        ],
    ],  # fmt: skip
    "evaluate": [
        ("missing", [*EVAL, "{w}/none.npz", "--ref", "{w}/none.npz"]),
        ("folder", [*EVAL, "{w}/folder", "--ref", "{w}/folder"]),
        ("num-images-0", ["evaluate", "--make-ref", "{out}/r.npz", "--data", "shapes", "--num-images", "0"]),
        ("batch-0", [*EVAL, "{w}/float.npz", "--ref", "{w}/float.npz", "--batch-size", "0"]),
        ("device", ["evaluate", "{w}/float.npz", "--ref", "{w}/float.npz", "--device", "banana"]),
        *[
            (f"npz-{n}", [*EVAL, f"{{w}}/{n}.npz", "--ref", f"{{w}}/{n}.npz"])
            for n in ("notzip", "float", "shape", "objects", "no-arr")
        ],
        *[
            (
                f"inception-{n}",
                [*EVAL, "--make-ref", "{out}/r.npz", "--data", "shapes", "--inception-weights", f"{{w}}/{n}"],
            )
            for n in ("garbage.pt", "ts-build.pt", "empty.pth")
        ],
    ],  # fmt: skip
    "probe": [
        ("num-images-0", ["probe", "--vae", "tiny-f4d4", "--num-images", "0"]),
        ("pca-0", ["probe", "--vae", "tiny-f4d4", "--pca-dim", "0"]),
        ("device", ["probe", "--vae", "tiny-f4d4", "--device", "banana"]),
        ("vae-missing", ["probe", "--vae", "{w}/none", "--output-dir", "{out}", "--num-images", "8"]),
        ("vae-nokey", ["probe", "--vae", "{w}/vae-nokey", "--output-dir", "{out}", "--num-images", "8"]),
        *[
            (f"store-{n}", ["probe", "--store", f"{{w}}/store-{n}", "--output-dir", "{out}"])
            for n in ("parent", "count-high", "no-stats", "labels")
        ],
    ],  # fmt: skip
    "cache-latents": [
        ("batch-0", ["cache-latents", "--vae", "tiny-f4d4", "--output-dir", "{out}", "--batch-size", "0"]),
        (
            "num-images-neg",
            ["cache-latents", "--vae", "tiny-f4d4", "--output-dir", "{out}", "--num-images", "-1"],
        ),
        (
            "shard-size-0",
            ["cache-latents", "--vae", "tiny-f4d4", "--output-dir", "{out}", "--shard-size", "0"],
        ),
        ("vae-missing", ["cache-latents", "--vae", "{w}/none", "--output-dir", "{out}", "--num-images", "4"]),
        *[
            (
                f"vae-{n}",
                ["cache-latents", "--vae", f"{{w}}/{n}", "--output-dir", "{out}", "--num-images", "4"],
            )
            for n in ("vae-nokey", "vae-badrecord", "truncated.pt", "garbage.safetensors", "ts-deep.pt")
        ],
    ],  # fmt: skip
    "prepare": [
        ("src-missing", ["prepare", "{w}/none", "{out}"]),
        ("src-file", ["prepare", "{w}/text.txt", "{out}"]),
        ("resolution", ["prepare", "{w}/folder", "{out}", "--resolution", "7"]),
        ("workers-neg", ["prepare", "{w}/folder", "{out}", "--workers", "-1"]),
        ("num-images-0", ["prepare", "{w}/folder", "{out}", "--data", "shapes", "--num-images", "0"]),
    ],
    "downstream": [
        ("action", ["downstream", "dance"]),
        ("head-steps-0", ["downstream", "train", "--head-steps", "0"]),
        ("lr-neg", ["downstream", "train", "--lr", "-1"]),
        ("batch-0", ["downstream", "train", "--batch-size", "0"]),
        (
            "heads-nokey",
            [
                "downstream",
                "eval",
                "--vae",
                "tiny-f4d4",
                "--heads",
                "{w}/heads",
                "--device",
                "cpu",
                "--output-dir",
                "{out}",
            ],
        ),
        (
            "heads-missing",
            [
                "downstream",
                "eval",
                "--vae",
                "tiny-f4d4",
                "--heads",
                "{w}/none",
                "--device",
                "cpu",
                "--output-dir",
                "{out}",
            ],
        ),
    ],  # fmt: skip
    "bench": [
        ("iters-0", ["bench", "vae", "--iters", "0"]),
        ("resolution-0", ["bench", "vae", "--resolution", "0"]),
        ("device", ["bench", "vae", "--device", "banana"]),
        ("stage", ["bench", "nothing"]),
    ],
    "study": [
        ("eval-points-0", ["study", "--eval_points", "0", DRY]),
        ("device", ["study", "--device", "banana", DRY]),
        ("scale", ["study", "--scale", "huge", DRY]),
    ],
    "demo": [
        ("scale", ["demo", "--scale", "huge", DRY]),
        ("seed-text", ["demo", "--seed", "abc", DRY]),
    ],
}

# format -> (case id, argv): one reader per format, through the command that reads it
FORMATS: dict[str, list[tuple[str, list[str]]]] = {
    "safetensors": [(n, [*SAMPLE, "--model", f"{{w}}/{n}"])
                    for n in ("garbage.safetensors", "huge-header.safetensors", "bad-header.safetensors")],
    "torch pickle": [(n, [*TV, "--preset", "shapes-tiny", "--vae-ckpt", f"{{w}}/{n}", "--max-steps", "1"])
                     for n in ("truncated.pt", "garbage.pt", "empty.pth", "pickle.pt", "list.pt")],
    "TorchScript": [(n, [*SAMPLE, "--model", f"{{w}}/{n}"])
                    for n in ("ts-oob.pt", "ts-negative.pt", "ts-strings.pt", "ts-build.pt", "ts-setitem.pt",
                              "ts-deep.pt", "ts-short.pt", "ts-bomb.pt")],
    "npz": [(n, [*EVAL, f"{{w}}/{n}.npz", "--ref", f"{{w}}/{n}.npz"])
            for n in ("notzip", "float", "shape", "objects", "no-arr")],
}  # fmt: skip


def run_case(argv: list[str]) -> tuple[int | None, str, BaseException | None]:
    """(exit code, stderr, the exception that escaped: a traceback) of ``sendvae ARGV`` run in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
        except Exception as e:  # noqa: BLE001 - what the user would see as a traceback
            return None, err.getvalue(), e
    return code, err.getvalue(), None


def folder_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("inputs")
    build_world(w)
    return w


def check(world: Path, tmp_path: Path, argv: list[str]) -> str:
    before = folder_hash(world)
    argv = [a.format(w=world, out=tmp_path / "out") for a in argv]
    code, err, escaped = run_case(argv)
    assert escaped is None, f"{argv}: {type(escaped).__name__}: {escaped}"
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (argv, code, lines[-5:])
    assert folder_hash(world) == before, f"{argv} changed {world}"
    return lines[0]


def _params(table):
    return [pytest.param(argv, id=f"{key}:{cid}") for key, cases in table.items() for cid, argv in cases]


@pytest.mark.parametrize("argv", _params(CASES))
def test_command_lines(world, tmp_path, argv):
    check(world, tmp_path, argv)


@pytest.mark.parametrize("argv", _params(FORMATS))
def test_weight_formats(world, tmp_path, argv):
    line = check(world, tmp_path, argv)
    assert "pwned" not in line


@pytest.mark.parametrize("name", ["stage-json", "stage-list", "stage-nosummary"])
def test_stage_records(world, name):
    from sendvae.pipeline.stages import Stages

    before = folder_hash(world)
    with pytest.raises(ValueError, match=r"pretrain.json .*delete it") as e:
        Stages(world / name, echo=lambda line: None).run("pretrain", lambda: {"summary": "ran"})
    assert "\n" not in str(e.value) and folder_hash(world) == before


# -- generated: saved configs and manifests with random values ----------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)


def _leaf_keys() -> list[str]:
    from sendvae.config import iter_fields
    from sendvae.train.vae_config import TrainVAEConfig

    return [name for name, _, _ in iter_fields(TrainVAEConfig)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(_leaf_keys()), value=json_values)
def test_saved_config_random_values(tmp_path, key, value):
    """Any JSON value at any key of a saved config: accepted (exit 0), or one line naming file and key."""
    section, _, leaf = key.rpartition(".")
    data: dict = {"preset": "shapes-tiny"}
    node = data
    for part in section.split(".") if section else []:
        node = node.setdefault(part, {})
    node[leaf] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    code, err, escaped = run_case(["train-vae", "--config", str(path), DRY])
    assert escaped is None, f"{key}={value!r}: {type(escaped).__name__}: {escaped}"
    lines = err.strip().splitlines()
    assert code == 0 or (code == 2 and len(lines) == 1 and key in lines[0]), (key, value, code, lines)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["resolution", "latent_shape", "dtype", "dataset", "teacher", "latent_stats",
                             "shards", "num_images", "vae"]), value=json_values)  # fmt: skip
def test_manifest_random_values(tmp_path_factory, path, value):
    """Any JSON value for a manifest key: the store reads (the value fits) or one line naming the file."""
    from sendvae.data.latent_store import LatentStore

    root = tmp_path_factory.mktemp("store")
    m = make_store(root)
    m[path] = value
    (root / "manifest.json").write_text(json.dumps(m))
    try:
        LatentStore(root)
    except ValueError as e:
        assert "\n" not in str(e) and "manifest.json" in str(e) or "shard-00000" in str(e), str(e)
