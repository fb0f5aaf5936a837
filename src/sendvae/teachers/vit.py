"""ViT teachers (DINOv2, DINOv3, CLIP, SigLIP, I-JEPA, MAE) built with timm, and weight-layout converters.

The architectures come from timm (`pretrained=False`); the weights from a file the user names, in the
official release layout (DINOv2 / DINOv3 / OpenAI CLIP / I-JEPA / MAE) or in timm names (the timm
Hugging Face repos; open_clip's `visual.trunk.` nesting and other prefixes are stripped). The official
layouts are converted by timm's own `checkpoint_filter_fn` of the model's family (`to_timm_state`).

Every ViT teacher returns one token per 16 training pixels by default, the f16 latent grid: patch-14
models see the image at 224 * res / 256 (REPA's choice for DINOv2, CLIP and I-JEPA), patch-16 models at
the training resolution itself. Position embeddings are resampled once, at load time, to that grid
(timm's bicubic resampling, as REPA does for DINOv2), and again on the fly for other input sizes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.models import eva, vision_transformer
from torch import nn

from .base import (
    CLIP_MEAN,
    CLIP_STD,
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Teacher,
    TeacherSpec,
    TeacherWeightsError,
    find_weight_file,
    load_checked,
    read_state_dict,
    strip_prefix,
    teacher_input_hw,
)

_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"


def _dinov2(size: str, timm_size: str, dim: int, reg: bool) -> TeacherSpec:
    stem = f"dinov2_vit{size}14" + ("_reg4" if reg else "")
    timm_name = f"vit_{timm_size}_patch14_{'reg4_' if reg else ''}dinov2"
    return TeacherSpec(
        name=f"dinov2-vit-{size}" + ("-reg" if reg else ""),
        kind="vit",
        timm_name=timm_name,
        embed_dim=dim,
        patch_size=14,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        native_size=518,
        input_size=224,
        num_prefix_tokens=5 if reg else 1,
        weight_files=(f"{stem}_pretrain.pth",),
        source=f"Official file (facebookresearch/dinov2): {_DINOV2}/dinov2_vit{size}14/{stem}_pretrain.pth",
        timm_tag="lvd142m",
    )


def _dinov3(size: str, timm_size: str, dim: int) -> TeacherSpec:
    return TeacherSpec(
        name=f"dinov3-vit-{size}",
        kind="vit",
        timm_name=f"vit_{timm_size}_patch16_dinov3",
        embed_dim=dim,
        patch_size=16,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        native_size=256,
        input_size=256,
        num_prefix_tokens=5,  # cls + 4 storage (register) tokens
        weight_files=(f"dinov3_vit{size}16_pretrain_lvd1689m*.pth",),
        source="Official files come from Meta's gated release (github.com/facebookresearch/dinov3).",
        timm_tag="lvd1689m",
    )


def _siglip(size: str, timm_size: str, dim: int) -> TeacherSpec:
    return TeacherSpec(
        name=f"siglip-vit-{size}",
        kind="vit",
        timm_name=f"vit_{timm_size}_patch16_siglip_256",
        embed_dim=dim,
        patch_size=16,
        mean=HALF,
        std=HALF,
        native_size=256,
        input_size=256,
        num_prefix_tokens=0,  # no cls token: SigLIP pools with an attention head, dropped here
        weight_files=("open_clip_model.safetensors", "model.safetensors"),
        source=f"Files from the Hugging Face repos timm/vit_{timm_size}_patch16_siglip_256.webli (timm) or "
        f"timm/ViT-{size.upper()}-16-SigLIP-256 (open_clip).",
        timm_tag="webli",
    )


def _mae(size: str, timm_name: str, dim: int, patch: int) -> TeacherSpec:
    full = {"b": "base", "l": "large", "h": "huge"}[size]
    return TeacherSpec(
        name=f"mae-vit-{size}",
        kind="vit",
        timm_name=timm_name,
        embed_dim=dim,
        patch_size=patch,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        native_size=224,
        input_size=16 * patch,
        num_prefix_tokens=1,
        weight_files=(f"mae_pretrain_vit_{full}.pth",),
        source="Official file (facebookresearch/mae): "
        f"https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{full}.pth",
        timm_tag="mae",
    )


VIT_TEACHERS: dict[str, TeacherSpec] = {
    s.name: s
    for s in [
        *(
            _dinov2(size, timm_size, dim, reg)
            for size, timm_size, dim in [
                ("s", "small", 384),
                ("b", "base", 768),
                ("l", "large", 1024),
                ("g", "giant", 1536),
            ]  # fmt: skip
            for reg in (False, True)
        ),
        TeacherSpec(
            name="clip-vit-L",
            kind="vit",
            timm_name="vit_large_patch14_clip_quickgelu_224",  # OpenAI CLIP was trained with QuickGELU
            embed_dim=1024,
            patch_size=14,
            mean=CLIP_MEAN,
            std=CLIP_STD,
            native_size=224,
            input_size=224,
            num_prefix_tokens=1,
            weight_files=("ViT-L-14.pt", "open_clip_pytorch_model.bin", "open_clip_model.safetensors"),
            source="Official file (openai/CLIP): the ViT-L-14.pt that clip.load('ViT-L/14') saves to "
            "~/.cache/clip/; open_clip's 'openai' ViT-L-14 checkpoint has the same layout.",
            timm_tag="openai",
        ),
        TeacherSpec(
            name="jepa-vit-h",
            kind="vit",
            timm_name="vit_huge_patch14_gap_224",
            embed_dim=1280,
            patch_size=14,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            native_size=224,
            input_size=224,
            num_prefix_tokens=0,
            weight_files=("IN1K-vit.h.14-300e.pth.tar",),
            source="Official file (facebookresearch/ijepa): "
            "https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar (its 'encoder' is used).",
            timm_tag="in1k_ijepa",
        ),
        _dinov3("s", "small", 384),
        _dinov3("b", "base", 768),
        _dinov3("l", "large", 1024),
        _siglip("b", "base", 768),
        _siglip("l", "large", 1024),
        _mae("b", "vit_base_patch16_224", 768, 16),
        _mae("l", "vit_large_patch16_224", 1024, 16),
        _mae("h", "vit_huge_patch14_224", 1280, 14),
    ]
}


class ViTTeacher(Teacher):
    """A timm ViT returning its final-norm patch tokens, as DINOv2's x_norm_patchtokens."""

    def __init__(
        self,
        spec: TeacherSpec,
        model: vision_transformer.VisionTransformer | eva.Eva,
        input_size: int,
        scale_input: bool,
    ) -> None:
        super().__init__(spec, model.embed_dim, input_size, scale_input)
        self.model = model
        self.patch_size = model.patch_embed.patch_size[0]
        self.num_prefix_tokens = model.num_prefix_tokens  # cls + registers, dropped from the output

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)  # (B, prefix + gh*gw, D), final norm applied
        return tokens[:, self.num_prefix_tokens :]  # (B, gh*gw, D)

    def plain_final_norm(self) -> ViTTeacher:
        """The final LayerNorm replaced by one without affine (same eps): RAE's `Dinov2withNorm`."""
        norm = self.model.norm
        if not isinstance(norm, nn.LayerNorm):
            raise ValueError(
                f"teacher {self.name!r} ends in a {type(norm).__name__}, not the LayerNorm whose affine RAE "
                "drops"
            )
        self.model.norm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
        self.final_norm = "plain"
        return self


