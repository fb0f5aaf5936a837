"""The RAE tokenizer (models/rae.py, train/rae.py): a frozen teacher encoder and a ViT decoder trained by
train-vae, exported like a VAE and used by cache-latents, train-sit and sample unchanged (CPU, tiny sizes)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sendvae.cli import main
from sendvae.commands.train_vae import add_arguments, resolve_config
from sendvae.data import ShapesDataset, to_float
from sendvae.data.latent_store import vae_fingerprint
from sendvae.models.rae import RAE, RAEConfig, RAEPosterior, noise_sigmas
from sendvae.models.rae_decoder import RAE_DECODERS
from sendvae.models.vae_io import load_vae
from sendvae.runtime import checkpoint as ckpt
from sendvae.runtime.distributed import DistInfo
from sendvae.runtime.log import RunLogger, read_stats
from sendvae.teachers import TEACHERS, Teacher, build_teacher
from sendvae.train.vae import VAETrainer
from sendvae.train.vae_config import PRESETS

STEPS = 40


def rae_args(out: Path, exp: str = "rae", steps: int = STEPS, *extra: str) -> list[str]:
    """train-vae --preset rae-tiny shrunk to seconds: 32 px shapes, batch 8, the GAN for the last 10 steps."""
    args = f"""--preset rae-tiny --output-dir {out} --exp-name {exp} --data.name shapes --resolution 32
        --batch-size 8 --max-steps {steps} --data.num_workers 0 --run.log_every 10 --run.ckpt_every 0
        --run.sample_every 0 --run.stats_images 32 --loss.gan_start {max(0, steps - 10)}"""
    return [*args.split(), *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A trained tiny RAE run folder (stats.jsonl, a checkpoint, export/vae)."""
    root = tmp_path_factory.mktemp("rae")
    assert main(["train-vae", *rae_args(root)]) == 0
    return root / "rae"


def _images(n: int = 4) -> torch.Tensor:
    ds = ShapesDataset(resolution=32)
    return to_float(torch.stack([ds[i][0] for i in range(n)]))


def _embedded_encoder(input_size: int = 128) -> Teacher:
    return build_teacher("efficientnet-lite0", resolution=32, input_size=input_size).plain_final_norm()


# -- training --------------------------------------------------------------------------------------------


def test_tiny_rae_trains_on_cpu_decoder_loss_falls(run):
    rows = read_stats(run / "stats.jsonl")
    assert len(rows) == STEPS // 10 and all(r["nan_steps"] == 0 for r in rows)
    # 10-step means of the L1 term. Measured, last / first, seeds 0-2: 0.48, 0.44, 0.40.
    assert rows[-1]["rec"] < 0.65 * rows[0]["rec"], (rows[0], rows[-1])
    assert rows[-1]["lpips"] < rows[0]["lpips"]
    assert "g" in rows[-1] and rows[-1]["kl"] == 0  # the GAN ran; a frozen encoder has no KL


def test_encoder_never_changes_and_only_the_decoder_is_optimised(tmp_path):
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = resolve_config(p.parse_args(rae_args(tmp_path, "inproc", 4)))
    tr = VAETrainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")), tmp_path / "inproc", RunLogger(None, False))
    rae = tr.model.vae
    assert isinstance(rae, RAE)
    opt_ids = {id(p) for g in tr.opt_g.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in rae.decoder.parameters()}, "the optimizer holds exactly the decoder"
    assert all(not p.requires_grad for p in rae.encoder.parameters())
    enc0 = {k: v.clone() for k, v in rae.encoder.state_dict().items()}
    dec0 = {k: v.clone() for k, v in rae.decoder.state_dict().items()}
    tr.model.train()
    assert rae.training and rae.decoder.training and not rae.encoder.training  # teacher stays in eval
    ds = tr.dataset
    for _ in range(3):  # steps with the GAN, its adaptive weight at the decoder's output layer
        batch = [torch.stack([ds[i][0] for i in range(8)]), torch.tensor([ds[i][1] for i in range(8)])]
        terms = tr.train_step(batch)
        tr.step += 1
        assert terms["skipped"] == 0 and "g" in terms
    for k, v in rae.encoder.state_dict().items():
        assert torch.equal(v, enc0[k]), f"encoder tensor {k} changed"  # weights and BatchNorm statistics
    assert all(p.grad is None for p in rae.encoder.parameters())
    assert any(not torch.equal(v, dec0[k]) for k, v in rae.decoder.state_dict().items())
    assert tr.dec_last is rae.decoder.head.weight and tr.enc_last is None


