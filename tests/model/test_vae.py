"""Tests for sclatent.model.VAE: outputs, options, training, likelihoods, persistence, query data.

One model trained on simulated data with a known cluster structure (``trained``) is shared
read-only by the tests that need a converged model; everything that trains, mutates or saves uses
its own small model.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sclatent._persistence import SAVE_FORMAT_VERSION
from sclatent.data import SetupError
from sclatent.datasets import synthetic
from sclatent.metrics import leiden_scores, nb_baseline_log_likelihood
from sclatent.model import VAE
from sclatent.model._base import DEFAULT_MAX_KL_WEIGHT, DEFAULT_PATIENCE

TRAIN = dict(accelerator="cpu", progress_bar=False)
N_EPOCHS_TRAINED = 40


def _small(n_cells: int = 200, n_genes: int = 40, n_batches: int = 2, seed: int = 1):
    """Small simulated counts with extra categorical (``donor``) and continuous (``pct_mt``) columns."""
    adata = synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=3, n_batches=n_batches, seed=seed)
    rng = np.random.default_rng(seed)
    adata.obs["donor"] = pd.Categorical(rng.choice(["d0", "d1", "d2"], size=n_cells))
    adata.obs["pct_mt"] = rng.uniform(0.0, 10.0, size=n_cells).astype(np.float32)
    return adata


def _finite_history(history: dict[str, list[float]]) -> bool:
    return all(np.isfinite(v).all() for v in history.values())


def _comparable(history: dict[str, list[float]]) -> dict[str, list[float]]:
    """History without the wall-clock column."""
    return {k: v for k, v in history.items() if k != "seconds"}


@pytest.fixture(scope="module")
def trained():
    """(adata, model): 600 cells x 200 genes, 4 well-separated types, one batch, 40 epochs."""
    adata = synthetic(n_cells=600, n_genes=200, n_clusters=4, n_batches=1, seed=0)
    VAE.setup_anndata(adata)
    model = VAE(adata, seed=0)
    model.train(max_epochs=N_EPOCHS_TRAINED, **TRAIN)
    return adata, model


@pytest.fixture(scope="module")
def small_model():
    """(adata, model) with batch and labels registered, trained briefly; use read-only."""
    adata = _small()
    VAE.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = VAE(adata, n_latent=5, n_hidden=32, seed=0)
    model.train(max_epochs=2, **TRAIN)
    return adata, model


# --------------------------------------------------------------------------- shapes and dtypes


def test_latent_shape_dtype(trained):
    adata, model = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 10)
    assert z.dtype == np.float32
    assert np.isfinite(z).all()
    # a posterior sample is not the mean, and is reproducible given a seed
    s1 = model.get_latent_representation(give_mean=False, seed=1)
    s2 = model.get_latent_representation(give_mean=False, seed=1)
    assert s1.shape == z.shape and s1.dtype == np.float32
    np.testing.assert_array_equal(s1, s2)
    assert not np.allclose(s1, z)
    # indices select rows of the full result
    idx = np.array([5, 0, 17])
    np.testing.assert_allclose(model.get_latent_representation(indices=idx), z[idx], rtol=1e-5, atol=1e-6)


def test_normalized_expression_rows_sum_to_library_size(trained):
    adata, model = trained
    df = model.get_normalized_expression(library_size=1e4)
    assert isinstance(df, pd.DataFrame)
    assert df.shape == (adata.n_obs, adata.n_vars)
    assert list(df.index) == list(adata.obs_names)
    assert list(df.columns) == list(adata.var_names)
    values = df.to_numpy()
    assert (values >= 0).all()
    np.testing.assert_allclose(values.sum(axis=1), 1e4, rtol=1e-4)
    # default library_size=1: proportions; averaging several posterior samples keeps the row sums
    np.testing.assert_allclose(model.get_normalized_expression(return_numpy=True).sum(axis=1), 1.0, rtol=1e-4)
    averaged = model.get_normalized_expression(indices=np.arange(20), n_samples=5, library_size=100.0, seed=0)
    assert averaged.shape == (20, adata.n_vars)
    assert list(averaged.index) == list(adata.obs_names[:20])
    np.testing.assert_allclose(averaged.to_numpy().sum(axis=1), 100.0, rtol=1e-4)


def test_normalized_expression_latent_library_matches_observed_totals(trained):
    adata, model = trained
    expected = model.get_normalized_expression(library_size="latent", return_numpy=True)
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    assert expected.shape == (adata.n_obs, adata.n_vars)
    np.testing.assert_allclose(expected.sum(axis=1), totals, rtol=1e-3)
    # "latent" is the normalised expression scaled by each cell's own library
    proportions = model.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(expected, proportions * totals[:, None], rtol=1e-3, atol=1e-6)


def test_posterior_predictive_sample(trained):
    adata, model = trained
    idx = np.arange(50)
    one = model.posterior_predictive_sample(indices=idx, seed=0)
    assert one.shape == (50, adata.n_vars)
    assert np.isfinite(one).all() and (one >= 0).all()
    np.testing.assert_array_equal(one, np.round(one))
    np.testing.assert_array_equal(one, model.posterior_predictive_sample(indices=idx, seed=0))
    many = model.posterior_predictive_sample(indices=idx, n_samples=3, seed=1)
    assert many.shape == (50, adata.n_vars, 3)
    assert (many >= 0).all()
    np.testing.assert_array_equal(many, np.round(many))
    assert not np.array_equal(many[..., 0], many[..., 1])
    # samples follow the cells' sequencing depth (libraries span 500-3000 counts)
    totals = np.asarray(adata.X[idx].sum(axis=1)).ravel()
    assert np.corrcoef(many.sum(axis=1).mean(axis=1), totals)[0, 1] > 0.8


# --------------------------------------------------------------------------- options

OPTIONS = [
    dict(gene_likelihood="zinb"),
    dict(gene_likelihood="nb"),
    dict(gene_likelihood="poisson"),
    dict(dispersion="gene"),
    dict(dispersion="gene-batch"),
    dict(dispersion="gene-label"),
    dict(dispersion="gene-cell"),
    dict(use_observed_library=False),
    dict(n_layers=2),
    dict(encode_covariates=False, inject_covariates=False),
    dict(covariates=True),
    dict(covariates=True, use_observed_library=False, dispersion="gene-batch", gene_likelihood="nb"),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_option_builds_and_trains(options):
    options = dict(options)
    covariates = options.pop("covariates", False)
    adata = _small(n_cells=120, n_genes=30)
    VAE.setup_anndata(
        adata,
        batch_key="batch",
        labels_key="cell_type",
        categorical_covariate_keys=["donor"] if covariates else None,
        continuous_covariate_keys=["pct_mt"] if covariates else None,
    )
    model = VAE(adata, n_latent=4, n_hidden=16, seed=0, **options)
    model.train(max_epochs=2, batch_size=64, **TRAIN)
    assert len(model.history["epoch"]) == 2
    assert _finite_history(model.history)
    assert np.isfinite(model.get_latent_representation()).all()
    assert np.isfinite(model.get_marginal_ll(n_mc_samples=4))
    samples = model.posterior_predictive_sample(n_samples=2, seed=0)
    assert samples.shape == (adata.n_obs, adata.n_vars, 2) and (samples >= 0).all()
    normalized = model.get_normalized_expression(n_samples=2, return_numpy=True, seed=0)
    np.testing.assert_allclose(normalized.sum(axis=1), 1.0, rtol=1e-4)

    log_theta = model.module.log_theta
    dispersion = options.get("dispersion", "gene")
    expected_rows = {"gene": 1, "gene-batch": 2, "gene-label": 3, "gene-cell": None}[dispersion]
    if expected_rows is None:
        assert log_theta is None
    else:
        assert tuple(log_theta.shape) == (expected_rows, adata.n_vars)

    if covariates:
        # the decoder reads the covariates: changing them changes the denoised expression
        reference = model.get_normalized_expression(return_numpy=True)
        shifted = adata.copy()
        shifted.obs["pct_mt"] = shifted.obs["pct_mt"] + 50.0
        assert not np.allclose(model.get_normalized_expression(shifted, return_numpy=True), reference)
        relabelled = adata.copy()
        relabelled.obs["donor"] = pd.Categorical(np.where(relabelled.obs["donor"] == "d0", "d1", "d0"))
        assert not np.allclose(model.get_normalized_expression(relabelled, return_numpy=True), reference)


def test_gene_label_dispersion_needs_labels():
    adata = _small(n_cells=60, n_genes=20)
    VAE.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match="labels_key"):
        VAE(adata, dispersion="gene-label")


@pytest.mark.parametrize(
    "options, match",
    [(dict(dispersion="gene-gene"), "dispersion"), (dict(gene_likelihood="gaussian"), "gene_likelihood")],
)
def test_bad_options_raise(options, match):
    adata = _small(n_cells=60, n_genes=20)
    VAE.setup_anndata(adata)
    with pytest.raises(ValueError, match=match):
        VAE(adata, **options)


def test_train_rejects_bad_arguments():
    adata = _small(n_cells=60, n_genes=20)
    VAE.setup_anndata(adata)
    model = VAE(adata, n_hidden=16)
    with pytest.raises(ValueError, match="max_epochs"):
        model.train(max_epochs=0, **TRAIN)
    with pytest.raises(ValueError, match="train_size"):
        model.train(max_epochs=1, train_size=1.5, **TRAIN)


# --------------------------------------------------------------------------- training


def test_history_keys_and_lengths(trained):
    _, model = trained
    history = model.history
    for key in ("train_elbo", "validation_elbo", "train_reconstruction", "train_kl", "kl_weight", "epoch"):
        assert key in history, key
        assert len(history[key]) == N_EPOCHS_TRAINED, key
    assert history["epoch"] == list(range(1, N_EPOCHS_TRAINED + 1))
    assert _finite_history(history)
    elbo = np.asarray(history["train_elbo"])
    parts = np.asarray(history["train_reconstruction"]) + np.asarray(history["train_kl"])
    np.testing.assert_allclose(elbo, -parts, rtol=1e-6)
    assert model.is_trained


def test_kl_weight_warms_up_to_the_default_max_kl_weight(trained):
    _, model = trained
    weights = np.asarray(model.history["kl_weight"])
    # default warm-up: min(20, max_epochs // 3) epochs, up to DEFAULT_MAX_KL_WEIGHT (2)
    assert DEFAULT_MAX_KL_WEIGHT == 2.0
    assert weights[0] < 1.0
    assert (np.diff(weights) >= 0).all()
    assert weights[-1] == DEFAULT_MAX_KL_WEIGHT
    assert (weights[13:] == DEFAULT_MAX_KL_WEIGHT).all() and weights[12] < DEFAULT_MAX_KL_WEIGHT
    assert ((weights >= 0) & (weights <= DEFAULT_MAX_KL_WEIGHT)).all()


def test_kl_warmup_epochs_argument():
    adata = _small(n_cells=100, n_genes=20)
    VAE.setup_anndata(adata)
    model = VAE(adata, n_hidden=16)
    model.train(max_epochs=6, kl_warmup_epochs=4, batch_size=32, max_kl_weight=1.0, **TRAIN)
    weights = np.asarray(model.history["kl_weight"])
    # the weight rises per step, (epoch + step / steps) / 4, and is recorded at each epoch's last step:
    # below 1 through epoch 4, exactly 1 from epoch 5 on
    assert (np.diff(weights[:5]) > 0).all()
    assert weights[3] < 1.0
    assert (weights[4:] == 1.0).all()
    assert weights[0] < 0.25
    no_warmup = VAE(adata, n_hidden=16)
    no_warmup.train(max_epochs=2, kl_warmup_epochs=0, **TRAIN)
    assert no_warmup.history["kl_weight"] == [DEFAULT_MAX_KL_WEIGHT, DEFAULT_MAX_KL_WEIGHT]


def test_max_kl_weight_scales_the_warm_up_and_pulls_posteriors_to_the_prior():
    adata = _small(n_cells=100, n_genes=20)
    VAE.setup_anndata(adata)
    runs = {}
    for weight in (1.0, 4.0):
        model = VAE(adata, n_hidden=16, seed=0)
        model.train(max_epochs=8, kl_warmup_epochs=4, batch_size=32, max_kl_weight=weight, **TRAIN)
        runs[weight] = model
    np.testing.assert_allclose(runs[4.0].history["kl_weight"], 4.0 * np.asarray(runs[1.0].history["kl_weight"]))
    assert runs[4.0].history["kl_weight"][-1] == 4.0
    # the recorded KL is the unweighted term: a heavier weight leaves less of it
    assert runs[4.0].history["train_kl"][-1] < 0.8 * runs[1.0].history["train_kl"][-1]
    # early stopping still watches the ELBO itself: -(reconstruction + KL), whatever the weight
    elbo = np.asarray(runs[4.0].history["train_elbo"])
    parts = np.asarray(runs[4.0].history["train_reconstruction"]) + np.asarray(runs[4.0].history["train_kl"])
    np.testing.assert_allclose(elbo, -parts, rtol=1e-6)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        *[("max_kl_weight", w, "max_kl_weight must be a finite number > 0") for w in (0.0, -1.0, math.nan, math.inf)],
        *[("check_val_every_n_epoch", n, "check_val_every_n_epoch must be >= 1") for n in (0, -2)],
    ],
)
def test_bad_training_options_are_refused_before_anything_runs(option, value, message):
    adata = _small(n_cells=50, n_genes=10)
    VAE.setup_anndata(adata)
    before = adata.copy()
    model = VAE(adata, n_hidden=8)
    with pytest.raises(ValueError, match=message):
        model.train(max_epochs=1, **{option: value}, **TRAIN)
    # refused before anything ran: no split, no history, the AnnData as it was
    assert model.train_indices.size == 0 and not model.history and not model.is_trained
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())
    assert adata.obs.equals(before.obs)


def test_check_val_every_n_epoch_scores_the_held_out_cells_on_those_epochs_and_the_last():
    adata = _small(n_cells=100, n_genes=20)
    VAE.setup_anndata(adata)
    model = VAE(adata, n_hidden=16, seed=0)
    model.train(max_epochs=7, check_val_every_n_epoch=3, **TRAIN)
    history = model.history
    assert all(len(values) == 7 for values in history.values())
    scored = np.isfinite(history["validation_elbo"])
    np.testing.assert_array_equal(np.flatnonzero(scored) + 1, [3, 6, 7])
    assert np.isfinite(history["train_elbo"]).all()
    # the last epoch's held-out ELBO is the trained model's, as get_elbo computes it
    held_out = model.get_elbo(indices=model.validation_indices)
    np.testing.assert_allclose(history["validation_elbo"][-1], held_out, rtol=0.05)


def test_early_stopping_counts_validations_when_they_are_spaced():
    adata = _small(n_cells=100, n_genes=20)
    VAE.setup_anndata(adata)
    model = VAE(adata, n_hidden=16, seed=0)
    # a learning rate too small to learn: the held-out ELBO only jitters, so patience 1 runs out soon
    model.train(max_epochs=40, lr=1e-12, check_val_every_n_epoch=4, patience=1, early_stopping=True, **TRAIN)
    epochs_run = model.history["epoch"][-1]
    assert 8 <= epochs_run < 40  # a best first, then no improvement: stopped early
    # it stopped on a scored epoch, and the unscored ones never counted
    assert epochs_run % 4 == 0
    np.testing.assert_array_equal(
        np.flatnonzero(np.isfinite(model.history["validation_elbo"])) + 1, np.arange(4, epochs_run + 1, 4)
    )


def test_train_again_appends_history():
    adata = _small(n_cells=100, n_genes=20)
    VAE.setup_anndata(adata)
    model = VAE(adata, n_hidden=16)
    model.train(max_epochs=2, **TRAIN)
    model.train(max_epochs=1, **TRAIN)
    assert model.history["epoch"] == [1, 2, 3]
    assert all(len(v) == 3 for v in model.history.values())


def test_validation_elbo_improves(trained):
    _, model = trained
    val = np.asarray(model.history["validation_elbo"])
    train = np.asarray(model.history["train_elbo"])
    # ELBOs are negative nats per cell; "clearly better" = at least 5 % of the first epoch's value
    assert val[-1] > val[0] + 0.05 * abs(val[0])
    assert train[-1] > train[0] + 0.05 * abs(train[0])
    # the recorded held-out ELBO is what get_elbo computes on the validation cells
    elbos = [model.get_elbo(indices=model.validation_indices, seed=s) for s in range(5)]
    assert abs(np.mean(elbos) - val[-1]) < 0.02 * abs(val[-1])


def test_train_validation_split(trained):
    adata, model = trained
    train, val = model.train_indices, model.validation_indices
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == adata.n_obs
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    assert len(train) == int(np.ceil(0.9 * adata.n_obs))


# --------------------------------------------------------------------------- marginal likelihood


def test_marginal_ll_mean_is_a_per_cell_mean(trained):
    """``return_mean=True`` averages cells, not minibatches: with 150 cells in minibatches of 64 the
    short last minibatch (22 cells) weighs as its cells do (scvi-tools' mean of minibatch means
    would weigh it like a full one); the benchmarks average ``return_mean=False`` the same way."""
    _, model = trained
    cells = np.arange(150)
    per_cell = model.get_marginal_ll(indices=cells, n_mc_samples=20, batch_size=64, return_mean=False, seed=0)
    mean = model.get_marginal_ll(indices=cells, n_mc_samples=20, batch_size=64, seed=0)
    assert mean == pytest.approx(per_cell.mean(), rel=1e-12)
    batch_means = np.mean([per_cell[i : i + 64].mean() for i in range(0, 150, 64)])
    assert abs(batch_means - per_cell.mean()) > 1e-3  # the distinction is not vacuous on these cells


def test_marginal_ll_batched_samples_match_one_sample_at_a_time(trained):
    """The importance samples are scored in chunks folded into the cell axis of one fused
    likelihood call; chunking must not change the estimate beyond float32 rounding."""
    _, model = trained
    batch = next(iter(model._batches(None, np.arange(40), 40)))
    with torch.no_grad():
        torch.manual_seed(0)
        together = model.module.marginal_log_likelihood(batch, n_samples=30, chunk=30)
        torch.manual_seed(0)
        one_by_one = model.module.marginal_log_likelihood(batch, n_samples=30, chunk=1)
    np.testing.assert_allclose(together.numpy(), one_by_one.numpy(), rtol=1e-5)


def test_marginal_ll_is_above_elbo(trained):
    _, model = trained
    cells = model.validation_indices
    iwae = model.get_marginal_ll(indices=cells, n_mc_samples=200, return_mean=False, seed=0)
    assert iwae.shape == (len(cells),)
    assert np.isfinite(iwae).all()
    assert (iwae < 0).all()  # log-probabilities of discrete counts
    # one importance sample is a one-sample ELBO estimate; its mean over seeds estimates the ELBO
    n_seeds = 20
    single = np.stack(
        [model.get_marginal_ll(indices=cells, n_mc_samples=1, return_mean=False, seed=s) for s in range(n_seeds)]
    )
    per_seed = single.mean(axis=1)
    standard_error = per_seed.std(ddof=1) / np.sqrt(n_seeds)
    assert iwae.mean() >= per_seed.mean() - 3 * standard_error
    elbos = np.array([model.get_elbo(indices=cells, seed=s) for s in range(n_seeds)])
    elbo_error = elbos.std(ddof=1) / np.sqrt(n_seeds)
    assert iwae.mean() >= elbos.mean() - 3 * elbo_error
    # both ELBO estimators target the same quantity
    assert abs(elbos.mean() - per_seed.mean()) < 5 * (standard_error + elbo_error) + 0.5
    # the mean agrees with the per-cell values
    assert model.get_marginal_ll(indices=cells, n_mc_samples=200, seed=0) == pytest.approx(iwae.mean(), rel=1e-6)


def test_marginal_ll_improves_with_training(trained):
    adata, model = trained
    cells = model.validation_indices
    trained_ll = model.get_marginal_ll(indices=cells, n_mc_samples=100)
    untrained_ll = VAE(adata, seed=0).get_marginal_ll(indices=cells, n_mc_samples=100)
    assert np.isfinite(trained_ll) and np.isfinite(untrained_ll)
    assert trained_ll > untrained_ll + 0.05 * abs(untrained_ll)
    # and it beats a model-free NB fit (library x gene frequency) on the same held-out cells:
    # the simulated cell types carry information that a single expression profile cannot.
    baseline = nb_baseline_log_likelihood(adata.X, model.train_indices, cells)
    assert trained_ll > baseline


# --------------------------------------------------------------------------- structure recovery


def test_latent_recovers_clusters(trained):
    adata, model = trained
    labels = adata.obs["cell_type"].to_numpy()
    # best over resolutions (scib's convention, as benchmarks/bench_clustering.py): the default KL
    # weight of 2 packs each type tighter, and resolution 1 alone splits some of them in two
    latent = model.get_latent_representation()
    scores = max((leiden_scores(latent, labels, resolution=r) for r in (0.3, 0.5, 1.0)), key=lambda s: s["ari"])
    random = leiden_scores(np.random.default_rng(0).standard_normal((adata.n_obs, 10)).astype(np.float32), labels)
    # A random embedding has no structure: Leiden clusters are unrelated to the labels (ARI ~ 0).
    assert abs(random["ari"]) < 0.05
    # Threshold: with 4 equal types, splitting two of them in halves still scores ARI 0.82, while
    # merging any two types drops it to 0.71. ARI > 0.75 thus demands that every type is separated.
    assert scores["ari"] > 0.75, scores
    assert scores["nmi"] > random["nmi"] + 0.5


def _knn_same_fraction(embedding: np.ndarray, groups: np.ndarray, k: int = 15) -> float:
    """Mean fraction of each cell's k nearest neighbours in the same group."""
    from sklearn.neighbors import NearestNeighbors

    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding, return_distance=False)[:, 1:]
    return float((groups[neighbours] == groups[:, None]).mean())


