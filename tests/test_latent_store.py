"""The latent store and `cache-latents`: equivalence with direct encoding, statistics, 1 vs 2 processes,
resume after a kill, VAE fingerprint checks, teacher tokens, DataLoader workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sendvae.cli import main as cli_main
from sendvae.data import ShapesDataset, to_float
from sendvae.data.caching import STOP_AFTER_ENV
from sendvae.data.latent_store import (
    LatentStore,
    LatentStoreMismatchError,
    bytes_per_image,
    draw_latents,
    select_flip,
    state_fingerprint,
    vae_fingerprint,
)
from sendvae.data.shapes_config import ShapesConfig
from sendvae.models.vae_io import load_vae

RES, N, SHARD = 32, 36, 8  # 5 shards, the last one partial
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def main(argv: list[str]) -> int:
    return cli_main(["cache-latents", *argv])


def cache_args(vae: Path, out: Path, *extra: str) -> list[str]:
    return [
        *["--vae", str(vae), "--data", "shapes", "--num-images", str(N), "--resolution", str(RES)],
        *["--output-dir", str(out), "--batch-size", "3", "--shard-size", str(SHARD), "--workers", "0"],
        *["--no-progress", "--device", "cpu", *extra],
    ]


def read_all(root: Path) -> tuple[np.ndarray, np.ndarray]:
    store = LatentStore(root)
    return store.gather(range(len(store))).numpy(), store.labels


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vae") / "tiny"
    load_vae("tiny-f8d4").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def store_dir(vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "clean"
    assert main(cache_args(vae_dir, out)) == 0
    return out


def test_moments_equal_direct_encode(store_dir, vae_dir):
    vae = load_vae(vae_dir).eval()
    ds = ShapesDataset(ShapesConfig(resolution=RES, seed=0, length=N))
    images, labels = zip(*[ds[i] for i in range(N)])
    x = to_float(torch.stack(images))
    with torch.no_grad():
        post, post_flip = vae.encode(x), vae.encode(x.flip(-1))
    moments, stored_labels = read_all(store_dir)
    assert moments.shape == (N, 2, 2, 4, RES // 8, RES // 8) and moments.dtype == np.float32
    expected = torch.stack(
        [torch.stack([post.mean, post.std], 1), torch.stack([post_flip.mean, post_flip.std], 1)], 1
    )  # (N, 2 flips, 2, C, h, w)
    torch.testing.assert_close(torch.from_numpy(moments), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[:, 0], expected[:, 1])  # the mirror is encoded, not a copy
    np.testing.assert_array_equal(stored_labels, np.array(labels))


def test_statistics_equal_float64(store_dir):
    store = LatentStore(store_dir)
    m = store.gather(range(len(store))).double().numpy()
    mu, sd = m[:, :, 0], m[:, :, 1]  # (N, 2, C, h, w)
    # z ~ q(z|x) over images, flips and positions: E[z] = E[mu], E[z^2] = E[mu^2 + sigma^2]
    mean = mu.transpose(2, 0, 1, 3, 4).reshape(4, -1).mean(1)
    second = (mu**2 + sd**2).transpose(2, 0, 1, 3, 4).reshape(4, -1).mean(1)
    stats = store.manifest["latent_stats"]
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats["std"], np.sqrt(second - mean**2), rtol=1e-12)
    assert stats["count_per_channel"] == N * 2 * (RES // 8) ** 2

    # the samples the trainer draws have these statistics (Monte Carlo, 200 draws per image)
    g = torch.Generator().manual_seed(0)
    moments = store.gather(range(len(store)))
    z = torch.cat([draw_latents(moments, generator=g) for _ in range(200)])  # (200 N, C, h, w)
    zc = z.transpose(0, 1).reshape(4, -1).double()
    torch.testing.assert_close(zc.mean(1), torch.tensor(store.stats.mean).double(), rtol=0, atol=0.02)
    torch.testing.assert_close(zc.std(1), torch.tensor(store.stats.std).double(), rtol=0.02, atol=0)
    zn = store.stats.normalize(z).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(zn.mean(1), torch.zeros(4), rtol=0, atol=0.02)
    torch.testing.assert_close(store.stats.denormalize(store.stats.normalize(z)), z, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_processes_write_the_same_store(store_dir, vae_dir, tmp_path):
    out = tmp_path / "two"
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "sendvae.cli", "cache-latents"]
    r = subprocess.run([*cmd, *cache_args(vae_dir, out)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_all(store_dir), read_all(out)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (store_dir, out))
    assert ma["latent_stats"] == mb["latent_stats"]  # float64 sums in shard order: exactly equal
    assert ma["shards"] == mb["shards"]
    assert "2 process(es)" in r.stdout and "rank 0 encoded 3 shards" in r.stdout  # shards 0, 2, 4


def test_interrupted_run_resumes(store_dir, vae_dir, tmp_path, capsys):
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "sendvae.cli", "cache-latents", *cache_args(vae_dir, out)]
    r = subprocess.run(cmd, env={**ENV, STOP_AFTER_ENV: "2"}, capture_output=True, text=True)
    assert r.returncode == 75, r.stderr[-3000:]
    done = sorted(p.name for p in out.glob("shard-*.json"))
    assert done == ["shard-00000.json", "shard-00001.json"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="run the same command again"):
        LatentStore(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[01].*")}

    assert main(cache_args(vae_dir, out)) == 0
    assert "(2 already complete)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-0000[01].*")} == stamps  # not redone
    a, b = read_all(store_dir), read_all(out)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert LatentStore(out).manifest["latent_stats"] == LatentStore(store_dir).manifest["latent_stats"]


def test_store_from_another_vae_is_refused(store_dir, vae_dir, tmp_path, capsys):
    store = LatentStore(store_dir)
    vae = load_vae(vae_dir)
    store.check_vae(vae)
    store.check_vae(vae_fingerprint(vae))
    vae.set_latent_stats(torch.randn(4), torch.rand(4) + 0.5)  # the stats are not part of the weights
    store.check_vae(vae)
    torch.manual_seed(1)
    other = load_vae("tiny-f8d4")
    with pytest.raises(LatentStoreMismatchError) as err:
        store.check_vae(other)
    msg = str(err.value)
    assert store.vae_fingerprint in msg and vae_fingerprint(other) in msg and str(vae_dir) in msg

    # caching into the same folder with another VAE is refused instead of mixing shards
    other.save_pretrained(tmp_path / "other")
    partial = tmp_path / "partial"
    shutil.copytree(store_dir, partial)
    assert main(cache_args(tmp_path / "other", partial)) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and vae_fingerprint(other) in err and store.vae_fingerprint in err


def test_fingerprint_depends_on_values_not_dtype(vae_dir):
    vae = load_vae(vae_dir)
    fp = vae_fingerprint(vae)
    assert len(fp) == 64 and fp == vae_fingerprint(load_vae(vae_dir))
    rounded = load_vae(vae_dir)
    rounded.load_state_dict({k: v.half().float() for k, v in vae.state_dict().items()})
    fp_rounded = vae_fingerprint(rounded)
    assert fp_rounded != fp  # other values
    assert vae_fingerprint(rounded.half()) == fp_rounded  # same values in another dtype
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1e-3
    assert vae_fingerprint(vae) != fp


def test_manifest_contents(store_dir, vae_dir):
    store = LatentStore(store_dir)
    m = store.manifest
    vae = load_vae(vae_dir)
    assert m["vae"]["fingerprint"] == vae_fingerprint(vae)
    assert m["vae"]["config"] == vae.config.to_dict()
    assert m["vae"]["source"] == str(vae_dir.resolve())
    assert m["dataset"]["name"] == "shapes" and m["dataset"]["resolution"] == RES
    assert m["dataset"]["num_images"] == m["num_images"] == len(store) == N
    assert store.num_classes == 8 and m["dataset"]["classes"][0] == "circle"
    assert store.latent_shape == (4, RES // 8, RES // 8) and m["dtype"] == "fp32"
    assert m["num_shards"] == len(m["shards"]) == 5 and [s["count"] for s in m["shards"]] == [8] * 4 + [4]
    assert m["teacher"] is None and store.feature_shape is None
    assert store.stats.channels == 4 and min(store.stats.std) > 0


def test_teacher_tokens(vae_dir, tmp_path, capsys):
    out, n = tmp_path / "feats", 10
    args = cache_args(vae_dir, out, "--enc-type", "dinov2-vit-s", "--teacher-random-init")
    args[args.index("--num-images") + 1] = str(n)
    assert main(args) == 0
    printed = capsys.readouterr().out
    per_image = 2 * 4 * 384 * 2  # flips x tokens (2x2 at 28 px) x dim x fp16
    assert f"{n} x 2 flips x 4 tokens x 384 x 2 B" in printed and f"({per_image} B/image)" in printed
    assert printed.index("teacher tokens") < printed.index("rank 0 encoded")  # printed before encoding

    store = LatentStore(out, with_features=True)
    assert store.feature_shape == (4, 384)
    moments, feats, label = store[3]
    assert moments.shape == (2, 2, 4, 4, 4) and feats.shape == (2, 4, 384) and feats.dtype == torch.float16
    from sendvae.teachers import build_teacher

    torch.manual_seed(0)  # the command seeds the random teacher with --seed (0)
    teacher = build_teacher("dinov2-vit-s", resolution=RES, random_init=True)
    assert state_fingerprint(teacher) == store.manifest["teacher"]["fingerprint"]
    ds = ShapesDataset(ShapesConfig(resolution=RES, seed=0, length=n))
    x = to_float(torch.stack([ds[i][0] for i in range(n)]))
    expected = torch.stack([teacher(x), teacher(x.flip(-1))], 1).half()  # (n, 2, N, D)
    got = store.gather(range(n), key="features")
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-3, atol=2e-3)

    # the estimate is the payload of the files (plus one .npy header per file)
    sizes = bytes_per_image(store.latent_shape, "fp32", 4, 384)
    payload = sum(int(s["sizes"][key]) - 128 for s in store.manifest["shards"] for key in s["files"])
    assert payload == n * sizes["total"]


def test_dataloader_with_two_workers(store_dir):
    store = LatentStore(store_dir)
    loader = DataLoader(store, batch_size=8, num_workers=2, shuffle=False)
    moments, labels = zip(*loader)
    torch.testing.assert_close(torch.cat(moments), store.gather(range(N)), rtol=0, atol=0)
    assert torch.cat(labels).tolist() == store.labels.tolist()


def test_batches_and_draw_latents(store_dir):
    store = LatentStore(store_dir)
    batches = list(store.batches(8, seed=3))
    assert (
        len(batches) == N // 8 and batches[0][0].shape == (8, 4, 4, 4) and batches[0][1].dtype == torch.int64
    )
    again = list(store.batches(8, seed=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert not torch.equal(batches[0][1], next(store.batches(8, seed=3, epoch=1))[1])
    assert sorted(torch.cat([y for _, y in store.batches(8, drop_last=False)]).tolist()) == sorted(
        store.labels.tolist()
    )

    # with std = 0, z is exactly the mean of the chosen flip
    m = store.gather([0, 1, 2, 3]).clone()
    m[:, :, 1] = 0
    flips = torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(draw_latents(m, flips), m[torch.arange(4), flips, 0], rtol=0, atol=0)
    assert torch.equal(select_flip(m, flips.bool()), m[torch.arange(4), flips])
    with pytest.raises(ValueError, match=r"\(B, 2, 2, C, h, w\)"):
        draw_latents(m[:, 0])


def test_fp16_store_and_bf16_encoder(store_dir, vae_dir, tmp_path):
    out = tmp_path / "fp16"
    assert main(cache_args(vae_dir, out, "--dtype", "fp16", "--precision", "bf16")) == 0
    half, ref = read_all(out)[0], read_all(store_dir)[0]
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), ref, rtol=0.05, atol=0.05)
    assert sum(s["sizes"]["moments"] for s in LatentStore(out).manifest["shards"]) < (
        sum(s["sizes"]["moments"] for s in LatentStore(store_dir).manifest["shards"])
    )
