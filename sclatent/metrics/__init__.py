"""Evaluation: clustering agreement, embedding quality and batch mixing, the imputation protocol,
posterior predictive checks, calibration, and model-free baselines."""

from .baselines import (
    diffusion_operator,
    diffusion_predictor,
    knn_smoothing_predictor,
    library_gene_mean_predictor,
    nb_baseline_log_likelihood,
    pca_embedding,
)
from .clustering import leiden_scores, neighbors_umap_leiden
from .embedding import batch_asw, batch_entropy, knn_accuracy, label_asw, linear_probe_scores
from .imputation import CORRUPTION_METHODS, Corruption, corrupt_counts, median_l1
from .ppc import PosteriorPredictiveCheck, posterior_predictive_check
from .realism import (
    classifier_two_sample_auroc,
    gene_statistic_correlations,
    marker_overlap,
    mmd_rbf,
    realism_metrics,
    split_halves,
)

__all__ = [
    "CORRUPTION_METHODS",
    "Corruption",
    "PosteriorPredictiveCheck",
    "batch_asw",
    "batch_entropy",
    "classifier_two_sample_auroc",
    "corrupt_counts",
    "diffusion_operator",
    "diffusion_predictor",
    "gene_statistic_correlations",
    "knn_accuracy",
    "knn_smoothing_predictor",
    "label_asw",
    "leiden_scores",
    "library_gene_mean_predictor",
    "linear_probe_scores",
    "marker_overlap",
    "median_l1",
    "mmd_rbf",
    "nb_baseline_log_likelihood",
    "neighbors_umap_leiden",
    "pca_embedding",
    "posterior_predictive_check",
    "realism_metrics",
    "split_halves",
]
