"""The dataset spec every stage shares: which images, where, at what size (``--data.*`` of train-vae).

``build_dataset(cfg)`` (``sendvae.data``) turns it into a dataset; ``cache-latents`` and ``evaluate``
fill one from their own options, and a latent store's manifest holds what rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import nonempty, option

DATASETS = ("shapes", "prepared", "imagefolder", "fashion-mnist")


@dataclass
class DataConfig:
    name: str = option("shapes", "dataset", choices=DATASETS)
    path: str | None = option(None, "dataset folder (prepared / imagefolder / fashion-mnist)", check=nonempty)
    resolution: int = option(256, "training resolution in pixels", min=8)
    hflip: bool = option(True, "random horizontal flips")
    num_workers: int = option(4, "DataLoader worker processes per rank", min=0)
    shapes_length: int = option(1_000_000, "number of distinct images of the shapes dataset", min=1)
    shapes_scene: str = option(
        "full",
        "shapes scene: full (textured backgrounds, second objects) or simple (one object, flat background)",
        choices=("full", "simple"),
    )
    subset: int | None = option(
        None, "use only the first N images (prepared / imagefolder / fashion-mnist; none: all of them)", min=1
    )
