"""Imputation benchmarks: hide some entries of a count matrix, train on the rest, score the hidden ones.

Three ways of hiding entries (:func:`corrupt_counts`), each applied to a fraction ``rate`` of a
matrix's entries chosen uniformly at random, and never densifying the matrix:

``"uniform"``
    The scVI paper's protocol (Lopez et al. 2018): a fraction ``rate`` of the **nonzero** entries
    (exactly ``round(rate * nnz)`` of them) is set to zero. Only nonzero counts are scored.
``"entries"``
    A fraction ``rate`` of **all** entries (exactly ``round(rate * n_cells * n_genes)``), zeros
    included, is hidden: the hidden nonzeros are set to zero and every hidden entry is recorded, so
    the score also covers the true zeros at the hidden positions (where a predictor that
    over-imputes pays). Since most entries of a count matrix are zero, most hidden entries are.
``"binomial"``
    A fraction ``rate`` of the nonzero entries is thinned to ``Binomial(x, 0.2)`` (each molecule kept
    with probability 0.2), a milder, more realistic loss; thinned values never exceed the originals
    and may be zero or not.

:func:`median_l1` scores a prediction at the recorded entries against their original counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

CORRUPTION_METHODS: tuple[str, ...] = ("uniform", "entries", "binomial")
BINOMIAL_KEEP_PROBABILITY = 0.2


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
        ``(n_hidden,)`` their true counts (zeros included for ``method="entries"``).
    """

    corrupted: sp.csr_matrix
    rows: np.ndarray
    cols: np.ndarray
    original: np.ndarray


def _sample_without_replacement(rng: np.random.Generator, population: int, size: int) -> np.ndarray:
    """Sorted ``(size,)`` int64 sample of ``range(population)`` without replacement, in O(size) memory.

    Draws with replacement (oversampled), keeps the distinct values and takes a random subset of
    them: by exchangeability the result is a uniformly random ``size``-subset.
    """
    if size > population:
        raise ValueError(f"cannot draw {size} distinct values from {population}.")
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    if size > population // 2:  # dense regime: a permutation costs no more than the sample itself
        return np.sort(rng.permutation(population)[:size]).astype(np.int64)
    chosen = np.zeros(0, dtype=np.int64)
    while chosen.size < size:
        missing = size - chosen.size
        draw = rng.integers(0, population, size=int(missing * 1.2) + 64, dtype=np.int64)
        chosen = np.union1d(chosen, draw)
    if chosen.size > size:
        chosen = np.sort(rng.choice(chosen, size=size, replace=False))
    return chosen


def _row_of_nonzeros(csr: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))


def corrupt_counts(counts, rate: float = 0.1, method: str = "uniform", seed: int = 0) -> Corruption:
    """Hide a fraction ``rate`` of the entries of ``counts`` (see the module docstring).

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` counts, sparse or dense; left untouched.
    rate
        Fraction in ``(0, 1)``: of the nonzero entries (``"uniform"``, ``"binomial"``) or of all
        entries (``"entries"``).
    method
        ``"uniform"`` (zero hidden nonzeros; the scVI paper's protocol), ``"entries"`` (hide any
        entries, zeros included) or ``"binomial"`` (thin hidden nonzeros to ``Binomial(x, 0.2)``).
    seed
        Seed of the choice of entries (and of the thinning).

    Returns
    -------
    Corruption
        :class:`Corruption`: the corrupted CSR float32 matrix (explicit zeros removed) and the
        coordinates and original values of the hidden entries, in row-major order.
    """
    if method not in CORRUPTION_METHODS:
        raise ValueError(f"method must be one of {CORRUPTION_METHODS}, got {method!r}.")
    if not 0 < rate < 1:
        raise ValueError("rate must be in (0, 1).")
    rng = np.random.default_rng(seed)
    csr = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    csr.eliminate_zeros()
    if method == "entries":
        return _corrupt_entries(csr, rate, rng)
    n_hidden = round(rate * csr.nnz)
    chosen = np.sort(rng.choice(csr.nnz, size=n_hidden, replace=False))
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))[chosen]
    cols = csr.indices[chosen].astype(np.int64)
    original = csr.data[chosen].copy()
    if method == "uniform":
        csr.data[chosen] = 0.0
    else:
        thinned = rng.binomial(original.astype(np.int64), BINOMIAL_KEEP_PROBABILITY)
        csr.data[chosen] = thinned.astype(np.float32)
    csr.eliminate_zeros()
    return Corruption(corrupted=csr, rows=rows, cols=cols, original=original)


def _corrupt_entries(csr: sp.csr_matrix, rate: float, rng: np.random.Generator) -> Corruption:
    """``method="entries"``: hide ``round(rate * n_cells * n_genes)`` entries of any value."""
    csr.sum_duplicates()  # canonical: sorted column indices within each row, no duplicates
    n_cells, n_genes = csr.shape
    flat = _sample_without_replacement(rng, n_cells * n_genes, round(rate * n_cells * n_genes))
    rows, cols = flat // n_genes, flat % n_genes
    # Look the sampled positions up among the stored entries: the flat keys of a canonical CSR
    # matrix are sorted, so a binary search finds each one (or says it is a zero).
    keys = _row_of_nonzeros(csr) * n_genes + csr.indices.astype(np.int64)
    position = np.searchsorted(keys, flat)
    found = position < keys.size
    found[found] = keys[position[found]] == flat[found]
    original = np.zeros(flat.size, dtype=np.float32)
    original[found] = csr.data[position[found]]
    csr.data[position[found]] = 0.0
    csr.eliminate_zeros()
    return Corruption(corrupted=csr, rows=rows, cols=cols, original=original)


def median_l1(predicted: np.ndarray, corruption: Corruption) -> float:
    """Median absolute error between ``predicted[rows, cols]`` and the hidden counts.

    ``predicted`` is ``(n_cells, n_genes)`` (dense array or DataFrame) or already the
    ``(n_hidden,)`` values at the hidden positions. For ``method="entries"`` the hidden true zeros
    are scored too.
    """
    predicted = np.asarray(predicted)
    values = predicted if predicted.ndim == 1 else predicted[corruption.rows, corruption.cols]
    return float(np.median(np.abs(values - corruption.original)))
