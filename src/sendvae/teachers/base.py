"""What every teacher shares: the spec, the frozen-module contract, weight files, token resampling.

A teacher is a frozen vision foundation model f whose patch features the VAE latents are aligned to
(Send-VAE: L_align = 1 - mean_n cos(h_phi(z_t)[n], f(x)[n])). It takes images in [-1, 1] at the
training resolution and returns patch tokens (B, N, D); everything model-specific (resizing, mean/std,
dropping cls/register tokens, the final norm) happens inside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.weights import WEIGHT_SUFFIXES, WeightsError, read_weights

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP and the TF EfficientNets: the input is simply x in [-1, 1]

# Files a weights folder is searched for when none of the spec's own file names is in it.
GENERIC_WEIGHT_FILES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)


class TeacherWeightsError(WeightsError):
    """A teacher's pretrained weights are missing, unreadable or in a layout we cannot map."""


@dataclass(frozen=True)
class TeacherSpec:
    """One registry entry: how to build a teacher and where its weights come from."""

    name: str
    kind: str  # "vit" or "efficientnet": which builder makes it
    timm_name: str  # architecture, built with timm.create_model(timm_name, pretrained=False)
    embed_dim: int  # D of the returned tokens
    patch_size: int  # pixels per token side at the teacher's input (the total stride for CNNs)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_size: int  # input side the weights were trained at (pretrained position-embedding grid)
    input_size: int  # teacher input side for a 256-px image; scaled with the resolution if scale_input
    num_prefix_tokens: int  # cls + register tokens dropped from the output
    weight_files: tuple[str, ...]  # official file name(s) a user brings; also searched for in folders
    source: str  # where those files come from
    timm_tag: str | None = None  # pretrained tag that allow_download=True fetches through timm
    scale_input: bool = True  # False: input_size regardless of the training resolution

    @property
    def hub_name(self) -> str | None:
        return f"{self.timm_name}.{self.timm_tag}" if self.timm_tag else None

    def how_to_provide(self) -> str:
        """The instructions a TeacherWeightsError carries for this teacher."""
        files = " or ".join(self.weight_files)
        lines = [
            f"Teacher '{self.name}' needs pretrained weights; sendvae never downloads them implicitly.",
            "Provide them with the teacher weights option: --teacher-weights PATH (train-sit: "
            "--teacher.weights PATH for the online REPA teacher, --eval.fd_teacher.weights PATH for "
            "the proxy FD teacher), or "
            f"build_teacher('{self.name}', weights=PATH) in Python.",
            f"PATH is a file or a folder holding it: {files}. {self.source}",
        ]
        if self.hub_name:
            lines.append(
                f"Timm/Hugging Face safetensors (the repo timm/{self.hub_name}) load as well; "
                f"allow_download=True lets timm fetch them from the Hub."
            )
        lines.append("random_init=True builds the network without weights (tests and benchmarks only).")
        return "\n".join(lines)


def teacher_input_hw(
    resolution: int | tuple[int, int], input_size: int, patch_size: int, scale_input: bool = True
) -> tuple[int, int]:
    """Teacher input (h, w) for training images of `resolution` px: a multiple of the patch size.

    `input_size` is the side for a 256-px image; with scale_input it grows with the resolution
    (DINOv2: 224 at 256 px -> 16x16 tokens, 448 at 512 px -> 32x32), else it is fixed.
    """
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if not scale_input:
        h = w = 256
    ih, iw = (max(1, round(s * input_size / 256 / patch_size)) * patch_size for s in (h, w))
    return ih, iw


TeacherT = TypeVar("TeacherT", bound="Teacher")


class Teacher(nn.Module):
    """A frozen feature extractor: images in [-1, 1] (B, 3, H, W) -> patch tokens (B, N, D), fp32.

    Always in eval mode with requires_grad off; `train()` is a no-op and forward runs under no_grad,
    so it can sit inside a training module. It runs under an outer bf16 autocast (preprocessing stays
    fp32) and returns fp32 tokens, ready for an fp32 cosine.
    """

    is_embedded = False  # True only for the teacher whose weights ship with the installed packages
    final_norm = "affine"  # "plain": the final LayerNorm without its affine (RAE; `plain_final_norm`)
    mean: torch.Tensor  # buffers (1, 3, 1, 1)
    std: torch.Tensor

    def __init__(self, spec: TeacherSpec, embed_dim: int, input_size: int, scale_input: bool) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.embed_dim = embed_dim
        self.patch_size = spec.patch_size
        self.input_size = input_size
        self.scale_input = scale_input
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def input_hw(self, resolution: int | tuple[int, int]) -> tuple[int, int]:
        """Teacher input (h, w) for a training image of `resolution` px, a multiple of the patch size."""
        return teacher_input_hw(resolution, self.input_size, self.patch_size, self.scale_input)

    def grid_size(self, resolution: int | tuple[int, int]) -> tuple[int, int]:
        """Token grid (gh, gw) the teacher returns for images of `resolution` px."""
        ih, iw = self.input_hw(resolution)
        return ih // self.patch_size, iw // self.patch_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1], bicubic resize to the teacher's input size, mean/std; fp32."""
        x = (x.float() + 1.0) / 2.0
        size = self.input_hw((x.shape[-2], x.shape[-1]))
        if size != tuple(x.shape[-2:]):
            # Plain bicubic without antialias, as REPA / REPA-E compute their teacher targets.
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, 3, h, w) -> patch tokens (B, gh * gw, D)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"teacher expects images (B, 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        return self.features(self.preprocess(x)).float()  # (B, N, D)

    def plain_final_norm(self: TeacherT) -> TeacherT:
        """Use the final LayerNorm without its affine: tokens LN(x) = (x - mean_c x) / std_c x per token.

        RAE's encoder normalisation (arXiv 2510.11690; bytetriper/RAE `Dinov2withNorm(normalize=True)` drops
        the weight and bias of DINOv2's last LayerNorm): the tokens a representation autoencoder encodes to.
        The affine's tensors leave the state dict. Returns the teacher; one without a final norm to strip
        raises ValueError.
        """
        raise ValueError(f"teacher {self.name!r} has no final LayerNorm to use without its affine")

    def train(self, mode: bool = True) -> Teacher:
        """Teachers stay in eval mode (frozen BatchNorm statistics, no dropout)."""
        return super().train(False)

    def freeze(self: TeacherT) -> TeacherT:
        super().train(False)
        self.requires_grad_(False)
        return self

    def extra_repr(self) -> str:
        norm = ", final_norm='plain'" if self.final_norm == "plain" else ""
        return f"name={self.name!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}{norm}"


