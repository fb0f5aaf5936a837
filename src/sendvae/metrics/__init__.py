"""Evaluation metrics: FID, sFID, IS, precision / recall (ADM protocol), FD_<teacher>, PSNR / SSIM / LPIPS."""

from sendvae.metrics.adm import (
    ReferenceBatchError,
    compute_activations,
    compute_reference,
    describe_is_splits,
    evaluate_samples,
    load_batch,
    save_batch,
)
from sendvae.metrics.features import FeatureExtractor, fd_metric_name
from sendvae.metrics.frechet import (
    StatsAccumulator,
    feature_statistics,
    frechet_distance,
    inception_score,
    is_split_sizes,
    precision_recall,
)
from sendvae.metrics.inception import FIDInceptionV3, load_fid_inception, tf1_bilinear_resize
from sendvae.metrics.recon import PSNR_MAX, ReconMetrics, psnr, reconstruct, ssim

__all__ = [
    "PSNR_MAX",
    "FeatureExtractor",
    "ReconMetrics",
    "fd_metric_name",
    "psnr",
    "reconstruct",
    "ssim",
    "FIDInceptionV3",
    "ReferenceBatchError",
    "StatsAccumulator",
    "compute_activations",
    "compute_reference",
    "describe_is_splits",
    "evaluate_samples",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "is_split_sizes",
    "load_batch",
    "load_fid_inception",
    "precision_recall",
    "save_batch",
    "tf1_bilinear_resize",
]
