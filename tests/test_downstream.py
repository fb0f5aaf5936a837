"""Downstream heads (``sendvae downstream``): targets, scores against an independent implementation, heads
read back, every variant with an alignment head end to end on the embedded shapes, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from sendvae.cli import main
from sendvae.data.shapes import ShapesDataset
from sendvae.evaluation import downstream as dsm
from sendvae.evaluation.downstream_heads import (
    DownstreamHeads,
    SegDepthMeter,
    load_heads,
    save_heads,
    shapes_targets,
    train_heads,
)
from sendvae.models.sit import SiT, SiTConfig

from .conftest import tiny_train_args

VARIANTS = ("sendvae", "reals", "repa", "vf")  # every variant with an alignment head
RES = 32
FAST = {"num_images": 12, "batch_size": 6, "device": "cpu"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A 2-step train-vae export per variant (and one without alignment) at 32 px, tiny-f4d4."""
    root = tmp_path_factory.mktemp("downstream-vaes")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch-home"))
        for name in (*VARIANTS, "none"):
            # patch 1: the 8x8 latent on the teacher's 8x8 grid (VF compares them one to one)
            run = {
                "loss.align": name,
                "model.vae": "tiny-f4d4",
                "mapper.patch_size": 1,
                "loss.lpips_weight": 0,
            }
            assert main(["train-vae", *tiny_train_args(root, exp=name, steps=2, **run)]) == 0
            out[name] = root / name / "export" / "vae"
    return out


@pytest.fixture(scope="module")
def heads(exports, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("heads")
    return dsm.train_downstream(
        d, vae=exports["sendvae"], num_images=48, steps=30, batch_size=16, device="cpu"
    )


@pytest.fixture(scope="module")
def sit(tmp_path_factory) -> Path:
    """A random tiny SiT on the 4x8x8 latents (no recorded statistics: pass latent_stats='vae')."""
    torch.manual_seed(0)
    cfg = SiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                    num_classes=8, z_dims=(), encoder_depth=1)  # fmt: skip
    d = tmp_path_factory.mktemp("sit") / "sit"
    SiT(cfg).save_pretrained(d)
    return d


# ---------------------------------------------------------------------------------------------------------
# Targets and scores


def test_targets_are_background_plus_the_visible_shape_class():
    ds = ShapesDataset(resolution=RES, seed=0, second_object_prob=1.0)
    images, seg, depth = shapes_targets(ds, range(6))
    assert images.shape == (6, 3, RES, RES) and seg.shape == depth.shape == (6, RES, RES)
    for i in range(6):
        s = ds.render(i)
        a = s.attributes
        assert torch.equal(seg[i] == 0, torch.from_numpy(s.mask == 0))
        assert set(seg[i][torch.from_numpy(s.mask == 1)].tolist()) == {a["shape"] + 1}
        second = seg[i][torch.from_numpy(s.mask == 2)]
        assert set(second.tolist()) <= {a["second_shape"] + 1}
        torch.testing.assert_close(depth[i], torch.from_numpy(s.depth))


