"""Evaluation: clustering agreement, the imputation protocol, and model-free baselines."""

from .baselines import (
    diffusion_operator,
    diffusion_predictor,
    knn_smoothing_predictor,
    library_gene_mean_predictor,
    nb_baseline_log_likelihood,
)
from .clustering import leiden_scores, neighbors_umap_leiden
from .imputation import CORRUPTION_METHODS, Corruption, corrupt_counts, median_l1

__all__ = [
    "CORRUPTION_METHODS",
    "Corruption",
    "corrupt_counts",
    "diffusion_operator",
    "diffusion_predictor",
    "knn_smoothing_predictor",
    "leiden_scores",
    "library_gene_mean_predictor",
    "median_l1",
    "nb_baseline_log_likelihood",
    "neighbors_umap_leiden",
]
