"""The alignment variants of VAE training (``--loss.align``): each one's head, loss, export and loader.

names.py     the variants by name: help lines and each paper's lambda_align (a leaf: no torch)
base.py      what a variant is (`Alignment`), what its head is built from, what its loss reads
latent_norm.py  the per-channel latent normalisation the heads read (running / fixed / none)
mapper.py    the Send-VAE mapper: ``sendvae`` (noisy latent) and ``repa`` (clean latent, MLP only)
vf.py        VA-VAE's VF loss through a 1x1 projection: ``vf``
reals.py     ReaLS's patch + global MLP: ``reals``
repae.py     REPA-E: a SiT's first blocks as the head, the SiT trained beside the VAE: ``repae``
registry.py  the entries, in --loss.align's order, and an exported head read back
"""

from .base import CLEAN_LATENT, NOISY_LATENT, AlignInputs, Alignment, HeadContext
from .names import NAMES, VARIANTS, alignment_help, paper_align_weight
from .registry import ALIGNMENTS, ExportedHead, alignment_for, head_summary, load_exported_head

__all__ = [
    "ALIGNMENTS",
    "CLEAN_LATENT",
    "NAMES",
    "NOISY_LATENT",
    "VARIANTS",
    "AlignInputs",
    "Alignment",
    "ExportedHead",
    "HeadContext",
    "alignment_for",
    "alignment_help",
    "head_summary",
    "load_exported_head",
    "paper_align_weight",
]
