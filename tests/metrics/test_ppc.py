"""Posterior predictive checks: a VAE fitted to counts simulated from a ZINB latent model (its own
likelihood family) reproduces the per-gene statistics and has calibrated predictive intervals; a
Poisson VAE on the same overdispersed counts does not."""

from __future__ import annotations

import pytest

from sclatent.datasets import synthetic
from sclatent.metrics import posterior_predictive_check
from sclatent.model import VAE
from sclatent.plotting import plot_posterior_predictive_check

TRAIN = dict(accelerator="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def data():
    adata = synthetic(n_cells=600, n_genes=50, n_clusters=3, n_batches=1, seed=5)
    VAE.setup_anndata(adata)
    return adata


def _fit(adata, likelihood):
    model = VAE(adata, n_latent=5, n_hidden=32, gene_likelihood=likelihood, seed=0)
    return model.train(max_epochs=80, **TRAIN)


def test_own_likelihood_gives_calibrated_intervals(data, tmp_path):
    check = posterior_predictive_check(_fit(data, "zinb"), n_samples=30)
    summary = check.summary["value"]
    # a randomised PIT is uniform under the right model: coverage near the nominal level (measured
    # 0.57 and 0.94: the posterior of z adds spread, so the intervals are a little wide)
    assert abs(summary["coverage_50"] - 0.5) < 0.1 and abs(summary["coverage_90"] - 0.9) < 0.06
    assert summary["mean_log_correlation"] > 0.99  # measured 0.999
    assert summary["zero_fraction_mean_absolute_error"] < 0.1  # measured 0.056
    assert set(check.genes.columns) >= {"observed_cv", "predicted_cv", "coverage_50", "coverage_90"}
    figure = plot_posterior_predictive_check(check, tmp_path / "ppc.png")
    assert (tmp_path / "ppc.png").stat().st_size > 0 and len(figure.axes) == 4


def test_a_poisson_model_misses_the_overdispersion(data):
    zinb = posterior_predictive_check(_fit(data, "zinb"), n_samples=20).summary["value"]
    poisson = posterior_predictive_check(_fit(data, "poisson"), n_samples=20).summary["value"]
    # Poisson intervals are far too narrow for overdispersed counts (measured coverage 0.26 / 0.58)
    assert poisson["coverage_50"] < 0.4 and poisson["coverage_90"] < 0.75
    assert abs(poisson["coverage_90"] - 0.9) > 3 * abs(zinb["coverage_90"] - 0.9)
    assert poisson["zero_fraction_mean_absolute_error"] > zinb["zero_fraction_mean_absolute_error"]


def test_too_few_draws_are_refused(data):
    with pytest.raises(ValueError, match="at least 10"):
        posterior_predictive_check(object(), data, n_samples=5)