def test_batch_conditioning_mixes_batches():
    """With batch in the model, the latent needs not encode the batch: batches mix, types stay apart.

    Two balanced batches with per-gene logit shifts (sd 0.5) separate completely in a PCA of
    log-normalised counts (kNN batch purity ~0.97); perfect mixing would give ~0.5. The same VAE
    without batch_key must encode the batch (purity ~1), which shows the mixing comes from the
    conditioning. Measured: conditioned VAE ~0.63 after 100 epochs.
    """
    import anndata as ad
    import scanpy as sc

    adata = synthetic(n_cells=400, n_genes=200, n_clusters=3, n_batches=2, batch_effect=0.5, seed=0)
    batches = adata.obs["batch"].cat.codes.to_numpy()
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    pca = ad.AnnData(adata.X.copy())
    sc.pp.normalize_total(pca, target_sum=1e4)
    sc.pp.log1p(pca)
    sc.pp.pca(pca, n_comps=10, random_state=0)
    pca_purity = _knn_same_fraction(pca.obsm["X_pca"], batches)

    latents = {}
    for key in ("batch", None):
        data = adata.copy()
        VAE.setup_anndata(data, batch_key=key)
        model = VAE(data, seed=0)
        model.train(max_epochs=100, **TRAIN)
        latents[key] = model.get_latent_representation()
    conditioned = _knn_same_fraction(latents["batch"], batches)
    unconditioned = _knn_same_fraction(latents[None], batches)
    assert pca_purity > 0.9  # the batch effect is strong
    assert conditioned < pca_purity - 0.15, (conditioned, pca_purity)
    assert conditioned < unconditioned - 0.15, (conditioned, unconditioned)
    # mixing must not come from a structureless latent: cell types stay separated
    assert _knn_same_fraction(latents["batch"], types) > 0.95


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(trained, tmp_path):
    adata, model = trained
    folder = model.save(tmp_path / "model")
    z = model.get_latent_representation()
    expr = model.get_normalized_expression(library_size=1e4, return_numpy=True)

    with_data = VAE.load(folder, adata=adata)
    np.testing.assert_array_equal(with_data.get_latent_representation(), z)
    np.testing.assert_array_equal(with_data.get_normalized_expression(library_size=1e4, return_numpy=True), expr)
    assert _comparable(with_data.history) == _comparable(model.history)
    assert with_data.is_trained
    np.testing.assert_array_equal(with_data.train_indices, model.train_indices)
    np.testing.assert_array_equal(with_data.validation_indices, model.validation_indices)
    assert with_data.hyperparameters == model.hyperparameters
    assert with_data.var_names == model.var_names

    without = VAE.load(folder)
    with pytest.raises(SetupError, match="adata"):
        without.get_latent_representation()
    np.testing.assert_array_equal(without.get_latent_representation(adata=adata), z)
    np.testing.assert_array_equal(without.get_normalized_expression(adata, library_size=1e4, return_numpy=True), expr)


