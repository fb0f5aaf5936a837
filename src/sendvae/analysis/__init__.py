"""Latent-space analysis: linear attribute probes, uniformity, discrimination (`sendvae probe`).

attributes (probe targets per dataset), features (what is probed), probes (the linear probes), measures
(uniformity, discrimination, CKNNA), report (tables, plots and the driver `report.probe_models`).
"""

from .attributes import AttributeFileError, ProbeData, ProbeTask, load_probe_data
from .measures import gini, gmm_discrimination, kde_uniformity, pearson_r
from .probes import f1_scores, make_split, probe_categorical, probe_continuous, probe_multilabel, top_k_recall

__all__ = [
    "AttributeFileError",
    "ProbeData",
    "ProbeTask",
    "f1_scores",
    "gini",
    "gmm_discrimination",
    "kde_uniformity",
    "load_probe_data",
    "make_split",
    "pearson_r",
    "probe_categorical",
    "probe_continuous",
    "probe_multilabel",
    "top_k_recall",
]
