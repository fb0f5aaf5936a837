"""Score image sets the way the demo and the study report them: by the judge, and in a teacher's features.

    ref = ImageSet.take(data.split("reference"), 1000)
    scorer = Scorer(judge, ref, teacher_fx)           # reference statistics computed once
    scorer.samples(images, labels)                     # {fd_judge, class_accuracy, per_class, fd_teacher}
    rec = scorer.reconstructions(vae, data.split("eval"), 1000)  # + psnr, ssim, stlpips_alex, rFD_<space>

Every key names its feature space or network: ``fd_judge`` (FD in the judge's penultimate features,
reported as FD_<judge>), ``fd_teacher`` (FD in the teacher's pooled features, FD_<teacher>), and the
perceptual metric as ``<variant>_<net>`` (``stlpips_alex``, ``lpips_vgg``), so two numbers with one name
are comparable.
"""

from __future__ import annotations

import numpy as np
import torch

from ..metrics.frechet import feature_statistics, frechet_distance
from .images import ImageSet
from .judge import Judge
from .reconstruction import score_reconstructions


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
        perceptual: str | None = "stlpips_alex",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        teacher: bool = True,
    ) -> tuple[dict, ImageSet, ImageSet]:
        """Reconstruct the first n images of `dataset` (posterior mean) and score them: the reconstruction
        metrics of the evaluation engine (`reconstruction.score_reconstructions`: PSNR, SSIM, the perceptual
        metric under its name, rFD_<judge> to the originals) and the `samples` scores of the reconstructions
        against the reference (fd_judge, class accuracy, fd_teacher: what samples are compared with); also
        the image sets."""
        r = score_reconstructions(
            vae, dataset, n, perceptual=perceptual, spaces=[self.judge], device=device, batch_size=batch_size
        )
        judged = self.samples(r.recons.images, r.recons.labels, teacher=teacher)
        return {**judged, **r.metrics}, r.originals, r.recons
