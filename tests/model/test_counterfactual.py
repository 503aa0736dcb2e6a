"""Counterfactual (batch-transformed) expression, gene subsets, posterior predictive counts in another
batch and the latent library size, for the VAE and the semi-supervised VAE.

A VAE is trained on simulated counts with a strong per-gene batch shift (``batch_effect=1.5``); the
same cells decoded in one batch should lose much of the shift between batches, along the simulated
per-gene shift.
"""

from __future__ import annotations

import numpy as np
import pytest

from sclatent.datasets import synthetic
from sclatent.model import VAE, SemiSupervisedVAE

TRAIN = dict(accelerator="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def trained():
    adata = synthetic(n_cells=600, n_genes=60, n_clusters=3, n_batches=2, batch_effect=1.5, seed=1)
    adata.obs["cluster"] = adata.obs["cell_type"].astype(str)
    VAE.setup_anndata(adata, batch_key="batch", labels_key="cluster")
    model = VAE(adata, n_latent=5, n_hidden=32, seed=0, use_observed_library=False)
    model.train(max_epochs=60, **TRAIN)
    return adata, model


def _batch_gap(adata, expression: np.ndarray) -> float:
    """Mean over clusters and genes of |log mean expression in batch_0 - in batch_1| (same cluster)."""
    gaps = []
    batches = adata.obs["batch"].astype(str).to_numpy()
    for cluster in np.unique(adata.obs["cluster"]):
        in_cluster = adata.obs["cluster"].to_numpy() == cluster
        means = [np.log(expression[in_cluster & (batches == b)].mean(0)) for b in ("batch_0", "batch_1")]
        gaps.append(np.abs(means[0] - means[1]).mean())
    return float(np.mean(gaps))


def test_transform_batch_removes_the_simulated_batch_shift(trained):
    adata, model = trained
    own = model.get_normalized_expression(return_numpy=True)
    in_batch_0 = model.get_normalized_expression(transform_batch="batch_0", return_numpy=True)
    gap_own, gap_transformed = _batch_gap(adata, own), _batch_gap(adata, in_batch_0)
    # measured: 0.85 with each cell's own batch, 0.51 decoded in batch_0 (the simulated truth: 1.65;
    # a 60-epoch VAE on 600 cells puts part of the shift into z, which no decoding removes)
    assert gap_transformed < 0.75 * gap_own, (gap_own, gap_transformed)
    # per gene, decoding batch_1's cells in batch_0 moves them along the simulated shift
    truth = adata.layers["true_mean"] / adata.layers["true_mean"].sum(1, keepdims=True)
    batches, labels = adata.obs["batch"].astype(str).to_numpy(), adata.obs["cluster"].to_numpy()
    true_shift = np.mean(
        [
            np.log(truth[(labels == c) & (batches == "batch_0")].mean(0))
            - np.log(truth[(labels == c) & (batches == "batch_1")].mean(0))
            for c in np.unique(labels)
        ],
        axis=0,
    )
    is_1 = batches == "batch_1"
    moved = np.log(in_batch_0[is_1]).mean(0) - np.log(own[is_1]).mean(0)
    assert np.corrcoef(moved, true_shift)[0, 1] > 0.6  # measured 0.78
    # the cells of batch_0 are decoded exactly as before (their own batch)
    is_0 = adata.obs["batch"].astype(str).to_numpy() == "batch_0"
    np.testing.assert_allclose(in_batch_0[is_0], own[is_0], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(in_batch_0.sum(1), 1.0, rtol=1e-4)


def test_a_list_of_batches_averages_them(trained):
    _, model = trained
    both = model.get_normalized_expression(transform_batch=["batch_0", "batch_1"], return_numpy=True)
    parts = [model.get_normalized_expression(transform_batch=b, return_numpy=True) for b in ("batch_0", "batch_1")]
    np.testing.assert_allclose(both, (parts[0] + parts[1]) / 2, rtol=1e-5, atol=1e-9)


def test_gene_list_selects_columns_in_its_order(trained, tmp_path):
    import anndata as ad

    adata, model = trained
    full = model.get_normalized_expression(library_size=1e4, transform_batch="batch_1")
    genes = [adata.var_names[7], adata.var_names[2], adata.var_names[40]]
    part = model.get_normalized_expression(library_size=1e4, transform_batch="batch_1", gene_list=genes)
    assert list(part.columns) == genes and list(part.index) == list(adata.obs_names)
    np.testing.assert_allclose(part.to_numpy(), full[genes].to_numpy(), rtol=1e-6)
    written = ad.read_h5ad(model.get_normalized_expression(gene_list=genes, out=tmp_path / "part.h5ad"))
    assert list(written.var_names) == genes and written.shape == (adata.n_obs, 3)


def test_posterior_predictive_sample_in_another_batch(trained):
    adata, model = trained
    is_1 = np.flatnonzero(adata.obs["batch"].astype(str).to_numpy() == "batch_1")
    own = model.posterior_predictive_sample(indices=is_1, seed=3)
    same = model.posterior_predictive_sample(indices=is_1, seed=3, transform_batch="batch_1")
    np.testing.assert_array_equal(own, same)  # each cell's own batch: the same draws
    moved = model.posterior_predictive_sample(indices=is_1, n_samples=20, seed=3, transform_batch="batch_0")
    expected = model.get_normalized_expression(
        indices=is_1, library_size="latent", transform_batch="batch_0", return_numpy=True
    )
    # the counterfactual draws follow the counterfactual mean (per gene, over cells and draws)
    correlation = np.corrcoef(np.log1p(moved.mean((0, 2))), np.log1p(expected.mean(0)))[0, 1]
    assert correlation > 0.95
    assert moved.shape == (is_1.size, adata.n_vars, 20) and np.all(moved == np.round(moved))


def test_latent_library_size_follows_the_observed_totals(trained):
    adata, model = trained
    size = model.get_latent_library_size()
    assert size.shape == (adata.n_obs, 1) and np.all(size > 0)
    totals = np.asarray(adata.layers["counts"].sum(1) if "counts" in adata.layers else adata.X.sum(1)).ravel()
    assert np.corrcoef(np.log(size[:, 0]), np.log(totals))[0, 1] > 0.7  # measured 0.81
    draws = model.get_latent_library_size(give_mean=False)
    assert draws.shape == size.shape and not np.array_equal(draws, size)


def test_the_semi_supervised_vae_decodes_like_the_vae_it_started_from(trained):
    adata, model = trained
    semi = SemiSupervisedVAE.from_vae(model, labels_key="cluster", unlabeled_category=None, adata=adata.copy())
    for kwargs in ({}, {"transform_batch": "batch_0"}, {"transform_batch": ["batch_0", "batch_1"]}):
        np.testing.assert_array_equal(
            semi.get_normalized_expression(return_numpy=True, **kwargs),
            model.get_normalized_expression(return_numpy=True, **kwargs),
        )
    np.testing.assert_array_equal(semi.get_latent_library_size(), model.get_latent_library_size())


def test_errors_name_the_fix(trained):
    adata, model = trained
    with pytest.raises(ValueError, match=r"\['batch_9'\] not among this model's batches \['batch_0', 'batch_1'\]"):
        model.get_normalized_expression(transform_batch="batch_9")
    with pytest.raises(ValueError, match="empty list"):
        model.get_normalized_expression(transform_batch=[])
    with pytest.raises(ValueError, match="not trained on"):
        model.get_normalized_expression(gene_list=["no_such_gene"])
    with pytest.raises(ValueError, match="one transform_batch category"):
        model.posterior_predictive_sample(transform_batch=["batch_0", "batch_1"])
    plain = adata.copy()
    VAE.setup_anndata(plain)
    single = VAE(plain, n_latent=3, n_hidden=16, seed=0)
    with pytest.raises(ValueError, match="single batch"):
        single.get_normalized_expression(transform_batch="batch_0")
    with pytest.raises(ValueError, match="use_observed_library=False"):
        single.get_latent_library_size()
