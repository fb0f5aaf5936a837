import argparse
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sendvae.diffusion.sampling import SamplerConfig, sample
from sendvae.models.sit import SIT_MODELS, SiT, SiTConfig, flops_per_image, sit_config
from sendvae.models.sit_io import infer_sit_config, infer_time_convention, load_sit
from sendvae.models.vae_io import CheckpointMismatchError


def tiny_config(**kw) -> SiTConfig:
    base = dict(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        depth=3,
        num_heads=4,
        num_classes=7,
        encoder_depth=2,
        projector_dim=32,
        z_dims=(24,),
    )
    return SiTConfig(**{**base, **kw})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    """Every parameter random (adaLN and output layers included), activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        fan_in = p[0].numel() if p.ndim > 1 else 1
        p.copy_(scale * torch.randn(p.shape, generator=g) / fan_in**0.5)


def inputs(cfg: SiTConfig, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.rand(b, generator=g), torch.randint(0, cfg.num_classes, (b,), generator=g)


# -- sizes and FLOPs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,ref_m", [("S", 33.0), ("B", 130.0), ("L", 458.0), ("XL", 675.0)])
def test_param_counts_match_dit(size, ref_m):
    cfg = sit_config(f"SiT-{size}/2")
    with torch.device("meta"):
        model = SiT(cfg)
    n = model.num_params(projectors=False)
    assert abs(n / 1e6 - ref_m) / ref_m < 0.005, n


def test_xl2_exact_dit_count_and_projector():
    # DiT counts its pos_embed (a frozen parameter) and a 2C-channel output (learn_sigma): 675,129,632.
    cfg = sit_config("SiT-XL/2", learn_sigma=True)
    with torch.device("meta"):
        model = SiT(cfg)
    assert model.num_params(projectors=False) + model.pos_embed.numel() == 675_129_632
    proj = model.num_params() - model.num_params(projectors=False)
    assert 8.0e6 < proj < 8.2e6  # 1152 -> 2048 -> 2048 -> 768


def test_registry():
    assert sorted(SIT_MODELS) == sorted(f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (1, 2, 4))
    cfg = SIT_MODELS["SiT-B/1"](input_size=16, in_channels=32, num_classes=10)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.num_tokens) == (
        12,
        768,
        12,
        1,
        256,
    )
    with pytest.raises(ValueError, match="unknown SiT model"):
        sit_config("SiT-XXL/2")
    with pytest.raises(ValueError, match="encoder_depth"):
        tiny_config(encoder_depth=4)


def test_flops_xl2():
    cfg = sit_config("SiT-XL/2", input_size=32, in_channels=4)
    assert abs(flops_per_image(cfg) / 237.2e9 - 1) < 0.01
    assert abs(flops_per_image(cfg, training=True) / 724.2e9 - 1) < 0.01  # fwd + bwd with REPA


@pytest.mark.parametrize("patch", [1, 2])
def test_flops_match_torch_counter(patch):
    # torch's FlopCounterMode counts matmuls and convolutions independently of our formula (explicit
    # attention: the CPU's fused attention kernel is not in its table)
    cfg = tiny_config(patch_size=patch, fused_attn=False)
    model = SiT(cfg).eval()
    x, t, y = inputs(cfg, b=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert counter.get_total_flops() == pytest.approx(2 * flops_per_image(cfg), rel=1e-9)


# -- forward ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_forward_shapes(patch):
    cfg = tiny_config(patch_size=patch, z_dims=(24, 40))
    model = SiT(cfg)
    randomize(model)
    x, t, y = inputs(cfg)
    v, feats = model(x, t, y, return_features=True)
    assert v.shape == x.shape
    assert [f.shape for f in feats] == [(3, cfg.num_tokens, 24), (3, cfg.num_tokens, 40)]
    model.eval()
    torch.testing.assert_close(model.forward_features(x, t, y)[1], model(x, t, y, return_features=True)[1][1])


def test_learn_sigma_returns_velocity_half():
    cfg = tiny_config(learn_sigma=True)
    model = SiT(cfg).eval()
    randomize(model)
    x, t, y = inputs(cfg)
    v = model(x, t, y)
    assert v.shape == x.shape and model.final_layer.linear.out_features == 2 * 4 * cfg.in_channels


def test_adaln_zero_initial_output_is_zero():
    cfg = tiny_config()
    model = SiT(cfg)
    x, t, y = inputs(cfg)
    assert torch.count_nonzero(model(x, t, y)) == 0
    # every block starts as the identity
    h = torch.randn(2, cfg.num_tokens, cfg.hidden_size)
    c = torch.randn(2, cfg.hidden_size)
    assert torch.equal(model.blocks[0](h, c), h)


def test_label_dropout_uses_null_class():
    cfg = tiny_config(num_classes=7, class_dropout_prob=0.5)
    model = SiT(cfg)
    emb = model.y_embedder
    table = emb.embedding_table.weight
    assert table.shape[0] == 8
    y = torch.randint(0, 7, (4000,))
    out = emb(y, force_drop_ids=torch.ones(4000, dtype=torch.bool))
    assert torch.equal(out, table[7].expand_as(out))
    emb.train()
    out = emb(y)
    dropped = (out == table[7]).all(-1)
    kept = (out == table[y]).all(-1)
    assert torch.all(dropped ^ kept) and abs(dropped.float().mean().item() - 0.5) < 0.05
    emb.eval()
    assert torch.equal(emb(y), table[y])
    no_null = SiT(tiny_config(class_dropout_prob=0.0))
    assert no_null.y_embedder.embedding_table.weight.shape[0] == 7
    with pytest.raises(ValueError, match="null class"):
        no_null.y_embedder(y[:2], force_drop_ids=torch.ones(2))


def test_unfused_attention_and_checkpointing_agree():
    cfg = tiny_config()
    model = SiT(cfg).eval()
    randomize(model)
    slow = SiT(tiny_config(fused_attn=False)).eval()
    slow.load_state_dict(model.state_dict())
    x, t, y = inputs(cfg)
    torch.testing.assert_close(slow(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-5)
    grads = []
    for ckpt in (True, False):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        v, feats = model(x, t, y, return_features=True)
        (v.square().sum() + feats[0].square().mean()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g_ckpt, g in zip(*grads, strict=True):
        torch.testing.assert_close(g_ckpt, g)


def test_no_graph_breaks():
    cfg = tiny_config()
    model = SiT(cfg).train()
    x, t, y = inputs(cfg)
    explanation = torch._dynamo.explain(model)(x, t, y, return_features=True)
    assert explanation.graph_break_count == 0, explanation.break_reasons


# -- an independent implementation of the public REPA SiT, working on its state dict ----------------------


def repa_state_dict(c, p, d, depth, heads, mlp, classes, z_dims, proj_dim, grid, qk_norm, seed) -> dict:
    """Random tensors under REPA's key names and shapes (incl. its pos_embed and REPA-E's BatchNorm)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "x_embedder.proj.weight": (d, c, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (p * p * c, d),
        "final_layer.linear.bias": (p * p * c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })  # fmt: skip
        if qk_norm:
            for n in ("q_norm", "k_norm"):
                shapes[b + f"attn.{n}.weight"] = shapes[b + f"attn.{n}.bias"] = (d // heads,)
    for k, z in enumerate(z_dims):
        for j, (o, i_) in zip((0, 2, 4), [(proj_dim, d), (proj_dim, proj_dim), (z, proj_dim)]):
            shapes[f"projectors.{k}.{j}.weight"], shapes[f"projectors.{k}.{j}.bias"] = (o, i_), (o,)
    sd = {}
    for k, s in shapes.items():
        fan_in = math.prod(s[1:]) if len(s) > 1 else 1
        sd[k] = torch.randn(s, generator=g) / fan_in**0.5
        if k.endswith("_norm.weight"):
            sd[k] = 1 + 0.2 * sd[k]
    sd["pos_embed"] = torch.from_numpy(mae_pos_embed(d, grid)).float()[None]
    sd["bn.running_mean"], sd["bn.running_var"] = torch.randn(c), torch.rand(c) + 0.5
    sd["bn.num_batches_tracked"] = torch.tensor(5)
    return sd


def mae_pos_embed(d: int, grid: int) -> np.ndarray:
    """MAE's 2D sin-cos table: first half from the column index, second from the row index."""
    omega = 1.0 / 10000 ** (np.arange(d // 4, dtype=np.float64) / (d // 4))
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    parts = [
        np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))], 1)
        for pos in (cols, rows)
    ]
    return np.concatenate(parts, 1)


