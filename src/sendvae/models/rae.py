"""The representation autoencoder (RAE, Zheng et al., arXiv 2510.11690): a frozen encoder, a trained decoder.

    x (B, 3, H, W) in [-1, 1] -> teacher f: patch tokens (B, N, C), registers / cls dropped, its final
      LayerNorm without affine -> as a map (B, C, gh, gw) -> z = (f(x) - mu_c) / sigma_c      (the latent)
    z -> ViT decoder (models/rae_decoder.py) -> x_hat (B, 3, gh * p, gw * p),  p = H / gh

mu_c, sigma_c: per-channel mean / std of f(x) over training images, measured once before the decoder trains
(``feature_mean`` / ``feature_std``) and part of the tokenizer from then on: the decoder learns to read z.
RAE (bytetriper/RAE src/stage1/rae.py) keeps mean / var per (channel, row, column) with sqrt(var + 1e-5);
ours are per channel, as every latent statistic here.

Noise augmentation (RAE Sec. 3): in training the decoder reads z + sigma * eps, eps ~ N(0, I), with one sigma
per image drawn from |N(0, tau^2)| (the paper, ``noise="halfnormal"``, the default) or U(0, tau) (the
public code's ``noise_tau * torch.rand``, ``noise="uniform"``), tau = 0.8; so the decoder stays sharp on
the slightly-off latents a diffusion model generates. It is `RAEPosterior.sample` in training mode: the
VAE trainer's z ~ q(z|x) is this draw, the posterior mean is z, its std is 0 and its KL is 0.

The RAE has the interface of `AutoencoderKL` that training, caching, sampling, evaluation and probing use
(encode -> posterior with mean / std / sample / mode / kl, decode, latent_channels, latent_grid,
downsample_factor, the latent statistics buffers, config.to_dict, save_pretrained, grad_checkpointing), so
`load_vae` returns it for an RAE export and every command takes it where it takes a VAE. The encoder
is a registered teacher (``teachers/``), frozen: eval mode and no gradient, whatever ``train()`` or
``requires_grad_()`` is asked; only the decoder has trainable parameters.

Export (`save_pretrained`): ``rae.json`` (this config, the latent statistics, the encoder's weights
fingerprint) and ``model.safetensors`` (encoder, decoder and statistics: the folder is self-contained).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..config import from_dict
from ..runtime.checkpoint import atomic_save_safetensors, atomic_write_json, load_checked, read_checkpoint
from ..runtime.weights import malformed, read_json
from ..teachers import TEACHERS, Teacher, build_teacher
from .autoencoder import Autoencoder, channel_stats
from .latent_stats import normalize
from .rae_decoder import RAE_DECODERS, RAEDecoder, RAEDecoderConfig

RAE_JSON = "rae.json"
RAE_WEIGHTS = "model.safetensors"
RAE_FORMAT_VERSION = 1
NOISE_KINDS = ("halfnormal", "uniform")


@dataclass
class RAEConfig:
    """What rebuilds an RAE: its encoder (a teacher and its input), the image size, the decoder, the noise."""

    kind: str = field(default="rae", metadata={"help": "marks an RAE record (load_vae reads it as one)"})
    encoder: str = field(default="dinov2-vit-b-reg", metadata={"help": "the frozen teacher (teachers/)"})
    encoder_input_size: int | None = field(
        default=None, metadata={"help": "teacher input side for 256-px images (None: the teacher's rule)"}
    )
    resolution: int = field(default=256, metadata={"help": "image side the RAE encodes and reconstructs"})
    decoder: RAEDecoderConfig = field(default_factory=lambda: replace(RAE_DECODERS["rae-vit-xl"]))
    noise_tau: float = field(default=0.8, metadata={"help": "tau of the decoder's noise augmentation"})
    noise: str = field(
        default="halfnormal", metadata={"help": "sigma per image: |N(0, tau^2)| (paper) or U(0, tau) (code)"}
    )

    def __post_init__(self) -> None:
        if self.kind != "rae":
            raise ValueError(f"an RAE config has kind 'rae', got {self.kind!r}")
        if self.encoder not in TEACHERS:
            raise ValueError(f"unknown RAE encoder {self.encoder!r}; choose a teacher: {', '.join(TEACHERS)}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"RAE noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if not (math.isfinite(self.noise_tau) and self.noise_tau >= 0):
            raise ValueError(f"RAE noise_tau must be a number >= 0, got {self.noise_tau}")

    def describe(self) -> str:
        d = self.decoder
        return (
            f"RAE ({self.encoder} encoder at {self.resolution} px, ViT decoder {d.hidden_size} wide x "
            f"{d.depth} blocks, noise {self.noise} tau {self.noise_tau:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RAEConfig:
        """Strictly: unknown fields and values of the wrong type are errors (`config.from_dict`)."""
        return from_dict(cls, d)


def is_rae_record(d: Any) -> bool:
    """Whether a stored config dict (a checkpoint's ``vae_config``) describes an RAE."""
    return isinstance(d, dict) and d.get("kind") == "rae"


def noise_sigmas(
    batch: int, tau: float, kind: str, generator: torch.Generator | None = None, device: Any = "cpu"
) -> torch.Tensor:
    """One noise level per image, (B,): sigma = tau |n|, n ~ N(0, 1) ("halfnormal": mean tau sqrt(2 / pi)),
    or sigma = tau u, u ~ U(0, 1) ("uniform", RAE's public code)."""
    if kind == "halfnormal":
        return tau * torch.randn(batch, generator=generator, device=device).abs()
    if kind == "uniform":
        return tau * torch.rand(batch, generator=generator, device=device)
    raise ValueError(f"unknown noise kind {kind!r}; choose from {NOISE_KINDS}")


class RAEPosterior:
    """The 'posterior' of a deterministic encoder: the latent z itself (std 0, KL 0). `sample` is RAE's noise
    augmentation, z + sigma_b * eps (a sigma per image b), when made with tau > 0 (training); else z."""

    def __init__(self, z: torch.Tensor, tau: float = 0.0, noise: str = "halfnormal"):
        self.mean = z  # (B, C, h, w)
        self.tau, self.noise = tau, noise

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        z = self.mean
        if self.tau <= 0:
            return z
        sigma = noise_sigmas(z.shape[0], self.tau, self.noise, generator, z.device).to(z.dtype)
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return z + sigma.view(-1, 1, 1, 1) * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """(B,) zeros: nothing regularises a frozen encoder's latent."""
        return torch.zeros(self.mean.shape[0], device=self.mean.device)


class RAE(Autoencoder):
    """Frozen teacher encoder + ViT decoder: images in [-1, 1] (B, 3, H, W) <-> latents (B, C, H/p, W/p)."""

    feature_mean: torch.Tensor  # buffers (C,): the encoder tokens' statistics that define z
    feature_std: torch.Tensor

    def __init__(self, config: RAEConfig, encoder: Teacher):
        super().__init__()
        self.config = config = replace(config)
        size = config.encoder_input_size or TEACHERS[config.encoder].input_size
        if (encoder.name, encoder.input_size) != (config.encoder, size):
            raise ValueError(
                f"the RAE config names encoder {config.encoder!r} at input size {size}, the teacher given is "
                f"{encoder.name!r} at {encoder.input_size}"
            )
        self.grid, self.patch = _check_patch_tokens(encoder, config.resolution)
        if encoder.final_norm != "plain":
            encoder.plain_final_norm()
        self.encoder = encoder.freeze()
        c = encoder.embed_dim
        self.decoder = RAEDecoder(config.decoder, c, self.patch)
        self.register_buffer("feature_mean", torch.zeros(c))
        self.register_buffer("feature_std", torch.ones(c))
        self._init_latent_stats(c)  # the diffusion stage's statistics of z (as AutoencoderKL's)

    # -- what the pipeline reads ---------------------------------------------------------------------------
    @property
    def downsample_factor(self) -> int:
        return self.patch

    @property
    def latent_channels(self) -> int:
        return self.encoder.embed_dim

    @property
    def grad_checkpointing(self) -> bool:
        return self.decoder.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enabled: bool) -> None:
        self.decoder.grad_checkpointing = bool(enabled)  # the encoder runs without a graph

    def last_layers(self) -> tuple[torch.Tensor, None]:
        """(decoder output weight, None): what the adaptive GAN weight differentiates (RAE: decoder_pred);
        the encoder is frozen, so there is no encoder layer for an encoder-side adaptive weight."""
        return self.decoder.head.weight, None

    def train(self, mode: bool = True) -> RAE:
        super().train(mode)
        self.encoder.train(False)  # a Teacher stays in eval mode anyway; said here as well
        return self

    def requires_grad_(self, requires_grad: bool = True) -> RAE:
        self.decoder.requires_grad_(requires_grad)  # the encoder stays frozen
        return self

    def latent_grid(self, resolution: int | tuple[int, int]) -> tuple[int, int]:
        """Latent (h, w) for an image of ``resolution``: the encoder's token grid, which the decoder turns
        back into exactly that many pixels (h * p, w * p)."""
        hw = (resolution, resolution) if isinstance(resolution, int) else (resolution[0], resolution[1])
        gh, gw = self.encoder.grid_size(hw)
        p = self.patch
        if (gh * p, gw * p) != hw:
            r = self.config.resolution
            raise ValueError(
                f"the RAE ({self.config.encoder}, {p}-pixel decoder patches) encodes a {hw[0]}x{hw[1]} image "
                f"to a {gh}x{gw} token grid, which decodes to {gh * p}x{gw * p}; give it {r}x{r} images"
            )
        return gh, gw

    def encode(self, x: torch.Tensor) -> RAEPosterior:
        """x in [-1, 1] (B, 3, H, W) -> z = (f(x) - mu) / sigma (B, C, gh, gw), with RAE's noise as the
        posterior's sample in training mode. No gradient reaches the encoder."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch (B, 3, H, W), got shape {tuple(x.shape)}")
        gh, gw = self.latent_grid((x.shape[2], x.shape[3]))
        tokens = self.encoder(x)  # (B, gh*gw, C) fp32, under no_grad
        z = tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        z = normalize(z, self.feature_mean, self.feature_std)
        tau = self.config.noise_tau if self.training else 0.0
        return RAEPosterior(z, tau, self.config.noise)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, h, w) -> image (B, 3, h * p, w * p), about [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, h, w), got shape {tuple(z.shape)}"
            )
        return self.decoder(z)

    @torch.no_grad()
    def set_feature_stats(self, mean: Any, std: Any) -> None:
        """mu, sigma of the encoder's tokens per channel: what z is normalised by (fixed before training)."""
        mean, std = channel_stats(mean, std, self.latent_channels, "RAE feature stats")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def encoder_fingerprint(self) -> str:
        """sha256 of the frozen encoder's weights: which encoder a decoder was trained for."""
        # imported here: sendvae.data's package init reaches models/ (the latent store reads latent_stats)
        from ..data.latent_store import state_fingerprint

        return state_fingerprint(self.encoder)

    def save_pretrained(self, directory: str | Path) -> Path:
        """``rae.json`` + ``model.safetensors`` in ``directory`` (atomic writes); `load_vae` reads it back."""
        out = Path(directory)
        record = {
            "format": "sendvae-rae",
            "format_version": RAE_FORMAT_VERSION,
            "config": self.config.to_dict(),
            "latent_mean": self.latent_mean.tolist(),
            "latent_std": self.latent_std.tolist(),
            "encoder_fingerprint": self.encoder_fingerprint(),
        }
        atomic_save_safetensors(dict(self.state_dict()), out / RAE_WEIGHTS)
        atomic_write_json(record, out / RAE_JSON)
        return out


