"""Shared transformer layers (models/layers.py): the formulas, the checkpoint names, and bitwise equality
with the blocks the mapper and SiT each defined before they shared them (kept below as the reference)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sendvae.align.mapper import Mapper, MapperConfig
from sendvae.models.layers import (
    Attention,
    Block,
    build_projector,
    init_vit_weights,
    mlp,
    sincos_pos_embed_2d,
)
from sendvae.models.sit import SiT, SiTBlock, SiTConfig

# -- the previous, per-model implementations (the reference side) -------------------------------------------


class MapperAttentionBefore(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class MapperBlockBefore(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MapperAttentionBefore(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SiTAttentionBefore(nn.Module):
    def __init__(self, cfg: SiTConfig):
        super().__init__()
        d, self.num_heads = cfg.hidden_size, cfg.num_heads
        head_dim = d // cfg.num_heads
        self.fused = cfg.fused_attn
        self.qkv = nn.Linear(d, 3 * d)
        if not cfg.qk_norm:
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        elif cfg.qk_norm_type == "layer":
            self.q_norm, self.k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
        else:
            self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps=1e-6), nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class SiTMlpBefore(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def projector_before(hidden: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def seeded(build, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def assert_same_module(new: nn.Module, old: nn.Module, x: torch.Tensor) -> None:
    """Same names and initial tensors (drawn in the same order), and bitwise the same output."""
    new_sd, old_sd = new.state_dict(), old.state_dict()
    assert list(new_sd) == list(old_sd)
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in new_sd)
    with torch.no_grad():  # non-trivial norm weights and biases too
        g = torch.Generator().manual_seed(1)
        for p, q in zip(new.parameters(), old.parameters()):
            q.copy_(p.copy_(torch.randn(p.shape, generator=g)))
    assert torch.equal(new(x), old(x))


TOKENS = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))  # (B, N, D)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_mapper_block_is_the_previous_one(qk_norm):
    new = seeded(lambda: Block(32, 2, 4.0, qk_norm))
    assert_same_module(new, seeded(lambda: MapperBlockBefore(32, 2, 4.0, qk_norm)), TOKENS)


@pytest.mark.parametrize("qk_norm, kind", [(False, "layer"), (True, "layer"), (True, "rms")])
@pytest.mark.parametrize("fused", [True, False])
def test_sit_attention_and_mlp_are_the_previous_ones(qk_norm, kind, fused):
    kw = dict(input_size=8, hidden_size=32, depth=1, num_heads=2, z_dims=(), fused_attn=fused)
    cfg = SiTConfig(**kw, qk_norm=qk_norm, qk_norm_type=kind)
    block = seeded(lambda: SiTBlock(cfg))
    assert_same_module(block.attn, seeded(lambda: SiTAttentionBefore(cfg)), TOKENS)
    new_mlp = seeded(lambda: mlp((32, 128, 32), partial(nn.GELU, approximate="tanh"), timm_names=True))
    assert_same_module(new_mlp, seeded(lambda: SiTMlpBefore(32, 128)), TOKENS)


def test_projector_is_the_previous_one():
    assert_same_module(
        seeded(lambda: build_projector(32, 16, 8)), seeded(lambda: projector_before(32, 16, 8)), TOKENS
    )


# -- the formulas --------------------------------------------------------------------------------------------


def test_attention_formula_fused_and_explicit():
    torch.manual_seed(0)
    fused, explicit = Attention(32, 4), Attention(32, 4, fused=False)
    explicit.load_state_dict(fused.state_dict())
    x = TOKENS
    b, n, d, h = *x.shape, 4
    q, k, v = (x @ fused.qkv.weight.T + fused.qkv.bias).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)  # (B, heads, N, N)
    want = (attn @ v).transpose(1, 2).reshape(b, n, d) @ fused.proj.weight.T + fused.proj.bias
    torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(explicit(x), want, rtol=0, atol=1e-5)


def test_qk_norm_is_per_head_and_named_for_checkpoints():
    plain = Attention(32, 2)
    assert list(plain.state_dict()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    normed = Attention(32, 2, partial(nn.LayerNorm, eps=1e-6))
    assert normed.q_norm.normalized_shape == (16,) and normed.k_norm.eps == 1e-6
    assert {"q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"} <= set(normed.state_dict())
    rms = Attention(32, 2, nn.RMSNorm)
    assert isinstance(rms.q_norm, nn.RMSNorm) and rms.q_norm is not rms.k_norm


def test_mlp_names_and_forward():
    seq = mlp((4, 8, 8, 3), nn.SiLU)
    assert [k for k in seq.state_dict() if k.endswith("weight")] == ["0.weight", "2.weight", "4.weight"]
    timm = mlp((4, 8, 4), nn.GELU, timm_names=True)
    assert list(timm.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    x = torch.randn(3, 4)
    assert torch.equal(timm(x), timm.fc2(F.gelu(timm.fc1(x))))
    w = [m for m in seq if isinstance(m, nn.Linear)]
    assert torch.equal(seq(x), w[2](F.silu(w[1](F.silu(w[0](x))))))
    with pytest.raises(ValueError, match="one hidden layer"):
        mlp((4, 8, 8, 4), nn.GELU, timm_names=True)


def test_init_vit_weights():
    torch.manual_seed(0)
    model = nn.Module()
    model.patch = nn.Conv2d(4, 8, 2, stride=2)
    model.head = mlp((8, 16, 8), nn.SiLU)
    init_vit_weights(model, model.patch)
    for lin, (fan_in, fan_out) in (
        (model.head[0], (8, 16)),
        (model.head[2], (16, 8)),
        (model.patch, (16, 8)),
    ):
        bound = math.sqrt(6 / (fan_in + fan_out))  # Xavier-uniform; the conv as a (8, 4*2*2) linear map
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.5 * bound
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))


def test_sincos_shape_and_width_check():
    assert sincos_pos_embed_2d(8, (2, 3)).shape == (6, 8)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, (2, 2))


# -- the models' layouts: checkpoint names, in the order the weights are drawn -------------------------------


def test_mapper_state_dict_layout():
    m = Mapper(
        4, (8, 8), 24, (4, 4), MapperConfig(hidden_dim=32, num_heads=2, projector_dim=16, qk_norm=True)
    )
    block = ["norm1", "attn.qkv", "attn.q_norm", "attn.k_norm", "attn.proj", "norm2", "mlp.0", "mlp.2"]
    params = ["patch_embed", *(f"blocks.0.{n}" for n in block), "final_norm"]
    params += [f"projector.{i}" for i in (0, 2, 4)]
    want = ["norm.running_mean", "norm.running_var", "norm.stats_set"]
    want += [f"{p}.{w}" for p in params for w in ("weight", "bias")]
    assert list(m.state_dict()) == want


def test_sit_state_dict_layout():
    kw = dict(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    cfg = SiTConfig(**kw, qk_norm=True, encoder_depth=1, projector_dim=16, z_dims=(8,))
    names = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2"]
    block = [
        "attn.qkv",
        "attn.q_norm",
        "attn.k_norm",
        "attn.proj",
        "mlp.fc1",
        "mlp.fc2",
        "adaLN_modulation.1",
    ]
    names += [f"blocks.0.{n}" for n in block] + [f"projectors.0.{i}" for i in (0, 2, 4)]
    names += ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    want = [f"{n}.{w}" for n in names for w in ("weight", "bias")]
    want.insert(6, "y_embedder.embedding_table.weight")
    assert list(SiT(cfg).state_dict()) == want
