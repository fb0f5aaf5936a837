"""The dimension-dependent time shift (SD3 / RAE): the map, training draws, sampling grids, and the shift a
SiT records in its export."""

import math

import pytest
import torch

from sendvae.cli import main
from sendvae.diffusion.sampling import SamplerConfig, euler_sample, sample
from sendvae.diffusion.sit_source import load_sit_source
from sendvae.diffusion.transport import TransportConfig, sample_t, shift_time, training_losses
from sendvae.models.sit import SiT, SiTConfig
from sendvae.models.sit_io import load_sit
from sendvae.models.timesteps import T_SAMPLERS


def paper_shift(t: float, m: int, n: int = 4096) -> float:
    """RAE's eq.: t_m = alpha t_n / (1 + (alpha - 1) t_n), alpha = sqrt(m / n), with t = 1 the noise end."""
    a = math.sqrt(m / n)
    return a * t / (1.0 + (a - 1.0) * t)


def tiny_sit(time_shift: float = 1.0) -> SiT:
    torch.manual_seed(0)
    cfg = SiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=5,
        z_dims=(), encoder_depth=1, time_shift=time_shift,
    )  # fmt: skip
    model = SiT(cfg).eval()
    with torch.no_grad():  # adaLN-Zero starts as v = 0: give every layer weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("shape", [(768, 16, 16), (32, 16, 16), (4, 32, 32), (4, 8, 8)])
def test_shift_is_the_papers_formula(shape):
    m = math.prod(shape)
    alpha = TransportConfig(time_shift="auto").shift_alpha(shape)
    assert alpha == pytest.approx(math.sqrt(m / 4096))
    ts = torch.linspace(0, 1, 101, dtype=torch.float64)
    ours = shift_time(ts, alpha)
    ref = torch.tensor([paper_shift(t, m) for t in ts.tolist()], dtype=torch.float64)
    assert torch.allclose(ours, ref, atol=1e-12)
    # SD3's reason for it: the noise-to-signal ratio t / (1 - t) of x_t = (1 - t) x + t eps scales by alpha
    inner = ts[1:-1]
    assert torch.allclose(ours[1:-1] / (1 - ours[1:-1]), alpha * inner / (1 - inner), rtol=1e-10)
    assert TransportConfig(time_shift="auto", shift_base=m).shift_alpha(shape) == 1.0
    assert TransportConfig(time_shift="2.5").shift_alpha(shape) == 2.5
    assert TransportConfig().shift_alpha(shape) == 1.0


def test_rae_latents_shift_toward_noise():
    alpha = TransportConfig(time_shift="auto").shift_alpha((768, 16, 16))  # RAE's DINOv2-B latents
    assert alpha == pytest.approx(math.sqrt(48))
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert (shift_time(t, alpha) > t).all(), "larger latents need more noise: t = 1 is noise here"
    assert shift_time(torch.tensor(0.5, dtype=torch.float64), alpha).item() == pytest.approx(0.874, abs=1e-3)


@pytest.mark.parametrize("alpha", [0.25, 1.0, 1.5, 6.93])
def test_shift_is_monotone_with_fixed_endpoints(alpha):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    s = shift_time(t, alpha)
    assert s[0].item() == 0.0 and s[-1].item() == pytest.approx(1.0, abs=1e-15)
    assert (s.diff() > 0).all()
    assert ((s >= 0) & (s <= 1)).all()


def test_alpha_one_is_the_identity():
    t = torch.rand(1000)
    assert shift_time(t, 1.0) is t
    assert torch.equal(shift_time(t, 1.0 + 0.0), t)
    with pytest.raises(ValueError, match="time_shift"):
        TransportConfig(time_shift="-1")
    with pytest.raises(ValueError, match="time_shift"):
        TransportConfig(time_shift="sometimes")


@pytest.mark.parametrize("sampler", T_SAMPLERS)
def test_training_draws_are_shifted_for_every_t_sampler(sampler):
    cfg = TransportConfig(t_sampler=sampler, time_shift="3")
    plain = sample_t(4096, cfg, generator=torch.Generator().manual_seed(1))
    shifted = sample_t(4096, cfg, generator=torch.Generator().manual_seed(1), shift=3.0)
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))
    assert shifted.mean() > plain.mean() + 0.1

    # training_losses draws t itself: shifted by the config for the batch's (C, H, W)
    x, y = torch.randn(8, 4, 8, 8), torch.zeros(8, dtype=torch.long)
    model = tiny_sit()
    out = training_losses(model, x, y, None, cfg, generator=torch.Generator().manual_seed(2))
    ref = sample_t(8, cfg, generator=torch.Generator().manual_seed(2), shift=3.0)
    assert torch.allclose(out["t"], ref)
    auto = TransportConfig(t_sampler=sampler, time_shift="auto", shift_base=64)  # 4 * 8 * 8 / 64: alpha 2
    out = training_losses(model, x, y, None, auto, generator=torch.Generator().manual_seed(2))
    ref = sample_t(8, auto, generator=torch.Generator().manual_seed(2), shift=2.0)
    assert torch.allclose(out["t"], ref)