# ---------------------------------------------------------------------------------------------------
# Weight layouts -> timm names


# timm's converter for each model family: official release names -> timm names (OpenAI CLIP's tower,
# DINOv2's register_tokens / cls position / SwiGLU w12-w3, DINOv3's storage_tokens / lsN.gamma / split q-v
# bias), pretraining-only tensors dropped, absolute position embeddings resampled to the model's grid.
StateFilter = Callable[..., dict[str, torch.Tensor]]  # (state, model) -> state
_TIMM_FILTERS: tuple[tuple[type, StateFilter], ...] = (
    (vision_transformer.VisionTransformer, vision_transformer.checkpoint_filter_fn),
    (eva.Eva, eva.checkpoint_filter_fn),
)


def _clip_tower(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The OpenAI CLIP / open_clip image tower under `visual.`, the text tower and other keys dropped.

    Ours because timm's CLIP conversion finds the tower only under `visual.` or `module.visual.`; this
    accepts any prefix in front of `class_embedding`.
    """
    prefix = next(k for k in state if k.endswith("class_embedding"))[: -len("class_embedding")]
    return {"visual." + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _unchunk_blocks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 ViT-g training checkpoints store blocks in chunks, `blocks.<chunk>.<index>.` with a global
    index; ours because timm's DINOv2 conversion reads flat `blocks.<index>.` names only."""
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def _check_dinov3_qkv_bias(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """DINOv3's one masked q/k/v bias, for a timm model without q/v biases (all but the `_qkvb` ones).

    The released biases of those models are all zero and are dropped; a non-zero one is an error. Ours
    because timm's DINOv3 conversion drops the bias without looking at it (and prints each block's miss).
    """
    own = model.state_dict()
    out = {}
    for key, v in state.items():
        if key.endswith("attn.qkv.bias") and key.replace("qkv.bias", "q_bias") not in own:
            q, _, vb = v.chunk(3)
            if q.abs().max() > 0 or vb.abs().max() > 0:
                arch = cast("dict[str, Any]", model.default_cfg).get("architecture", "")  # set by timm
                raise TeacherWeightsError(
                    f"'{key}' holds a non-zero q/v bias but {type(model).__name__} has none; build the "
                    f"'_qkvb' variant, e.g. timm_name='{arch}_qkvb'"
                )
            continue
        out[key] = v
    return out


def to_timm_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Any supported layout -> the model's timm names, position embeddings resampled to its grid.

    The conversion is timm's `checkpoint_filter_fn` for the model's family; what runs before it only
    brings a file into a form that function reads (see each helper for why).
    """
    if any("embeddings.patch_embedding" in k for k in state):
        raise TeacherWeightsError(
            "this file is in the Hugging Face transformers layout (e.g. facebook/dinov2-base), which is "
            "not mapped; use the official release file or the model.safetensors of the timm/ Hub repo."
        )
    if any(k.endswith("class_embedding") for k in state):
        state = _clip_tower(state)
    else:
        # ours: timm strips a fixed list of prefixes; this finds the one under which the model's names are
        state = strip_prefix(state, set(model.state_dict()))
        state = _unchunk_blocks(state)
        if "storage_tokens" in state:
            state = _check_dinov3_qkv_bias(state, model)
    timm_filter = next((f for cls, f in _TIMM_FILTERS if isinstance(model, cls)), None)
    if timm_filter is None:
        raise TeacherWeightsError(
            f"no weight conversion for timm's {type(model).__name__}: ViT teachers are timm "
            "VisionTransformer or Eva models"
        )
    return timm_filter(state, model)


def _is_vision_transformer(timm_name: str) -> bool:
    return timm.models.model_entrypoint(timm_name).__module__.endswith(".vision_transformer")


def _download(spec: TeacherSpec) -> Path:
    """Fetch the timm weights of `spec` (only with allow_download=True)."""
    assert spec.hub_name is not None  # every ViT spec names a timm tag
    cfg = timm.models.get_pretrained_cfg(spec.hub_name)
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(cfg.hf_hub_id, "model.safetensors"))
    if cfg is not None and cfg.url:
        assert isinstance(cfg.url, str)  # timm's ViT configs give one URL
        dst = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(cfg.url, str(dst))
        return dst
    raise TeacherWeightsError(f"timm knows no download for {spec.hub_name}.\n{spec.how_to_provide()}")


def build_vit_teacher(
    spec: TeacherSpec,
    weights: str | Path | None = None,
    resolution: int = 256,
    random_init: bool = False,
    allow_download: bool = False,
    model_kwargs: dict | None = None,
    input_size: int | None = None,
    timm_name: str | None = None,
    trust_pickle: bool = False,
) -> ViTTeacher:
    """Build a ViT teacher for `resolution`-px training images; see `sendvae.teachers.build_teacher`."""
    if weights is None and not (random_init or allow_download):
        raise TeacherWeightsError(spec.how_to_provide())
    path = find_weight_file(weights, spec) if weights is not None else None
    input_size = input_size or spec.input_size
    patch = (model_kwargs or {}).get("patch_size", spec.patch_size)
    kwargs: dict[str, Any] = dict(
        num_classes=0,
        global_pool="",  # no pooling head (SigLIP's attention pool): only the tokens are used
        img_size=teacher_input_hw(resolution, input_size, patch),
        dynamic_img_size=True,  # other input sizes resample the position embeddings on the fly
    )
    arch = timm_name or spec.timm_name
    if (path is not None or not random_init) and _is_vision_transformer(arch):
        kwargs["weight_init"] = "skip"  # all weights are loaded next; timm's ViT-L init takes ~10 s on CPU
    kwargs.update(model_kwargs or {})
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if path is not None or not random_init:
        path = path or _download(spec)
        load_checked(model, to_timm_state(read_state_dict(path, trust_pickle), model), spec, path)
    vit = cast("vision_transformer.VisionTransformer | eva.Eva", model)  # the ViT families of TEACHERS
    return ViTTeacher(spec, vit, input_size, scale_input=spec.scale_input).freeze()
