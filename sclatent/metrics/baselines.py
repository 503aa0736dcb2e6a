"""Model-free baselines every model result is printed beside."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln


def library_gene_mean_predictor(
    counts, rows: np.ndarray, cols: np.ndarray, train_cells: np.ndarray | None = None
) -> np.ndarray:
    """Expected count ``library_c * p_g`` at ``(rows, cols)``: no model, just depth and gene frequency.

    ``p_g`` is gene g's share of all counts (over ``train_cells`` if given); the library is the
    cell's observed total of the (possibly corrupted) counts.
    """
    csr = sp.csr_matrix(counts)
    library = np.asarray(csr.sum(axis=1)).ravel()
    reference = csr if train_cells is None else csr[train_cells]
    gene_totals = np.asarray(reference.sum(axis=0)).ravel()
    frequency = gene_totals / max(gene_totals.sum(), 1.0)
    return library[rows] * frequency[cols]


def nb_baseline_log_likelihood(counts, train_cells: np.ndarray, test_cells: np.ndarray) -> float:
    """Mean log-likelihood per test cell (nats) under NB(library * p_g, theta_g).

    ``p_g`` and the per-gene inverse dispersion ``theta_g`` (method of moments on size-normalised
    counts, clipped to [1e-2, 1e4]) are estimated on ``train_cells``: a model-free reference for the
    held-out likelihoods of the latent-variable models.
    """
    csr = sp.csr_matrix(counts, dtype=np.float64)
    library = np.asarray(csr.sum(axis=1)).ravel()
    train = csr[train_cells]
    gene_totals = np.asarray(train.sum(axis=0)).ravel()
    frequency = np.maximum(gene_totals / gene_totals.sum(), 1e-12)
    lib_train = np.maximum(library[train_cells], 1.0)
    scale = lib_train.mean()
    normalised = sp.diags(scale / lib_train) @ train
    mean = np.asarray(normalised.mean(axis=0)).ravel()
    second = np.asarray(normalised.multiply(normalised).mean(axis=0)).ravel()
    variance = second - mean**2
    excess = np.maximum(variance - mean, 1e-12)
    theta = np.clip(mean**2 / excess, 1e-2, 1e4)
    total = 0.0
    for start in range(0, len(test_cells), 512):
        cells = test_cells[start : start + 512]
        x = csr[cells].toarray()
        mu = np.maximum(library[cells], 1.0)[:, None] * frequency[None, :]
        log_p = (
            gammaln(x + theta)
            - gammaln(theta)
            - gammaln(x + 1)
            + theta * (np.log(theta) - np.log(theta + mu))
            + x * (np.log(mu) - np.log(theta + mu))
        )
        total += log_p.sum()
    return float(total / max(1, len(test_cells)))
