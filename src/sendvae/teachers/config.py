"""The teacher option, one spelling for every command and pipeline: ``--teacher.*`` (``--SECTION.teacher.*``).

train-vae's alignment target, train-sit's online REPA teacher and its proxy-FD feature network, the demo's
and the study's teacher: each is a `TeacherConfig`, built by `build_from_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from . import DEFAULT_TEACHER, Teacher, build_teacher


@dataclass
class TeacherConfig:
    enc_type: str | None = option("dinov2-vit-b", "teacher vision foundation model (see `sendvae info`)")
    weights: str | None = option(None, "local weights file/folder for the teacher")
    random_init: bool = option(False, "random teacher weights (tests and benchmarks only)")
    allow_download: bool = option(False, "let timm/HF download the teacher weights (needs network)")
    input_size: int | None = option(
        None,
        "teacher input side in pixels (default: the teacher's rule, 224 x res / 256 for patch-14 ViTs)",
        min=1,
    )


def embedded_teacher(input_size: int | None = None) -> TeacherConfig:
    """The bundled teacher (no weights to fetch), at ``input_size`` px."""
    return TeacherConfig(enc_type=DEFAULT_TEACHER, input_size=input_size)


def build_from_config(cfg: TeacherConfig, resolution: int, device: torch.device | str = "cpu") -> Teacher:
    """The teacher ``cfg`` names, frozen, for images of ``resolution`` px, on ``device``."""
    if cfg.enc_type is None:
        raise ValueError("no teacher named: pass --teacher.enc_type NAME (see `sendvae info`)")
    opts = {"input_size": cfg.input_size} if cfg.input_size else {}
    teacher = build_teacher(
        cfg.enc_type,
        weights=cfg.weights,
        resolution=resolution,
        random_init=cfg.random_init,
        allow_download=cfg.allow_download,
        **opts,
    )
    return teacher.to(device)
