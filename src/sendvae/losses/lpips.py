"""LPIPS perceptual distance (Zhang et al. 2018) and shift-tolerant ST-LPIPS (Ghildyal & Liu 2022).

d(x, y) = sum_l mean_hw( w_l . (f_l(x) - f_l(y))^2 ), where f_l are the channel-normalised activations of
five layers of a frozen trunk (VGG16 or AlexNet) and w_l >= 0 are per-channel weights fitted to human
judgements (the 1x1 "lin" heads). Because the heads are 1x1 and linear, the spatial mean is taken first
and the head is a dot product over channels, which is cheaper and identical in exact arithmetic.

Two weight sources, neither downloaded at run time:
- "stlpips" (default, offline): PyPI `stlpips-pytorch` ships complete networks (trunk + heads) in
  stlpips_pytorch/weights/vST0.0/{vgg,alex}_shift_tolerant.pth. We only read those files; the package
  itself imports IPython and torchsummary without declaring them, so it is never imported. Its trunks are
  anti-aliased: stride-1 max-pools followed by a reflect-padded [1,2,1]^2 blur with stride 2.
- "lpips" (the standard metric, v0.1): a torchvision ImageNet trunk file the user provides
  (vgg16-397923af.pth / alexnet-owt-7be5be79.pth; found in torch's hub cache, where torchvision keeps it,
  when not given) and the lpips package's lin heads (weights/v0.1/{net}.pth, found in an installed
  `lpips` package when not given). `find_standard_files` says which of the two are on disk.

Default trunk: VGG. The LPIPS authors recommend AlexNet for evaluation and VGG when the distance is used
as a training loss (closer to a classic perceptual loss); LDM/taming, REPA-E and Send-VAE train with
LPIPS-VGG. AlexNet is about 4x cheaper and is offered for small runs.

As a training loss the second argument is the target: its trunk pass builds no autograd graph (unless it
requires a gradient itself), which keeps about half of the activations LPIPS would otherwise hold for
the backward pass, with the same value and the same gradient w.r.t. the reconstruction.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from pathlib import Path
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime.weights import read_weights

LPIPS_VARIANTS = ("stlpips", "lpips")
LPIPS_NETS = ("vgg", "alex")

# LPIPS ScalingLayer: maps [-1, 1] inputs to ImageNet-standardised ones, (x - shift) / scale.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Smallest image side each trunk accepts (its deepest pooling / reflect padding still needs a pixel).
_MIN_SIZE = {("stlpips", "vgg"): 18, ("stlpips", "alex"): 21, ("lpips", "vgg"): 16, ("lpips", "alex"): 31}
TORCHVISION_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


class LPIPSWeightsError(FileNotFoundError):
    """A weight file LPIPS needs is missing or does not hold the expected tensors."""


class BlurDownsample(nn.Module):
    """Anti-aliased stride-2 downsampling of ST-LPIPS: reflect pad 2, depthwise [1,2,1]x[1,2,1]/16, stride 2.

    Output size floor((H + 1) / 2) + 1 (the extra padding is ST-LPIPS's "pad more" choice).
    """

    kernel: torch.Tensor  # buffer (C, 1, 3, 3)

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(taps, taps) / 16.0
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (2, 2, 2, 2), mode="reflect")
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, groups=x.shape[1])


def _vgg16_layers(shift_tolerant: bool) -> tuple[list[nn.Module], tuple[int, ...]]:
    """VGG16 features up to relu5_3; taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
    layers: list[nn.Module] = []
    taps: list[int] = []
    c_in = 3
    for v in _VGG16_CFG:
        if v == "M":
            taps.append(len(layers) - 1)
            if shift_tolerant:
                layers += [nn.MaxPool2d(2, stride=1), BlurDownsample(c_in)]
            else:
                layers.append(nn.MaxPool2d(2, stride=2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    taps.append(len(layers) - 1)
    return layers, tuple(taps)


def _alexnet_layers(shift_tolerant: bool) -> tuple[list[nn.Module], tuple[int, ...]]:
    """AlexNet features up to relu5; taps after relu1..relu5 (indices match the published state dicts)."""
    relu = lambda: nn.ReLU(inplace=True)
    if not shift_tolerant:  # torchvision alexnet().features[:12]
        layers = [
            nn.Conv2d(3, 64, 11, stride=4, padding=2), relu(), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 192, 5, padding=2), relu(), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(192, 384, 3, padding=1), relu(),
            nn.Conv2d(384, 256, 3, padding=1), relu(),
            nn.Conv2d(256, 256, 3, padding=1), relu(),
        ]  # fmt: skip
        return layers, (1, 4, 7, 9, 11)
    # ST-LPIPS: stride-1 conv1 then blur-downsample before the ReLU; stride-1 max-pools then blur.
    layers = [
        nn.Conv2d(3, 64, 11, stride=1, padding=2), BlurDownsample(64), relu(),
        nn.MaxPool2d(3, stride=1), BlurDownsample(64), nn.Conv2d(64, 192, 5, padding=2), relu(),
        nn.MaxPool2d(3, stride=1), BlurDownsample(192), nn.Conv2d(192, 384, 3, padding=1), relu(),
        nn.Conv2d(384, 256, 3, padding=1), relu(),
        nn.Conv2d(256, 256, 3, padding=1), relu(),
    ]  # fmt: skip
    return layers, (2, 6, 10, 12, 14)


def _package_file(package: str, *parts: str) -> Path | None:
    """A file shipped inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent.joinpath(*parts)


def stlpips_weights_path(net: str) -> Path:
    """The ST-LPIPS network file bundled with PyPI `stlpips-pytorch`."""
    path = _package_file("stlpips_pytorch", "weights", "vST0.0", f"{net}_shift_tolerant.pth")
    if path is None or not path.is_file():
        raise LPIPSWeightsError(
            f"ST-LPIPS weights for net={net!r} not found: install them with `pip install stlpips-pytorch`, "
            "or pass weights=PATH to a *_shift_tolerant.pth file"
        )
    return path


def trunk_cache_path(net: str) -> Path:
    """Where torchvision keeps its ImageNet trunk file: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[net]


def lin_package_path(net: str) -> Path | None:
    """The lin-head file of an installed `lpips` package (weights/v0.1/<net>.pth), or None."""
    return _package_file("lpips", "weights", "v0.1", f"{net}.pth")


def find_standard_files(
    net: str, weights: str | Path | None = None, trunk_weights: str | Path | None = None
) -> tuple[Path | None, Path | None]:
    """(trunk, lin heads) files of standard LPIPS-`net`, each None when it is not on disk.

    A path given is used as is; otherwise the trunk is looked for in torch's hub cache and the heads in
    the installed `lpips` package. Nothing is downloaded.
    """
    trunk = Path(trunk_weights).expanduser() if trunk_weights is not None else trunk_cache_path(net)
    lins = Path(weights).expanduser() if weights is not None else lin_package_path(net)
    return (trunk if trunk.is_file() else None), (lins if lins is not None and lins.is_file() else None)


def _load_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LPIPSWeightsError(f"{what} file not found: {path}")
    state = read_weights(path, what)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def _remap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published key layouts -> ours. Fixed buffers (blur kernels, scaling layer) are rebuilt, not loaded.

    lpips/stlpips trunk: net.slice{s}.{j}.weight -> features.{j}.weight (j counts over the whole trunk)
    torchvision trunk:   features.{j}.weight     -> features.{j}.weight (classifier.* ignored)
    lin heads:           lin{k}.model.{i}.weight -> lins.{k}.weight (i = 1 with dropout, 0 without)
    """
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(?:net\.slice\d+|features)\.(\d+)\.(weight|bias)", key):
            out[f"features.{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", key):
            out[f"lins.{m[1]}.weight"] = value
    return out


def _unit_channels(h: torch.Tensor) -> torch.Tensor:
    """fp32 activations (B, C, h, w) scaled to unit-length channel vectors per position.

    The eps inside the root keeps the gradient finite at 0.
    """
    f = h.float()
    return f * torch.rsqrt(f.square().sum(1, keepdim=True) + 1e-20)


class LPIPS(nn.Module):
    """Frozen perceptual distance: forward(x, y) -> (B,) for images in [-1, 1], NCHW.

    Always in eval mode with no trainable parameters; differentiable w.r.t. x, and w.r.t. y only when y
    requires a gradient (y is the target of a training loss: no graph is built for it). Under autocast
    the trunk convolutions run in low precision; the scaling layer, feature normalisation, squared
    differences and head sums run in fp32. Keep the module itself in fp32 (autocast does the casting).
    Weights: see build_lpips; pretrained=False gives random weights, for tests only.
    """

    shift: torch.Tensor  # buffers (1, 3, 1, 1)
    scale: torch.Tensor

    def __init__(
        self,
        variant: str = "stlpips",
        net: str = "vgg",
        weights: str | Path | None = None,
        trunk_weights: str | Path | None = None,
        pretrained: bool = True,
    ):
        super().__init__()
        if variant not in LPIPS_VARIANTS:
            raise ValueError(f"unknown LPIPS variant {variant!r}; choose one of {LPIPS_VARIANTS}")
        if net not in LPIPS_NETS:
            raise ValueError(f"unknown LPIPS net {net!r}; choose one of {LPIPS_NETS}")
        self.variant, self.net = variant, net
        self.min_size = _MIN_SIZE[(variant, net)]
        shift_tolerant = variant == "stlpips"
        build = _vgg16_layers if net == "vgg" else _alexnet_layers
        layers, self.taps = build(shift_tolerant)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            self._load_weights(weights, trunk_weights)
        else:  # random trunk, non-negative random heads (a distance that is still >= 0); for tests
            for lin in self.lins:
                cast(nn.Conv2d, lin).weight.data.abs_()
        self.requires_grad_(False)
        self.eval()

    def _load_weights(self, weights: str | Path | None, trunk_weights: str | Path | None) -> None:
        if self.variant == "stlpips":
            path = Path(weights) if weights is not None else stlpips_weights_path(self.net)
            state = _remap(_load_file(path, "ST-LPIPS network"))
            sources = str(path)
        else:
            found_trunk, found_lins = find_standard_files(self.net, weights, trunk_weights)
            if trunk_weights is None and found_trunk is None:
                raise LPIPSWeightsError(
                    f"standard LPIPS-{self.net} needs trunk_weights=PATH to the torchvision ImageNet "
                    f"{self.net} state dict ({TORCHVISION_FILES[self.net]}; not in "
                    f"{trunk_cache_path(self.net).parent}); it is never downloaded here"
                )
            if weights is None and found_lins is None:
                raise LPIPSWeightsError(
                    f"standard LPIPS-{self.net} needs weights=PATH to its lin heads (the lpips package's "
                    f"weights/v0.1/{self.net}.pth); `pip install lpips` provides them"
                )
            trunk_weights = trunk_weights if trunk_weights is not None else found_trunk
            weights = weights if weights is not None else found_lins
            assert trunk_weights is not None and weights is not None  # both checked just above
            trunk = _remap(_load_file(trunk_weights, "trunk"))
            lins = _remap(_load_file(weights, "LPIPS lin"))
            trunk = {k: v for k, v in trunk.items() if k.startswith("features.")}
            lins = {k: v for k, v in lins.items() if k.startswith("lins.")}
            state, sources = {**trunk, **lins}, f"{trunk_weights} + {weights}"
        expected = {k: v.shape for k, v in self.state_dict().items()}
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        wrong = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k])
        if missing or unexpected or wrong:
            raise LPIPSWeightsError(
                f"{sources} does not match LPIPS variant={self.variant!r} net={self.net!r}: "
                f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}"
            )
        self.load_state_dict(state)

    def train(self, mode: bool = True) -> LPIPS:
        # A fixed metric: stays in eval mode when a parent loss module is put in training mode.
        return super().train(False)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, net={self.net!r}, taps={self.taps}"

    def _trunk(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Trunk layers start .. stop - 1 applied to h."""
        for layer in itertools.islice(self.features, start, stop):
            h = layer(h)
        return h

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance (B,) between images x and y (B, 3, H, W) in [-1, 1]; y is the target."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"expected two (B, 3, H, W) images of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"{self.variant}-{self.net} needs images of at least {self.min_size} px a side, got {x.shape}"
            )
        # The target y gets no graph unless it asks for a gradient: run separately (same numbers as one
        # pass over cat([x, y]), with nothing of y's trunk pass kept for the backward).
        target_grad = torch.is_grad_enabled() and y.requires_grad
        hx = (x.float() - self.shift) / self.scale  # (B, 3, H, W)
        with torch.set_grad_enabled(target_grad):
            hy = (y.float() - self.shift) / self.scale
        dist = x.new_zeros(x.shape[0], dtype=torch.float32)
        start = 0
        for tap, lin in zip(self.taps, self.lins):
            hx = self._trunk(hx, start, tap + 1)
            with torch.set_grad_enabled(target_grad):
                hy = self._trunk(hy, start, tap + 1)
                fy = _unit_channels(hy)  # (B, C, h, w)
            diff = (_unit_channels(hx) - fy).square().mean((2, 3))  # (B, C): spatial mean before the head
            dist = dist + (diff * cast(nn.Conv2d, lin).weight.view(1, -1).float()).sum(1)
            start = tap + 1
        return dist


def build_lpips(
    variant: str = "stlpips",
    net: str = "vgg",
    weights: str | Path | None = None,
    trunk_weights: str | Path | None = None,
    pretrained: bool = True,
) -> LPIPS:
    """The LPIPS used by training and evaluation.

    variant "stlpips": offline default, weights from `stlpips-pytorch` (or `weights`, a full network file).
    variant "lpips": the standard metric; `trunk_weights` = torchvision ImageNet state dict (default: the
    file in torch's hub cache), `weights` = lpips v0.1 lin heads (default: the installed `lpips` package's
    file). pretrained=False: random weights of the same network (tests and benchmarks only).
    """
    return LPIPS(
        variant=variant, net=net, weights=weights, trunk_weights=trunk_weights, pretrained=pretrained
    )
