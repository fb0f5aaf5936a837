"""An independent judge of generated images: a small CNN classifier trained from scratch on real images.

Why not the teacher: the VAEs are aligned to the teacher's features, so FD and class probes in those
features favour the aligned variants by construction, and a linear probe on them reads blur as another
class. The judge is a network nothing else in the pipeline touches, trained on the real training split
(Fashion-MNIST's 60000 images; for the shapes scene, 20000 rendered images of their own seed). It gives:

* class accuracy of class-conditional samples (overall and per class): the fraction the judge reads as
  the class they were asked for. Its own held-out test accuracy (`test_accuracy`) is the ceiling.
* FD_<judge>: the Frechet distance between Gaussians of its penultimate features (128-d) over a set of
  images and over held-out real images (the FID formula in this network's space, never called FID).

Network (``JudgeNet``, 2.6 M multiply-adds per 32 px image, ~100 K parameters): three conv-BN-ReLU
stages (16, 32, 64 channels), each followed by a 2x2 max-pool, then a 128-unit ReLU layer (the
features) and the linear classifier. Input: the channel mean of the uint8 image scaled to [-1, 1] (one
grey channel; Fashion-MNIST is grey, the shapes' classes are shapes, not colours). Trained with AdamW
and a one-cycle schedule, random horizontal flips (the latent stores hold every image and its mirror, so
samples may face either way). Deterministic for a seed on a given machine.

Trained once per machine and cached: ``$SENDVAE_CACHE`` (default ``~/.cache/sendvae``)/judges/
NAME-FINGERPRINT.safetensors, the fingerprint a hash of the judge version, its recipe and the training
data (the IDX files' bytes; the shapes scene's config). A cache file whose recorded fingerprint or
tensors do not match is trained again, never used.

Why our own and not torchvision / timm: their smallest classifiers are ImageNet-sized (millions of
parameters, minutes per epoch on 2 cores); a 100 K-parameter CNN reaches ~91% on Fashion-MNIST in a
minute (3 epochs), which is what a judge trained on the user's machine needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..data.embedded import Embedded
from ..data.fashion_mnist import DEFAULT_ROOT, FashionMNIST, find_fashion_mnist_files
from ..data.shapes_config import scene_config
from ..metrics.frechet import feature_statistics, frechet_distance
from ..runtime.checkpoint import atomic_write_bytes

JUDGE_VERSION = 1
SHAPES_TRAIN_IMAGES = 20000


@dataclass(frozen=True)
class JudgeRecipe:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    train_images: int | None = None  # None: the whole training split (shapes: SHAPES_TRAIN_IMAGES)
    seed: int = 0


class JudgeNet(nn.Module):
    """(N, 1, H, W) in [-1, 1] -> features (N, 128) -> logits (N, K); H, W divisible by 8."""

    def __init__(
        self, num_classes: int, resolution: int, widths: tuple[int, ...] = (16, 32, 64), dim: int = 128
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in widths:  # each stage halves the side: H -> H / 8
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = resolution // 2 ** len(widths)
        self.fc = nn.Linear(c_in * side * side, dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.convs(x).flatten(1)))  # (N, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, K)


def judge_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, 1, H, W) in [-1, 1]: the channel mean."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"the judge takes uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    return images.float().mean(1, keepdim=True) / 127.5 - 1.0


def _stack(dataset, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` (all: None) items of a `(uint8 (3, H, W), label)` dataset as two tensors."""
    n = len(dataset) if n is None else min(n, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items])


def data_fingerprint(data: Embedded) -> str:
    """What the judge's training data is: the IDX files' bytes (Fashion-MNIST) or the scene's config."""
    h = hashlib.sha256()
    if data.name == "fashion-mnist":
        for split in ("train", "test"):
            for path in find_fashion_mnist_files(data.path or "", split):
                h.update(path.read_bytes())
    else:
        h.update(repr(scene_config(data.scene, resolution=data.resolution)).encode())
    return h.hexdigest()


