"""Model-free baselines every model result is printed beside: scanpy's PCA embedding, depth x gene
frequency, an NB likelihood reference, and neighbourhood imputation (kNN smoothing, MAGIC-like
diffusion)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln


def pca_embedding(adata, layer: str | None = None, n_comps: int = 50) -> np.ndarray:
    """Scanpy's standard PCA (normalize_total to 1e4, log1p, ``n_comps`` PCs) of ``adata``'s counts.

    Works on a copy (``adata`` is not touched); the embedding every learned one is compared with.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, min(n_comps, min(shape) - 1))`` float32.
    """
    import anndata as ad
    import scanpy as sc

    counts = adata.X if layer is None else adata.layers[layer]
    scratch = ad.AnnData(counts.copy())
    sc.pp.normalize_total(scratch, target_sum=1e4)
    sc.pp.log1p(scratch)
    n_comps = min(n_comps, min(scratch.shape) - 1)
    sc.pp.pca(scratch, n_comps=n_comps, random_state=0)
    return scratch.obsm["X_pca"]


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


def fit_nb_gene_model(counts, train_cells: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """The model-free NB reference fitted on ``train_cells``: gene frequencies and dispersions.

    Returns
    -------
    tuple
        ``(counts as CSR float64, library (n_cells,), frequency p_g (G,), theta_g (G,))``: ``p_g`` is
        gene g's share of the training counts, ``theta_g`` the method-of-moments inverse dispersion of
        the size-normalised training counts, clipped to [1e-2, 1e4].
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
    return csr, library, frequency, theta


