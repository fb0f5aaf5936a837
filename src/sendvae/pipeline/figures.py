"""The pipelines' figures: image grids (small images scaled up so that a person can see them) and curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def save_image_grid(
    images: torch.Tensor,
    path: Path,
    nrow: int = 8,
    min_side: int = 96,
    row_labels: Sequence[str] | None = None,
) -> None:
    """uint8 (N, 3, H, W) -> a PNG grid, each image scaled up (nearest, integer factor) to >= min_side;
    `row_labels`: a name written left of each row (PIL's built-in font, no font file needed)."""
    import torch.nn.functional as F
    import torchvision
    from PIL import Image, ImageDraw

    x = images.float() / 255.0
    factor = max(1, -(-min_side // x.shape[-1]))  # ceil
    if factor > 1:
        x = F.interpolate(x, scale_factor=factor, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = torchvision.utils.make_grid(x, nrow=nrow, padding=2, pad_value=1.0)  # (3, H', W')
    img = Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    if row_labels:
        margin, cell = 110, x.shape[-2] + 2
        canvas = Image.new("RGB", (img.width + margin, img.height), "white")
        canvas.paste(img, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        for i, label in enumerate(row_labels):
            draw.text((6, 2 + i * cell + cell // 2 - 6), label, fill="black")
        img = canvas
    img.save(path)


def plot_curves(
    panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[float], Sequence[float]]]]],
    path: Path,
    xlabel: str = "step",
) -> None:
    """One subplot per panel: (title, [(label, x, y), ...]); empty series are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, x, y in series:
            if len(x):
                ax.plot(np.asarray(x), np.asarray(y), marker="." if len(x) < 40 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key of stats.jsonl rows."""
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]