class Judge:
    """A trained `JudgeNet` with its test accuracy; scores image sets against a reference."""

    def __init__(
        self,
        net: JudgeNet,
        name: str,
        classes: tuple[str, ...],
        test_accuracy: float,
        per_class: list[float],
        fingerprint: str,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.name, self.classes, self.fingerprint = name, classes, fingerprint
        self.metric_name = f"FD_{name}"
        self.test_accuracy, self.test_per_class = float(test_accuracy), list(per_class)
        self.ref_stats: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @torch.no_grad()
    def run(self, images: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(features float64 (N, D), predicted classes (N,))."""
        feats, preds = [], []
        for i in range(0, len(images), batch_size):
            f = self.net.features(judge_input(images[i : i + batch_size]).to(self.device))
            feats.append(f.double().cpu())
            preds.append(self.net.head(f).argmax(1).cpu())
        return torch.cat(feats).numpy(), torch.cat(preds).numpy()

    def features(self, images: torch.Tensor) -> np.ndarray:
        return self.run(images)[0]

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.run(images)[1]

    def set_reference(self, images: torch.Tensor) -> None:
        """Held-out real images: the FD reference."""
        self.ref_stats = feature_statistics(self.features(images))

    def scores(self, images: torch.Tensor, labels: np.ndarray | None = None) -> dict:
        """{fd (against the reference), class_accuracy and per_class (with labels)} of one image set."""
        f, pred = self.run(images)
        out: dict = {}
        if self.ref_stats is not None:
            out["fd"] = float(frechet_distance(*feature_statistics(f), *self.ref_stats))
        if labels is not None:
            acc, per = class_accuracy(pred, np.asarray(labels), self.num_classes)
            out["class_accuracy"], out["per_class"] = acc, per
        return out


def class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """Overall and per-class fraction of `pred == labels` (NaN for a class with no image)."""
    hit = pred == labels
    per = [
        float(hit[labels == k].mean()) if (labels == k).any() else float("nan") for k in range(num_classes)
    ]
    return float(hit.mean()), per


def train_judge_net(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    recipe: JudgeRecipe,
    progress: Callable[[str], None] | None = None,
) -> JudgeNet:
    """Train a `JudgeNet` on uint8 images (N, 3, H, W) and labels (N,), deterministically for recipe.seed."""
    torch.manual_seed(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    net = JudgeNet(num_classes, images.shape[-1]).to(memory_format=torch.channels_last)  # 1.5x on CPU
    x = judge_input(images)  # (N, 1, H, W)
    n, bs = len(x), recipe.batch_size
    steps = recipe.epochs * (n // bs)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(steps, 1))
    net.train()
    for epoch in range(recipe.epochs):
        perm = torch.randperm(n, generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        total = 0.0
        for i in range(n // bs):
            idx = perm[i * bs : (i + 1) * bs]
            xb = torch.where(flip[idx, None, None, None], x[idx].flip(-1), x[idx])
            xb = xb.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(net(xb), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        if progress:
            progress(f"judge epoch {epoch + 1}/{recipe.epochs}: loss {total / max(1, n // bs):.4f}")
    return net.eval()


def cache_dir() -> Path:
    root = (
        os.environ.get("SENDVAE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sendvae"
    )
    return Path(root) / "judges"


def judge_name(data: Embedded) -> str:
    return "fmnist-cnn" if data.name == "fashion-mnist" else "shapes-cnn"


def load_judge(
    data: Embedded,
    recipe: JudgeRecipe = JudgeRecipe(),
    *,
    device: str | torch.device = "cpu",
    cache: str | os.PathLike | None = None,
    echo: Callable[[str], None] | None = None,
) -> Judge:
    """The judge of `data`: from the cache when its fingerprint matches, else trained (about a minute on
    2 cores for Fashion-MNIST) and cached. Its held-out test accuracy is measured on the test split."""

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    name = judge_name(data)
    meta = {
        "version": JUDGE_VERSION,
        "name": name,
        "resolution": data.resolution,
        "dataset": data.name,
        "scene": data.scene if data.name == "shapes" else None,
        "recipe": dataclasses.asdict(recipe),
        "data": data_fingerprint(data),
    }
    fingerprint = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    path = Path(cache) if cache is not None else cache_dir()
    path = path / f"{name}-{data.resolution}px-{fingerprint[:16]}.safetensors"
    classes = data.classes
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                stored = f.metadata() or {}
            if stored.get("fingerprint") != fingerprint:
                raise ValueError("its recorded fingerprint differs")
            net = JudgeNet(len(classes), data.resolution)
            net.load_state_dict(load_file(str(path)))
            acc, per = float(stored["test_accuracy"]), json.loads(stored["per_class"])
            return Judge(net.eval(), name, classes, acc, per, fingerprint, device)
        except Exception as e:  # a foreign, stale or broken cache file: train again, never use it
            echo(f"[judge] cached {path} unusable ({type(e).__name__}: {e}); training again")
    t0 = time.perf_counter()
    train = data.split("judge")
    n = recipe.train_images or (None if data.name == "fashion-mnist" else SHAPES_TRAIN_IMAGES)
    images, labels = _stack(train, n)
    echo(f"[judge] training {name} on {len(images)} real images of {data.description} (once per machine)")
    net = train_judge_net(images, labels, len(classes), recipe, progress=echo)
    test = data.split("reference") if data.name == "shapes" else _test_split(data)
    t_images, t_labels = _stack(test, 10000 if data.name == "fashion-mnist" else 2000)
    judge = Judge(net, name, classes, 0.0, [], fingerprint, device)
    acc, per = class_accuracy(judge.predict(t_images), t_labels.numpy(), len(classes))
    judge.test_accuracy, judge.test_per_class = acc, per
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    stored = {
        "fingerprint": fingerprint,
        "test_accuracy": repr(acc),
        "per_class": json.dumps(per),
        "meta": json.dumps(meta),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = safetensors_bytes(tensors, metadata=stored)
    atomic_write_bytes(path, lambda f: f.write(blob))
    took = time.perf_counter() - t0
    echo(f"[judge] {name}: {acc:.1%} on {len(t_images)} held-out test images ({took:.0f} s)")
    return judge


def _test_split(data: Embedded):

    return FashionMNIST(data.path or DEFAULT_ROOT, "test", data.resolution)