def test_saved_files_format(trained, tmp_path):
    _, model = trained
    folder = model.save(tmp_path / "model")
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["format_version"] == SAVE_FORMAT_VERSION
    assert metadata["model_class"] == "VAE"
    assert metadata["hyperparameters"] == model.hyperparameters
    state = torch.load(folder / "model.pt", weights_only=True)
    reference = model.module.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value.cpu()), key
    assert not list(folder.glob("*.tmp"))


def test_load_refuses_query_missing_genes(trained, tmp_path):
    adata, model = trained
    folder = model.save(tmp_path / "model")
    missing = adata[:, adata.var_names[5:]].copy()
    with pytest.raises(SetupError, match="lacks 5"):
        VAE.load(folder, adata=missing)
    loaded = VAE.load(folder)
    with pytest.raises(SetupError, match="lacks 5"):
        loaded.get_latent_representation(adata=missing)


def test_save_refuses_non_empty_directory(trained, tmp_path):
    _, model = trained
    folder = model.save(tmp_path / "model")
    with pytest.raises(FileExistsError, match="overwrite"):
        model.save(folder)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        model.save(other)
    assert not (other / "model.pt").exists()
    model.save(folder, overwrite=True)
    assert VAE.load(folder).is_trained
    empty = tmp_path / "empty"
    empty.mkdir()
    model.save(empty)  # an existing empty directory is fine
    assert (empty / "metadata.json").exists()