def nb_log_pmf(x: np.ndarray, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """log NB(x | mean mu, inverse dispersion theta), elementwise (broadcasting), nats."""
    return (
        gammaln(x + theta)
        - gammaln(theta)
        - gammaln(x + 1)
        + theta * (np.log(theta) - np.log(theta + mu))
        + x * (np.log(mu) - np.log(theta + mu))
    )


def nb_baseline_log_likelihood(counts, train_cells: np.ndarray, test_cells: np.ndarray) -> float:
    """Mean log-likelihood per test cell (nats) under NB(library * p_g, theta_g).

    ``p_g`` and the per-gene inverse dispersion ``theta_g`` (:func:`fit_nb_gene_model`) are
    estimated on ``train_cells``: a model-free reference for the held-out likelihoods of the
    latent-variable models.
    """
    csr, library, frequency, theta = fit_nb_gene_model(counts, train_cells)
    total = 0.0
    for start in range(0, len(test_cells), 512):
        cells = test_cells[start : start + 512]
        mu = np.maximum(library[cells], 1.0)[:, None] * frequency[None, :]
        total += nb_log_pmf(csr[cells].toarray(), mu, theta).sum()
    return float(total / max(1, len(test_cells)))


# ---------------------------------------------------------------------------- neighbourhood imputation

# Counts per cell after library normalisation, before log1p, for the PCA of the kNN graph (scanpy's default).
_PCA_TARGET_SUM = 1e4
# Cells per block when the smoothed profiles are formed densely.
_ROW_CHUNK = 2048


def _library_and_profiles(counts) -> tuple[sp.csr_matrix, np.ndarray, sp.csr_matrix]:
    """``(counts as CSR float64, library (n_cells,), profiles = counts / library)``; empty cells keep a
    zero profile."""
    csr = sp.csr_matrix(counts, dtype=np.float64)
    library = np.asarray(csr.sum(axis=1)).ravel()
    profiles = sp.diags(1.0 / np.maximum(library, 1e-12) * (library > 0)) @ csr
    return csr, library, sp.csr_matrix(profiles)


def _pca_neighbors(
    csr: sp.csr_matrix, library: np.ndarray, n_neighbors: int, n_comps: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """kNN of each cell in the PCA (``n_comps``, or fewer when small) of ``log1p(counts / library * 1e4)``.

    Returns ``(indices, distances)``, both ``(n_cells, k)`` with ``k = min(n_neighbors, n_cells - 1)``,
    the cell itself excluded, nearest first.
    """
    import scanpy as sc
    from sklearn.neighbors import NearestNeighbors

    n_cells, n_genes = csr.shape
    k = min(n_neighbors, n_cells - 1)
    if k < 1:
        raise ValueError("need at least two cells for a neighbour graph.")
    logn = sp.csr_matrix(sp.diags(_PCA_TARGET_SUM / np.maximum(library, 1e-12) * (library > 0)) @ csr)
    logn.data = np.log1p(logn.data)
    comps = min(n_comps, n_cells - 1, n_genes - 1)
    if comps >= 1:
        embedding = np.asarray(sc.pp.pca(logn.astype(np.float32), n_comps=comps, random_state=seed), np.float64)
    else:  # a single gene (or cell): the data themselves
        embedding = logn.toarray()
    distances, indices = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    # Drop the cell itself; with duplicate cells it need not come first, or at all (then drop the last).
    not_self = indices != np.arange(n_cells)[:, None]
    keep = not_self & (np.cumsum(not_self, axis=1) <= k)
    return indices[keep].reshape(n_cells, k), distances[keep].reshape(n_cells, k)


def _predict_from_profiles(
    smoothed_rows, library: np.ndarray, n_genes: int, rows: np.ndarray | None, cols: np.ndarray | None
) -> np.ndarray:
    """``library_c * smoothed profile`` densely (``(n_cells, n_genes)`` float32) or at ``(rows, cols)``.

    ``smoothed_rows(start, stop)`` returns the dense ``(stop - start, n_genes)`` profiles of a block.
    """
    n_cells = library.size
    if (rows is None) != (cols is None):
        raise ValueError("pass both rows and cols, or neither.")
    if rows is None:
        out = np.empty((n_cells, n_genes), dtype=np.float32)
        for start in range(0, n_cells, _ROW_CHUNK):
            stop = min(n_cells, start + _ROW_CHUNK)
            out[start:stop] = smoothed_rows(start, stop) * library[start:stop, None]
        return out
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    if rows.shape != cols.shape:
        raise ValueError("rows and cols must have the same shape.")
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    values = np.zeros(rows.size, dtype=np.float64)
    for start in range(0, n_cells, _ROW_CHUNK):
        stop = min(n_cells, start + _ROW_CHUNK)
        lo, hi = np.searchsorted(sorted_rows, [start, stop])
        if lo == hi:
            continue
        block = smoothed_rows(start, stop)
        sel = order[lo:hi]
        values[sel] = block[rows[sel] - start, cols[sel]] * library[rows[sel]]
    return values


def knn_smoothing_predictor(
    counts,
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
    n_neighbors: int = 15,
    n_comps: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """kNN smoothing: a cell's library times the mean normalised profile of itself and its neighbours.

    The neighbours are the ``n_neighbors`` nearest cells (Euclidean) in the first ``n_comps``
    principal components (fewer for small data) of ``log1p(counts / library * 1e4)``; the profile of
    a cell is ``counts / library``. The predicted count of gene g in cell c is
    ``library_c * mean_{j in {c} + kNN(c)} counts_jg / library_j``.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` (corrupted) counts, sparse or dense.
    rows, cols
        Entries to predict (``(n,)`` each); default: the whole matrix.
    n_neighbors, n_comps
        Neighbours per cell (capped at ``n_cells - 1``) and principal components.
    seed
        Seed of the PCA solver.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_genes)`` float32, or ``(n,)`` float64 values at ``(rows, cols)``.
    """
    csr, library, profiles = _library_and_profiles(counts)
    n_cells, n_genes = csr.shape
    neighbors, _ = _pca_neighbors(csr, library, n_neighbors, n_comps, seed)
    k = neighbors.shape[1]
    members = np.concatenate([np.arange(n_cells)[:, None], neighbors], axis=1)
    average = sp.csr_matrix(
        (np.full(members.size, 1.0 / (k + 1)), members.ravel(), np.arange(0, members.size + 1, k + 1)),
        shape=(n_cells, n_cells),
    )

    def smoothed_rows(start: int, stop: int) -> np.ndarray:
        return (average[start:stop] @ profiles).toarray()

    return _predict_from_profiles(smoothed_rows, library, n_genes, rows, cols)


def diffusion_operator(counts, n_neighbors: int = 15, n_comps: int = 50, seed: int = 0) -> sp.csr_matrix:
    """MAGIC-like Markov matrix ``(n_cells, n_cells)`` (rows sum to 1) on the kNN graph of
    :func:`knn_smoothing_predictor`.

    Adaptive Gaussian kernel: ``w_ij = exp(-(d_ij / sigma_i)^2)`` for the ``n_neighbors`` nearest
    cells j of i, with ``sigma_i`` the distance to i's farthest one; symmetrised
    (``(W + W^T) / 2``), self-loops of weight 1, normalised by row.
    """
    csr, library, _ = _library_and_profiles(counts)
    n_cells = csr.shape[0]
    neighbors, distances = _pca_neighbors(csr, library, n_neighbors, n_comps, seed)
    k = neighbors.shape[1]
    sigma = np.maximum(distances[:, -1:], 1e-12)
    weights = np.exp(-((distances / sigma) ** 2))
    kernel = sp.csr_matrix(
        (weights.ravel(), neighbors.ravel(), np.arange(0, neighbors.size + 1, k)), shape=(n_cells, n_cells)
    )
    kernel = sp.csr_matrix(0.5 * (kernel + kernel.T) + sp.identity(n_cells, format="csr"))
    degree = np.asarray(kernel.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / degree) @ kernel)


def diffusion_predictor(
    counts,
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
    n_neighbors: int = 15,
    t: int = 3,
    n_comps: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """MAGIC-like diffusion: a cell's library times its normalised profile diffused ``t`` steps.

    The Markov matrix ``M`` of :func:`diffusion_operator` is applied ``t`` times to the normalised
    profiles ``counts / library`` (no log or square root, so the result is still a profile whose
    entries sum to 1 per cell); the predicted count is ``library_c * (M^t P)_cg``. Unlike MAGIC, the
    diffusion acts on proportions, so the prediction is on the count scale.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` (corrupted) counts, sparse or dense.
    rows, cols
        Entries to predict (``(n,)`` each); default: the whole matrix.
    n_neighbors, n_comps
        Neighbours per cell and principal components of the graph (see :func:`knn_smoothing_predictor`).
    t
        Diffusion steps (>= 1).
    seed
        Seed of the PCA solver.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_genes)`` float32, or ``(n,)`` float64 values at ``(rows, cols)``. Holds two dense
        ``(n_cells, n_genes)`` float32 intermediates when ``t >= 2``.
    """
    if t < 1:
        raise ValueError(f"t must be >= 1, got {t}.")
    csr, library, profiles = _library_and_profiles(counts)
    n_cells, n_genes = csr.shape
    markov = diffusion_operator(csr, n_neighbors=n_neighbors, n_comps=n_comps, seed=seed)
    state = None  # dense M^(s) P after s steps, for s = 1 .. t - 1
    if t >= 2:
        state = np.empty((n_cells, n_genes), dtype=np.float32)
        for start in range(0, n_cells, _ROW_CHUNK):
            stop = min(n_cells, start + _ROW_CHUNK)
            state[start:stop] = (markov[start:stop] @ profiles).toarray()
        markov32 = markov.astype(np.float32)
        for _ in range(t - 2):
            state = markov32 @ state

    def smoothed_rows(start: int, stop: int) -> np.ndarray:
        if state is None:
            return (markov[start:stop] @ profiles).toarray()
        return markov[start:stop] @ state

    return _predict_from_profiles(smoothed_rows, library, n_genes, rows, cols)