def test_meter_matches_sklearn_and_the_depth_formulas():
    g = torch.Generator().manual_seed(0)
    k = 5
    t = torch.randint(0, k - 1, (3, 7, 9), generator=g)  # class 4 never in the truth
    p = torch.where(torch.rand(t.shape, generator=g) < 0.6, t, torch.randint(0, k, t.shape, generator=g))
    d = torch.rand(t.shape, generator=g) + 0.25
    dh = d * torch.exp(torch.randn(t.shape, generator=g) * 0.3)
    meter = SegDepthMeter(k)
    meter.update(p[:2], dh[:2], t[:2], d[:2])  # two batches = one dataset-level count
    meter.update(p[2:], dh[2:], t[2:], d[2:])
    r = meter.result()
    yt, yp = t.flatten().numpy(), p.flatten().numpy()
    present = sorted(set(yt) | set(yp))  # a class in neither is left out
    assert r["miou"] == pytest.approx(jaccard_score(yt, yp, labels=present, average="macro"))
    assert r["fg_iou"] == pytest.approx(jaccard_score(yt > 0, yp > 0))
    dn, dhn = d.double().numpy(), dh.double().numpy()
    assert r["abs_rel"] == pytest.approx(np.mean(np.abs(dhn - dn) / dn))
    assert r["delta1"] == pytest.approx(np.mean(np.maximum(dhn / dn, dn / dhn) < 1.25))
    perfect = SegDepthMeter(k)
    perfect.update(t, d, t, d)
    assert perfect.result() == {"miou": 1.0, "fg_iou": 1.0, "abs_rel": 0.0, "delta1": 1.0}


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_heads_learn_and_read_back(tmp_path, kind):
    torch.manual_seed(0)
    seg = torch.zeros(32, 16, 16, dtype=torch.long)
    seg[:, 4:12, 4:12] = torch.randint(1, 3, (32,))[:, None, None]  # a square of class 1 or 2
    depth = torch.where(seg > 0, 0.5, 1.0)
    proto = torch.randn(3, 12)  # one token direction per class, on a 4x4 grid
    cls_tokens = torch.nn.functional.avg_pool2d(seg[:, None].float(), 4).round().long()  # (32, 1, 4, 4)
    tokens = proto[cls_tokens.flatten(1)] + 0.1 * torch.randn(32, 16, 12)
    heads, logs = train_heads(tokens, seg, depth, (4, 4), 3, kind, steps=150, batch_size=16, lr=1e-2)
    m, d = heads.predict(tokens, (16, 16))
    meter = SegDepthMeter(3)
    meter.update(m, d, seg, depth)
    r = meter.result()
    # predicting background everywhere: mIoU 0.25, fg IoU 0, AbsRel 0.25 (bilinear upsampling of a 4x4 grid
    # blurs the square's edges, so not 1, 1, 0)
    assert r["miou"] > 0.6 and r["fg_iou"] > 0.6 and r["abs_rel"] < 0.15, (r, logs)
    save_heads(heads, tmp_path, {"teacher": "toy"})
    again, meta = load_heads(tmp_path)
    assert meta["kind"] == kind and meta["teacher"] == "toy" and tuple(meta["grid"]) == (4, 4)
    torch.testing.assert_close(again(tokens, (16, 16))[0], heads(tokens, (16, 16))[0])


def test_heads_read_directions_only():
    """Alignment losses fix the direction of a predicted token, not its norm: so do the heads."""
    torch.manual_seed(0)
    heads = DownstreamHeads(12, 3, (2, 2), "conv").eval()
    x = torch.randn(2, 4, 12)
    torch.testing.assert_close(heads(x * 7.0, (8, 8))[0], heads(x, (8, 8))[0])


# ---------------------------------------------------------------------------------------------------------
# End to end: every variant with an alignment head


@pytest.mark.parametrize("name", VARIANTS)
def test_scores_for_every_variant(exports, heads, name):
    result = dsm.downstream_scores(exports[name], heads, **FAST)
    scores = result["scores"]
    assert list(scores) == ["teacher-real", "vae-real", "constant"] and result["meta"]["align"] == name
    assert (
        scores["constant"]["fg_iou"] == 0 and 0 < scores["constant"]["delta1"] < 1
    )  # objects are not depth 1
    for s in scores.values():
        assert 0 <= s["miou"] <= 1 and 0 <= s["fg_iou"] <= 1 and s["abs_rel"] >= 0 and 0 <= s["delta1"] <= 1
    if name != "sendvae":  # the same heads on the same images: the teacher row does not depend on the VAE
        assert (
            scores["teacher-real"]
            == dsm.downstream_scores(exports["sendvae"], heads, **FAST)["scores"]["teacher-real"]
        )


def test_generated_latents_are_scored_against_the_heads_on_the_decoded_image(
    exports, heads, sit, monkeypatch
):
    from sendvae.models.vae_io import load_vae

    result = dsm.downstream_scores(exports["reals"], heads, sit=sit, latent_stats="vae", **FAST)
    gen = result["scores"]["vae-generated"]
    assert result["meta"]["sit"] == str(sit) and 0 <= gen["miou"] <= 1
    # features that are the teacher's of the decoded sample agree with the reference exactly
    vae = load_vae(exports["reals"])
    teacher = dsm.build_heads_teacher(
        json.loads((heads / "heads.json").read_text()), None, torch.device("cpu")
    )
    monkeypatch.setattr(dsm, "_head_tokens", lambda ex, z, grid: teacher(vae.decode(z).float().clamp(-1, 1)))
    exact = dsm.downstream_scores(exports["reals"], heads, sit=sit, latent_stats="vae", **FAST)
    assert exact["scores"]["vae-generated"] == {"miou": 1.0, "fg_iou": 1.0, "abs_rel": 0.0, "delta1": 1.0}


