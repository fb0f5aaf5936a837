"""An image set as the evaluation reads it: uint8 images (N, 3, H, W) and their class labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