def _check_patch_tokens(encoder: Teacher, resolution: int) -> tuple[tuple[int, int], int]:
    """(token grid, decoder patch) of ``encoder`` at ``resolution``; ValueError unless it gives patch tokens
    (B, gh * gw, D) on a grid that divides the image."""
    gh, gw = encoder.grid_size(resolution)
    ref = next(iter(encoder.buffers()), None)
    x = torch.zeros(1, 3, resolution, resolution, device=ref.device if ref is not None else "cpu")
    with torch.no_grad():
        out = encoder(x)
    if out.ndim != 3 or tuple(out.shape[1:]) != (gh * gw, encoder.embed_dim):
        raise ValueError(
            f"an RAE encodes to a teacher's patch tokens (B, {gh}x{gw} tokens, {encoder.embed_dim}); teacher "
            f"{encoder.name!r} returns shape {tuple(out.shape)} for a {resolution}-px image: a teacher "
            "without patch tokens (a pooled or global feature) cannot be an RAE encoder; choose a ViT or CNN "
            "teacher"
        )
    if resolution % gh or resolution % gw or resolution // gh != resolution // gw:
        raise ValueError(
            f"the RAE decoder turns each of the {gh}x{gw} tokens of {encoder.name!r} into a square patch: "
            f"--resolution {resolution} must be a multiple of the token grid (the teacher input size sets it)"
        )
    return (gh, gw), resolution // gh


