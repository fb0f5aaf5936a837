"""Frechet distance in the feature space of a registered teacher: FD_<teacher>.

    fx = FeatureExtractor("efficientnet-lite0")          # the offline default, real weights embedded
    fd = fx.frechet_distance(real_images, fake_images)   # uint8 (N, H, W, 3) or (N, 3, H, W)
    print(fx.metric_name, fd)                            # FD_efficientnet-lite0

The features are the teacher's patch tokens averaged over tokens, (N, D), as FD_DINOv2 (Stein et al.
2023) pools a ViT. This is not FID: FID is the Frechet distance in the pool_3 space of the
inception-2015-12-05 graph (metrics.inception) and only that metric is ever named FID.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sendvae.data.transforms import to_float
from sendvae.metrics.frechet import StatsAccumulator, frechet_distance
from sendvae.teachers import DEFAULT_TEACHER, build_teacher

ImageBatch = np.ndarray | torch.Tensor

if TYPE_CHECKING:
    from ..teachers.config import TeacherConfig


def fd_metric_name(teacher: str) -> str:
    """The metric's name for a teacher: FD_<teacher>, e.g. FD_dinov2-vit-b."""
    return f"FD_{teacher}"


def _as_nchw_uint8(images: ImageBatch) -> torch.Tensor:
    """uint8 (N, H, W, 3) (ADM .npz layout) or (N, 3, H, W) -> uint8 (N, 3, H, W) tensor."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(
            f"expected uint8 images (N, H, W, 3) or (N, 3, H, W), got {x.dtype} {tuple(x.shape)}"
        )
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(x.shape)}")
    return x


class FeatureExtractor:
    """A frozen teacher as a feature extractor for Frechet distances: images -> pooled features (N, D).

    name / weights / random_init / opts: as `sendvae.teachers.build_teacher`; `resolution` is the
    image size the teacher's input size is computed for (the EfficientNet default always takes 224).
    """

    def __init__(
        self,
        name: str = DEFAULT_TEACHER,
        weights: str | Path | None = None,
        resolution: int = 256,
        random_init: bool = False,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        **opts,
    ) -> None:
        self.name = name
        self.metric_name = fd_metric_name(name)
        self.batch_size = batch_size
        self.device = torch.device(device)
        teacher = build_teacher(name, weights=weights, resolution=resolution, random_init=random_init, **opts)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)

    @classmethod
    def from_config(
        cls, cfg: TeacherConfig, resolution: int, device: str | torch.device = "cpu", batch_size: int = 64
    ) -> FeatureExtractor:
        """The extractor of a ``--*.teacher.*`` option (`teachers.config.TeacherConfig`)."""
        if cfg.enc_type is None:
            raise ValueError("FD_<teacher> needs a teacher: set its enc_type (see `sendvae info`)")
        opts: dict = {"input_size": cfg.input_size} if cfg.input_size else {}
        return cls(cfg.enc_type, cfg.weights, resolution, cfg.random_init, device, batch_size,
                   allow_download=cfg.allow_download, **opts)  # fmt: skip

    @property
    def dim(self) -> int:
        return self.teacher.embed_dim

    @torch.no_grad()
    def features(self, images: ImageBatch) -> torch.Tensor:
        """uint8 images -> float32 pooled features (N, D) on the extractor's device."""
        x = _as_nchw_uint8(images)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            batch = to_float(x[i : i + self.batch_size].to(self.device))  # (B, 3, H, W) in [-1, 1]
            with torch.autocast(self.device.type, enabled=False):  # metric features in fp32
                tokens = self.teacher(batch)  # (B, N, D)
            out.append(tokens.float().mean(dim=1))  # (B, D)
        return torch.cat(out)

    def statistics(self, batches: ImageBatch | Iterable[ImageBatch]) -> tuple[np.ndarray, np.ndarray]:
        """float64 (mu (D,), sigma (D, D)) of the pooled features of one array or an iterable of batches."""
        if isinstance(batches, (np.ndarray, torch.Tensor)):
            batches = [batches]
        acc = StatsAccumulator()
        for b in batches:
            acc.update(self.features(b))
        return acc.finalize()

    def frechet_distance(
        self, real: ImageBatch | Iterable[ImageBatch], fake: ImageBatch | Iterable[ImageBatch]
    ) -> float:
        """FD_<teacher> between two image sets (each an array or an iterable of uint8 batches)."""
        return frechet_distance(*self.statistics(fake), *self.statistics(real))
