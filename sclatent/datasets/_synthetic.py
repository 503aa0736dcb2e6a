"""Zero-inflated negative binomial counts simulated from a known latent structure."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

# Latent geometry: within-cluster standard deviation per latent dimension, and the smallest allowed
# distance between cluster centres. The ratio (~10x the per-dimension spread, ~4.5x the RMS radius
# of a cluster in 5 dimensions) keeps clusters separable by Leiden on a decent embedding.
_WITHIN_SD = 0.2
_MIN_CENTRE_DISTANCE = 2.0
# Candidate centres drawn per requested cluster for the farthest-point selection.
_CANDIDATES_PER_CLUSTER = 50
# Weight of the tanh branch of the latent -> logit map (the nonlinearity).
_NONLINEAR_WEIGHT = 0.5
# Spread of the per-gene baseline logits, giving a realistic range of mean expression levels.
_BASELINE_LOGIT_SD = 1.0
# Per-gene multiplicative jitter (log scale) of the inverse dispersion.
_DISPERSION_LOG_SD = 0.3
# Log-library standard deviation when ``library_size`` is a mean log-library rather than a range.
_DEFAULT_LOG_LIBRARY_SD = 0.35


def _cluster_centres(
    rng: np.random.Generator, n_clusters: int, n_latent: int, separation: float = _MIN_CENTRE_DISTANCE
) -> np.ndarray:
    """``(n_clusters, n_latent)`` centres whose closest pair is ``separation`` apart."""
    if n_clusters == 1:
        return np.zeros((1, n_latent))
    candidates = rng.standard_normal((_CANDIDATES_PER_CLUSTER * n_clusters, n_latent))
    # Farthest-point selection avoids two random centres landing next to each other.
    chosen = [0]
    dist = np.linalg.norm(candidates - candidates[0], axis=1)
    for _ in range(n_clusters - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(candidates - candidates[nxt], axis=1))
    centres = candidates[chosen]
    centres -= centres.mean(axis=0)
    pair = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)
    min_dist = pair[np.triu_indices(n_clusters, k=1)].min()
    return centres * (separation / min_dist)


def _log_library_params(library_size: tuple[float, float] | float) -> tuple[float, float]:
    if np.isscalar(library_size):
        return float(library_size), _DEFAULT_LOG_LIBRARY_SD
    lo, hi = (float(v) for v in library_size)  # type: ignore[union-attr]
    if not 0 < lo <= hi:
        raise ValueError(f"library_size range must satisfy 0 < low <= high, got {library_size!r}")
    # The range is the central ~95 % (+-2 sd) of the log-normal.
    return 0.5 * (np.log(lo) + np.log(hi)), 0.25 * (np.log(hi) - np.log(lo))


def _balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``(n,)`` labels in ``0..k-1`` with group sizes differing by at most one, randomly ordered."""
    return rng.permutation(np.arange(n) % k)


def _expression_profiles(
    z: np.ndarray,
    batch: np.ndarray,
    baseline: np.ndarray,
    w_lin: np.ndarray,
    w_nonlin: np.ndarray,
    batch_shift: np.ndarray,
    extra_logits: np.ndarray | None = None,
) -> np.ndarray:
    """``(n, G)`` gene proportions ``softmax(b + W z + 0.5 V tanh(z) + s_batch [+ extra])`` of ``(n, L)`` latents."""
    logits = baseline + z @ w_lin + _NONLINEAR_WEIGHT * np.tanh(z) @ w_nonlin + batch_shift[batch]
    if extra_logits is not None:
        logits = logits + extra_logits
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


def _planted_effects(
    seed: int, n_clusters: int, n_genes: int, fraction: float, magnitude: tuple[float, float]
) -> np.ndarray | None:
    """``(n_genes, n_clusters)`` planted log2 effects (None when ``fraction`` is 0), from their own
    generator so that the rest of the simulation does not change."""
    if fraction <= 0:
        return None
    low, high = (float(v) for v in magnitude)
    if not 0 <= low <= high:
        raise ValueError(f"de_log2_fold_change must satisfy 0 <= low <= high, got {magnitude!r}")
    rng = np.random.default_rng([seed, 1])
    effects = np.zeros((n_genes, n_clusters))
    n_de = round(fraction * n_genes)
    for k in range(n_clusters):
        genes = rng.choice(n_genes, size=n_de, replace=False)
        effects[genes, k] = rng.uniform(low, high, n_de) * rng.choice([-1.0, 1.0], n_de)
    return effects


def _true_log2_fold_changes(probs: np.ndarray, cluster: np.ndarray, batch: np.ndarray, n_clusters: int) -> np.ndarray:
    """``(n_genes, n_clusters)``: log2 of each type's mean true proportion over the other cells',
    within each batch that holds both, averaged over those batches."""
    out = np.zeros((probs.shape[1], n_clusters))
    for k in range(n_clusters):
        per_batch = [
            np.log2(probs[(cluster == k) & (batch == b)].mean(0))
            - np.log2(probs[(cluster != k) & (batch == b)].mean(0))
            for b in np.unique(batch)
            if ((cluster == k) & (batch == b)).any() and ((cluster != k) & (batch == b)).any()
        ]
        out[:, k] = np.mean(per_batch, axis=0)
    return out.astype(np.float32)