def ref_forward(sd, x, t, y, heads, p, encoder_depth, qk_norm):
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]
    ln = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)
    mod = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]
    b, c, hh, ww = x.shape
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.reshape(b, h.shape[1], -1).permute(0, 2, 1) + sd["pos_embed"]
    n, d = h.shape[1], h.shape[2]
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    tf = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    cond = (
        lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2")
        + sd["y_embedder.embedding_table.weight"][y]
    )
    feats = None
    for i in range(sum(k.endswith("attn.qkv.weight") for k in sd)):
        pre = f"blocks.{i}."
        m = lin(F.silu(cond), pre + "adaLN_modulation.1").chunk(6, 1)
        a = mod(ln(h), m[0], m[1])
        q, k, v = lin(a, pre + "attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        if qk_norm:
            q = F.layer_norm(q, q.shape[-1:], sd[pre + "attn.q_norm.weight"], sd[pre + "attn.q_norm.bias"])
            k = F.layer_norm(k, k.shape[-1:], sd[pre + "attn.k_norm.weight"], sd[pre + "attn.k_norm.bias"])
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        h = h + m[2][:, None] * lin(o, pre + "attn.proj")
        a = mod(ln(h), m[3], m[4])
        h = h + m[5][:, None] * lin(F.gelu(lin(a, pre + "mlp.fc1"), approximate="tanh"), pre + "mlp.fc2")
        if i + 1 == encoder_depth:
            feats = []
            for kk in range(sum(key.endswith(".4.weight") for key in sd if key.startswith("projectors."))):
                z = F.silu(lin(F.silu(lin(h, f"projectors.{kk}.0")), f"projectors.{kk}.2"))
                feats.append(lin(z, f"projectors.{kk}.4"))
    shift, scale = lin(F.silu(cond), "final_layer.adaLN_modulation.1").chunk(2, 1)
    out = lin(mod(ln(h), shift, scale), "final_layer.linear")
    gh, c_out = hh // p, out.shape[-1] // (p * p)  # c_out = 2C with learn_sigma
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(b, gh, gh, p, p, c_out)).reshape(b, c_out, hh, ww)
    return out, feats