def test_saved_files_respect_umask(trained, tmp_path):
    """Saved files get the permissions of any other file the user writes (umask), not 0600."""
    _, model = trained
    folder = model.save(tmp_path / "model")
    reference = tmp_path / "reference.txt"
    reference.write_text("x")
    expected = reference.stat().st_mode & 0o777
    for name in ("model.pt", "metadata.json"):
        assert oct((folder / name).stat().st_mode & 0o777) == oct(expected), name


def test_load_checks_class_and_format(trained, tmp_path):
    _, model = trained
    folder = model.save(tmp_path / "model")

    class OtherVAE(VAE):
        pass

    with pytest.raises(TypeError, match="VAE"):
        OtherVAE.load(folder)
    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    metadata = json.loads((changed / "metadata.json").read_text())
    metadata["format_version"] = SAVE_FORMAT_VERSION + 1
    (changed / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="format"):
        VAE.load(changed)
    with pytest.raises(FileNotFoundError):
        VAE.load(tmp_path / "nowhere")


def test_save_load_latent_library_model(tmp_path):
    """The latent-library prior lives in buffers: loading without adata must restore it."""
    adata = _small(n_cells=120, n_genes=30)
    VAE.setup_anndata(adata, batch_key="batch")
    model = VAE(adata, n_hidden=16, use_observed_library=False, seed=2)
    model.train(max_epochs=2, **TRAIN)
    model.save(tmp_path / "m")
    loaded = VAE.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.module.library_log_means.numpy(), model.module.library_log_means.numpy())
    np.testing.assert_array_equal(
        loaded.get_normalized_expression(adata, library_size="latent", return_numpy=True),
        model.get_normalized_expression(library_size="latent", return_numpy=True),
    )
    assert loaded.get_elbo(adata) == model.get_elbo()


