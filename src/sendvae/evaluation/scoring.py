"""Score image sets the way the demo and the study report them: by the judge, and in a teacher's features.

    ref = ImageSet.take(data.split("reference"), 1000)
    scorer = Scorer(judge, ref, teacher_fx)           # reference statistics computed once
    scorer.samples(images, labels)                     # {fd_judge, class_accuracy, per_class, fd_teacher}
    rec = scorer.reconstructions(vae, data.split("eval"), 1000, lpips)   # + psnr, ssim, lpips_<net>

Every key names its feature space or network: ``fd_judge`` (FD in the judge's penultimate features,
reported as FD_<judge>), ``fd_teacher`` (FD in the teacher's pooled features, FD_<teacher>), and the
perceptual metric as ``<variant>_<net>`` (``stlpips_alex``, ``lpips_vgg``), so two numbers with one name
are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..metrics.frechet import feature_statistics, frechet_distance
from ..metrics.recon import ReconMetrics, reconstruct
from .judge import Judge


@dataclass
class ImageSet:
    """uint8 images (N, 3, H, W) with their class labels (N,)."""

    images: torch.Tensor
    labels: np.ndarray

    @classmethod
    def take(cls, dataset, n: int, start: int = 0) -> ImageSet:
        """Items start..start+n-1 of a `(uint8 (3, H, W), label)` dataset."""
        if start + n > len(dataset):
            raise ValueError(f"asked for {n} images from {start}, but the set has {len(dataset)}")
        items = [dataset[i] for i in range(start, start + n)]
        return cls(torch.stack([torch.as_tensor(x) for x, _ in items]), np.array([int(y) for _, y in items]))

    @classmethod
    def from_npz(cls, path) -> ImageSet:
        """An ADM sample batch: arr_0 uint8 (N, H, W, 3), arr_1 labels (N,)."""
        with np.load(path) as z:
            return cls(torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).contiguous(), np.asarray(z["arr_1"]))


class Scorer:
    """The judge (class accuracy, FD_<judge>) and a teacher (FD_<teacher>, optional) against one reference."""

    def __init__(self, judge: Judge, reference: ImageSet, teacher_fx=None) -> None:
        self.judge, self.fx = judge, teacher_fx
        judge.set_reference(reference.images)
        self.judge_metric = judge.metric_name
        self.teacher_metric = teacher_fx.metric_name if teacher_fx is not None else None
        self._teacher_ref = (
            feature_statistics(self._teacher_features(reference.images)) if teacher_fx is not None else None
        )

    def _teacher_features(self, images: torch.Tensor) -> np.ndarray:
        return self.fx.features(images).cpu().double().numpy()  # (N, D)

    def samples(self, images: torch.Tensor, labels: np.ndarray | None = None, teacher: bool = True) -> dict:
        """{fd_judge, class_accuracy, per_class (with labels), fd_teacher (with a teacher, unless `teacher`
        is False: the teacher is the costly network on a CPU)}."""
        s = self.judge.scores(images, labels)
        out = {"fd_judge": s["fd"], **{k: v for k, v in s.items() if k != "fd"}}
        if self.fx is not None and teacher:
            assert self._teacher_ref is not None
            stats = feature_statistics(self._teacher_features(images))
            out["fd_teacher"] = float(frechet_distance(*stats, *self._teacher_ref))
        return out

    def reconstructions(
        self,
        vae,
        dataset,
        n: int,
        lpips=None,
        lpips_name: str = "stlpips_alex",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> tuple[dict, ImageSet, ImageSet]:
        """Reconstruct the first n images of `dataset` (posterior mean) and score them: the `samples` scores
        (rFD in both spaces, class accuracy), PSNR, SSIM, LPIPS as `lpips_name`; also the image sets."""
        metrics = ReconMetrics(lpips)
        originals, recons = [], []
        for x, y in reconstruct(vae, dataset, n, batch_size, device):
            metrics.update(x, y)
            originals.append(x)
            recons.append(y)
        labels = np.array([int(dataset[i][1]) for i in range(n)])
        orig, rec = ImageSet(torch.cat(originals), labels), ImageSet(torch.cat(recons), labels)
        m = metrics.result()
        if "lpips" in m:
            m[lpips_name] = m.pop("lpips")
        return {**self.samples(rec.images, labels), **m}, orig, rec
