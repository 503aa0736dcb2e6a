"""The scVI paper's imputation protocol: hide some nonzero counts, train, score the hidden ones."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class Corruption:
    """A corrupted count matrix and what was hidden.

    Attributes
    ----------
    corrupted
        ``(n_cells, n_genes)`` CSR float32 counts to train on.
    rows, cols
        ``(n_hidden,)`` coordinates of the corrupted entries.
    original
        ``(n_hidden,)`` their true counts.
    """

    corrupted: sp.csr_matrix
    rows: np.ndarray
    cols: np.ndarray
    original: np.ndarray


def corrupt_counts(counts, rate: float = 0.1, method: str = "uniform", seed: int = 0) -> Corruption:
    """Hide a fraction ``rate`` of the nonzero entries of ``counts``.

    ``method="uniform"`` zeroes the chosen entries (the scVI paper's protocol);
    ``method="binomial"`` thins them to ``Binomial(x, 0.2)`` (each molecule kept with
    probability 0.2), a milder, more realistic loss. Never densifies the matrix.
    """
    if method not in ("uniform", "binomial"):
        raise ValueError(f"method must be 'uniform' or 'binomial', got {method!r}.")
    if not 0 < rate < 1:
        raise ValueError("rate must be in (0, 1).")
    rng = np.random.default_rng(seed)
    csr = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    csr.eliminate_zeros()
    n_hidden = round(rate * csr.nnz)
    chosen = np.sort(rng.choice(csr.nnz, size=n_hidden, replace=False))
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))[chosen]
    cols = csr.indices[chosen].astype(np.int64)
    original = csr.data[chosen].copy()
    if method == "uniform":
        csr.data[chosen] = 0.0
    else:
        csr.data[chosen] = rng.binomial(original.astype(np.int64), 0.2).astype(np.float32)
    csr.eliminate_zeros()
    return Corruption(corrupted=csr, rows=rows, cols=cols, original=original)


def median_l1(predicted: np.ndarray, corruption: Corruption) -> float:
    """Median absolute error between ``predicted[rows, cols]`` and the hidden counts.

    ``predicted`` is ``(n_cells, n_genes)`` (dense array or DataFrame) or already the
    ``(n_hidden,)`` values at the hidden positions.
    """
    predicted = np.asarray(predicted)
    values = predicted if predicted.ndim == 1 else predicted[corruption.rows, corruption.cols]
    return float(np.median(np.abs(values - corruption.original)))