class TimeRecorder(torch.nn.Module):
    def __init__(self, model: SiT):
        super().__init__()
        self.model, self.config, self.times = model, model.config, []

    def forward(self, x, t, y):
        self.times.append(float(t.reshape(-1)[0]))
        return self.model(x, t, y)


@pytest.mark.parametrize("mode, method", [("ode", "euler"), ("ode", "heun"), ("sde", "euler")])
def test_sampling_warps_the_grid(mode, method):
    model = tiny_sit()
    y, seeds = torch.tensor([0, 1, 2]), [0, 1, 2]
    cfg = SamplerConfig(mode=mode, method=method, steps=6)
    plain = sample(model, y, seeds, cfg)
    shifted = sample(model, y, seeds, SamplerConfig(mode=mode, method=method, steps=6, time_shift=3.0))
    assert torch.isfinite(plain).all() and torch.isfinite(shifted).all()
    assert (plain - shifted).abs().max() > 1e-3, "the shift changes the samples"
    # alpha = 1 is exactly today's sampler
    assert torch.equal(plain, sample(model, y, seeds, SamplerConfig(mode=mode, method=method, steps=6,
                                                                     time_shift=1.0)))  # fmt: skip

    rec = TimeRecorder(model)
    sample(rec, y, seeds, SamplerConfig(mode=mode, method=method, steps=6, time_shift=3.0))
    if mode == "ode":
        grid = [1 - i / 6 for i in range(6)]
    else:
        grid = [1 + (0.04 - 1) * i / 5 for i in range(6)]
    expect = [3 * t / (1 + 2 * t) for t in grid]
    starts = rec.times if method == "euler" else rec.times[0::2][:5] + rec.times[-1:]
    assert starts == pytest.approx(expect, abs=1e-6)


def test_sit_exported_with_the_shift_samples_with_it(tmp_path):
    model = tiny_sit(time_shift=3.0)
    model.save_pretrained(tmp_path / "sit")
    loaded = load_sit(tmp_path / "sit")
    assert loaded.config.time_shift == 3.0
    y, seeds = torch.tensor([0, 4]), [5, 6]
    cfg = SamplerConfig(steps=5)
    recorded = sample(loaded, y, seeds, cfg)
    assert torch.equal(recorded, sample(model, y, seeds, SamplerConfig(steps=5, time_shift=3.0)))
    overridden = sample(loaded, y, seeds, SamplerConfig(steps=5, time_shift=1.0))
    assert (recorded - overridden).abs().max() > 1e-3, "the sampler config overrides the recorded shift"
    assert torch.equal(overridden, sample(tiny_sit(), y, seeds, cfg))
    # the trainer's grids and proxy FD sample through euler_sample: the recorded shift too
    noise = torch.randn(2, 4, 8, 8)
    assert torch.equal(
        euler_sample(loaded, noise, y, null_class=5, steps=5),
        euler_sample(loaded, noise, y, null_class=5, steps=5, time_shift=3.0),
    )
    assert "time shift 3" in loaded.config.describe()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 32 px -> tiny f4 VAE -> 4 x 8 x 8 latents; SiT/2 -> 16 tokens of 4 * 2 * 2 = 16 values
    path = tmp_path_factory.mktemp("store") / "plain"
    args = ["cache-latents", "--vae", "tiny-f4d4", "--data", "shapes", "--resolution", "32",
            "--num-images", "16", "--output-dir", str(path), "--workers", "0", "--batch-size", "16",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return str(path)


def train_sit_args(out, store: str, *extra: str) -> list[str]:
    return ["train-sit", "--preset", "shapes-tiny", "--store", store, "--output-dir", str(out), "--exp-name",
            "run", "--max-steps", "2", "--batch-size", "4", "--proj-coeff", "0", "--run.log_every", "1",
            "--run.ckpt_every", "0", "--run.sample_every", "0", "--model.depth", "1", *extra]  # fmt: skip


def test_train_sit_records_the_shift_it_trained_with(tmp_path, store):
    assert main(train_sit_args(tmp_path, store, "--transport.time_shift", "auto", "--transport.shift_base",
                               "64")) == 0  # fmt: skip
    sit = load_sit(tmp_path / "run" / "export" / "sit")
    assert sit.config.time_shift == 2.0  # sqrt(4 * 8 * 8 / 64)
    loaded = load_sit_source(tmp_path / "run")  # what `sendvae sample --exp-path` reads
    assert loaded.model.config.time_shift == 2.0