def test_trained_checkpoint_and_export_hold_the_untouched_encoder(run):
    fresh = _embedded_encoder().state_dict()  # the bundled weights, RAE-normalised
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    for k, v in fresh.items():
        assert torch.equal(state["model"][f"vae.encoder.{k}"], v), k
    exported = load_vae(run / "export" / "vae")
    assert isinstance(exported, RAE)
    for k, v in fresh.items():
        assert torch.equal(exported.encoder.state_dict()[k], v), k


# -- noise augmentation -----------------------------------------------------------------------------------


def test_noise_augmentation_is_on_by_default_with_rae_tau():
    assert (RAEConfig().noise_tau, RAEConfig().noise) == (0.8, "halfnormal")
    for preset in ("rae-tiny", "rae-dinov2-b"):
        m = PRESETS.build(preset).model
        assert (m.rae_noise_tau, m.rae_noise, m.sample_posterior) == (0.8, "halfnormal", True), preset
    cfg = RAEConfig(encoder="efficientnet-lite0", encoder_input_size=128, resolution=32)
    cfg.decoder = RAE_DECODERS["rae-tiny"]
    rae = RAE(cfg, build_teacher("efficientnet-lite0", resolution=32, input_size=128, random_init=True))
    x = _images(2)
    rae.train()
    post = rae.encode(x)
    assert not torch.equal(post.sample(), post.mean)  # training: z + sigma eps
    rae.eval()
    post = rae.encode(x)
    assert torch.equal(post.sample(), post.mean) and post.std.eq(0).all() and post.kl().eq(0).all()