def test_early_stopping_stops():
    adata = _small(n_cells=100, n_genes=20)
    VAE.setup_anndata(adata)
    model = VAE(adata, n_hidden=16)
    # lr=0: nothing improves beyond sampling noise, so patience runs out long before max_epochs
    model.train(max_epochs=200, lr=0.0, early_stopping=True, patience=3, **TRAIN)
    n_epochs = len(model.history["epoch"])
    assert 4 <= n_epochs < 200
    val = np.asarray(model.history["validation_elbo"])
    assert val[-3:].max() <= val[:-3].max()  # the last `patience` epochs did not improve


def test_default_training_stops_early_and_restores_the_best_epoch():
    """``train()`` with no arguments: early stopping on the held-out ELBO, best epoch restored. A
    wide model on 60 cells overfits within a few dozen epochs, so the held-out ELBO peaks and falls."""
    adata = _small(n_cells=60, n_genes=300, n_batches=1, seed=3)
    VAE.setup_anndata(adata)
    model = VAE(adata, n_hidden=256, n_latent=20, dropout_rate=0.0, seed=0)
    model.train(max_epochs=400, **TRAIN)
    val = np.asarray(model.history["validation_elbo"])
    best = int(np.argmax(val))
    assert len(val) == best + 1 + DEFAULT_PATIENCE < 400  # stopped `patience` epochs after the best one
    assert val[best] > val[-1] + 1.0  # it did overfit after the best epoch
    # the parameters are the best epoch's: the held-out ELBO is back at its peak, not at the last value
    held_out = np.mean([model.get_elbo(indices=model.validation_indices, seed=s) for s in range(20)])
    assert abs(held_out - val[best]) < abs(held_out - val[-1])
    assert held_out > val[-1] + 0.5 * (val[best] - val[-1])