def build_rae(config: RAEConfig, weights: str | Path | None = None, random_init: bool = False, **opts) -> RAE:
    """An RAE with a fresh decoder on the teacher ``config.encoder`` (``weights``: its file, as for any
    teacher; ``random_init`` for tests and for loading an export, whose tensors replace them)."""
    if config.encoder_input_size is not None:
        opts["input_size"] = config.encoder_input_size
    teacher = build_teacher(
        config.encoder, weights=weights, resolution=config.resolution, random_init=random_init, **opts
    )
    return RAE(config, teacher)


def load_rae(path: str | Path, map_location: Any = "cpu") -> RAE:
    """An RAE export folder (``rae.json`` + ``model.safetensors``), in eval mode."""
    path = Path(path)
    meta = read_json(path / RAE_JSON, "RAE record")
    with malformed(path / RAE_JSON, "RAE record"):
        if meta.get("format_version", 0) > RAE_FORMAT_VERSION:
            raise ValueError(
                f"{path / RAE_JSON} has format_version {meta['format_version']}; upgrade sendvae"
            )
        cfg = RAEConfig.from_dict(meta["config"])
        fingerprint = meta.get("encoder_fingerprint")
    return rae_from_state(cfg, read_checkpoint(path / RAE_WEIGHTS, map_location), str(path), fingerprint)


def rae_from_state(
    cfg: RAEConfig, state: dict[str, torch.Tensor], source: str, encoder_fingerprint: str | None = None
) -> RAE:
    """An RAE of ``cfg`` holding ``state`` (strictly: every tensor, encoder included), in eval mode."""
    model = build_rae(cfg, random_init=True)
    load_checked(model, state, strict=True, expected=cfg.describe(), source=source)
    if encoder_fingerprint is not None and model.encoder_fingerprint() != encoder_fingerprint:
        raise ValueError(
            f"{source}: the encoder weights do not match the fingerprint its record holds; the file is "
            "corrupt or was altered, export it again"
        )
    return model.eval()
