"""How real do synthetic cells look? Model-agnostic comparisons of two count matrices.

Every function takes two ``(n_cells, n_genes)`` count matrices (dense or sparse, same genes in the
same order) and knows nothing of how either was made. None of the numbers means much alone: report
each beside the same figure for two halves of the real data (:func:`split_halves`), the floor a
perfect generator would reach at that sample size.

- :func:`classifier_two_sample_auroc`: cross-validated AUROC of a logistic regression telling the two
  sets apart on a PCA of log-normalised counts (0.5: indistinguishable, 1: fully separable).
- :func:`mmd_rbf`: squared maximum mean discrepancy on the same PCA, RBF kernel, median-heuristic
  bandwidth.
- :func:`gene_statistic_correlations`: Pearson correlations of per-gene mean, variance (of
  log-normalised expression) and zero fraction (of the counts).
- :func:`marker_overlap`: per cell type, the fraction of the top-k marker genes (Wilcoxon rank test,
  type vs rest) found in the first set that are also top-k in the second.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

NORMALISED_TOTAL = 1e4


def _dense(counts) -> np.ndarray:
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    return x.astype(np.float64)


def log_normalise(counts) -> np.ndarray:
    """``(n, G)`` ``log1p(x / total * 1e4)`` as float64 (empty cells stay zero)."""
    x = _dense(counts)
    total = np.maximum(x.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(x / total * NORMALISED_TOTAL)


def _check_pair(a, b) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"The two matrices must have the same genes: {a.shape[1]} vs {b.shape[1]} columns.")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError("Each set needs at least two cells.")


def pooled_pca(a, b, n_comps: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the log-normalised cells of both sets, fitted on the pooled cells (genes centred and
    scaled to unit variance, clipped at 10 sd as in scanpy): ``(n_a, k)``, ``(n_b, k)``.

    Fitting on the pool (not on the real set alone) keeps directions in which only the synthetic
    cells vary, so a difference there is visible to the tests below.
    """
    from sklearn.decomposition import PCA

    _check_pair(a, b)
    pooled = np.vstack([log_normalise(a), log_normalise(b)])
    sd = pooled.std(axis=0)
    pooled = np.clip((pooled - pooled.mean(axis=0)) / np.where(sd > 0, sd, 1.0), -10, 10)
    k = int(min(n_comps, pooled.shape[0] - 1, pooled.shape[1]))
    scores = PCA(n_components=k, random_state=seed).fit_transform(pooled)
    return scores[: a.shape[0]], scores[a.shape[0] :]