def test_two_cells_train_or_fail_clearly():
    """setup/train document two cells with counts as the minimum; a 1-cell training split must not
    reach BatchNorm (``Expected more than 1 value per channel``)."""
    import anndata as ad

    adata = ad.AnnData(np.array([[1, 2, 0, 4], [0, 3, 1, 1]], dtype=np.float32))
    VAE.setup_anndata(adata)
    model = VAE(adata, n_hidden=8)
    try:
        model.train(max_epochs=1, **TRAIN)
    except SetupError as err:
        assert "cell" in str(err)
    else:
        assert _finite_history(model.history)


def test_empty_indices_give_empty_results(trained):
    adata, model = trained
    none = np.array([], dtype=np.int64)
    assert model.get_latent_representation(indices=none).shape == (0, 10)
    assert model.get_normalized_expression(indices=none, return_numpy=True).shape == (0, adata.n_vars)
    assert model.posterior_predictive_sample(indices=none).shape == (0, adata.n_vars)


# --------------------------------------------------------------------------- reproducibility


def _fit(adata, seed):
    model = VAE(adata, n_latent=5, n_hidden=32, seed=seed)
    model.train(max_epochs=3, batch_size=64, **TRAIN)
    return model


def test_seeded_training_is_reproducible():
    adata = _small(n_cells=150, n_genes=30)
    VAE.setup_anndata(adata, batch_key="batch")
    first, second, other = _fit(adata, 3), _fit(adata, 3), _fit(adata, 4)
    np.testing.assert_array_equal(first.get_latent_representation(), second.get_latent_representation())
    assert _comparable(first.history) == _comparable(second.history)
    np.testing.assert_array_equal(first.validation_indices, second.validation_indices)
    assert not np.array_equal(first.get_latent_representation(), other.get_latent_representation())
    assert _comparable(first.history) != _comparable(other.history)


