"""Is a generated image good, and of the class it was asked for? Measured in the bundled teacher's features.

On the embedded example there is no Inception network and no ImageNet classifier, so both judgements use
the pooled features f(x) (D,) of the teacher the pipeline already has (EfficientNet-Lite0):

* FD_<teacher>: the Frechet distance between the Gaussians of f over a set of images and over real
  images the models never saw (`reference`), the FID formula in another feature space (never called FID).
* class accuracy: a multinomial logistic regression on f, fitted on real labelled images and checked on
  held-out real ones (`real_accuracy`, its ceiling); a sample counts as of class k when the probe says k.
  For class-conditional samples this is the fraction that show the class they were asked for (chance is
  1 / K), the embedded stand-in for the Inception classifier behind IS.

Why scikit-learn's LogisticRegression: an L2 multinomial fit on a few thousand 112-d features takes a
second with lbfgs, deterministic for a fixed input, the field's standard linear probe.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..metrics.features import FeatureExtractor
from ..metrics.frechet import feature_statistics, frechet_distance


@dataclass
class ImageSet:
    """uint8 images (N, 3, H, W) with their class labels (N,)."""

    images: torch.Tensor
    labels: np.ndarray


def render(dataset, indices: Iterable[int]) -> ImageSet:
    """Images and labels of `dataset` at `indices` (a `(uint8 (3, H, W), label)` dataset)."""
    items = [dataset[int(i)] for i in indices]
    return ImageSet(torch.stack([torch.as_tensor(x) for x, _ in items]), np.array([int(y) for _, y in items]))


class Judge:
    """FD_<teacher> against held-out real images, and a linear class probe fitted on other real images.

    reference: real images for the FD statistics; train / test: labelled real images for the probe.
    """

    def __init__(
        self, fx: FeatureExtractor, reference: ImageSet, train: ImageSet, test: ImageSet, seed: int = 0
    ) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.fx = fx
        self.metric_name = fx.metric_name
        self.ref_stats = feature_statistics(self.features(reference.images))
        self.probe = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
        )
        self.probe.fit(self.features(train.images), train.labels)
        self.num_classes = int(len(self.probe.classes_))
        self.real_accuracy = self.class_accuracy(test.images, test.labels)

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.fx.features(images).cpu().double().numpy()  # (N, D)

    def fd(self, images: torch.Tensor) -> float:
        """FD_<teacher> of the images against the reference."""
        return float(frechet_distance(*feature_statistics(self.features(images)), *self.ref_stats))

    def class_accuracy(self, images: torch.Tensor, labels: np.ndarray) -> float:
        """Fraction of the images the probe assigns to their label."""
        return float((self.probe.predict(self.features(images)) == np.asarray(labels)).mean())

    def scores(self, images: torch.Tensor, labels: np.ndarray | None = None) -> dict[str, float]:
        """{fd, class_accuracy (when labels are given)} of one image set, features computed once."""
        f = self.features(images)
        out = {"fd": float(frechet_distance(*feature_statistics(f), *self.ref_stats))}
        if labels is not None:
            out["class_accuracy"] = float((self.probe.predict(f) == np.asarray(labels)).mean())
        return out