@pytest.mark.parametrize("kind", ["halfnormal", "uniform"])
def test_noise_sigma_distribution(kind):
    """sigma ~ tau |N(0, 1)| (the paper) or tau U(0, 1) (RAE's code): mean and a Kolmogorov-Smirnov distance
    against the exact CDF; and the sample is z + sigma_b eps with one sigma per image."""
    tau, n = 0.8, 20000
    s = noise_sigmas(n, tau, kind, torch.Generator().manual_seed(0)).double()
    if kind == "halfnormal":
        mean, cdf = tau * math.sqrt(2 / math.pi), lambda v: torch.erf(v / (tau * math.sqrt(2)))
    else:
        mean, cdf = tau / 2, lambda v: (v / tau).clamp(0, 1)
    # mean: 4 standard errors at n = 20000 are < 2% of it
    assert abs(s.mean().item() - mean) < 0.02 * mean, (s.mean(), mean)
    # KS: the 0.1% critical value at n = 20000 is 1.95 / sqrt(n) = 0.014
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (cdf(s.sort().values) - ecdf).abs().max().item()
    assert ks < 0.02, ks
    # the sample: one sigma per image, then eps, from the same stream
    z = torch.randn(6, 5, 4, 4)
    got = RAEPosterior(z, tau, kind).sample(torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = noise_sigmas(6, tau, kind, g)
    want = z + sigma.view(-1, 1, 1, 1) * torch.randn(z.shape, generator=g)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- export and loading -------------------------------------------------------------------------------------


def test_export_load_vae_roundtrip(run, tmp_path):
    export = run / "export" / "vae"
    rae = load_vae(export)
    assert isinstance(rae, RAE) and not rae.training
    assert json.loads((export / "rae.json").read_text())["config"]["encoder"] == "efficientnet-lite0"
    x = _images(4)
    with torch.no_grad():
        post = rae.encode(x)
        z = post.mean
        recon = rae.decode(z)
    assert z.shape == (4, 112, 8, 8) and rae.latent_grid(32) == (8, 8) and rae.downsample_factor == 4
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    # the decoder's normalisation and the diffusion statistics: measured on the same images, z is ~N(0, 1)
    assert rae.latent_mean.abs().max() < 1e-4 and (rae.latent_std - 1).abs().max() < 1e-3
    # the training state loads to the same model, and a re-export is the same file content
    from_ckpt = load_vae(ckpt.latest_checkpoint(run))
    rae.save_pretrained(tmp_path / "again")
    again = load_vae(tmp_path / "again")
    for other in (from_ckpt, again):
        assert isinstance(other, RAE)
        with torch.no_grad():
            torch.testing.assert_close(other.decode(other.encode(x).mean), recon, rtol=0, atol=0)
    assert vae_fingerprint(again) == vae_fingerprint(rae)
    assert (tmp_path / "again" / "model.safetensors").read_bytes()[:8]  # safetensors, no pickle
    with pytest.raises(ValueError, match="carries its own config"):
        load_vae(export, config="tiny-f4d4")


def test_cache_train_sit_sample_on_the_rae_export(run, tmp_path):
    export = str(run / "export" / "vae")
    store = tmp_path / "store"
    args = f"""cache-latents --vae {export} --data shapes --resolution 32 --num-images 32 --output-dir {store}
        --workers 0 --batch-size 16 --no-progress"""
    assert main(args.split()) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["latent_shape"] == [112, 8, 8]
    sit = f"""train-sit --preset shapes-tiny --store {store} --output-dir {tmp_path} --exp-name sit
        --vae {export} --max-steps 4 --batch-size 8 --model.model SiT-S/1 --model.depth 2
        --model.hidden_size 128 --proj-coeff 0 --transport.time_shift auto --run.log_every 2"""
    assert main(sit.split()) == 0
    assert all(math.isfinite(r["loss"]) for r in read_stats(tmp_path / "sit" / "stats.jsonl"))
    out = tmp_path / "samples"
    sample = f"""sample --exp-path {tmp_path / "sit"} --num-samples 4 --batch-size 4 --steps 2
        --output-dir {out} --no-progress --device cpu"""
    assert main(sample.split()) == 0
    (npz,) = out.glob("*.npz")
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8


# -- bad input: one line each -------------------------------------------------------------------------------


class _PooledTeacher(Teacher):
    """A teacher that returns one global feature per image instead of patch tokens."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)).repeat(1, 40)[:, : self.embed_dim]  # (B, D)


def test_a_teacher_without_patch_tokens_is_refused():
    teacher = _PooledTeacher(TEACHERS["efficientnet-lite0"], 112, 128, False)
    cfg = RAEConfig(encoder="efficientnet-lite0", encoder_input_size=128, resolution=32)
    with pytest.raises(ValueError, match="patch tokens") as e:
        RAE(cfg, teacher)
    assert "\n" not in str(e.value)


def test_a_sit_narrower_than_the_latent_is_one_line(run, tmp_path, capsys):
    store = tmp_path / "store"
    args = f"""cache-latents --vae {run / "export" / "vae"} --data shapes --resolution 32 --num-images 8
        --output-dir {store} --workers 0 --no-progress"""
    assert main(args.split()) == 0
    capsys.readouterr()
    sit = f"""train-sit --preset shapes-tiny --store {store} --output-dir {tmp_path} --exp-name narrow
        --max-steps 1 --batch-size 8 --model.model SiT-S/1 --model.hidden_size 64 --proj-coeff 0"""
    assert main(sit.split()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "narrower" in err and "112" in err, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--teacher.input_size", "64"), "another encoder"),  # another token grid
        (("--teacher-random-init",), "another encoder"),  # the same teacher with other weights
        (("--model.vae_ckpt", "tiny-f4d4"), "is a VAE, not an RAE"),
        (("--loss.align", "sendvae"), "nothing to align"),
    ],
)
def test_bad_rae_runs_are_one_line(run, tmp_path, capsys, extra, message):
    export = str(run / "export" / "vae")
    ckpt_args = () if "--model.vae_ckpt" in extra else ("--model.vae_ckpt", export)
    assert main(["train-vae", *rae_args(tmp_path, "bad", 2), *ckpt_args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_decoder_for_the_same_encoder_continues(run, tmp_path):
    """--model.vae_ckpt with the encoder it was trained for: the run starts from its decoder."""
    export = run / "export" / "vae"
    assert main(["train-vae", *rae_args(tmp_path, "cont", 1), "--model.vae_ckpt", str(export)]) == 0
    st = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "cont"))
    src = load_vae(export)
    assert isinstance(src, RAE)
    torch.testing.assert_close(st["model"]["vae.feature_mean"], src.feature_mean, rtol=0, atol=0)


def test_vit_plain_final_norm_is_the_teachers_norm_without_affine():
    """A ViT teacher's RAE tokens: its final LayerNorm without weight / bias. Re-applying the affine gives
    the teacher's own tokens back, and the affine's tensors leave the state dict."""
    torch.manual_seed(0)
    kw = dict(resolution=32, random_init=True, model_kwargs={"depth": 1})
    own = build_teacher("dinov2-vit-s-reg", **kw)
    with torch.no_grad():
        own.model.norm.weight.uniform_(0.5, 1.5)
        own.model.norm.bias.uniform_(-0.5, 0.5)
    w, b = own.model.norm.weight.clone(), own.model.norm.bias.clone()
    plain = build_teacher("dinov2-vit-s-reg", **kw)
    plain.load_state_dict(own.state_dict())
    plain.plain_final_norm()
    assert "model.norm.weight" not in plain.state_dict() and plain.final_norm == "plain"
    x = _images(2)
    tokens = plain(x)
    torch.testing.assert_close(tokens * w + b, own(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(tokens.shape[:2]), rtol=0, atol=1e-5)


def test_the_study_row_has_the_vaes_token_grid_and_sit():
    """`sendvae study`'s rae row: the decoder trains as many steps as a VAE row's pre-training + fine-tune,
    the same SiT sees as many tokens (the teacher's 8 x 8 grid at 128 px = the tiny-f4d4's at 32 px)."""
    from sendvae.pipeline.study import _variant
    from sendvae.pipeline.study_config import VARIANTS, study_config

    cfg = study_config("ci")
    rae, vae = _variant(cfg, "rae", 0), _variant(cfg, "none", 0)
    assert "rae" in VARIANTS and rae.vae.model.vae == "rae-tiny" and rae.vae.loss.align == "none"
    assert rae.pretrain_steps == cfg.base.pretrain_steps + cfg.base.vae.optim.max_steps
    assert rae.sit.model == vae.sit.model and rae.sit.optim == vae.sit.optim
    assert (rae.sit.transport.time_shift, vae.sit.transport.time_shift) == ("auto", "none")
    res, t = rae.vae.data.resolution, rae.vae.teacher
    grid = build_teacher(t.enc_type, resolution=res, input_size=t.input_size, random_init=True).grid_size(res)
    assert grid == load_vae(vae.vae.model.vae).latent_grid(res) == (8, 8)


def test_the_dinov2_recipe_runs_with_a_vit_encoder(tmp_path):
    """rae-dinov2-b's recipe (ViT teacher with registers, EMA, adaptive GAN from step 0) for 2 steps, shrunk:
    DINOv2-S with registers, random weights, 64 px (56 px input: 4 x 4 patch tokens, the 5 prefix tokens
    dropped), the rae-tiny decoder, the bundled ST-LPIPS instead of the VGG files."""
    args = f"""--preset rae-dinov2-b --output-dir {tmp_path} --exp-name d --data.name shapes --resolution 64
        --batch-size 2 --max-steps 2 --model.vae rae-tiny --enc-type dinov2-vit-s-reg --teacher-random-init
        --loss.lpips_variant stlpips --loss.lpips_net alex --loss.gan_start 0 --run.log_every 1
        --run.stats_images 4 --data.num_workers 0 --model.disc_ndf 8 --model.disc_layers 2"""
    assert main(["train-vae", *args.split()]) == 0
    assert all("g" in r for r in read_stats(tmp_path / "d" / "stats.jsonl"))
    rae = load_vae(tmp_path / "d" / "export" / "vae")
    assert isinstance(rae, RAE) and rae.encoder.final_norm == "plain" and rae.downsample_factor == 16
    with torch.no_grad():
        z = rae.encode(to_float(torch.stack([ShapesDataset(resolution=64)[i][0] for i in range(2)]))).mean
    assert z.shape == (2, 384, 4, 4)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "d"))
    for k, v in rae.decoder.state_dict().items():  # the export is the EMA (the recipe keeps one)
        assert torch.equal(v, state["ema"][f"decoder.{k}"]), k
