"""Posterior predictive checks of a count model: do counts drawn from the fitted model look like the
observed ones, gene by gene?

For every cell, ``n_samples`` count vectors are drawn from the model's posterior predictive
(``model.posterior_predictive_sample``: ``z, l ~ q(z, l | x)``, then ``x ~ p(x | z, l)``). Per gene,
the observed and the predicted coefficient of variation, zero fraction, mean and variance are
compared, and the predictive intervals are checked: for each observed count the randomised
probability integral transform ``u = (#{draws < x} + V (#{draws = x} + 1)) / (S + 1)``
(``V ~ U(0, 1)``; uniform on (0, 1) when the model is right, also for discrete counts) falls in
the central 50 % interval (``0.25 <= u <= 0.75``) or 90 % interval with frequencies 0.5 and 0.9
for a calibrated model. Cells are processed in chunks, so memory stays at one chunk's draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Central predictive intervals whose coverage is reported.
INTERVALS = (0.5, 0.9)


@dataclass
class PosteriorPredictiveCheck:
    """What :func:`posterior_predictive_check` measured.

    Attributes
    ----------
    genes
        Genes x statistics DataFrame: ``observed_mean``, ``predicted_mean``, ``observed_var``,
        ``predicted_var``, ``observed_cv``, ``predicted_cv``, ``observed_zero_fraction``,
        ``predicted_zero_fraction``, ``coverage_50``, ``coverage_90`` (fraction of the gene's
        observed counts inside the central 50 % / 90 % predictive interval).
    summary
        One-row-per-statistic DataFrame: ``value`` of each summary (correlations of observed and
        predicted per-gene statistics on log scales, mean absolute errors, interval coverages).
    n_samples
        Posterior predictive draws per cell.
    """

    genes: pd.DataFrame
    summary: pd.DataFrame
    n_samples: int


def _dense(matrix) -> np.ndarray:
    return np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=np.float64)


def posterior_predictive_check(
    model,
    adata=None,
    n_samples: int = 20,
    chunk_size: int = 512,
    seed: int = 0,
) -> PosteriorPredictiveCheck:
    """Compare the observed counts with the model's posterior predictive, gene by gene.

    Parameters
    ----------
    model
        A trained count model with ``posterior_predictive_sample`` (``VAE``,
        ``SemiSupervisedVAE``) and a registry naming the counts' layer.
    adata
        Cells to check (default: the model's AnnData); raw counts in the registered layer.
    n_samples
        Draws per cell (at least 10: the 90 % interval needs them).
    chunk_size
        Cells per chunk (memory: ``chunk_size x n_genes x n_samples`` float32 draws).
    seed
        Seed of the draws and of the randomised PIT.

    Returns
    -------
    PosteriorPredictiveCheck
        Per-gene statistics and a summary; plot with
        :func:`sclatent.plotting.plot_posterior_predictive_check`.
    """
    if n_samples < 10:
        raise ValueError(f"n_samples={n_samples} is too few draws for a 90 % interval; use at least 10.")
    adata = model.adata if adata is None else adata
    layer = model.registry.layer
    counts = adata.layers[layer] if layer else adata.X
    n_cells, n_genes = counts.shape
    rng = np.random.default_rng(seed)
    sums = {k: np.zeros(n_genes) for k in ("obs", "obs2", "obs0", "pred", "pred2", "pred0")}
    inside = {level: np.zeros(n_genes) for level in INTERVALS}
    for start in range(0, n_cells, chunk_size):
        cells = np.arange(start, min(start + chunk_size, n_cells))
        observed = _dense(counts[cells])
        draws = model.posterior_predictive_sample(adata, indices=cells, n_samples=n_samples, seed=seed + start)
        draws = draws.astype(np.float64)  # (cells, genes, samples)
        sums["obs"] += observed.sum(0)
        sums["obs2"] += (observed**2).sum(0)
        sums["obs0"] += (observed == 0).sum(0)
        sums["pred"] += draws.mean(2).sum(0)
        sums["pred2"] += (draws**2).mean(2).sum(0)
        sums["pred0"] += (draws == 0).mean(2).sum(0)
        below = (draws < observed[..., None]).sum(2)
        equal = (draws == observed[..., None]).sum(2)
        pit = (below + rng.random(below.shape) * (equal + 1)) / (n_samples + 1)
        for level in INTERVALS:
            tail = (1 - level) / 2
            inside[level] += ((pit >= tail) & (pit <= 1 - tail)).sum(0)
    mean_obs, mean_pred = sums["obs"] / n_cells, sums["pred"] / n_cells
    var_obs = np.maximum(sums["obs2"] / n_cells - mean_obs**2, 0.0)
    var_pred = np.maximum(sums["pred2"] / n_cells - mean_pred**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv_obs, cv_pred = np.sqrt(var_obs) / mean_obs, np.sqrt(var_pred) / mean_pred
    genes = pd.DataFrame(
        {
            "observed_mean": mean_obs,
            "predicted_mean": mean_pred,
            "observed_var": var_obs,
            "predicted_var": var_pred,
            "observed_cv": cv_obs,
            "predicted_cv": cv_pred,
            "observed_zero_fraction": sums["obs0"] / n_cells,
            "predicted_zero_fraction": sums["pred0"] / n_cells,
            **{f"coverage_{round(level * 100)}": inside[level] / n_cells for level in INTERVALS},
        },
        index=pd.Index(adata.var_names, name="gene"),
    )
    expressed = (mean_obs > 0) & (mean_pred > 0)

    def log_correlation(a, b) -> float:
        return float(np.corrcoef(np.log(a[expressed]), np.log(b[expressed]))[0, 1])

    summary = {
        "cv_log_correlation": log_correlation(cv_obs, cv_pred),
        "cv_mean_absolute_error": float(np.nanmean(np.abs(cv_obs - cv_pred)[expressed])),
        "zero_fraction_correlation": float(
            np.corrcoef(genes["observed_zero_fraction"], genes["predicted_zero_fraction"])[0, 1]
        ),
        "zero_fraction_mean_absolute_error": float(
            np.abs(genes["observed_zero_fraction"] - genes["predicted_zero_fraction"]).mean()
        ),
        "mean_log_correlation": log_correlation(mean_obs, mean_pred),
        "variance_log_correlation": log_correlation(np.maximum(var_obs, 1e-12), np.maximum(var_pred, 1e-12)),
        **{
            f"coverage_{round(level * 100)}": float(genes[f"coverage_{round(level * 100)}"].mean())
            for level in INTERVALS
        },
    }
    table = pd.DataFrame({"value": pd.Series(summary)})
    table.index.name = "statistic"
    return PosteriorPredictiveCheck(genes=genes, summary=table, n_samples=n_samples)


__all__ = ["INTERVALS", "PosteriorPredictiveCheck", "posterior_predictive_check"]