def test_outputs_do_not_disturb_global_rng(small_model):
    _, model = small_model
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.get_latent_representation(give_mean=False, seed=5)
    model.get_marginal_ll(n_mc_samples=3, seed=5)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


# --------------------------------------------------------------------------- query data


def test_query_with_permuted_genes(small_model):
    adata, model = small_model
    perm = np.random.default_rng(0).permutation(adata.n_vars)
    query = adata[:, perm].copy()
    np.testing.assert_array_equal(model.get_latent_representation(adata=query), model.get_latent_representation())
    expr = model.get_normalized_expression(query, return_numpy=False)
    assert list(expr.columns) == model.var_names  # returned in the model's gene order
    np.testing.assert_allclose(expr.to_numpy(), model.get_normalized_expression(return_numpy=True), rtol=1e-6)


def test_query_with_extra_genes_and_dense_counts(small_model):
    adata, model = small_model
    extra = pd.DataFrame(index=["extra_gene"])
    dense = np.hstack([adata.X.toarray(), np.ones((adata.n_obs, 1), dtype=np.float32)])
    import anndata as ad

    query = ad.AnnData(dense, obs=adata.obs.copy(), var=pd.concat([adata.var, extra]))
    np.testing.assert_allclose(
        model.get_latent_representation(adata=query), model.get_latent_representation(), rtol=1e-5, atol=1e-6
    )


