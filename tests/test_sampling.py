"""Samplers: per-image seeds, classifier-free guidance and its interval, ODE/SDE on an analytic flow, REPA's
published samplers, and eval mode whatever the caller left."""

import pytest
import torch
from torch import nn

from sendvae.diffusion.sampling import NOISE_BLOCK, SamplerConfig, euler_sample, sample, score_from_velocity
from sendvae.models.sit import SiT, SiTConfig
from sendvae.models.sit_io import load_sit


def tiny_sit(num_classes: int = 5) -> SiT:
    torch.manual_seed(0)
    cfg = SiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2,
        num_classes=num_classes, z_dims=(), encoder_depth=1,
    )  # fmt: skip
    model = SiT(cfg).eval()
    with torch.no_grad():  # adaLN-Zero starts as v = 0: give every layer weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


class Recorder(nn.Module):
    """Wraps a model and records the labels of every call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, x, t, y):
        self.calls.append((t.clone(), y.clone()))
        return self.model(x, t, y)


class GaussianFlow(nn.Module):
    """Exact velocity E[eps - x0 | x_t] of x_t = (1 - t) x0 + t eps for x0 ~ N(mu, s^2), eps ~ N(0, 1)."""

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, t, y):
        t = t.view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.s**2 + t**2  # Var[x_t]
        r = x - (1 - t) * self.mu  # x_t - E[x_t]
        e_eps = t / var * r
        e_x0 = self.mu + (1 - t) * self.s**2 / var * r
        return e_eps - e_x0


class TwoVelocities(nn.Module):
    """v = 1 for a class label, 0 for the null class: guided v = scale inside the interval, 1 outside."""

    null = 3

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, y):
        self.batches.append((float(t[0]), int((y == self.null).sum())))
        return (y != self.null).float().view(-1, 1, 1, 1).expand_as(x).clone()


@pytest.mark.parametrize("mode,method", [("sde", "euler"), ("ode", "heun")])
def test_image_does_not_depend_on_batch_size(mode, method):
    model = tiny_sit()
    labels = torch.arange(16) % 5
    seeds = [100 + i for i in range(16)]
    # 40 SDE steps cross a noise block boundary (32)
    cfg = SamplerConfig(mode=mode, method=method, steps=40 if mode == "sde" else 6, cfg_scale=2.0)
    whole = sample(model, labels, seeds, cfg)
    parts = torch.cat([sample(model, labels[i : i + 4], seeds[i : i + 4], cfg) for i in range(0, 16, 4)])
    assert whole.shape == (16, 4, 8, 8) and whole.isfinite().all()
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
    # an image depends on its own seed only: reordering the batch reorders the images
    perm = torch.randperm(16)
    shuffled = sample(model, labels[perm], [seeds[i] for i in perm], cfg)
    torch.testing.assert_close(shuffled, whole[perm], atol=1e-5, rtol=1e-5)
    other = sample(model, labels[:4], [0, 1, 2, 3], cfg)
    assert (other - whole[:4]).abs().amax() > 0.1


def test_cfg_scale_one_is_unguided_euler_and_skips_unconditional_pass():
    model = Recorder(tiny_sit())
    labels, seeds, steps = torch.tensor([0, 1, 2, 4]), [7, 8, 9, 10], 5
    out = sample(model, labels, seeds, SamplerConfig(steps=steps, cfg_scale=1.0, guidance_high=0.5))
    assert all(len(y) == 4 and (y != 5).all() for _, y in model.calls)  # no null-class pass
    assert len(model.calls) == steps
    # independent Euler: x_1 from each image's own generator, dx = v dt
    x = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    for i in range(steps):
        t = 1 - i / steps
        x = x - model.model(x, torch.full((4,), t), labels) / steps
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    torch.testing.assert_close(euler_sample(model.model, noise, labels, 5, steps=steps), x)


@pytest.mark.parametrize("low,high", [(0.0, 1.0), (0.0, 0.5), (0.3, 0.7)])
def test_guidance_only_inside_interval(low, high):
    model, scale, steps = TwoVelocities(), 3.0, 10
    cfg = SamplerConfig(steps=steps, cfg_scale=scale, guidance_low=low, guidance_high=high)
    labels = torch.tensor([0, 1])
    out = sample(model, labels, [0, 1], cfg, null_class=TwoVelocities.null, latent_shape=(1, 2, 2))
    x1 = torch.stack([torch.randn(1, 2, 2, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    ts = [1 - i / steps for i in range(steps)]
    inside = [low - 1e-6 <= t <= high + 1e-6 for t in ts]
    # x_0 = x_1 - sum_i v(t_i) dt with v = scale inside, 1 outside
    expected = x1 - sum(scale if a else 1.0 for a in inside) / steps
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the unconditional half is run exactly at the times inside the interval
    assert [nulls > 0 for _, nulls in model.batches] == inside
    assert any(inside) and (not all(inside) or (low, high) == (0.0, 1.0))


class NoiseStreams:
    """Our per-image noise layout, written out: image i's generator (seed i) draws its starting noise, then
    its SDE noise in blocks of NOISE_BLOCK steps. (REPA draws torch.randn_like for the whole batch.)"""

    def __init__(self, seeds, shape):
        self.gens, self.shape = [torch.Generator().manual_seed(s) for s in seeds], shape

    def _draw(self, *lead):
        return torch.stack([torch.randn((*lead, *self.shape), generator=g) for g in self.gens])

    def initial(self):
        return self._draw()

    def step(self, k):
        if k % NOISE_BLOCK == 0:
            self.block = self._draw(NOISE_BLOCK)
        return self.block[:, k % NOISE_BLOCK]


def repa_sampler(model, noise, sde_noise, y, null_class, steps, mode, heun, cfg_scale, low, high):
    """REPA's euler_sampler (ODE, optionally Heun) and euler_maruyama_sampler (SDE) from samplers.py, written
    from the published algorithm: x in float64, the model fed float32. A step's guidance is decided once,
    by its start time t_cur in [low, high], and holds for Heun's corrector evaluated at t_next too.

    ODE: linspace(1, 0, steps + 1), x <- x + dt d, Heun x <- x + dt (d + d') / 2 except on the last step.
    SDE: linspace(1, 0.04, steps) then 0; drift d = v - w/2 s with w = 2 t and the linear path's score
    s = ((t - 1) v - x) / t, guided on the drift; x <- x + d dt + sqrt(w) sqrt(|dt|) eps, the last step
    (0.04 -> 0) without noise. `sde_noise(k)` is step k's eps.
    """

    def drift(x, t, guided, sde):
        xs, ys = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_class)])) if guided else (x, y)
        v = model(xs.float(), torch.full((xs.shape[0],), float(t)), ys).double()
        d = v - 0.5 * (2 * t) * (((t - 1) * v - xs) / t) if sde else v
        if guided:
            d_c, d_u = d.chunk(2)
            d = d_u + cfg_scale * (d_c - d_u)
        return d

    x = noise.double()
    if mode == "ode":
        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    else:
        ts = torch.cat(
            [torch.linspace(1, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
        )
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur
        guided = cfg_scale > 1.0 and low <= t_cur <= high
        d = drift(x, t_cur, guided, mode == "sde")
        x_next = x + dt * d
        if mode == "ode" and heun and i < steps - 1:
            d_prime = drift(x_next, t_next, guided, False)  # guided as the step's start decided
            x_next = x + dt * (0.5 * d + 0.5 * d_prime)
        if mode == "sde" and i < steps - 1:
            x_next = x_next + torch.sqrt(2 * t_cur) * sde_noise(i).double() * torch.sqrt(dt.abs())
        x = x_next
    return x.float()


@pytest.mark.parametrize(
    "mode,method,steps,low,high",
    [
        ("ode", "euler", 8, 0.0, 0.7),
        ("ode", "heun", 8, 0.0, 0.7),  # the step 0.75 -> 0.625 starts outside and ends inside
        ("ode", "heun", 8, 0.3, 1.0),  # the step 0.375 -> 0.25 starts inside and ends outside
        ("ode", "heun", 8, 0.0, 1.0),
        ("sde", "euler", 40, 0.0, 0.7),  # 40 steps cross a noise block
    ],
)
def test_matches_repa_samplers_with_guidance_interval(mode, method, steps, low, high):
    model = tiny_sit()
    labels, seeds = torch.tensor([0, 1, 2, 4]), [21, 22, 23, 24]
    cfg = SamplerConfig(
        mode=mode, method=method, steps=steps, cfg_scale=4.0, guidance_low=low, guidance_high=high
    )
    ours = sample(model, labels, seeds, cfg)
    streams = NoiseStreams(seeds, (4, 8, 8))
    x1 = streams.initial()
    with torch.no_grad():
        ref = repa_sampler(model, x1, streams.step, labels, 5, steps, mode, method == "heun", 4.0, low, high)
    assert (ref - x1).abs().mean() > 0.1  # the walk went somewhere
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)  # fp32 against REPA's float64 walk


def test_sampling_is_in_eval_mode_whatever_the_caller_left(tmp_path):
    model = tiny_sit()  # class_dropout_prob 0.1: in training mode labels drop to the null class at random
    loaded = load_sit(model.save_pretrained(tmp_path / "sit"))
    assert not loaded.training
    labels, seeds = torch.arange(32) % 5, list(range(32))
    cfg = SamplerConfig(steps=4, cfg_scale=2.0)
    first = sample(loaded, labels, seeds, cfg)
    assert torch.equal(sample(loaded, labels, seeds, cfg), first)
    # the check can fail: in training mode the forward itself drops labels
    x, t = torch.randn(32, 4, 8, 8), torch.full((32,), 0.5)
    with torch.no_grad():
        torch.manual_seed(0)
        dropped = loaded.train()(x, t, labels)
        assert (dropped - loaded.eval()(x, t, labels)).abs().amax() > 1e-3
    # a model left in training mode (here a mixed one) samples the same and gets its own modes back
    loaded.train()
    loaded.blocks[0].eval()
    modes = [m.training for m in loaded.modules()]
    assert torch.equal(sample(loaded, labels, seeds, cfg), first)
    assert [m.training for m in loaded.modules()] == modes
    noise = NoiseStreams(seeds, (4, 8, 8)).initial()
    trained = euler_sample(loaded, noise, labels, 5, steps=4, cfg_scale=2.0)
    assert [m.training for m in loaded.modules()] == modes
    torch.testing.assert_close(trained, euler_sample(loaded.eval(), noise, labels, 5, steps=4, cfg_scale=2.0))
    torch.testing.assert_close(trained, first, atol=1e-5, rtol=1e-5)


def test_score_from_velocity_is_exact_for_gaussians():
    mu, s, t = 0.7, 0.4, torch.tensor(0.3)
    x = torch.linspace(-2, 2, 9).view(-1, 1, 1, 1)
    v = GaussianFlow(mu, s)(x, t.expand(9), None)
    var = (1 - t) ** 2 * s**2 + t**2
    torch.testing.assert_close(score_from_velocity(x, v, t), -(x - (1 - t) * mu) / var)


@pytest.mark.parametrize(
    "cfg",
    [SamplerConfig(mode="ode", method="heun", steps=50), SamplerConfig(mode="sde", steps=250)],
    ids=["ode-heun-50", "sde-250"],
)
def test_samplers_reach_the_data_distribution(cfg):
    mu, s, n = 1.5, 0.5, 4000
    x = sample(GaussianFlow(mu, s), torch.zeros(n, dtype=torch.long), range(n), cfg, null_class=1,
               latent_shape=(1, 1, 1)).flatten()  # fmt: skip
    assert abs(x.mean().item() - mu) < 0.03  # standard error 0.008
    assert abs(x.std().item() - s) < 0.03  # standard error 0.006
    if cfg.mode == "ode":  # the ODE is a deterministic map: x_1 quantiles -> data quantiles
        x1 = torch.cat([torch.randn(1, generator=torch.Generator().manual_seed(i)) for i in range(n)])
        torch.testing.assert_close(x, mu + s * x1, atol=2e-3, rtol=0)


def test_bf16_autocast_close_to_fp32():
    model, labels = tiny_sit(), torch.tensor([0, 3])
    a = sample(model, labels, [1, 2], SamplerConfig(steps=4))
    b = sample(model, labels, [1, 2], SamplerConfig(steps=4, precision="bf16"))
    assert b.dtype == torch.float32 and 0 < (a - b).abs().amax() < 0.1


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="mode"):
        SamplerConfig(mode="ddim")
    with pytest.raises(ValueError, match="interval"):
        SamplerConfig(guidance_low=0.8, guidance_high=0.2)
    with pytest.raises(ValueError, match="seeds"):
        sample(tiny_sit(), torch.tensor([0, 1]), [0], SamplerConfig(steps=1))