@pytest.mark.parametrize("qk_norm", [False, True])
def test_repa_checkpoint_matches_reference(tmp_path, qk_norm):
    kw = dict(c=4, p=2, d=128, depth=3, heads=2, mlp=512, classes=10, z_dims=(48, 32), proj_dim=64, grid=4)
    ema = repa_state_dict(**kw, qk_norm=qk_norm, seed=1)
    raw = repa_state_dict(**kw, qk_norm=qk_norm, seed=2)
    args = argparse.Namespace(model="custom", encoder_depth=2, qk_norm=qk_norm, cfg_prob=0.1, fused_attn=True)
    path = tmp_path / "last.pt"
    # a REPA-E training checkpoint: both weight sets, the argparse args, DDP-style prefixes on one of them
    torch.save(
        {"model": {"module." + k: v for k, v in raw.items()}, "ema": ema, "args": args, "steps": 10}, path
    )

    model = load_sit(path)
    cfg = model.config
    assert not model.training and not load_sit(path, weights="model").training
    assert infer_sit_config(ema, vars(args)) == cfg
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.input_size) == (128, 3, 2, 2, 8)
    assert (cfg.num_classes, cfg.z_dims, cfg.encoder_depth, cfg.qk_norm) == (10, (48, 32), 2, qk_norm)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 9, 10])
    with torch.no_grad():
        for sd, m in ((ema, model), (raw, load_sit(path, weights="model"))):
            v, feats = m(x, t, y, return_features=True)
            v_ref, feats_ref = ref_forward(sd, x, t, y, 2, 2, 2, qk_norm)
            assert (v - v_ref).abs().max() < 1e-5 and v_ref.abs().mean() > 0.1
            for f, f_ref in zip(feats, feats_ref, strict=True):
                assert (f - f_ref).abs().max() < 1e-5


# -- time conventions: each accepted layout samples as its own repository's sampler -------------------------


def sit_state_dict(c, p, d, depth, heads, mlp, classes, grid, seed) -> dict:
    """Ma et al.'s SiT layout (its released SiT-XL-2-256x256.pt): DiT's tensor names, no REPA projectors, no
    latent BatchNorm, and learn_sigma: the final linear gives 2C channels per pixel."""
    sd = repa_state_dict(c, p, d, depth, heads, mlp, classes, (), 0, grid, False, seed)
    for k in [k for k in sd if k.startswith("bn.")]:
        del sd[k]
    g = torch.Generator().manual_seed(seed + 1)
    sd["final_layer.linear.weight"] = torch.randn(p * p * 2 * c, d, generator=g) / d**0.5
    sd["final_layer.linear.bias"] = torch.randn(p * p * 2 * c, generator=g)
    return sd