def test_query_unknown_batch_category(small_model):
    adata, model = small_model
    query = adata.copy()
    batches = query.obs["batch"].astype(str).to_numpy()
    batches[0] = "batch_unseen"
    query.obs["batch"] = batches
    with pytest.raises(SetupError, match="batch_unseen"):
        model.get_latent_representation(adata=query)
    no_batch = adata.copy()
    del no_batch.obs["batch"]
    with pytest.raises(SetupError, match="batch"):
        model.get_latent_representation(adata=no_batch)


def test_query_with_non_integer_counts_is_refused(small_model):
    adata, model = small_model
    query = adata.copy()
    query.X = query.X * 0.5
    with pytest.raises(SetupError, match="non-integer"):
        model.get_latent_representation(adata=query)


def _snapshot(adata):
    return dict(
        X=adata.X.copy(),
        layers={k: v.copy() for k, v in adata.layers.items()},
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        obsm={k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        uns_keys=set(adata.uns.keys()),
        registry=adata.uns.get("_sclatent_registry"),
    )


def _assert_unchanged(adata, snap):
    def same_matrix(a, b):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
        if sp.issparse(a):
            assert (a != b).nnz == 0
        else:
            np.testing.assert_array_equal(a, b)

    same_matrix(adata.X, snap["X"])
    assert set(adata.layers) == set(snap["layers"])
    for key, value in snap["layers"].items():
        same_matrix(adata.layers[key], value)
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert set(adata.obsm) == set(snap["obsm"])
    for key, value in snap["obsm"].items():
        np.testing.assert_array_equal(adata.obsm[key], value)
    assert set(adata.uns.keys()) == snap["uns_keys"]
    assert adata.uns.get("_sclatent_registry") == snap["registry"]


def test_caller_anndata_is_not_mutated():
    adata = _small(n_cells=120, n_genes=30)
    adata.obs["batch"] = adata.obs["batch"].astype(str)  # a plain string column must stay one
    VAE.setup_anndata(
        adata,
        batch_key="batch",
        labels_key="cell_type",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct_mt"],
    )
    before = _snapshot(adata)
    model = VAE(adata, n_hidden=16, use_observed_library=False)
    model.train(max_epochs=2, **TRAIN)
    model.get_latent_representation()
    model.get_latent_representation(give_mean=False, seed=0)
    model.get_normalized_expression(n_samples=2)
    model.get_normalized_expression(library_size="latent")
    model.get_marginal_ll(n_mc_samples=3)
    model.get_elbo()
    model.get_reconstruction_error()
    model.get_kl_divergence()
    model.posterior_predictive_sample(n_samples=2)
    _assert_unchanged(adata, before)
    assert adata.obs["batch"].dtype == object

    query = adata[:, ::-1].copy()
    query_before = _snapshot(query)
    model.get_latent_representation(adata=query)
    model.get_normalized_expression(query)
    _assert_unchanged(query, query_before)


# --------------------------------------------------------------------------- empty cells


def test_zero_count_cells_excluded_from_training_but_embedded():
    adata = _small(n_cells=150, n_genes=30)
    counts = adata.X.tolil()
    empty = np.array([0, 7, 42, 149])
    counts[empty] = 0
    adata.X = sp.csr_matrix(counts)
    adata.X.eliminate_zeros()
    with pytest.warns(UserWarning, match="zero total counts"):
        VAE.setup_anndata(adata, batch_key="batch")
    model = VAE(adata, n_hidden=16)
    model.train(max_epochs=2, train_size=0.8, **TRAIN)
    used = np.concatenate([model.train_indices, model.validation_indices])
    assert np.intersect1d(used, empty).size == 0
    np.testing.assert_array_equal(np.sort(used), np.setdiff1d(np.arange(adata.n_obs), empty))
    assert _finite_history(model.history)
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, model.module.n_latent)
    assert np.isfinite(z).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        expr = model.get_normalized_expression(indices=empty, return_numpy=True)
    assert np.isfinite(expr).all()
    np.testing.assert_allclose(expr.sum(axis=1), 1.0, rtol=1e-4)


# --------------------------------------------------------------------------- repr


def test_repr_mentions_class_data_and_status(trained):
    adata, model = trained
    text = repr(model)
    assert text.startswith("VAE(")
    assert "n_latent=10" in text
    assert f"{adata.n_obs} cells x {adata.n_vars} genes" in text
    assert f"trained for {N_EPOCHS_TRAINED} epochs" in text
    assert "held-out ELBO" in text
    fresh = repr(VAE(adata, n_latent=3))
    assert "not trained" in fresh and "n_latent=3" in fresh
