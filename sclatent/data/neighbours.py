"""Minibatches that carry one sampled k-nearest neighbour per cell.

A model that mixes each cell with a similar one (CLEAR-style augmentation in contrastive
learning) needs, in each minibatch, the counts of a neighbour of every cell. The neighbours are
found once, before training, from a fixed kNN table (:func:`knn_table`, on scanpy's PCA of the
log-normalised counts), and :class:`NeighbourData` wraps a :class:`~sclatent.data.CellData` so
that each minibatch it yields has ``batch.neighbour``: a minibatch of one neighbour per cell,
drawn uniformly from the cell's ``k`` neighbours. The trainer sees an object with the same
``iterate`` as ``CellData``; nothing else in the data path changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .loader import CellData, MiniBatch

# Seed of the neighbour draws of non-shuffled passes (evaluation), so that they repeat exactly.
EVALUATION_SEED = 0


def knn_table(
    counts,
    reference_cells: np.ndarray,
    n_neighbors: int = 15,
    n_pcs: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Each cell's ``n_neighbors`` nearest reference cells in scanpy's PCA of its log counts.

    Parameters
    ----------
    counts
        ``(n_cells, G)`` counts (scipy sparse or dense).
    reference_cells
        Indices of the cells neighbours may be drawn from (the training cells: held-out cells never
        leak into a training view).
    n_neighbors
        ``k``.
    n_pcs
        Principal components of ``log1p(normalize_total(1e4))`` used for the distances (Euclidean).
    seed
        Seed of the PCA solver.

    Returns
    -------
    ``(n_cells, k)`` int64 indices into the cells; a reference cell is never its own neighbour.
    ``k`` is capped at ``len(reference_cells) - 1``.
    """
    import anndata as ad
    import scanpy as sc
    from sklearn.neighbors import NearestNeighbors

    reference_cells = np.asarray(reference_cells, dtype=np.int64)
    if len(reference_cells) < 2:
        raise ValueError("kNN neighbours need at least two reference cells.")
    k = int(min(n_neighbors, len(reference_cells) - 1))
    if k < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    scratch = ad.AnnData(counts.copy().astype(np.float32))
    with warnings.catch_warnings():
        # empty cells were reported at registration; they are never reference cells (not trained on)
        warnings.filterwarnings("ignore", message="Some cells have zero counts")
        sc.pp.normalize_total(scratch, target_sum=1e4)
    sc.pp.log1p(scratch)
    n_comps = int(min(n_pcs, min(scratch.shape) - 1))
    sc.pp.pca(scratch, n_comps=n_comps, random_state=seed)
    pcs = scratch.obsm["X_pca"]
    search = NearestNeighbors(n_neighbors=k + 1).fit(pcs[reference_cells])
    _, found = search.kneighbors(pcs)
    found = reference_cells[found]  # (n_cells, k + 1) cell indices, nearest first
    # drop each cell itself where it was found (a reference cell finds itself first), else the farthest
    is_self = found == np.arange(len(pcs))[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(len(pcs)), drop] = False
    return found[keep].reshape(len(pcs), k).astype(np.int64)


class NeighbourData:
    """A :class:`CellData` whose minibatches carry one sampled kNN neighbour per cell.

    Parameters
    ----------
    data
        The cells.
    table
        ``(n_cells, k)`` int64 neighbour indices into ``data`` (e.g. from :func:`knn_table`).

    ``iterate`` takes the arguments of :meth:`CellData.iterate`; each minibatch gets
    ``batch.neighbour``, the minibatch of ``table[cell, j]`` with ``j`` uniform in ``0..k-1``,
    drawn from ``generator`` in training passes (shuffled, or with explicit ``batch_sizes`` as a
    distributed rank's) and from a generator seeded with :data:`EVALUATION_SEED` otherwise.
    """

    def __init__(self, data: CellData, table: np.ndarray) -> None:
        table = np.asarray(table)
        if table.ndim != 2 or table.shape[0] != data.n_cells or table.shape[1] < 1:
            raise ValueError(f"the neighbour table must be ({data.n_cells}, k >= 1), got shape {table.shape}.")
        if table.min() < 0 or table.max() >= data.n_cells:
            raise ValueError(f"neighbour indices must lie in [0, {data.n_cells}).")
        self.data = data
        self.table = torch.as_tensor(table, dtype=torch.int64)

    @property
    def n_cells(self) -> int:
        return self.data.n_cells

    def epoch_order(self, cells: np.ndarray | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The wrapped data's :meth:`CellData.epoch_order` (the neighbours draw nothing here)."""
        return self.data.epoch_order(cells, generator)

    def iterate(
        self,
        cells: np.ndarray | torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> Iterator[MiniBatch]:
        training = shuffle or batch_sizes is not None
        if not training or generator is None:
            generator = torch.Generator().manual_seed(EVALUATION_SEED)
        k = self.table.shape[1]
        minibatches = self.data.iterate(
            cells, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last, batch_sizes=batch_sizes
        )
        for batch in minibatches:
            rows = batch.cell_index.cpu()
            pick = torch.randint(0, k, (rows.numel(),), generator=generator)
            batch.neighbour = self.data.gather(self.table[rows, pick])
            yield batch
