"""Minibatches that carry one sampled k-nearest neighbour per cell.

A model that mixes each cell with a similar one (CLEAR-style augmentation in contrastive
learning) needs, in each minibatch, the counts of a neighbour of every cell. The neighbours are
found once, before training, from a fixed kNN table (:func:`knn_table`, on scanpy's PCA of the
log-normalised counts; :func:`streamed_knn_table`, an incremental PCA of row chunks read from
disk, for cells that are streamed), and :class:`NeighbourData` wraps a
:class:`~sclatent.data.CellData` or :class:`~sclatent.data.OnDiskCellData` so that each minibatch
it yields has ``batch.neighbour``: a minibatch of one neighbour per cell, drawn uniformly from the
cell's ``k`` neighbours. :func:`neighbour_data` does both for a model. The trainer sees an object
with the same ``iterate`` as ``CellData``; nothing else in the data path changes.

Layering: the top of :mod:`sclatent.data`: this file imports ``_counts``, ``registry``, ``loader``
and ``ondisk``, and nothing in the data package imports it.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterator, Sequence

import anndata as ad
import numpy as np
import torch

from ._counts import CountSource, clean_csr
from .loader import CellData, MiniBatch, WrappedData
from .ondisk import OnDiskCellData
from .registry import Registry, count_source

__all__ = ["EVALUATION_SEED", "NeighbourData", "knn_table", "neighbour_data", "streamed_knn_table"]

logger = logging.getLogger("sclatent")

#: Seed of the neighbour draws of non-shuffled passes (evaluation), so that they repeat exactly.
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
    numpy.ndarray
        ``(n_cells, k)`` int64 indices into the cells; a reference cell is never its own neighbour.
        ``k`` is capped at ``len(reference_cells) - 1``.
    """
    import scanpy as sc

    reference_cells = np.asarray(reference_cells, dtype=np.int64)
    k = _neighbour_count(reference_cells, n_neighbors)
    scratch = ad.AnnData(counts.copy().astype(np.float32))
    with warnings.catch_warnings():
        # empty cells were reported at registration; they are never reference cells (not trained on)
        warnings.filterwarnings("ignore", message="Some cells have zero counts")
        sc.pp.normalize_total(scratch, target_sum=1e4)
    sc.pp.log1p(scratch)
    n_comps = int(min(n_pcs, min(scratch.shape) - 1))
    sc.pp.pca(scratch, n_comps=n_comps, random_state=seed)
    return _nearest_reference_cells(scratch.obsm["X_pca"], reference_cells, k)


def _neighbour_count(reference_cells: np.ndarray, n_neighbors: int) -> int:
    """``k``: ``n_neighbors`` capped at ``len(reference_cells) - 1``, checked."""
    if len(reference_cells) < 2:
        raise ValueError("kNN neighbours need at least two reference cells.")
    k = int(min(n_neighbors, len(reference_cells) - 1))
    if k < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    return k


def _nearest_reference_cells(pcs: np.ndarray, reference_cells: np.ndarray, k: int) -> np.ndarray:
    """``(n_cells, k)`` int64: each cell's ``k`` nearest reference cells in ``pcs``, never itself."""
    from sklearn.neighbors import NearestNeighbors

    search = NearestNeighbors(n_neighbors=k + 1).fit(pcs[reference_cells])
    _, found = search.kneighbors(pcs)
    found = reference_cells[found]  # (n_cells, k + 1) cell indices, nearest first
    # drop each cell itself where it was found (a reference cell finds itself first), else the farthest
    is_self = found == np.arange(len(pcs))[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(len(pcs)), drop] = False
    return found[keep].reshape(len(pcs), k).astype(np.int64)


# Dense entries (cells x genes) of one chunk of the streamed PCA.
_PCA_CHUNK_ENTRIES = 2**23


