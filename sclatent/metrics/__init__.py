"""Evaluation: clustering agreement, embedding quality and batch mixing, the imputation protocol,
and model-free baselines."""

from .baselines import (
    diffusion_operator,
    diffusion_predictor,
    knn_smoothing_predictor,
    library_gene_mean_predictor,
    nb_baseline_log_likelihood,
)
from .clustering import leiden_scores, neighbors_umap_leiden
from .embedding import batch_asw, batch_entropy, knn_accuracy, label_asw, linear_probe_scores
from .imputation import CORRUPTION_METHODS, Corruption, corrupt_counts, median_l1

__all__ = [
    "CORRUPTION_METHODS",
    "Corruption",
    "batch_asw",
    "batch_entropy",
    "corrupt_counts",
    "diffusion_operator",
    "diffusion_predictor",
    "knn_accuracy",
    "knn_smoothing_predictor",
    "label_asw",
    "leiden_scores",
    "library_gene_mean_predictor",
    "linear_probe_scores",
    "median_l1",
    "nb_baseline_log_likelihood",
    "neighbors_umap_leiden",
]