def resample_tokens(
    tokens: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Resample patch tokens (B, gh*gw, D) from one token grid to another.

    Used when the latent grid differs from the teacher grid. Shrinking in both directions averages
    (adaptive average pooling: every destination token is the mean of the source tokens it covers);
    otherwise the (B, D, gh, gw) map is interpolated bilinearly (align_corners=False). Equal grids
    return the input unchanged.
    """
    # tuples (callers may pass lists)
    src_grid, dst_grid = cast("tuple[int, int]", tuple(src_grid)), cast("tuple[int, int]", tuple(dst_grid))
    b, n, d = tokens.shape
    if n != src_grid[0] * src_grid[1]:
        raise ValueError(f"{n} tokens do not form a {src_grid[0]}x{src_grid[1]} grid")
    if src_grid == dst_grid:
        return tokens
    fmap = tokens.transpose(1, 2).reshape(b, d, *src_grid)  # (B, D, gh, gw)
    if dst_grid[0] <= src_grid[0] and dst_grid[1] <= src_grid[1]:
        fmap = F.adaptive_avg_pool2d(fmap, dst_grid)
    else:
        fmap = F.interpolate(fmap, size=dst_grid, mode="bilinear", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)  # (B, gh'*gw', D)


def find_weight_file(path: str | Path, spec: TeacherSpec) -> Path:
    """A weights file, or a folder holding one of the spec's files (or a single weights file)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise TeacherWeightsError(f"teacher weights '{path}' do not exist.\n{spec.how_to_provide()}")
    for pattern in spec.weight_files + GENERIC_WEIGHT_FILES:  # file names, some with a * for a hash
        hits = sorted(p for p in path.glob(pattern) if p.is_file())
        if hits:
            return hits[0]
    found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(found) == 1:
        return found[0]
    listing = ", ".join(p.name for p in found) or "no weight files"
    raise TeacherWeightsError(
        f"cannot tell which file in the folder '{path}' holds the '{spec.name}' weights ({listing}); "
        f"name the file itself.\n{spec.how_to_provide()}"
    )


def read_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, torch.save or TorchScript (OpenAI CLIP's .pt) file, on the CPU.

    Read as data (`sendvae.runtime.weights`): a TorchScript archive's code never runs.
    """
    try:
        obj = read_weights(path, "teacher weights", trust_pickle=trust_pickle)
    except WeightsError as e:
        raise TeacherWeightsError(str(e)) from None
    return unwrap_state_dict(obj)


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Descend training-checkpoint containers ({'model': ...}, I-JEPA's {'encoder': ...}) to the tensors."""
    # I-JEPA keeps 'encoder' (the one REPA and timm load) next to 'target_encoder' and 'predictor'.
    containers = ("state_dict", "model", "module", "encoder", "target_encoder", "teacher")
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in containers if isinstance(obj.get(k), dict)), None)
        if key is None:
            raise TeacherWeightsError(f"no state dict found in a checkpoint with keys {sorted(obj)[:10]}")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise TeacherWeightsError(f"expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefix(state: dict[str, torch.Tensor], known: set[str]) -> dict[str, torch.Tensor]:
    """Drop the key prefix ('module.', 'visual.trunk.', 'backbone.', ...) under which most keys are known.

    Keys outside the chosen prefix are dropped too (a text tower, a decoder, a predictor).
    """
    counts: dict[str, int] = {"": sum(k in known for k in state)}
    for key in state:
        for i, ch in enumerate(key):
            if ch == "." and key[i + 1 :] in known:
                counts[key[: i + 1]] = counts.get(key[: i + 1], 0) + 1
    prefix = max(counts, key=lambda p: (counts[p], -len(p)))
    if not prefix:
        return state
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], spec: TeacherSpec, path: Path) -> None:
    """load_state_dict that fails on any missing parameter or mismatched shape, with the how-to text."""
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and v.shape != own[k].shape]  # fmt: skip
    missing = [k for k in own if k not in state]
    if bad or missing:
        sample = ", ".join(list(state)[:6])
        raise TeacherWeightsError(
            f"'{path}' does not fit teacher '{spec.name}' ({spec.timm_name}): "
            f"{len(missing)} missing keys {missing[:5]}, {len(bad)} shape mismatches {bad[:3]}. "
            f"The file's first keys: {sample}.\n{spec.how_to_provide()}"
        )
    unused = [k for k in state if k not in own]
    if unused:
        logger.info("teacher %s: ignored %d keys of %s (e.g. %s)", spec.name, len(unused), path, unused[:3])
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