def streamed_knn_table(
    source: CountSource,
    reference_cells: np.ndarray,
    n_neighbors: int = 15,
    n_pcs: int = 50,
) -> np.ndarray:
    """:func:`knn_table` for counts on disk, read in row chunks and never loaded whole.

    Each chunk is log-normalised as scanpy does it (``log1p(normalize_total(1e4))``); an
    ``sklearn.decomposition.IncrementalPCA`` is fitted over the chunks in one pass and projects
    them in a second. Memory: the ``(n_cells, n_pcs)`` components and one dense chunk of about
    ``2**23`` values. The components differ from scanpy's full PCA in the last digits (and in
    sign), so the table may differ from :func:`knn_table`'s in near ties.

    Parameters
    ----------
    source
        The counts (:func:`sclatent.data.registry.count_source`), on disk; its gene order is applied.
    reference_cells, n_neighbors, n_pcs
        As for :func:`knn_table` (the PCA has no random seed).
    """
    from sklearn.decomposition import IncrementalPCA

    reference_cells = np.asarray(reference_cells, dtype=np.int64)
    k = _neighbour_count(reference_cells, n_neighbors)
    reader = source.reader()
    n_cells, n_genes = source.n_cells, source.n_genes
    n_comps = int(min(n_pcs, min(n_cells, n_genes) - 1))
    rows = max(4 * n_comps, _PCA_CHUNK_ENTRIES // max(1, n_genes))
    # chunk bounds; a last chunk with fewer rows than components joins the one before (IncrementalPCA)
    bounds = [*range(0, n_cells, rows), n_cells]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < n_comps:
        del bounds[-2]

    def log_normalised() -> Iterator[tuple[int, np.ndarray]]:
        for start, stop in itertools.pairwise(bounds):
            chunk = reader.read(start, stop)
            if source.column_order is not None:
                chunk = chunk[:, source.column_order]
            chunk = clean_csr(chunk.copy())
            totals = np.asarray(chunk.sum(axis=1)).ravel()
            scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0).astype(np.float32)
            dense = chunk.toarray() * scale[:, None]
            yield start, np.log1p(dense, out=dense)

    pca = IncrementalPCA(n_components=n_comps)
    for _, chunk in log_normalised():
        pca.partial_fit(chunk)
    pcs = np.zeros((n_cells, n_comps), dtype=np.float32)
    for start, chunk in log_normalised():
        pcs[start : start + chunk.shape[0]] = pca.transform(chunk)
    return _nearest_reference_cells(pcs, reference_cells, k)


def neighbour_data(
    data: CellData | OnDiskCellData,
    adata: ad.AnnData,
    registry: Registry,
    reference_cells: np.ndarray,
    n_neighbors: int = 15,
    seed: int = 0,
) -> NeighbourData:
    """``data`` with one kNN neighbour per cell in each minibatch: the kNN table built and attached.

    Parameters
    ----------
    data
        The cells of ``adata`` (:func:`sclatent.data.ondisk.make_cell_data`).
    adata, registry
        Their AnnData and registry; the counts are read through ``data.source`` when the cells
        carry it (located when they were made), else located here (gene order of query data
        included).
    reference_cells
        The cells neighbours may be drawn from (the training cells).
    n_neighbors, seed
        ``k`` and the seed of the PCA (:func:`knn_table`).

    Notes
    -----
    Cells in memory (also when loaded from disk) get :func:`knn_table` of the whole matrix read
    into memory (scanpy's PCA: seeded, the same table as for the same counts in memory); cells
    streamed from disk get :func:`streamed_knn_table`, which never loads the matrix.
    """
    source = getattr(data, "source", None)
    source = count_source(adata, registry) if source is None else source
    if source.on_disk and isinstance(data, OnDiskCellData):
        logger.info(
            "sclatent: building the kNN table of %s by an incremental PCA of row chunks read from disk.", source.where
        )
        table = streamed_knn_table(source, reference_cells, n_neighbors=n_neighbors)
        return NeighbourData(data, table)
    matrix = source.matrix
    if source.on_disk:
        # the kNN table comes from a PCA of every cell: read the matrix once for it
        logger.warning(
            "sclatent: neighbour mixing reads the on-disk count matrix %s into memory once to build its kNN "
            "table (the cells are held in memory anyway; mix_max_weight=0 avoids this).",
            source.where,
        )
        matrix = source.in_memory().matrix
    if source.column_order is not None:
        matrix = matrix[:, source.column_order]
    table = knn_table(matrix, reference_cells, n_neighbors=n_neighbors, seed=seed)
    return NeighbourData(data, table)


class NeighbourData(WrappedData):
    """A :class:`CellData` (or :class:`OnDiskCellData`) whose minibatches carry one sampled kNN
    neighbour per cell.

    Parameters
    ----------
    data
        The cells.
    table
        ``(n_cells, k)`` int64 neighbour indices into ``data`` (e.g. from :func:`knn_table`).

    Notes
    -----
    ``iterate`` takes the arguments of :meth:`CellData.iterate`; each minibatch gets
    ``batch.neighbour``, the minibatch of ``table[cell, j]`` with ``j`` uniform in ``0..k-1``,
    drawn from ``generator`` in training passes (shuffled, or with explicit ``batch_sizes`` as a
    distributed rank's) and from a generator seeded with :data:`EVALUATION_SEED` otherwise.
    """

    def __init__(self, data: CellData | OnDiskCellData, table: np.ndarray) -> None:
        table = np.asarray(table)
        if table.ndim != 2 or table.shape[0] != data.n_cells or table.shape[1] < 1:
            raise ValueError(f"the neighbour table must be ({data.n_cells}, k >= 1), got shape {table.shape}.")
        if table.min() < 0 or table.max() >= data.n_cells:
            raise ValueError(f"neighbour indices must lie in [0, {data.n_cells}).")
        self.data = data
        self.table = torch.as_tensor(table, dtype=torch.int64)

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
