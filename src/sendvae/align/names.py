"""The alignment variants by name: the one list the config, the presets, the demo and the study read.

A leaf (no torch, no other module of ours): `--loss.align`'s choices and help come from here before any
network is built, and each variant's lambda_align is its own paper's, written once:

  none     no alignment (the plain VAE objective)                                       -
  repa     REPA-style direct alignment (Yu et al., arXiv 2410.06940; REPA's lambda)     1.0
  vf       VA-VAE's VF loss (Yao et al., arXiv 2501.01423; with its adaptive weight)    0.1
  sendvae  Send-VAE (arXiv 2601.05823, Sec. 3)                                          1.0
  reals    ReaLS (Xu et al., arXiv 2502.00359)                                          1.0
  repae    REPA-E (Leng et al., arXiv 2504.10483; its vae_align_proj_coeff)             1.5

The networks, losses and exports of each are in this package's modules (registry.py lists them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantInfo:
    name: str
    help: str  # one line for --loss.align's help
    paper_weight: float | None  # lambda_align of its paper (None: no alignment term)
    source: str  # where the variant and its weight come from


VARIANTS: dict[str, VariantInfo] = {
    v.name: v
    for v in (
        VariantInfo("none", "no alignment (no teacher, no head)", None, "-"),
        VariantInfo(
            "repa",
            "REPA-style: MLP on the clean latent, token cosine",
            1.0,
            "REPA (arXiv 2410.06940) applied to the VAE latent, as Send-VAE's 'direct alignment' baseline",
        ),
        VariantInfo(
            "vf",
            "VA-VAE: 1x1 projection, marginal cosine + distance-matrix VF loss",
            0.1,
            "VA-VAE (arXiv 2501.01423) / LightningDiT's vavae config: vf_weight 0.1 with the adaptive weight",
        ),
        VariantInfo(
            "sendvae",
            "Send-VAE: mapper (ViT blocks + MLP) on the noisy latent z_t, token cosine",
            1.0,
            "Send-VAE (arXiv 2601.05823), Sec. 3 and 4.1",
        ),
        VariantInfo(
            "reals",
            "ReaLS: MLP on the clean latent to patch tokens and a global feature, patch + global cosine",
            1.0,
            "ReaLS (arXiv 2502.00359)",
        ),
        VariantInfo(
            "repae",
            "REPA-E: a SiT's first blocks + projector on the noisy BatchNorm latent (SiT frozen for this "
            "loss), token cosine; the SiT trains beside the VAE on the detached latents (--sit.*)",
            1.5,
            "REPA-E (arXiv 2504.10483), README training command: vae-align-proj-coeff 1.5",
        ),
    )
}

NAMES: tuple[str, ...] = tuple(VARIANTS)
PAPER = "sendvae"  # the variant of the paper this project implements: the default of --loss.align, the claim


def alignment_help() -> str:
    """The help of ``--loss.align``: every variant's name and line."""
    return "alignment variant: " + "; ".join(f"{v.name}: {v.help}" for v in VARIANTS.values())


def paper_align_weight(name: str, default: float) -> float:
    """lambda_align of variant ``name`` in its paper, else ``default`` (no alignment term)."""
    w = VARIANTS[name].paper_weight
    return default if w is None else w
