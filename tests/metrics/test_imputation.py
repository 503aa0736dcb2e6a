"""Tests for the imputation protocol (corrupt_counts, median_l1) and the neighbourhood baselines."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sclatent.metrics import (
    corrupt_counts,
    diffusion_predictor,
    knn_smoothing_predictor,
    library_gene_mean_predictor,
    median_l1,
)

RATE = 0.1


def _counts(n_cells: int = 300, n_genes: int = 80, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.gamma(0.3, 2.0, size=(n_cells, n_genes))).astype(np.float32)
    return sp.csr_matrix(dense)


def _two_groups(n_per_group: int = 100, n_genes: int = 60, seed: int = 0):
    """Two well-separated cell groups: group 0 expresses the first half of the genes highly, group 1
    the second half. Returns counts (CSR), group labels, the (2, G) true profiles and libraries."""
    rng = np.random.default_rng(seed)
    half = n_genes // 2
    weights = np.full((2, n_genes), 0.2)
    weights[0, :half] = 5.0
    weights[1, half:] = 5.0
    weights *= rng.uniform(0.5, 1.5, size=n_genes)  # gene-specific levels, shared by both groups
    profiles = weights / weights.sum(axis=1, keepdims=True)
    groups = np.repeat([0, 1], n_per_group)
    rng.shuffle(groups)
    depth = rng.uniform(300, 900, size=groups.size)
    counts = rng.poisson(depth[:, None] * profiles[groups]).astype(np.float32)
    return sp.csr_matrix(counts), groups, profiles


# ---------------------------------------------------------------------------------- corrupt_counts


def test_uniform_hides_exactly_rate_of_the_nonzeros():
    counts = _counts()
    c = corrupt_counts(counts, rate=RATE, method="uniform", seed=3)
    assert c.rows.size == round(RATE * counts.nnz)
    assert (c.original > 0).all()
    np.testing.assert_array_equal(c.original, counts.toarray()[c.rows, c.cols])
    assert (c.corrupted.toarray()[c.rows, c.cols] == 0).all()
    # everything else is untouched
    diff = counts.toarray() - c.corrupted.toarray()
    diff[c.rows, c.cols] = 0
    assert not diff.any()
    assert c.corrupted.nnz == counts.nnz - c.rows.size


def test_entries_hides_rate_of_all_entries_zeros_included():
    counts = _counts()
    dense = counts.toarray()
    n_cells, n_genes = dense.shape
    c = corrupt_counts(counts, rate=RATE, method="entries", seed=3)
    assert c.rows.size == round(RATE * n_cells * n_genes)
    flat = c.rows * n_genes + c.cols
    assert np.unique(flat).size == flat.size  # distinct positions
    np.testing.assert_array_equal(c.original, dense[c.rows, c.cols])
    zero_fraction = (dense == 0).mean()
    assert zero_fraction > 0.3
    hidden_zeros = (c.original == 0).mean()
    assert abs(hidden_zeros - zero_fraction) < 0.05  # the hidden entries are a uniform sample of all entries
    corrupted = c.corrupted.toarray()
    assert (corrupted[c.rows, c.cols] == 0).all()
    diff = dense - corrupted
    diff[c.rows, c.cols] = 0
    assert not diff.any()
    # roughly uniform over cells and genes
    assert np.bincount(c.rows, minlength=n_cells).max() < 4 * RATE * n_genes
    assert np.bincount(c.cols, minlength=n_genes).min() > 0


def test_binomial_thins_rate_of_the_nonzeros():
    counts = _counts()
    dense = counts.toarray()
    c = corrupt_counts(counts, rate=RATE, method="binomial", seed=3)
    assert c.rows.size == round(RATE * counts.nnz)
    np.testing.assert_array_equal(c.original, dense[c.rows, c.cols])
    thinned = c.corrupted.toarray()[c.rows, c.cols]
    assert (thinned <= c.original).all()
    assert (thinned < c.original).mean() > 0.5
    assert thinned.sum() < 0.4 * c.original.sum()  # about 20 % of the molecules survive


@pytest.mark.parametrize("method", ["uniform", "entries", "binomial"])
def test_corruption_is_seeded_and_leaves_the_input_alone(method):
    counts = _counts()
    before = counts.copy()
    a = corrupt_counts(counts, rate=RATE, method=method, seed=7)
    b = corrupt_counts(counts, rate=RATE, method=method, seed=7)
    other = corrupt_counts(counts, rate=RATE, method=method, seed=8)
    assert (counts != before).nnz == 0
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.cols, b.cols)
    assert (a.corrupted != b.corrupted).nnz == 0
    assert not (np.array_equal(a.rows, other.rows) and np.array_equal(a.cols, other.cols))
    assert a.corrupted.dtype == np.float32 and sp.isspmatrix_csr(a.corrupted)
    # dense input gives the same corruption
    dense = corrupt_counts(counts.toarray(), rate=RATE, method=method, seed=7)
    np.testing.assert_array_equal(dense.rows, a.rows)
    np.testing.assert_array_equal(dense.original, a.original)


def test_corrupt_counts_rejects_bad_arguments():
    counts = _counts(20, 10)
    with pytest.raises(ValueError, match="method"):
        corrupt_counts(counts, method="everything")
    with pytest.raises(ValueError, match="rate"):
        corrupt_counts(counts, rate=0.0)


@pytest.mark.parametrize("method", ["uniform", "entries", "binomial"])
def test_median_l1_of_a_perfect_predictor_is_zero(method):
    counts = _counts()
    c = corrupt_counts(counts, rate=RATE, method=method, seed=1)
    assert median_l1(counts.toarray(), c) == 0.0
    assert median_l1(c.original.astype(np.float64), c) == 0.0
    assert median_l1(counts.toarray() + 1.0, c) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("predictor", [knn_smoothing_predictor, diffusion_predictor])
def test_neighbourhood_baselines_recover_the_group_profiles(predictor):
    counts, groups, profiles = _two_groups()
    c = corrupt_counts(counts, rate=RATE, method="uniform", seed=0)
    library = np.asarray(c.corrupted.sum(axis=1)).ravel()

    predicted = predictor(c.corrupted, n_neighbors=10, seed=0)
    assert predicted.shape == counts.shape and predicted.dtype == np.float32
    assert np.isfinite(predicted).all() and (predicted >= 0).all()
    # the predicted counts keep each cell's library (they are library x a profile summing to 1)
    np.testing.assert_allclose(predicted.sum(axis=1), library, rtol=1e-4)

    rows, cols = np.indices(counts.shape).reshape(2, -1)
    global_mean = library_gene_mean_predictor(c.corrupted, rows, cols).reshape(counts.shape)

    # profile error per cell (L1 between predicted and true proportions)
    truth = profiles[groups]
    error = np.abs(predicted / library[:, None] - truth).sum(axis=1)
    error_global = np.abs(global_mean / library[:, None] - truth).sum(axis=1)
    assert error.mean() < 0.3 * error_global.mean()
    assert (error < error_global).mean() > 0.95

    # and on the protocol's score at the hidden entries
    assert median_l1(predicted, c) < 0.6 * median_l1(global_mean, c)


@pytest.mark.parametrize("predictor", [knn_smoothing_predictor, diffusion_predictor])
def test_neighbourhood_baselines_at_selected_entries_match_the_dense_matrix(predictor):
    counts, _, _ = _two_groups(n_per_group=40, n_genes=20)
    c = corrupt_counts(counts, rate=0.2, method="entries", seed=2)
    dense = predictor(c.corrupted, n_neighbors=5, seed=0)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(c.rows.size)  # any order of the entries
    values = predictor(c.corrupted, c.rows[shuffled], c.cols[shuffled], n_neighbors=5, seed=0)
    assert values.shape == (c.rows.size,)
    np.testing.assert_allclose(values, dense[c.rows[shuffled], c.cols[shuffled]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="both"):
        predictor(c.corrupted, c.rows, None)


def test_knn_smoothing_is_an_average_over_the_cell_and_its_neighbours():
    # Three identical cells and one different: with 2 neighbours each identical cell averages
    # identical profiles, so it is predicted exactly.
    counts = sp.csr_matrix(np.array([[4, 0, 4], [4, 0, 4], [4, 0, 4], [0, 9, 1]], dtype=np.float32))
    predicted = knn_smoothing_predictor(counts, n_neighbors=2, seed=0)
    np.testing.assert_allclose(predicted[:3], counts.toarray()[:3], atol=1e-5)


def test_diffusion_needs_a_step():
    counts, _, _ = _two_groups(n_per_group=10, n_genes=10)
    with pytest.raises(ValueError, match="t must be"):
        diffusion_predictor(counts, t=0)