def _zinb_counts(rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray, zero_inflation: float) -> np.ndarray:
    """``(n, G)`` float64 ZINB counts with means ``mean`` (before dropout) and inverse dispersions ``theta``."""
    # Gamma(shape=theta, scale=mu/theta) has mean mu and variance mu^2/theta: Poisson of it is NB.
    rate = rng.gamma(shape=theta[None, :], scale=mean / theta[None, :])
    counts = rng.poisson(rate).astype(np.float64)
    if zero_inflation > 0:
        counts[rng.random(counts.shape) < zero_inflation] = 0.0
    return counts


def synthetic(
    n_cells: int = 1000,
    n_genes: int = 200,
    n_clusters: int = 4,
    n_batches: int = 2,
    n_latent: int = 5,
    zero_inflation: float = 0.1,
    dispersion: float = 5.0,
    library_size: tuple[float, float] | float = (500, 3000),
    batch_effect: float = 0.5,
    seed: int = 0,
    de_fraction: float = 0.0,
    de_log2_fold_change: tuple[float, float] = (0.3, 1.3),
    cluster_separation: float = _MIN_CENTRE_DISTANCE,
) -> ad.AnnData:
    """Simulate ZINB single-cell counts with known clusters, batches and latent positions.

    Generative process (all randomness from ``np.random.default_rng(seed)``):

    1. ``n_clusters`` centres in an ``n_latent``-dimensional space, chosen by farthest-point
       selection and scaled so the closest pair is 2.0 apart; each cell's ``z`` is its centre
       plus isotropic Gaussian noise with sd 0.2 per dimension.
    2. Gene logits ``b + W z + 0.5 * V tanh(z) + s_batch``: per-gene baselines ``b ~ N(0, 1)``,
       random maps ``W, V`` with entries ``N(0, 1 / n_latent)``, and a per-batch additive shift
       ``s_batch ~ N(0, batch_effect**2)`` per gene.
    3. Expected counts ``mu = library * softmax(logits)`` with log-normal per-cell library sizes.
    4. Negative binomial counts by gamma-Poisson mixing with per-gene inverse dispersion
       ``theta_g = dispersion * exp(N(0, 0.3**2))`` (variance ``mu + mu**2 / theta``).
    5. Each count is replaced by zero with probability ``zero_inflation``.

    Cells whose counts are all zero after step 5 get a single count on one gene drawn from their
    own expression profile, so every cell has a positive library; the number of such cells is
    stored in ``uns["synthetic_params"]["n_empty_cells_fixed"]``.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the count matrix.
    n_clusters
        Number of cell types; cells are split between them as evenly as possible.
    n_batches
        Number of batches, assigned evenly and independently of cell type.
    n_latent
        Dimension of the true latent space.
    zero_inflation
        Probability in ``[0, 1)`` that a count is dropped to zero.
    dispersion
        Typical inverse dispersion ``theta`` of the negative binomial (larger: closer to Poisson).
    library_size
        ``(low, high)``: log-normal library sizes with about 95 % of cells in this range; or a
        float: the mean log-library, with log-sd 0.35.
    batch_effect
        Standard deviation of the per-batch, per-gene logit shifts (0 disables batch effects).
    seed
        Seed for ``numpy.random.default_rng``; the output is a deterministic function of the
        arguments.
    de_fraction
        Differential expression planted on top of the latent structure: for each cell type, this
        fraction of the genes gets a log2 fold change drawn uniformly from
        ``de_log2_fold_change`` (magnitude) with a random sign, added to the type's logits (drawn
        from a second generator, ``default_rng([seed, 1])``, so ``de_fraction=0`` leaves every
        other output unchanged). The truth is returned (see below).
    de_log2_fold_change
        ``(low, high)`` magnitude of the planted log2 fold changes (weak effects by default).
    cluster_separation
        Distance of the closest pair of cluster centres in the latent space (2.0); 0 puts every
        type at the same latent position, so the types differ only by the planted effects.

    Returns
    -------
    AnnData
        ``(n_cells, n_genes)``. ``X``: CSR float32 counts; ``layers["counts"]``: a copy;
        ``layers["true_mean"]``: dense float32 ``(n_cells, n_genes)`` expected counts before
        zero inflation (``library * softmax``), so ``E[X] = (1 - zero_inflation) * true_mean``.
        ``obs``: ``cell_type`` (categorical ``"type_0"``, ...), ``batch`` (categorical
        ``"batch_0"``, ...), ``library_size`` (the simulated library, float). ``obsm["X_true_latent"]``:
        ``(n_cells, n_latent)`` float32 latent positions. ``var_names``: ``"gene_0"``, ...
        ``uns["synthetic_params"]``: the arguments and derived settings as plain JSON types.
        With ``de_fraction > 0``: ``varm["de_log2_fold_change"]`` ``(n_genes, n_clusters)``, the
        planted log2 effect of each type (0 where none), and ``varm["true_log2_fold_change"]``
        ``(n_genes, n_clusters)``, each type's log2 fold change of the true normalised expression
        against the other cells, within each batch and averaged over batches (batch shifts cancel),
        i.e. the answer a one-vs-rest differential expression should find.
    """
    if n_cells < max(n_clusters, n_batches):
        raise ValueError(f"n_cells ({n_cells}) must be at least n_clusters ({n_clusters}) and n_batches ({n_batches})")
    if min(n_genes, n_clusters, n_batches, n_latent) < 1:
        raise ValueError("n_genes, n_clusters, n_batches and n_latent must all be >= 1")
    if not 0.0 <= zero_inflation < 1.0:
        raise ValueError(f"zero_inflation must be in [0, 1), got {zero_inflation}")
    if dispersion <= 0:
        raise ValueError(f"dispersion must be positive, got {dispersion}")
    if batch_effect < 0:
        raise ValueError(f"batch_effect must be non-negative, got {batch_effect}")
    if not 0.0 <= de_fraction <= 1.0:
        raise ValueError(f"de_fraction must be in [0, 1], got {de_fraction}")
    if cluster_separation < 0:
        raise ValueError(f"cluster_separation must be non-negative, got {cluster_separation}")
    log_lib_mean, log_lib_sd = _log_library_params(library_size)

    rng = np.random.default_rng(seed)

    centres = _cluster_centres(rng, n_clusters, n_latent, cluster_separation)
    cluster = _balanced_labels(rng, n_cells, n_clusters)
    batch = _balanced_labels(rng, n_cells, n_batches)
    z = centres[cluster] + _WITHIN_SD * rng.standard_normal((n_cells, n_latent))

    baseline = _BASELINE_LOGIT_SD * rng.standard_normal(n_genes)
    w_lin = rng.standard_normal((n_latent, n_genes)) / np.sqrt(n_latent)
    w_nonlin = rng.standard_normal((n_latent, n_genes)) / np.sqrt(n_latent)
    batch_shift = batch_effect * rng.standard_normal((n_batches, n_genes))
    de_effect = _planted_effects(seed, n_clusters, n_genes, de_fraction, de_log2_fold_change)
    extra = None if de_effect is None else (np.log(2.0) * de_effect.T)[cluster]
    probs = _expression_profiles(z, batch, baseline, w_lin, w_nonlin, batch_shift, extra)

    library = np.exp(log_lib_mean + log_lib_sd * rng.standard_normal(n_cells))
    mean = library[:, None] * probs

    theta = dispersion * np.exp(_DISPERSION_LOG_SD * rng.standard_normal(n_genes))
    counts = _zinb_counts(rng, mean, theta, zero_inflation)

    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    for i in empty:
        counts[i, rng.choice(n_genes, p=probs[i])] = 1.0

    x = sp.csr_matrix(counts.astype(np.float32))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cluster, categories=[f"type_{k}" for k in range(n_clusters)]),
            "batch": pd.Categorical.from_codes(batch, categories=[f"batch_{k}" for k in range(n_batches)]),
            "library_size": library.astype(np.float32),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{j}" for j in range(n_genes)]))
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    adata.layers["true_mean"] = mean.astype(np.float32)
    adata.obsm["X_true_latent"] = z.astype(np.float32)
    if de_effect is not None:
        adata.varm["de_log2_fold_change"] = de_effect.astype(np.float32)
        adata.varm["true_log2_fold_change"] = _true_log2_fold_changes(probs, cluster, batch, n_clusters)

    params: dict[str, Any] = {
        "n_cells": int(n_cells),
        "n_genes": int(n_genes),
        "n_clusters": int(n_clusters),
        "n_batches": int(n_batches),
        "n_latent": int(n_latent),
        "zero_inflation": float(zero_inflation),
        "dispersion": float(dispersion),
        "library_size": [float(v) for v in library_size] if not np.isscalar(library_size) else float(library_size),
        "log_library_mean": float(log_lib_mean),
        "log_library_sd": float(log_lib_sd),
        "batch_effect": float(batch_effect),
        "seed": int(seed),
        "within_cluster_sd": _WITHIN_SD,
        "min_centre_distance": _MIN_CENTRE_DISTANCE,
        "n_empty_cells_fixed": int(empty.size),
    }
    if de_fraction > 0 or cluster_separation != _MIN_CENTRE_DISTANCE:
        params.update(
            de_fraction=float(de_fraction),
            de_log2_fold_change=[float(v) for v in de_log2_fold_change],
            cluster_separation=float(cluster_separation),
        )
    adata.uns["synthetic_params"] = params
    return adata
