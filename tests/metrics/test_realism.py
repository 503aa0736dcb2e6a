"""The realism metrics (sclatent.metrics.realism) that judge synthetic cells: two halves of the same
data are indistinguishable, different data are told apart, mismatched genes are refused.

Moved from the GAN's tests (tests/model/test_gan.py); simulated data only.
"""

from __future__ import annotations

import numpy as np
import pytest

from sclatent.datasets import synthetic
from sclatent.metrics import (
    classifier_two_sample_auroc,
    gene_statistic_correlations,
    marker_overlap,
    mmd_rbf,
    split_halves,
)


@pytest.fixture(scope="module")
def realism_data():
    adata = synthetic(n_cells=600, n_genes=60, n_clusters=3, n_batches=1, seed=11)
    other = synthetic(n_cells=600, n_genes=60, n_clusters=3, n_batches=1, seed=12)  # other genes' profiles
    return adata, other


def test_two_halves_of_the_same_data_are_indistinguishable(realism_data):
    adata, _ = realism_data
    labels = adata.obs["cell_type"].to_numpy()
    first, second = split_halves(labels, seed=0)
    assert abs(len(first) - len(second)) <= 3
    auroc = classifier_two_sample_auroc(adata.X[first], adata.X[second])
    # 300 vs 300 cells: the AUROC's sd under the null is ~0.024; 0.5 +- 0.1 is > 4 sd
    assert abs(auroc - 0.5) < 0.1
    same = mmd_rbf(adata.X[first], adata.X[second])
    other = mmd_rbf(adata.X[first], realism_data[1].X[second])
    assert abs(same) < 0.01 and other > 20 * max(abs(same), 1e-3)
    corr = gene_statistic_correlations(adata.X[first], adata.X[second])
    # measured 0.99 (mean), 0.90 (variance: 300 cells per half), 0.97 (zero fraction)
    assert corr["mean"] > 0.95 and corr["variance"] > 0.8 and corr["zero_fraction"] > 0.9
    overlap = marker_overlap(adata.X[first], labels[first], adata.X[second], labels[second], k=10)
    assert overlap["mean"] > 0.7


def test_different_data_are_told_apart(realism_data):
    adata, other = realism_data
    assert classifier_two_sample_auroc(adata.X, other.X) > 0.98
    # the same cells with three quarters of their counts thinned away are also caught (a subtler
    # difference: noisier profiles, the same means); chance is 0.5 +- 0.02 at 600 vs 600 cells
    rng = np.random.default_rng(0)
    x = adata.X.toarray()
    thinned = rng.binomial(x.astype(np.int64), 0.25)
    assert classifier_two_sample_auroc(adata.X, thinned) > 0.65
    labels = adata.obs["cell_type"].to_numpy()
    shuffled = rng.permutation(labels)
    assert marker_overlap(adata.X, labels, adata.X, shuffled, k=10)["mean"] < 0.5


def test_metrics_reject_mismatched_genes(realism_data):
    adata, _ = realism_data
    with pytest.raises(ValueError, match="same genes"):
        classifier_two_sample_auroc(adata.X, adata.X[:, :10])
