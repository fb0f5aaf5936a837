"""The ReaLS variant (``--loss.align reals``): its head, its two-term loss, its preset, a short CPU run."""

from __future__ import annotations

import json

import pytest
import torch

import sendvae
from sendvae.align import ALIGNMENTS, AlignInputs, load_exported_head
from sendvae.align.mapper import MapperConfig
from sendvae.align.reals import RealsHead, load_reals_head, reals_loss, split_reals_output
from sendvae.cli import main
from sendvae.runtime import checkpoint as ckpt
from sendvae.runtime.log import read_stats
from sendvae.train.vae_config import PRESETS, LossConfig

from .conftest import tiny_train_args


def _head(**kw) -> RealsHead:
    cfg = MapperConfig(hidden_dim=32, projector_dim=48, **kw)
    return RealsHead(4, (8, 8), 24, (4, 4), cfg)


# ---------------------------------------------------------------------------------------------------------
# The head


def test_head_outputs_global_then_patch_tokens_from_the_clean_latent():
    torch.manual_seed(0)
    head = _head(noise=True, depth=3).train()  # depth and noise are forced off: an MLP on the clean latent
    assert head.config.depth == 0 and head.config.noise is False and not head.patch.blocks
    z = torch.randn(2, 4, 8, 8)
    out = head(z)
    assert out.shape == (2, 1 + 16, 24) and head.token_grid == (4, 4)  # patch 2 from 8x8 onto 4x4
    assert torch.equal(head(z), out), "no noise: the same latent gives the same features"
    patch, glob = split_reals_output(out)
    torch.testing.assert_close(head.patch_tokens(z), patch)
    assert glob.shape == (2, 24)


def test_global_branch_reads_every_token_and_patch_tokens_are_local():
    torch.manual_seed(0)
    head = _head(latent_norm="none").eval()
    z = torch.randn(1, 4, 8, 8)
    z2 = z.clone()
    z2[..., :2, :2] += 3.0  # change one 2x2 patch of the latent: token 0 of the 4x4 grid
    a, b = head(z), head(z2)
    assert not torch.allclose(a[:, 0], b[:, 0]), "the global feature depends on every token"
    assert not torch.allclose(a[:, 1], b[:, 1])  # the changed token
    torch.testing.assert_close(a[:, 2:], b[:, 2:])  # the others: a per-token MLP


# ---------------------------------------------------------------------------------------------------------
# The loss: a patch term and a global term against the teacher's pooled feature


def test_loss_has_a_patch_and_a_global_term_with_their_weights():
    torch.manual_seed(0)
    target = torch.randn(3, 16, 8)
    pooled = target.mean(1)
    patch, glob = target.clone(), torch.randn(3, 8)
    loss, logs = reals_loss(patch, glob, target, pooled, weight_patch=0.7, weight_global=0.4)
    cos_g = torch.cosine_similarity(glob, pooled, dim=-1).mean()
    torch.testing.assert_close(loss, 0.4 * (1 - cos_g))  # patch tokens exact: only the global term is left
    torch.testing.assert_close(logs["cos"], torch.tensor(1.0))
    patch = torch.randn(3, 16, 8)
    loss, logs = reals_loss(patch, pooled * 2.5, target, pooled, 0.7, 0.4)  # global right up to scale
    cos_p = torch.cosine_similarity(patch, target, dim=-1).mean()
    torch.testing.assert_close(loss, 0.7 * (1 - cos_p))  # only the patch term is left
    torch.testing.assert_close(logs["cos_global"], torch.tensor(1.0))