def classifier_two_sample_auroc(a, b, n_comps: int = 50, n_splits: int = 5, seed: int = 0) -> float:
    """Cross-validated AUROC of a classifier telling cells of ``a`` from cells of ``b``.

    The larger set is subsampled (seeded) to the size of the smaller so chance is exactly 0.5;
    logistic regression (L2, C=1) on the standardised pooled PCA (:func:`pooled_pca`), stratified
    ``n_splits``-fold out-of-fold probabilities, one AUROC over all cells.

    Returns
    -------
    float
        AUROC in [0, 1]: ~0.5 when the sets are indistinguishable to a linear classifier, 1 when
        separable. Below 0.5 is chance fluctuation.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _check_pair(a, b)
    rng = np.random.default_rng(seed)
    n = min(a.shape[0], b.shape[0])
    a = a[np.sort(rng.choice(a.shape[0], n, replace=False))]
    b = b[np.sort(rng.choice(b.shape[0], n, replace=False))]
    pa, pb = pooled_pca(a, b, n_comps, seed)
    features = np.vstack([pa, pb])
    target = np.r_[np.zeros(n), np.ones(n)]
    n_splits = int(min(n_splits, n))
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    proba = cross_val_predict(classifier, features, target, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(target, proba))


def mmd_rbf(a, b, n_comps: int = 50, max_cells: int = 2000, seed: int = 0) -> float:
    """Unbiased squared MMD between the sets on the pooled PCA (RBF kernel).

    The bandwidth is the median pairwise Euclidean distance of the pooled cells (median heuristic):
    ``k(x, y) = exp(-||x - y||^2 / (2 * median^2))``. Each set is subsampled (seeded) to at most
    ``max_cells`` cells. Near 0 (it can be slightly negative) for samples of one distribution.
    """
    _check_pair(a, b)
    rng = np.random.default_rng(seed)
    if a.shape[0] > max_cells:
        a = a[np.sort(rng.choice(a.shape[0], max_cells, replace=False))]
    if b.shape[0] > max_cells:
        b = b[np.sort(rng.choice(b.shape[0], max_cells, replace=False))]
    pa, pb = pooled_pca(a, b, n_comps, seed)
    pooled = np.vstack([pa, pb])
    sq = np.maximum(((pooled[:, None, :] - pooled[None, :, :]) ** 2).sum(-1), 0.0)
    off_diagonal = sq[np.triu_indices(pooled.shape[0], k=1)]
    bandwidth2 = np.median(off_diagonal)
    kernel = np.exp(-sq / (2.0 * max(bandwidth2, 1e-12)))
    n, m = pa.shape[0], pb.shape[0]
    kaa, kbb, kab = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    term_a = (kaa.sum() - np.trace(kaa)) / (n * (n - 1))
    term_b = (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
    return float(term_a + term_b - 2.0 * kab.mean())


def gene_statistic_correlations(a, b) -> dict[str, float]:
    """Pearson correlations across genes of per-gene statistics of the two sets.

    Returns
    -------
    dict
        ``{"mean": r, "variance": r, "zero_fraction": r}``: mean and variance of log-normalised
        expression, fraction of zero counts. Genes constant in both sets make a correlation undefined
        (NaN) only if every gene is.
    """
    _check_pair(a, b)
    la, lb = log_normalise(a), log_normalise(b)
    za, zb = (_dense(a) == 0).mean(axis=0), (_dense(b) == 0).mean(axis=0)
    out = {}
    for name, (u, v) in {
        "mean": (la.mean(0), lb.mean(0)),
        "variance": (la.var(0), lb.var(0)),
        "zero_fraction": (za, zb),
    }.items():
        out[name] = float(np.corrcoef(u, v)[0, 1]) if u.std() > 0 and v.std() > 0 else float("nan")
    return out


def top_markers(counts, labels, k: int = 20) -> dict[str, list[int]]:
    """Per label, the ``k`` genes (column indices) most up in it vs all other cells.

    Ranked by the Wilcoxon rank-sum z-score on log-normalised expression (scanpy's
    ``rank_genes_groups(method="wilcoxon")``). Labels with fewer than 2 cells are skipped.
    """
    import anndata as ad
    import scanpy as sc

    labels = np.asarray(labels).astype(str)
    keep = [t for t in np.unique(labels) if (labels == t).sum() >= 2]
    scratch = ad.AnnData(log_normalise(counts).astype(np.float32))
    scratch.obs["label"] = labels
    scratch.var_names = [str(i) for i in range(scratch.n_vars)]
    if len(keep) < 2:
        return {}
    sc.tl.rank_genes_groups(scratch, "label", groups=keep, method="wilcoxon", n_genes=k, use_raw=False)
    names = scratch.uns["rank_genes_groups"]["names"]
    return {t: [int(g) for g in names[t][:k]] for t in keep}


def marker_overlap(a, labels_a, b, labels_b, k: int = 20) -> dict[str, float]:
    """Per label present in both sets, ``|top_k(a) & top_k(b)| / k`` (see
    :func:`~sclatent.metrics.realism.top_markers`), and ``"mean"`` over the labels."""
    _check_pair(a, b)
    ma, mb = top_markers(a, labels_a, k), top_markers(b, labels_b, k)
    out = {t: len(set(ma[t]) & set(mb[t])) / k for t in ma if t in mb}
    out["mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


def split_halves(labels, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of cells into two halves stratified by label: index arrays ``(first, second)``."""
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    first, second = [], []
    for t in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == t))
        half = len(idx) // 2
        first.append(idx[:half])
        second.append(idx[half:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def realism_metrics(a, b, labels_a=None, labels_b=None, k_markers: int = 20, seed: int = 0) -> dict[str, float]:
    """All of the above for sets ``a`` (reference) and ``b``, as one flat dict.

    Keys: ``c2st_auroc``, ``mmd``, ``corr_mean``, ``corr_variance``, ``corr_zero_fraction`` and,
    with both label arrays, ``marker_overlap`` (mean over the labels).
    """
    out = {"c2st_auroc": classifier_two_sample_auroc(a, b, seed=seed), "mmd": mmd_rbf(a, b, seed=seed)}
    out.update({f"corr_{k}": v for k, v in gene_statistic_correlations(a, b).items()})
    if labels_a is not None and labels_b is not None:
        out["marker_overlap"] = marker_overlap(a, labels_a, b, labels_b, k=k_markers)["mean"]
    return out


__all__ = [
    "classifier_two_sample_auroc",
    "gene_statistic_correlations",
    "log_normalise",
    "marker_overlap",
    "mmd_rbf",
    "pooled_pca",
    "realism_metrics",
    "split_halves",
    "top_markers",
]
