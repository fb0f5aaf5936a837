"""RAE's DiT^DH wide head on the SiT, off by default, and the width the latent's tokens need."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sendvae.cli import main
from sendvae.diffusion.sampling import SamplerConfig, sample
from sendvae.diffusion.sit_source import load_sit_source
from sendvae.models.sit import SiT, SiTConfig, flops_per_image
from sendvae.models.sit_io import infer_sit_config, load_sit

from .test_sit import inputs, mae_pos_embed, randomize, ref_forward, repa_state_dict, tiny_config
from .test_time_shift import store, train_sit_args  # noqa: F401 (the module's latent store fixture)

HEAD = dict(head_depth=2, head_width=96, head_num_heads=3)


def test_head_off_is_todays_sit():
    # the state dict keys of a SiT without a head, in order, and its forward: REPA's (an independent
    # implementation on the state dict, tests/test_sit.py); head_width / head_num_heads unused at depth 0
    kw = dict(c=4, p=2, d=64, depth=3, heads=4, mlp=256, classes=7, z_dims=(24,), proj_dim=32, grid=4)
    sd = repa_state_dict(**kw, qk_norm=False, seed=1)
    plain = tiny_config()
    other = tiny_config(head_width=4096, head_num_heads=5)
    for cfg in (plain, other):
        model = SiT(cfg).eval()
        want = [k for k in sd if not k.startswith(("pos_embed", "bn."))]
        assert sorted(model.state_dict()) == sorted(want) and not any("head" in k for k in model.state_dict())
        model.load_state_dict({k: sd[k] for k in want})
        x, t, y = inputs(cfg)
        out, feats = model(x, t, y, return_features=True)
        ref, ref_feats = ref_forward(sd, x, t, y, heads=4, p=2, encoder_depth=2, qk_norm=False)
        assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(feats[0], ref_feats[0], atol=1e-5)
    torch.manual_seed(0)
    a = SiT(plain)
    torch.manual_seed(0)
    b = SiT(other)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))
    x, t, y = inputs(plain)
    randomize(a, seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.eval()(x, t, y), b.eval()(x, t, y))
    assert flops_per_image(plain) == flops_per_image(other)


def head_reference(model: SiT, x, t, y) -> torch.Tensor:
    """RAE's DiTwDDTHead forward (stage2/models/DDT.py) from the published algorithm, on our tensors: the
    backbone's tokens h (taken from the model), s = Linear(SiLU(h + t_emb)), the head's own patch embedding
    of x_t without positions, adaLN-Zero blocks and the final layer conditioned on s per token."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    seen = {}
    model.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(h=o))
    model(x, t, y)
    h, x, t = seen["h"].double(), x.double(), t.double()
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]
    ln = lambda v: F.layer_norm(v, v.shape[-1:], eps=1e-6)
    mod = lambda v, shift, scale: v * (1 + scale) + shift
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    tf = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    t_emb = lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    s = lin(F.silu(h + t_emb[:, None]), "head.cond")  # (B, N, W)
    b, c, hh, ww = x.shape
    p, w, heads = model.config.patch_size, model.config.head_width, model.config.head_num_heads
    z = F.conv2d(x, sd["head.x_embedder.proj.weight"], sd["head.x_embedder.proj.bias"], stride=p)
    z = z.flatten(2).transpose(1, 2)  # (B, N, W)
    n = z.shape[1]
    for i in range(model.config.head_depth):
        pre = f"head.blocks.{i}."
        m = lin(F.silu(s), pre + "adaLN_modulation.1").chunk(6, -1)  # (B, N, W) each
        a = mod(ln(z), m[0], m[1])
        q, k, v = lin(a, pre + "attn.qkv").reshape(b, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // heads), -1)
        z = z + m[2] * lin((att @ v).transpose(1, 2).reshape(b, n, w), pre + "attn.proj")
        a = mod(ln(z), m[3], m[4])
        z = z + m[5] * lin(F.gelu(lin(a, pre + "mlp.fc1"), approximate="tanh"), pre + "mlp.fc2")
    shift, scale = lin(F.silu(s), "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = lin(mod(ln(z), shift, scale), "final_layer.linear")  # (B, N, p*p*C)
    g = hh // p
    return torch.einsum("nhwpqc->nchpwq", out.reshape(b, g, g, p, p, c)).reshape(b, c, hh, ww)


def test_head_matches_the_rae_algorithm():
    cfg = tiny_config(**HEAD)
    model = SiT(cfg).eval()
    x, t, y = inputs(cfg)
    assert model(x, t, y).abs().max() == 0, "adaLN-Zero: a new head predicts v = 0"
    keys = list(model.state_dict())
    assert {k.split(".")[2] for k in keys if k.startswith("head.blocks.")} == {"0", "1"}
    assert model.state_dict()["head.x_embedder.proj.weight"].shape == (96, 4, 2, 2)
    assert model.state_dict()["head.cond.weight"].shape == (96, 64)
    assert model.state_dict()["final_layer.linear.weight"].shape == (16, 96)
    randomize(model, seed=4)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.allclose(out.double(), head_reference(model, x, t, y), rtol=1e-5, atol=1e-4)  # fp32 vs fp64
    # REPA still reads the backbone; gradients reach the backbone through the head's condition
    model.train()
    v, feats = model(x, t, y, return_features=True)
    (v.square().mean() + feats[0].square().mean()).backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.head.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0


def test_head_flops_and_checkpointing():
    cfg = tiny_config(**HEAD, fused_attn=False)
    model = SiT(cfg).eval()
    randomize(model, seed=5)
    x, t, y = inputs(cfg, b=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert counter.get_total_flops() == pytest.approx(2 * flops_per_image(cfg), rel=1e-9)
    ckpt = SiT(cfg, grad_checkpointing=True)
    ckpt.load_state_dict(model.state_dict())
    model.train(), ckpt.train()
    for m in (model, ckpt):
        m(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.bool)).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_head_round_trips_through_the_export(tmp_path):
    cfg = tiny_config(**HEAD, time_shift=2.0)
    model = SiT(cfg).eval()
    randomize(model, seed=6)
    out = model.save_pretrained(tmp_path / "export")
    loaded = load_sit(out)
    assert loaded.config == cfg
    x, t, y = inputs(cfg)
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    # a bare state dict (no config.json): the head is read off the tensors
    sd = {**model.state_dict(), "pos_embed": torch.from_numpy(mae_pos_embed(64, 4)).float()[None]}
    inferred = infer_sit_config(sd)
    assert (inferred.head_depth, inferred.head_width) == (2, 96)
    assert "head 2 x 96" in cfg.describe()


def test_narrow_sit_is_a_clear_error():
    with pytest.raises(ValueError, match=r"hidden_size 8 is narrower than .* = 16 values") as e:
        SiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=8, num_heads=2, depth=1, z_dims=())
    assert "head_width >= 16" in str(e.value)
    SiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=8, num_heads=2, depth=1, z_dims=(),
              head_depth=1, head_width=16, head_num_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="narrower"):  # a head narrower than the tokens too
        SiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=8, num_heads=2, depth=1, z_dims=(),
                  head_depth=1, head_width=8, head_num_heads=2)  # fmt: skip


