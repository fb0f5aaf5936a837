"""Readers that trust nothing: a latent store's manifest, a pipeline's stage records, the JSON records of
export folders and training states. Each malformed input is one error naming the file (and the key),
never a traceback and never a silent partial or out-of-folder read."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sendvae.data.latent_store import FORMAT_VERSION, LatentStore, write_shard
from sendvae.pipeline.stages import Stages
from sendvae.runtime.weights import WeightsError

C, H, W, N, CLASSES = 2, 4, 4, 6, 3


def make_store(root: Path, n: int = N) -> dict:
    """A hand-made latent store of one shard, as cache-latents lays it out (no VAE needed)."""
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    moments = g.standard_normal((n, 2, 2, C, H, W)).astype(np.float32)
    moments[:, :, 1] = np.abs(moments[:, :, 1]) + 0.1
    rec = write_shard(root, 0, 0, n, moments, np.arange(n) % CLASSES)
    manifest = {
        "format_version": FORMAT_VERSION, "resolution": 16, "latent_shape": [C, H, W], "dtype": "fp32",
        "dataset": {"name": "shapes", "resolution": 16, "num_classes": CLASSES},
        "vae": {"fingerprint": "f" * 64, "source": "test"}, "teacher": None, "num_images": n,
        "latent_stats": {"mean": [0.0] * C, "std": [1.0] * C},
        "shards": [{key: rec[key] for key in ("files", "sizes", "count")}],
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_hand_made_store_reads(tmp_path):
    make_store(tmp_path / "s")
    store = LatentStore(tmp_path / "s")
    assert len(store) == N and store.num_classes == CLASSES


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_path_out_of_the_store_is_refused(tmp_path, where):
    """A manifest naming a shard outside its folder was read silently (here: another store's labels)."""
    m = make_store(tmp_path / "s")
    other = tmp_path / "other"
    make_store(other)
    name = m["shards"][0]["files"]["labels"]
    m["shards"][0]["files"]["labels"] = f"../other/{name}" if where == "parent" else str(other / name)
    write_manifest(tmp_path / "s", m)
    with pytest.raises(
        ValueError, match=r"manifest.json: shards\[0\].files.labels: .* not a file name inside"
    ):
        LatentStore(tmp_path / "s")


@pytest.mark.parametrize("count", [N - 2, N + 3])
def test_count_disagreeing_with_arrays_is_refused(tmp_path, count):
    """count below the arrays trained on a subset silently; above, an IndexError at the first batch."""
    m = make_store(tmp_path / "s")
    m["shards"][0]["count"], m["num_images"] = count, count
    write_manifest(tmp_path / "s", m)
    with pytest.raises(ValueError, match=rf"shard-00000.moments.npy holds .* \(shards\[0\].count {count}\)"):
        LatentStore(tmp_path / "s")


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda m: m.pop("latent_stats"), "latent_stats.mean is missing"),
        (lambda m: m["dataset"].update(num_classes=2), "labels outside [0, 2)"),  # labels go up to 2
        (lambda m: m.update(latent_shape=[C, H, 2 * W]), "moments.npy holds float32 (6, 2, 2, 2, 4, 4)"),
        (lambda m: m.update(latent_shape=[C, H]), "latent_shape: expected [C, h, w]"),
        (lambda m: m["latent_stats"].update(std=[1.0, 0.0]), "latent_stats.std: expected 2 finite numbers"),
        (lambda m: m["shards"][0].update(count="6"), "shards[0].count: expected int"),
        (lambda m: m.update(shards=[]), "shards: the store holds no shard"),
        (lambda m: m.update(shards=[7]), "shards[0]: expected an object"),
        (lambda m: m.update(dtype="fp64"), "dtype: 'fp64' is not one of fp32, fp16"),
        (lambda m: m.update(teacher={"name": "x"}), "teacher.tokens is missing"),
        (lambda m: m.update(num_images=99), "num_images: 99 but the shards hold 6"),
    ],
)
def test_malformed_manifest_is_one_error_naming_the_key(tmp_path, edit, says):
    m = make_store(tmp_path / "s")
    edit(m)
    write_manifest(tmp_path / "s", m)
    with pytest.raises(ValueError) as e:
        LatentStore(tmp_path / "s")
    assert says in str(e.value) and str(tmp_path / "s") in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"x"', "[" * 100_000])
def test_manifest_that_is_not_an_object(tmp_path, text):
    make_store(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="manifest.json"):
        LatentStore(tmp_path / "s")


# -- stage records ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["{broken", "[1]", json.dumps({"settings": {}, "seconds": 1}), '{"summary": "s", "settings": 3}']
)
def test_broken_stage_record_is_one_error_naming_the_file(tmp_path, text):
    stages = Stages(tmp_path, echo=lambda line: None)
    stages.dir.mkdir()
    stages.path("train").write_text(text)
    with pytest.raises(ValueError, match=r"stages/train.json .*delete it to run stage 'train' again"):
        stages.run("train", lambda: {"summary": "ran"})


# -- export folders and training states ------------------------------------------------------------------


@pytest.fixture
def vae_export(tmp_path):
    from sendvae.models.vae import VAE_CONFIGS, AutoencoderKL

    out = tmp_path / "vae"
    AutoencoderKL(VAE_CONFIGS["tiny-f4d4"]).save_pretrained(out)
    return out


def test_vae_config_without_a_key(vae_export):
    """A diffusers config.json without block_out_channels was `KeyError: 'block_out_channels'`."""
    from sendvae.models.vae_io import load_vae

    (vae_export / "sendvae.json").unlink()  # config.json alone, as diffusers writes it
    cfg = json.loads((vae_export / "config.json").read_text())
    del cfg["block_out_channels"]
    (vae_export / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"config.json': key 'block_out_channels' is missing"):
        load_vae(vae_export)


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda m: m.update(config={**m["config"], "ch": "16"}), "(ch: expected an integer"),
        (lambda m: m.pop("config"), "key 'config' is missing"),
        (lambda m: m.update(format_version="1"), "malformed"),
    ],
)
def test_vae_record_malformed(vae_export, edit, says):
    from sendvae.models.vae_io import load_vae

    meta = json.loads((vae_export / "sendvae.json").read_text())
    edit(meta)
    (vae_export / "sendvae.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sendvae.json") as e:
        load_vae(vae_export)
    assert says in str(e.value)


def test_mapper_and_heads_records_without_a_key(tmp_path):
    from sendvae.align.mapper import load_mapper
    from sendvae.evaluation.downstream_heads import load_heads

    for name, load in (("mapper.json", load_mapper), ("heads.json", load_heads)):
        (tmp_path / name).write_text(json.dumps({"config": {}}))
        with pytest.raises(WeightsError, match=rf"{name}': key '\w+' is missing"):
            load(tmp_path)
        (tmp_path / name).write_text("[]")
        with pytest.raises(WeightsError, match=rf"{name}' holds a JSON list"):
            load(tmp_path)


@pytest.mark.parametrize("state", [{"model": {}}, {"model_config": {"depth": "x"}}, [1, 2]])
def test_crafted_training_state(tmp_path, state):
    from sendvae.diffusion.sit_source import load_sit_run

    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "step-0000001.pt")
    with pytest.raises(WeightsError, match=r"step-0000001.pt"):
        load_sit_run(tmp_path)
