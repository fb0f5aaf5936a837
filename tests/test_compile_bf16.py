"""The compiled and the bf16 paths, proven on CPU: train-vae (Send-VAE alignment), train-sit (REPA) and the
sampler under ``torch.compile`` (inductor, C++ on CPU) and under bf16 autocast, against eager fp32.

What each comparison allows, and why:
* compiled fp32 vs eager fp32: inductor fuses and reorders float sums, nothing else; the random draws inside
  the compiled VAE forward are made by eager's generator (``fallback_random``), so the runs see the same
  numbers. The first step's terms agree to 1e-5 relative. After it the float-order differences of the
  gradients are amplified by AdamW, whose first updates are lr * g / (|g| + eps), a sign for every element
  well above eps (see tests/test_grad_accum.py): 1e-2 at lr 2e-3 (train-vae), 1e-4 at 3e-4 (train-sit).
* bf16 autocast vs fp32: the networks round to 8 mantissa bits; losses and cosines are fp32. The first step
  (same weights) agrees to 2e-2 relative; later steps drift with the updates (within 6e-2 over 4 steps).
* compiled: one graph for the model's forward (no graph break, `torch._dynamo.explain`), compiled once over
  steps with different t, labels, noise and images (``unique_graphs`` stays 1: no recompilation).
The REPA / Send-VAE cosine is computed in fp32 (the known bf16 / fp16 NaN of REPA's issue threads): tokens
with large norms give a finite alignment loss equal to fp32's.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters

from sendvae.cli import main
from sendvae.commands._training import resolve_config
from sendvae.commands.train_sit import add_arguments as sit_arguments
from sendvae.commands.train_vae import add_arguments as vae_arguments
from sendvae.commands.train_vae import resolve_config as vae_config
from sendvae.diffusion.sampling import SamplerConfig, sample
from sendvae.diffusion.transport import TransportConfig, training_losses
from sendvae.models.sit import SiT
from sendvae.runtime.distributed import DistInfo
from sendvae.runtime.log import RunLogger, read_stats
from sendvae.train.sit import SiTTrainer
from sendvae.train.sit_config import PRESETS as SIT_PRESETS
from sendvae.train.sit_config import TrainSiTConfig
from sendvae.train.vae import VAETrainer

from .conftest import tiny_train_args
from .test_sit import tiny_config
from .test_train_sit import _args as sit_args
from .test_train_sit import _store

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
STEPS = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _store(
        tmp_path_factory.mktemp("stores") / "repa", True
    )  # 4 x 10 x 10 latents, cached teacher tokens


def _vae_trainer(tmp_path, **overrides) -> VAETrainer:
    p = argparse.ArgumentParser()
    vae_arguments(p)
    cfg = vae_config(p.parse_args(tiny_train_args(tmp_path, **overrides)))
    return VAETrainer(cfg, CPU, tmp_path / "run", RunLogger(None, False))


def _sit_trainer(tmp_path, store, **overrides) -> SiTTrainer:
    p = argparse.ArgumentParser()
    sit_arguments(p)
    cfg = resolve_config(
        p.parse_args(sit_args(tmp_path, store, **overrides)), SIT_PRESETS, TrainSiTConfig, "shapes-tiny"
    )
    return SiTTrainer(cfg, CPU, tmp_path / "run", RunLogger(None, False))


def _rel(a: float, b: float) -> float:
    """|a - b| relative to b, or to 0.1 for a term near 0 (a cosine term can be ~0 at step 1)."""
    return abs(a - b) / max(abs(b), 0.1)


def _compare(rows, ref, keys, first: float, later: float) -> None:
    """Each key of each step's row against the reference run's: ``first`` at step 1, ``later`` after."""
    assert len(rows) == len(ref) == STEPS
    for r, e in zip(rows, ref):
        for k in keys:
            tol = first if r["step"] == 1 else later
            assert _rel(r[k], e[k]) < tol, (r["step"], k, r[k], e[k])


def _run(command: str, args: list[str], run_dir) -> list[dict]:
    assert main([command, *args]) == 0
    return read_stats(run_dir / "stats.jsonl")


def _compiled_run(command: str, args: list[str], run_dir) -> tuple[list[dict], int]:
    """The run with --run.compile true (draws inside the graph made by eager's generator): its rows and the
    number of graphs dynamo compiled."""
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fallback_random=True):
        rows = _run(command, [*args, "--run.compile", "true"], run_dir)
    return rows, counters["stats"]["unique_graphs"]


# -- graph breaks -------------------------------------------------------------------------------------------


def test_compiled_forwards_have_no_graph_break(tmp_path, store):
    """The forward each trainer compiles, called as the trainer calls it: VAE + Send-VAE mapper (the
    posterior sample and the mapper's noise drawn inside); SiT with REPA features and label dropout."""
    vae_tr = _vae_trainer(tmp_path / "vae")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    explained = torch._dynamo.explain(vae_tr.model)(x, None)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons

    sit_tr = _sit_trainer(tmp_path / "sit", store)
    c, h, w = sit_tr.store.latent_shape
    drop = torch.tensor([True, False])
    args = (torch.randn(2, c, h, w), torch.rand(2), torch.tensor([1, 3]))
    explained = torch._dynamo.explain(sit_tr.model)(*args, force_drop_ids=drop, return_features=True)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


# -- the trainers: compiled and bf16 against eager fp32 -----------------------------------------------------


@pytest.mark.slow
def test_train_vae_compiled_and_bf16_match_eager(tmp_path):
    # Send-VAE alignment, LPIPS, KL; the GAN from step 0. The compiled run's mapper noise is off: inductor
    # may draw the mapper's t and eps (independent nodes) in either order, fallback_random or not, so with
    # it on the runs differ by their draws, not their arithmetic; the posterior sample, drawn alone, matches.
    def args(exp: str, **over) -> list[str]:
        return tiny_train_args(tmp_path, exp=exp, steps=STEPS, **{"loss.gan_start": 0, **over})

    no_noise = {"mapper.noise": "false"}
    eager = _run("train-vae", args("eager", **no_noise), tmp_path / "eager")
    compiled, graphs = _compiled_run("train-vae", args("compiled", **no_noise), tmp_path / "compiled")
    assert graphs == 1  # one graph, compiled once over 4 steps of new images and posterior samples
    # measured: step 1 within 3.3e-7, steps 2-4 within 3.4e-3 (kl, g: AdamW's amplification, module docstring)
    _compare(compiled, eager, ("loss", "rec", "lpips", "kl", "align", "g", "d", "grad_norm"), 1e-5, 1e-2)
    # bf16 with the mapper's noise (new t each step), no GAN (with it: test_train_vae_bf16_with_the_gan)
    no_gan = {"loss.gan_weight": 0}
    ref = _run("train-vae", args("eager-nogan", **no_gan), tmp_path / "eager-nogan")
    bf16 = _run("train-vae", args("bf16", **no_gan, **{"run.precision": "bf16"}), tmp_path / "bf16")
    _compare(bf16, ref, ("loss", "rec", "lpips", "kl", "align", "grad_norm"), 2e-2, 6e-2)


def test_train_vae_bf16_with_the_gan(tmp_path):
    """bf16 autocast with the GAN from step 0: the generator's losses run under the forward's autocast
    (LPIPS and the discriminator read the bf16 reconstruction; each term reduced in fp32) and match fp32's."""

    def args(exp: str, **over) -> list[str]:
        return tiny_train_args(tmp_path, exp=exp, steps=STEPS, **{"loss.gan_start": 0, **over})

    ref = _run("train-vae", args("fp32"), tmp_path / "fp32")
    bf16 = _run("train-vae", args("bf16", **{"run.precision": "bf16"}), tmp_path / "bf16")
    # measured: step 1 within 0.6%; after, the VAE terms within 4.4% (lpips, step 4), the GAN's within 10.6%
    # (g near 0 at step 2: -0.070 vs -0.080, relative to 0.1) and 5.7% (step 4)
    _compare(bf16, ref, ("loss", "rec", "lpips", "kl", "align", "grad_norm"), 2e-2, 6e-2)
    _compare(bf16, ref, ("g", "d"), 2e-2, 0.15)


@pytest.mark.slow
def test_train_sit_compiled_and_bf16_match_eager(tmp_path, store):
    # REPA on cached teacher tokens; every step draws new t, noise, flips, label dropout and batch
    def args(exp: str, **over) -> list[str]:
        return sit_args(tmp_path, store, exp=exp, steps=STEPS, **over)

    eager = _run("train-sit", args("eager"), tmp_path / "eager")
    keys = ("loss", "denoise", "proj", "grad_norm")
    compiled, graphs = _compiled_run("train-sit", args("compiled"), tmp_path / "compiled")
    assert graphs == 1
    _compare(compiled, eager, keys, 1e-4, 1e-4)
    bf16 = _run("train-sit", args("bf16", **{"run.precision": "bf16"}), tmp_path / "bf16")
    _compare(bf16, eager, keys, 2e-2, 6e-2)


# -- the sampler --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sampler_compiled_and_bf16_match_eager(tmp_path, store):
    """The SDE sampler with guidance on every step (one batch shape: 2B) over 6 steps, each a new t: the
    compiled SiT once, no recompilation; compiled vs eager 1e-4; bf16 autocast vs fp32 within 5e-2."""
    sit = _sit_trainer(tmp_path, store).ema.eval()
    labels, seeds = torch.tensor([0, 1, 2]), [11, 12, 13]
    cfg = SamplerConfig(mode="sde", steps=6, cfg_scale=2.0)
    eager = sample(sit, labels, seeds, cfg)
    torch._dynamo.reset()
    counters.clear()
    compiled = sample(torch.compile(sit), labels, seeds, cfg)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    low = sample(sit, labels, seeds, SamplerConfig(mode="sde", steps=6, cfg_scale=2.0, precision="bf16"))
    assert torch.isfinite(low).all()
    assert float((low - eager).norm() / eager.norm()) < 5e-2


# -- the fp32 cosine under bf16 -----------------------------------------------------------------------------


def test_repa_loss_with_large_norm_tokens_is_finite_in_bf16():
    """REPA's projection loss on tokens of norm ~1e4 (the projector scaled up) under bf16 autocast: finite,
    and equal to fp32's within the rounding of bf16 inputs. In fp16 the same tokens' squared norms overflow
    (> 65504), the failure REPA's issue threads report; the loss normalises in fp32."""
    torch.manual_seed(0)
    sit = SiT(tiny_config())
    with torch.no_grad():
        sit.projectors[0][-1].weight.mul_(3e3)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    teacher = 300 * torch.randn(3, sit.config.num_tokens, 24)
    cfg, t, eps = TransportConfig(proj_coeff=0.5), torch.rand(3), torch.randn(3, 4, 8, 8)
    ref = training_losses(sit, x, y, teacher, cfg, t=t, noise=eps)
    feats = sit(x, t, y, return_features=True)[1][0].detach()
    assert feats.norm(dim=-1).min() > 256
    assert torch.isinf((feats.half() * feats.half()).sum(-1)).all()  # fp16: |f|^2 > 65504
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = training_losses(sit, x, y, teacher, cfg, t=t, noise=eps)
    assert torch.isfinite(low["proj"]) and low["proj"].dtype == torch.float32
    assert abs(low["proj"].item() - ref["proj"].item()) < 1e-2
    low["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in sit.parameters() if p.grad is not None)


def test_send_vae_alignment_with_large_norm_tokens_is_finite_in_bf16(tmp_path):
    """The Send-VAE mapper's tokens scaled to norms ~1e4, one train-vae step in bf16 autocast and one in
    fp32 from the same weights: the alignment term is finite and the same within bf16 rounding."""
    terms = {}
    for precision in ("fp32", "bf16"):
        tr = _vae_trainer(tmp_path / precision, **{"run.precision": precision, "loss.gan_weight": 0})
        with torch.no_grad():
            last = [m for m in tr.model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.mul_(1e3)
            last.bias.mul_(1e3)
        batch = torch.stack([tr.dataset[i][0] for i in range(4)])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            x = batch.float() / 127.5 - 1
            pred = tr.model(x)[3]
        assert pred.float().norm(dim=-1).min() > 256
        terms[precision] = tr.train_step(batch)
    assert torch.isfinite(terms["bf16"]["align"]) and terms["bf16"]["skipped"].item() == 0
    assert abs(terms["bf16"]["align"].item() - terms["fp32"]["align"].item()) < 1e-2
    json.dumps({k: v.item() for k, v in terms["bf16"].items()})  # every logged term a finite scalar
