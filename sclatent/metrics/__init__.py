"""Evaluation: clustering agreement, the imputation protocol, and model-free baselines."""

from .baselines import library_gene_mean_predictor, nb_baseline_log_likelihood
from .clustering import leiden_scores, neighbors_umap_leiden
from .imputation import Corruption, corrupt_counts, median_l1

__all__ = [
    "Corruption",
    "corrupt_counts",
    "leiden_scores",
    "library_gene_mean_predictor",
    "median_l1",
    "nb_baseline_log_likelihood",
    "neighbors_umap_leiden",
]
