"""PatchGAN discriminator (pix2pix; the taming-transformers / LDM `NLayerDiscriminator`).

Each output logit judges one receptive-field patch (70x70 for 3 layers): a 256 px image gives a
30x30 map. The `main.{N}` layout matches taming, LDM and REPA-E checkpoints.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sendvae.runtime.checkpoint import CheckpointMismatchError, find_state_dict, load_checked, read_checkpoint

log = logging.getLogger(__name__)


class ActNorm(nn.Module):
    """Per-channel affine y = scale * (x + loc), initialised from the first training batch (Glow).

    Parameter names (`loc`, `scale`, buffer `initialized`) follow taming's ActNorm.
    """

    initialized: torch.Tensor  # buffer, uint8 scalar

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        # (B, C, H, W) -> per-channel mean/std, so the first batch comes out zero-mean, unit-variance
        flat = x.detach().float().transpose(0, 1).flatten(1)
        self.loc.copy_(-flat.mean(1).view_as(self.loc))
        self.scale.copy_((1.0 / (flat.std(1) + 1e-6)).view_as(self.scale))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """conv4x4/2 + LeakyReLU, then (n_layers - 1) x [conv4x4/2, norm, LeakyReLU], one conv4x4/1 block,
    and a conv4x4/1 to one logit per patch. Widths ndf * min(2**n, 8).

    (B, input_nc, H, W) -> (B, 1, H/8 - 2, W/8 - 2) for n_layers=3.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.input_nc, self.ndf, self.n_layers, self.use_actnorm = input_nc, ndf, n_layers, use_actnorm
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own shift, as in pix2pix
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=use_bias),
                norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """pix2pix init: conv weights N(0, 0.02); BatchNorm weights N(1, 0.02); all biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_nc:
            raise ValueError(f"expected images (B, {self.input_nc}, H, W), got shape {tuple(x.shape)}")
        return self.main(x)

    def describe(self) -> str:
        return (
            f"NLayerDiscriminator(input_nc={self.input_nc}, ndf={self.ndf}, n_layers={self.n_layers}, "
            f"use_actnorm={self.use_actnorm})"
        )


def infer_discriminator_args(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """NLayerDiscriminator arguments from the shapes of a `main.N`-named state dict."""
    # conv layers: 4-D `main.N.weight` (norm weights are 1-D; ActNorm has `loc`/`scale` instead)
    convs = sorted(
        int(k.split(".")[1]) for k, v in sd.items() if re.fullmatch(r"main\.\d+\.weight", k) and v.ndim == 4
    )
    if len(convs) < 3:
        raise CheckpointMismatchError(f"not a PatchGAN state dict: {len(convs)} conv layers under 'main.'")
    first = sd[f"main.{convs[0]}.weight"]  # (ndf, input_nc, 4, 4)
    return {
        "input_nc": first.shape[1],
        "ndf": first.shape[0],
        "n_layers": len(convs) - 2,
        "use_actnorm": any(k.endswith(".loc") for k in sd),
    }


def load_discriminator(
    path: str | Path, strict: bool = True, map_location: Any = "cpu"
) -> NLayerDiscriminator:
    """A PatchGAN from a taming/LDM/REPA-E checkpoint; its size is read from the tensor shapes.

    The state dict may sit at the top level or under "state_dict"/"model"/"discriminator", with a
    prefix such as `loss.discriminator.` or `discriminator.`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"discriminator checkpoint {path} does not exist")
    raw = read_checkpoint(path, map_location)
    sd, where = find_state_dict(
        raw, "main.0.weight", ("discriminator", "disc", "state_dict", "model"), source=f"checkpoint {path}"
    )
    args = infer_discriminator_args(sd)
    model = NLayerDiscriminator(**args)
    load_checked(
        model,
        sd,
        strict=strict,
        expected=model.describe(),
        source=str(path),
        optional=lambda k: k.endswith("num_batches_tracked"),
    )
    log.info("discriminator: %s from %s (%s)", model.describe(), path, where)
    return model.to(map_location).eval()
