"""Official teacher weight layouts go through timm's own `checkpoint_filter_fn` (teachers/vit.py
`to_timm_state`): on the tiny random models of test_teachers.py, written in each release layout, the
conversion gives back exactly the tensors of the timm model the file was written from."""

from __future__ import annotations

import timm
import torch

from sendvae.teachers import TEACHERS
from sendvae.teachers.vit import to_timm_state
from tests.test_teachers import TINY, official_dinov2, openai_clip_layout, tiny_timm


def target(timm_name: str, img_size: int, **kwargs) -> torch.nn.Module:
    """The model build_teacher loads into: no classifier, no pooling head."""
    args = dict(num_classes=0, global_pool="", img_size=img_size, dynamic_img_size=True, **TINY)
    return timm.create_model(timm_name, pretrained=False, **{**args, **kwargs})


def assert_converts_to(state: dict, ref: torch.nn.Module, model: torch.nn.Module, inexact=()) -> None:
    """Every tensor the model holds comes out of the conversion equal to the reference model's."""
    out, want = to_timm_state(state, model), ref.state_dict()
    own = model.state_dict()
    assert set(own) <= set(out), sorted(set(own) - set(out))[:5]
    for k in own:
        if k in inexact:  # rebuilt by an addition: equal up to rounding
            torch.testing.assert_close(out[k], want[k], rtol=0, atol=1e-6)
        else:
            assert out[k].shape == want[k].shape and torch.equal(out[k], want[k]), k


def test_dinov2_layouts():
    for name in ("dinov2-vit-s", "dinov2-vit-s-reg"):
        spec = TEACHERS[name]
        ref = tiny_timm(spec.timm_name, 56, dynamic_img_size=True)
        # register models: the official cls token is stored minus its position, which is folded back in
        inexact = ("cls_token",) if name.endswith("-reg") else ()
        assert_converts_to(official_dinov2(ref), ref, target(spec.timm_name, 56), inexact)
    kwargs = dict(depth=4, embed_dim=96, num_heads=2)
    ref = tiny_timm("vit_giant_patch14_dinov2", 56, **kwargs)  # chunked blocks, SwiGLU w12 / w3
    state = official_dinov2(ref, chunk=2, swiglu=True)
    assert_converts_to(state, ref, target("vit_giant_patch14_dinov2", 56, **kwargs))


def test_openai_clip_layout_under_any_prefix():
    name = TEACHERS["clip-vit-L"].timm_name
    ref = tiny_timm(name, 56)
    state = openai_clip_layout(ref)
    assert_converts_to(state, ref, target(name, 56))
    nested = {f"module.clip.{k}": v for k, v in state.items()}  # timm alone knows 'visual.' only
    assert_converts_to(nested, ref, target(name, 56))


def test_timm_names_open_clip_siglip_and_ijepa():
    name = TEACHERS["siglip-vit-b"].timm_name
    ref = tiny_timm(name, 64)
    state = {f"visual.trunk.{k}": v for k, v in ref.state_dict().items()}
    assert_converts_to(state, ref, target(name, 64))
    name = TEACHERS["jepa-vit-h"].timm_name
    ref = tiny_timm(name, 56)
    assert_converts_to({f"module.{k}": v for k, v in ref.state_dict().items()}, ref, target(name, 56))


def dinov3_official(ref: torch.nn.Module, qkv_bias: torch.Tensor | None = None) -> dict:
    """timm Eva DINOv3 -> facebookresearch/dinov3 names, with the one masked q/k/v bias per block."""
    state = {"mask_token": torch.zeros(1, 64), "rope_embed.periods": torch.ones(8)}
    for k, v in ref.state_dict().items():
        if k.endswith(("q_bias", "v_bias")):
            continue
        k = (
            k.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        state[k] = v
    for i in range(TINY["depth"]):
        state[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * 64) if qkv_bias is None else qkv_bias[i]
        state[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * 64)
    return state


def test_dinov3_layout(capsys):
    name = TEACHERS["dinov3-vit-s"].timm_name
    ref = tiny_timm(name, 64)
    assert_converts_to(dinov3_official(ref), ref, target(name, 64))
    assert capsys.readouterr().out == ""  # the all-zero biases are dropped quietly
    # the `_qkvb` variant keeps q and v biases: the official vector is split, its k third dropped
    ref = tiny_timm(name + "_qkvb", 64)
    sd = ref.state_dict()
    packed = [
        torch.cat([sd[f"blocks.{i}.attn.q_bias"], torch.randn(64), sd[f"blocks.{i}.attn.v_bias"]])
        for i in range(2)
    ]
    assert_converts_to(dinov3_official(ref, packed), ref, target(name + "_qkvb", 64))