def test_registry_loss_targets_the_pooled_teacher_feature_not_a_token():
    a = ALIGNMENTS["reals"]
    torch.manual_seed(0)
    target = torch.randn(2, 16, 8) + torch.randn(2, 1, 8)  # tokens share an image-level component
    cfg = LossConfig(reals_patch_weight=1.0, reals_global_weight=1.0)
    pooled = torch.cat([target.mean(1, keepdim=True), target], 1)  # global = the pooled feature
    first = torch.cat([target[:, :1], target], 1)  # global = a cls-like first token
    loss_pooled, logs = a.loss(AlignInputs(pooled, target), cfg)
    loss_first, _ = a.loss(AlignInputs(first, target), cfg)
    assert float(loss_pooled) < 1e-6 and float(logs["cos_global"]) == pytest.approx(1.0, abs=1e-6)
    assert float(loss_first) > 1e-3
    assert set(logs) | {"align"} == set(a.logged) == {"align", "cos", "cos_global"}


@pytest.mark.parametrize("zero, moved", [("reals_patch_weight", 0), ("reals_global_weight", 1)])
def test_each_weight_switches_its_term_off(zero, moved):
    """With one weight at 0, the gradient reaches only the other term's outputs (global: token 0)."""
    torch.manual_seed(0)
    pred = torch.randn(2, 17, 8, requires_grad=True)
    loss, _ = ALIGNMENTS["reals"].loss(AlignInputs(pred, torch.randn(2, 16, 8)), LossConfig(**{zero: 0.0}))
    loss.backward()
    g = pred.grad.abs().sum((0, 2))  # (17,)
    if moved == 0:  # patch weight 0: only the global token moves
        assert g[0] > 0 and torch.all(g[1:] == 0)
    else:
        assert g[0] == 0 and torch.all(g[1:] > 0)


# ---------------------------------------------------------------------------------------------------------
# The preset, a short run, bad input


def test_preset_sets_the_variant_and_the_kl_weight():
    cfg = PRESETS.build("reals-f16d32")
    assert cfg.loss.align == "reals" and cfg.mapper.depth == 0 and cfg.mapper.noise is False
    assert cfg.loss.kl_weight == 1e-6 and cfg.loss.reals_patch_weight == cfg.loss.reals_global_weight == 1.0


def test_kl_weight_is_an_option_of_the_preset(capsys):
    assert main(["train-vae", "--preset", "reals-f16d32", "--loss.kl_weight", "1e-4", "--dry-run"]) == 0
    loss = json.loads(capsys.readouterr().out)["loss"]
    assert loss["kl_weight"] == 1e-4 and loss["align"] == "reals"


def test_short_cpu_run_aligns_both_terms_and_exports_the_head(tmp_path):
    run = {"loss.align": "reals", "model.vae": "tiny-f4d4", "mapper.patch_size": 1, "loss.gan_start": 100}
    args = tiny_train_args(tmp_path, steps=8, **run)
    assert main(["train-vae", *args]) == 0
    rows = read_stats(tmp_path / "run" / "stats.jsonl")
    assert len(rows) == 8 and all({"cos", "cos_global", "align"} <= set(r) for r in rows)
    assert rows[-1]["align"] < rows[0]["align"]  # both terms are optimised
    assert rows[-1]["cos_global"] > rows[0]["cos_global"] and rows[-1]["cos"] > rows[0]["cos"]
    export = tmp_path / "run" / "export" / "vae"
    head = load_reals_head(export)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))["model"]
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, state[f"head.{k}"])
    ex = load_exported_head(export)
    vae = sendvae.load_vae(str(export))
    z = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).mean
    tokens = ex.tokens(z)
    assert ex.alignment.name == "reals" and tokens.shape == (2, 64, 112)  # patch tokens only
    torch.testing.assert_close(tokens, head(z)[:, 1:])


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"mapper.patch_size": 3}, ("patch_size 3", "8x8")),
        ({"mapper.patch_size": 2, "mapper.grid_mismatch": "error"}, ("teacher grid", "grid_mismatch")),
    ],
)
def test_grid_mismatch_is_one_line(tmp_path, capsys, overrides, words):
    args = tiny_train_args(
        tmp_path, steps=1, **{"loss.align": "reals", "model.vae": "tiny-f4d4", **overrides}
    )
    assert main(["train-vae", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sendvae train-vae: error:")
    assert all(w in err for w in words), err
