"""The independent judge: a small CNN trained on real Fashion-MNIST (or the shapes), cached by fingerprint."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sendvae.data.embedded import Embedded, resolve
from sendvae.data.fashion_mnist import DEFAULT_ROOT
from sendvae.evaluation.judge import JudgeRecipe, load_judge, train_judge_net
from sendvae.evaluation.scoring import ImageSet

needs_fmnist = pytest.mark.skipif(
    resolve("fashion-mnist", None, 32, fallback=True).name != "fashion-mnist",
    reason=f"Fashion-MNIST is not installed in {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def fmnist_judge(tmp_path_factory):
    """The demo's judge (the full recipe: 60000 images, 3 epochs; ~1-2 min on one thread)."""
    torch.set_num_threads(2)
    try:
        data = resolve("fashion-mnist", None, 32, fallback=False)
        return data, load_judge(data, cache=tmp_path_factory.mktemp("judges"))
    finally:
        torch.set_num_threads(1)


@needs_fmnist
@pytest.mark.slow
def test_judge_reads_real_images_and_not_noise_or_wrong_labels(fmnist_judge):
    data, judge = fmnist_judge
    assert judge.metric_name == "FD_fmnist-cnn" and judge.num_classes == 10
    assert judge.test_accuracy >= 0.88  # measured 0.912 (10000 test images); chance 0.10
    ref, other = ImageSet.take(data.split("reference"), 2000), ImageSet.take(data.split("eval"), 2000)
    judge.set_reference(ref.images)
    real = judge.scores(other.images, other.labels)
    assert real["class_accuracy"] >= 0.85
    assert min(real["per_class"]) > 0.5  # shirts are the weakest class (measured 0.72)
    shuffled = np.random.default_rng(0).permutation(other.labels)
    wrong = judge.scores(other.images, shuffled)
    assert wrong["class_accuracy"] < 0.2  # near chance (0.10)
    assert np.isclose(wrong["fd"], real["fd"])  # FD does not read the labels
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, other.images.shape, dtype=torch.uint8, generator=g)
    assert judge.scores(noise)["fd"] > 20 * real["fd"]


@needs_fmnist
def test_judge_is_cached_by_fingerprint_and_retrained_when_the_cache_is_foreign(tmp_path):
    data = resolve("fashion-mnist", None, 32, fallback=False)
    recipe = JudgeRecipe(epochs=1, train_images=512, batch_size=64)
    lines: list[str] = []
    first = load_judge(data, recipe, cache=tmp_path, echo=lines.append)
    assert any("training" in line for line in lines)
    files = list(tmp_path.glob("fmnist-cnn-32px-*.safetensors"))
    assert len(files) == 1
    lines.clear()
    again = load_judge(data, recipe, cache=tmp_path, echo=lines.append)
    assert lines == [] and again.test_accuracy == first.test_accuracy  # read, not trained
    # another recipe or dataset is another file, never the cached one
    shapes = load_judge(Embedded("shapes", None, 32), JudgeRecipe(epochs=1, train_images=256), cache=tmp_path)
    assert shapes.name == "shapes-cnn" and len(list(tmp_path.glob("*.safetensors"))) == 2
    # a file at the right name with another fingerprint (e.g. copied from another version): trained again
    tensors = load_file(str(files[0]))
    save_file(
        tensors, str(files[0]), metadata={"fingerprint": "0" * 64, "test_accuracy": "0.99", "per_class": "[]"}
    )
    lines.clear()
    judge = load_judge(data, recipe, cache=tmp_path, echo=lines.append)
    assert any("unusable" in line for line in lines) and judge.test_accuracy == first.test_accuracy
    # a truncated file: trained again
    files[0].write_bytes(files[0].read_bytes()[:100])
    lines.clear()
    assert load_judge(data, recipe, cache=tmp_path, echo=lines.append).test_accuracy == first.test_accuracy
    assert any("unusable" in line for line in lines)


@needs_fmnist
def test_judge_training_data_is_fingerprinted(tmp_path):
    """Other IDX bytes (another release, a changed file) are another judge."""
    from sendvae.evaluation.judge import data_fingerprint

    root = tmp_path / "fm"
    shutil.copytree(DEFAULT_ROOT, root)
    a = data_fingerprint(resolve("fashion-mnist", str(root), 32))
    name = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(name.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    name.write_bytes(gzip.compress(bytes(raw)))
    assert data_fingerprint(resolve("fashion-mnist", str(root), 32)) != a


def test_judge_training_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (256,), generator=g)
    recipe = JudgeRecipe(epochs=2, batch_size=32, seed=3)
    a, b = (train_judge_net(images, labels, 4, recipe).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_judge_net(images, labels, 4, JudgeRecipe(epochs=2, batch_size=32, seed=4)).state_dict()
    assert not torch.equal(a["fc.weight"], c["fc.weight"])


def test_shapes_judge_reads_the_shapes_class(tmp_path):
    data = Embedded("shapes", None, 32, "simple")
    judge = load_judge(data, JudgeRecipe(epochs=4, train_images=4000), cache=tmp_path)
    other = ImageSet.take(data.split("eval"), 400)
    # measured 0.835 (the demo's recipe, 20000 images x 3 epochs: 0.995); chance 0.125
    assert judge.scores(other.images, other.labels)["class_accuracy"] > 0.7


def test_judge_refuses_float_images(tmp_path):
    data = Embedded("shapes", None, 32, "simple")
    judge = load_judge(data, JudgeRecipe(epochs=1, train_images=128), cache=tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        judge.predict(torch.zeros(2, 3, 32, 32))


def test_missing_fashion_mnist_falls_back_to_the_shapes_and_says_so_first(tmp_path, monkeypatch, capsys):
    import sendvae.data.embedded as embedded
    import sendvae.pipeline.demo as demo
    from sendvae.pipeline.demo_config import demo_config

    monkeypatch.setattr(embedded, "DEFAULT_ROOT", str(tmp_path / "nowhere"))
    emb = resolve("fashion-mnist", None, 32)
    assert emb.name == "shapes" and "apt-get install -y dataset-fashion-mnist" in emb.note
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found in .*apt-get install"):
        resolve("fashion-mnist", str(tmp_path), 32)  # a folder given explicitly never falls back

    class Stop(Exception):
        pass

    seen = []

    def first_stage(cfg, root, init=None):
        seen.append(cfg.vae.data.name)
        raise Stop

    monkeypatch.setattr(demo, "train_vae_stage", first_stage)
    with pytest.raises(Stop):
        demo.run_demo(demo_config("ci"), tmp_path / "demo", progress=False)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[data] Fashion-MNIST not found") and "runs on the shapes" in err[0]
    assert seen == ["shapes"]


@needs_fmnist
def test_torchvision_layout_and_bad_files(tmp_path):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in Path(DEFAULT_ROOT).iterdir():
        (raw / f.name).symlink_to(f)
    emb = resolve("fashion-mnist", str(tmp_path / "tv"), 32)
    assert emb.name == "fashion-mnist" and len(emb.split("train")) == 60000 and len(emb.split("eval")) == 5000
    x, y = emb.split("reference")[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and torch.equal(x[0], x[1]) and 0 <= y < 10
    bad = tmp_path / "bad"
    shutil.copytree(DEFAULT_ROOT, bad)
    name = bad / "train-labels-idx1-ubyte.gz"
    name.write_bytes(gzip.compress(gzip.decompress(name.read_bytes())[:-10]))  # a truncated IDX file
    with pytest.raises(ValueError, match="truncated"):
        resolve("fashion-mnist", str(bad), 32)