def test_cli_train_eval_predict(exports, sit, tmp_path, capsys):
    vae, out = str(exports["vf"]), tmp_path / "d"
    common = ["--batch-size", "8", "--device", "cpu"]
    argv = ["downstream", "train", "--vae", vae, "--output-dir", str(out / "heads"), "--num-images", "16",
            "--head-steps", "3", "--head", "conv", *common]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "heads" / "heads.json").read_text())["kind"] == "conv"
    gen = ["--sit", str(sit), "--latent-stats", "vae", "--steps", "2"]
    argv = ["downstream", "eval", "--vae", vae, "--heads", str(out / "heads"), "--output-dir",
            str(out / "eval"), "--num-images", "8", "--grid-images", "4", *gen, *common]  # fmt: skip
    assert main(argv) == 0
    md = (out / "eval" / "downstream.md").read_text()
    assert "| vae-generated |" in md and "mIoU" in md and "| teacher-real |" in md
    table = json.loads((out / "eval" / "downstream.json").read_text())
    rows = table["grid_rows"]  # the real and the generated image, and 5 (mask, depth) pairs
    assert table["meta"]["align"] == "vf" and len(rows) == 2 + 2 * 5 and rows[0] == "image"
    from PIL import Image

    w, h = Image.open(out / "eval" / "downstream.png").size
    assert w == 4 * (RES + 1) + 1 and h == len(table["grid_rows"]) * (RES + 1) + 1
    argv = ["downstream", "predict", "--vae", vae, "--heads", str(out / "heads"), "--output-dir",
            str(out / "pred"), "--num-images", "3", *gen, *common]  # fmt: skip
    assert main(argv) == 0
    with np.load(out / "pred" / "predictions.npz") as z:
        assert z["images"].shape == (3, RES, RES, 3) and z["masks"].shape == z["depths"].shape == (
            3,
            RES,
            RES,
        )
        assert z["masks"].max() < 9 and (z["depths"] > 0).all()
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, naming the problem and what to do


@pytest.mark.parametrize("source", ["none", "tiny-f4d4"])
def test_a_vae_without_an_alignment_head_is_one_line(exports, heads, tmp_path, capsys, source):
    vae = str(exports["none"]) if source == "none" else source
    for action in (["train", "--output-dir", str(tmp_path / "h")], ["eval", "--heads", str(heads)]):
        assert main(["downstream", *action, "--vae", vae, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "holds no alignment head" in err and "--loss.align" in err, err


def test_heads_for_another_teacher_grid_are_refused(exports, tmp_path, capsys):
    other = dsm.train_downstream(tmp_path / "h", resolution=64, num_images=8, steps=1, device="cpu")
    with pytest.raises(ValueError, match="train heads for it: sendvae downstream train --vae"):
        dsm.downstream_scores(exports["reals"], other, **FAST)
    assert main(["downstream", "eval", "--vae", str(exports["reals"]), "--heads", str(other)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_sit_for_other_latents_is_refused(exports, heads, tmp_path):
    cfg = SiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                    num_classes=8, z_dims=(), encoder_depth=1)  # fmt: skip
    SiT(cfg).save_pretrained(tmp_path / "sit")
    with pytest.raises(ValueError, match=r"makes latents \(4, 4, 4\); this VAE's are \(4, 8, 8\)"):
        dsm.downstream_scores(exports["reals"], heads, sit=tmp_path / "sit", latent_stats="vae", **FAST)


def test_eval_without_heads_names_the_options(exports, capsys):
    assert main(["downstream", "eval", "--vae", str(exports["reals"])]) == 2
    assert "needs --vae EXPORT and --heads DIR" in capsys.readouterr().err