def test_train_sit_refuses_a_sit_narrower_than_its_tokens(tmp_path, store, capsys):  # noqa: F811
    # 4 channels x patch 2^2 = 16 values per token; an 8-wide SiT/2 cannot carry them
    args = train_sit_args(tmp_path, store, "--model.hidden_size", "8", "--model.num_heads", "2")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "8 wide" in err[0] and "= 16 values" in err[0]
    assert "--model.hidden_size >= 16" in err[0] and "--model.head_width >= 16" in err[0]


def test_train_sit_with_a_wide_head_round_trips(tmp_path, store):  # noqa: F811
    head = ["--model.head_depth", "2", "--model.head_width", "32", "--model.head_num_heads", "2"]
    narrow = ["--model.hidden_size", "8", "--model.num_heads", "2"]  # the head carries the tokens
    assert main(train_sit_args(tmp_path, store, *narrow, *head)) == 0
    sit = load_sit(tmp_path / "run" / "export" / "sit")
    cfg = sit.config
    assert (cfg.hidden_size, cfg.head_depth, cfg.head_width, cfg.head_num_heads) == (8, 2, 32, 2)
    run = load_sit_source(tmp_path / "run")  # the run's last checkpoint, as `sendvae sample` reads it
    assert run.model.config == cfg
    for k, v in sit.state_dict().items():
        assert torch.equal(v, run.model.state_dict()[k]), k
    z = sample(sit, torch.tensor([0, 1]), [0, 1], SamplerConfig(steps=2))
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