def per_seed_noise(seeds, shape) -> torch.Tensor:
    """Image i's starting noise: the first draw of torch.Generator().manual_seed(seeds[i])."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def sit_euler(sd, noise, y, steps, heads, p, cfg_scale=1.0, null_class=None) -> torch.Tensor:
    """SiT's ODE sampler (transport.Sampler.sample_ode, torchdiffeq's fixed-grid "euler") on its Linear path
    with velocity prediction, from the published algorithm, on the raw checkpoint forward.

    SiT's path is x_t = t x + (1 - t) eps: the walk starts from the noise at t = 0 and ends on data at t = 1,
    x <- x + v(x, t) dt over linspace(0, 1, steps + 1) (SiT's --num-sampling-steps counts grid points, so it
    is steps + 1), v = the first C of the model's 2C output channels. Guidance, when asked, acts on every
    channel (SiT's forward_with_cfg guides only 3: the bug we do not repeat).
    """
    c = noise.shape[1]

    def v(x, t, labels):
        return ref_forward(sd, x, t.expand(x.shape[0]), labels, heads, p, 0, False)[0][:, :c]

    x, ts = noise, torch.linspace(0, 1, steps + 1)
    for t, t_next in zip(ts[:-1], ts[1:]):
        d = v(x, t, y)
        if cfg_scale != 1.0:
            d_u = v(x, t, torch.full_like(y, null_class))
            d = d_u + cfg_scale * (d - d_u)
        x = x + (t_next - t) * d
    return x


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("layout", ["released", "train.py"])
def test_original_sit_checkpoint_samples_like_sit_euler(tmp_path, layout, cfg_scale):
    # 384 wide: 6 heads, from the width table (bare file) and from args.model "SiT-S/2" (train.py)
    kw = dict(c=4, p=2, d=384, depth=2, heads=6, mlp=1536, classes=5, grid=4)
    sd = sit_state_dict(**kw, seed=3)
    path = tmp_path / "SiT-S-2.pt"
    if layout == "released":  # a bare state dict
        torch.save(sd, path)
    else:  # SiT's train.py: model, ema, opt and its argparse arguments
        args = argparse.Namespace(
            model="SiT-S/2", path_type="Linear", prediction="velocity", loss_weight=None, num_classes=5
        )
        torch.save({"model": sit_state_dict(**kw, seed=4), "ema": sd, "opt": {}, "args": args}, path)
    model = load_sit(path)
    cfg = model.config
    assert (cfg.time_convention, cfg.learn_sigma, cfg.z_dims, cfg.num_heads) == ("sit", True, (), 6)
    assert not model.training
    labels, seeds, steps = torch.tensor([0, 3, 4]), [11, 12, 13], 8
    ours = sample(model, labels, seeds, SamplerConfig(steps=steps, cfg_scale=cfg_scale))
    noise = per_seed_noise(seeds, (4, 8, 8))
    with torch.no_grad():
        ref = sit_euler(sd, noise, labels, steps, heads=6, p=2, cfg_scale=cfg_scale, null_class=5)
    assert (ref - noise).abs().mean() > 0.5  # the walk went somewhere
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)  # fp32; |ref| up to ~7


def repa_euler(model_fn, noise, y, null_class, steps, cfg_scale, low, high) -> torch.Tensor:
    """REPA's euler_sampler (samplers.py), from the published algorithm: x in float64 from the noise at
    t = 1 to data at 0 over linspace(1, 0, steps + 1), x <- x + (t_next - t) d, guided when t is in
    [low, high]; the model sees float32 inputs."""
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x = noise.double()
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        tb = torch.full((x.shape[0],), float(t_cur))
        d = model_fn(x.float(), tb, y).double()
        if cfg_scale > 1.0 and low <= t_cur <= high:
            d_u = model_fn(x.float(), tb, torch.full_like(y, null_class)).double()
            d = d_u + cfg_scale * (d - d_u)
        x = x + (t_next - t_cur) * d
    return x.float()


def test_repa_checkpoint_samples_like_repa_euler(tmp_path):
    kw = dict(c=4, p=2, d=128, depth=3, heads=2, mlp=512, classes=10, z_dims=(48,), proj_dim=64, grid=4)
    sd = repa_state_dict(**kw, qk_norm=False, seed=5)
    args = argparse.Namespace(
        model="custom", encoder_depth=2, path_type="linear", prediction="v", cfg_prob=0.1
    )
    torch.save({"ema": sd, "args": args}, tmp_path / "last.pt")
    model = load_sit(tmp_path / "last.pt")
    assert (model.config.time_convention, model.config.learn_sigma) == ("repa", False)
    labels, seeds, steps = torch.tensor([1, 9, 4]), [0, 5, 6], 8
    ours = sample(model, labels, seeds, SamplerConfig(steps=steps, cfg_scale=3.0, guidance_high=0.7))
    noise = per_seed_noise(seeds, (4, 8, 8))
    with torch.no_grad():
        raw = lambda x, t, y: ref_forward(sd, x, t, y, 2, 2, 2, False)[0]
        ref = repa_euler(raw, noise, labels, 10, steps, 3.0, 0.0, 0.7)
    assert (ref - noise).abs().mean() > 0.5
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)  # fp32; |ref| up to ~7


def test_time_convention_from_args_and_layout(tmp_path, caplog):
    kw = dict(c=4, p=2, d=128, depth=2, heads=2, mlp=512, classes=5, grid=4)
    sd = sit_state_dict(**kw, seed=0)
    repa = repa_state_dict(**kw, z_dims=(16,), proj_dim=32, qk_norm=False, seed=0)
    assert (infer_time_convention(sd), infer_time_convention(repa)) == ("sit", "repa")
    # stored training arguments decide before the layout
    assert infer_time_convention(sd, {"path_type": "linear", "prediction": "v"}) == "repa"
    assert infer_time_convention(repa, {"path_type": "Linear", "prediction": "velocity"}) == "sit"
    refused = [
        ({"path_type": "GVP", "prediction": "velocity"}, "Linear path"),
        ({"path_type": "Linear", "prediction": "noise"}, "Linear path"),
        ({"path_type": "cosine", "prediction": "v"}, "cosine"),
        ({"model": "DiT-XL/2"}, "DiT"),
    ]
    for args, match in refused:
        with pytest.raises(CheckpointMismatchError, match=match):
            infer_time_convention(sd, args)
    with pytest.raises(ValueError, match="time_convention"):
        tiny_config(time_convention="edm")

    torch.save(sd, tmp_path / "sit.pt")
    model = load_sit(tmp_path / "sit.pt")
    assert "SiT time" in model.config.describe()
    # the model speaks our time: v(x, t) = -v_SiT(x, 1 - t) on the first C channels
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 5])
    with torch.no_grad():
        v_sit = ref_forward(sd, x, 1 - t, y, 2, 2, 0, False)[0][:, :4]
        assert (model(x, t, y) + v_sit).abs().max() < 1e-5 and v_sit.abs().mean() > 0.1
        # an export keeps the convention
        loaded = load_sit(model.save_pretrained(tmp_path / "export"))
        assert loaded.config.time_convention == "sit" and torch.equal(loaded(x, t, y), model(x, t, y))
    # a config passed by hand wins; a convention the tensors contradict is reported
    with caplog.at_level(logging.WARNING, logger="sendvae.models.sit_io"):
        mine = load_sit(
            tmp_path / "sit.pt", SiTConfig(**{**model.config.to_dict(), "time_convention": "repa"})
        )
    assert mine.config.time_convention == "repa" and "time_convention='sit'" in caplog.text


def test_load_errors_name_the_keys(tmp_path):
    kw = dict(c=4, p=2, d=128, depth=2, heads=2, mlp=512, classes=10, z_dims=(48,), proj_dim=64, grid=4)
    sd = repa_state_dict(**kw, qk_norm=False, seed=0)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    torch.save({"ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias") as e:
        load_sit(tmp_path / "bad.pt")
    assert "blocks.1.extra.weight" in str(e.value)
    wrong = tiny_config(hidden_size=128, num_heads=2, depth=2)  # other projector / class sizes
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_sit(tmp_path / "bad.pt", wrong)
    with pytest.raises(FileNotFoundError):
        load_sit(tmp_path / "nothing.pt")


def test_preset_name_config(tmp_path):
    model = SiT(sit_config("SiT-S/4", input_size=8, num_classes=5, z_dims=(16,), projector_dim=32))
    sd = {**model.state_dict(), "pos_embed": model.pos_embed}
    torch.save({"ema": sd}, tmp_path / "s4.pt")
    assert load_sit(tmp_path / "s4.pt", "SiT-S/4").config == model.config
    inferred = load_sit(tmp_path / "s4.pt").config  # 384 wide -> 6 heads, 12 blocks -> REPA depth 4
    assert (inferred.num_heads, inferred.encoder_depth, inferred.num_classes) == (6, 4, 5)


def test_save_pretrained_round_trip(tmp_path):
    cfg = tiny_config(qk_norm=True, qk_norm_type="rms", learn_sigma=True, z_dims=(24, 12))
    model = SiT(cfg).eval()
    randomize(model, seed=3)
    out = model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    for path in (out, out / "model.safetensors"):
        loaded = load_sit(path)
        assert loaded.config == cfg and not loaded.training
        x, t, y = inputs(cfg)
        assert torch.equal(loaded(x, t, y), model(x, t, y))
