"""Minibatches of counts, gathered on the compute device.

The count matrix is held as CSR tensors (``indptr``, ``indices``, ``values``); a minibatch is
gathered from them by row index with a handful of vectorised tensor ops, giving both the dense
``(B, G)`` counts the encoder reads and the nonzero coordinates the sparse likelihood uses. When
the matrix fits on the device it is moved there once and minibatches never touch the host; on
CPU the host *is* the device. Otherwise the CSR stays on the host and each gathered minibatch is
copied over (pinned, non-blocking).

Layering: this file imports :mod:`sclatent.data._counts` (the count matrix and its reading),
:mod:`sclatent.data.registry` (registry, obs codes) and :mod:`sclatent.contracts` (the
:class:`~sclatent.contracts.TrainingData` contract); ``ondisk`` and ``neighbours`` build on it.
:meth:`CellData.from_csr` is the one place a CSR matrix and per-cell codes become tensors: the
AnnData constructor and the on-disk buffers both go through it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from .. import _native
from ..contracts import TrainingData, checked_batch_sizes, index_tensor
from ._counts import CountSource
from .registry import Registry, count_source, encode_categorical, encode_continuous, encode_labels

__all__ = [
    "CellCodes",
    "CellData",
    "MiniBatch",
    "WrappedData",
    "checked_batch_sizes",
    "obs_codes",
    "resolve_device",
    "slice_minibatches",
]

# ``sclatent.contracts.index_tensor`` under its former name here
_index_tensor = index_tensor

# Fraction of free device memory the resident count matrix may take.
_DEVICE_MEMORY_FRACTION = 0.5
# Cells x genes gathered at once by ``CellData.iterate`` (then sliced into minibatches).
_GATHER_ENTRIES = 2**25


@dataclass
class MiniBatch:
    """One minibatch of cells, every tensor on the compute device.

    The counts are held sparse (models read the nonzeros); :attr:`counts` densifies on first use.

    Attributes
    ----------
    nz_row, nz_col, nz_val
        ``(nnz,)`` coordinates (int64) and values (float32) of the nonzero counts, sorted by row.
    nz_row_ptr
        ``(B + 1,)`` int64; cell ``b``'s nonzeros are ``nz_row_ptr[b]:nz_row_ptr[b + 1]`` (CSR).
    n_genes
        Number of genes ``G``.
    nz_log_factorial
        ``(nnz,)`` ``lgamma(nz_val + 1)``, precomputed once per dataset.
    library
        ``(B,)`` total counts per cell.
    batch_index, label_index
        ``(B,)`` int64 codes (zeros when no key was registered).
    categorical_covariates
        ``(B, K)`` int64 codes.
    continuous_covariates
        ``(B, C)`` float32.
    cell_index
        ``(B,)`` int64 row of each cell in the source AnnData.
    neighbour
        Optional minibatch of one neighbour per cell (row ``b`` is cell ``b``'s), attached by a
        wrapper such as :class:`sclatent.data.neighbours.NeighbourData` for models that mix a cell
        with a neighbour; None otherwise (and after :meth:`select_rows`).
    labelled
        Optional minibatch of labelled cells drawn alongside this one, attached in training by
        :class:`sclatent.data.labelled.LabelledData` for semi-supervised models (their classifier
        sees labels in every step however rare labels are); None otherwise.
    """

    nz_row: torch.Tensor
    nz_col: torch.Tensor
    nz_val: torch.Tensor
    nz_row_ptr: torch.Tensor
    n_genes: int
    nz_log_factorial: torch.Tensor
    library: torch.Tensor
    batch_index: torch.Tensor
    label_index: torch.Tensor
    categorical_covariates: torch.Tensor
    continuous_covariates: torch.Tensor
    cell_index: torch.Tensor
    neighbour: MiniBatch | None = None
    labelled: MiniBatch | None = None

    @property
    def size(self) -> int:
        return self.cell_index.numel()

    def covariates(self) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """What a covariate-injected layer reads: the batch and categorical codes (``(B,)`` each,
        batch first) and the continuous covariates (``(B, C)``, None when there are none)."""
        cats = [self.batch_index, *self.categorical_covariates.unbind(-1)]
        cont = self.continuous_covariates if self.continuous_covariates.shape[-1] else None
        return cats, cont

    def in_batch(self, code: int) -> MiniBatch:
        """These cells with every batch code set to ``code`` (counts and other covariates unchanged):
        what a decoder reads to give counterfactual expression in another batch."""
        return dataclasses.replace(self, batch_index=torch.full_like(self.batch_index, code))

    def select_rows(self, begin: int, end: int, row_ptr: list[int] | None = None) -> MiniBatch:
        """Cells ``begin:end`` of this minibatch as a minibatch (mostly views).

        ``row_ptr`` is ``nz_row_ptr`` as a list, if the caller has it (saves a device sync).
        """
        row_ptr = self.nz_row_ptr.tolist() if row_ptr is None else row_ptr
        lo, hi = row_ptr[begin], row_ptr[end]
        return MiniBatch(
            nz_row=self.nz_row[lo:hi] - begin,
            nz_col=self.nz_col[lo:hi],
            nz_val=self.nz_val[lo:hi],
            nz_row_ptr=self.nz_row_ptr[begin : end + 1] - lo,
            n_genes=self.n_genes,
            nz_log_factorial=self.nz_log_factorial[lo:hi],
            library=self.library[begin:end],
            batch_index=self.batch_index[begin:end],
            label_index=self.label_index[begin:end],
            categorical_covariates=self.categorical_covariates[begin:end],
            continuous_covariates=self.continuous_covariates[begin:end],
            cell_index=self.cell_index[begin:end],
        )

    @functools.cached_property
    def counts(self) -> torch.Tensor:
        """``(B, G)`` float32 dense counts."""
        dense = torch.zeros(self.size, self.n_genes, device=self.nz_val.device)
        dense[self.nz_row, self.nz_col] = self.nz_val
        return dense


def resolve_device(accelerator: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as given."""
    if accelerator in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator == "gpu":
        accelerator = "cuda"
    device = torch.device(accelerator)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"accelerator={accelerator!r} requested but CUDA is not available; use 'cpu' or 'auto'.")
    return device


class CellCodes(NamedTuple):
    """What a minibatch carries per cell besides the counts (tensors on one device).

    ``batch_index`` ``(n,)`` int64; ``label_index`` ``(n,)`` int64 (zeros when no labels key is
    registered or the column is absent, as in query data); ``categorical_covariates`` ``(n, K)``
    int64; ``continuous_covariates`` ``(n, C)`` float32.
    """

    batch_index: torch.Tensor
    label_index: torch.Tensor
    categorical_covariates: torch.Tensor
    continuous_covariates: torch.Tensor

    def take(self, rows: torch.Tensor) -> CellCodes:
        """The codes of cells ``rows`` (an index tensor on the codes' device)."""
        return CellCodes(*(codes[rows] for codes in self))


def obs_codes(adata: ad.AnnData, registry: Registry, device: torch.device) -> CellCodes:
    """The per-cell inputs a minibatch carries besides the counts, on ``device``.

    Returns
    -------
    CellCodes
        ``(batch_index, label_index, categorical_covariates, continuous_covariates)`` (a
        :class:`CellCodes`): ``(n,)`` int64, ``(n,)`` int64 (zeros when no key is registered or the
        labels column is absent, as in query data), ``(n, K)`` int64 and ``(n, C)`` float32.
    """
    n_cells = adata.n_obs

    def on_device(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device)

    zeros = np.zeros(n_cells, dtype=np.int64)
    batch_index = (
        encode_categorical(adata, registry.batch_key, registry.batch_categories, "batch_key")
        if registry.batch_key
        else zeros
    )
    has_labels = registry.labels_key and (registry.partial_labels or registry.labels_key in adata.obs.columns)
    label_index = encode_labels(adata, registry) if has_labels else zeros
    cats = [
        encode_categorical(adata, k, registry.categorical_covariate_categories[k], "categorical_covariate_keys")
        for k in registry.categorical_covariate_keys
    ]
    categorical = np.stack(cats, axis=1) if cats else np.zeros((n_cells, 0), dtype=np.int64)
    continuous = encode_continuous(adata, registry.continuous_covariate_keys)
    return CellCodes(on_device(batch_index), on_device(label_index), on_device(categorical), on_device(continuous))


def slice_minibatches(block: MiniBatch, sizes: Sequence[int]) -> Iterator[MiniBatch]:
    """Consecutive minibatches of ``sizes`` cells cut from one gathered ``block`` (mostly views)."""
    row_ptr = block.nz_row_ptr.tolist()
    offset = 0
    for size in sizes:
        yield block.select_rows(offset, offset + size, row_ptr)
        offset += size


# Counts below this get log(k!) from a table: lgamma in double precision was half the time of
# building an on-disk buffer. The table holds the same float32 numbers lgamma gives.
_LOG_FACTORIAL_TABLE_SIZE = 2**16
_log_factorial_table: dict[torch.device, torch.Tensor] = {}


def _log_factorial(values: torch.Tensor) -> torch.Tensor:
    """``(nnz,)`` float32 ``lgamma(values + 1)``, computed in double precision (looked up for small counts)."""
    if values.numel():
        top = float(values.max())
        if top < _LOG_FACTORIAL_TABLE_SIZE and float(values.min()) >= 0 and bool((values == values.floor()).all()):
            table = _log_factorial_table.get(values.device)
            if table is None:
                whole = torch.arange(_LOG_FACTORIAL_TABLE_SIZE, dtype=torch.float64, device=values.device)
                table = _log_factorial_table[values.device] = torch.lgamma(whole + 1.0).float()
            return table[values.long()]
    return torch.lgamma(values.double() + 1.0).float()


@dataclass
class _CSRCells:
    """What :meth:`CellData.from_csr` hands to ``CellData.__init__``."""

    csr: sp.csr_matrix
    codes: CellCodes
    library: torch.Tensor | None
    storage_note: str


class CellData(TrainingData):
    """The cells of a registered AnnData as tensors, ready to be cut into minibatches.

    Parameters
    ----------
    adata
        AnnData set up with ``setup_anndata`` (or query data matching ``registry``).
    registry
        The registry to read ``adata`` with (the model's, for query data).
    device
        Compute device.
    on_device
        Keep the CSR matrix on ``device``; ``None`` decides from its size and free memory.
    validate
        Check the counts (done already by ``setup_anndata`` for the training data).
    source
        The counts of ``adata`` already located (:func:`sclatent.data.registry.count_source`);
        default: located here. A matrix on disk is read into memory once.

    Notes
    -----
    :meth:`from_csr` builds one from a cleaned CSR matrix and per-cell codes instead (the on-disk
    buffers). ``source`` is kept (None for :meth:`from_csr`), so that what else reads the counts
    (a kNN table) needs not locate them again.
    """

    def __init__(
        self,
        adata: ad.AnnData | None,
        registry: Registry | None,
        device: torch.device | str = "cpu",
        on_device: bool | None = None,
        validate: bool = True,
        *,
        source: CountSource | None = None,
        _cells: _CSRCells | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.source = source
        if _cells is None:  # read the AnnData (from_csr passes its arrays instead)
            source = count_source(adata, registry) if source is None else source
            self.source = source
            # a backed h5ad / zarr small enough to hold (see ondisk.make_cell_data): read it once
            loaded = source.in_memory()
            if validate:
                loaded.check(registry.allow_non_integer)
            csr = loaded.to_csr()
            note = "loaded from disk into memory" if source.on_disk else ""
            _cells = _CSRCells(csr, obs_codes(adata, registry, self.device), None, note)
        self._store(_cells, on_device)

    @classmethod
    def from_csr(
        cls,
        csr: sp.csr_matrix,
        codes: CellCodes | Sequence[torch.Tensor],
        device: torch.device | str = "cpu",
        on_device: bool | None = None,
        library: torch.Tensor | None = None,
        storage_note: str = "",
    ) -> CellData:
        """Cells from a cleaned CSR matrix (float32, no duplicates or stored zeros:
        :func:`sclatent.data._counts.clean_csr`) and their codes.

        Parameters
        ----------
        csr
            ``(n_cells, n_genes)`` counts, in the model's gene order.
        codes
            ``(batch_index, label_index, categorical_covariates, continuous_covariates)`` of the
            cells (:class:`CellCodes`, as :func:`obs_codes` makes them), on ``device``.
        device, on_device
            As for the constructor.
        library
            ``(n_cells,)`` float32 total counts on ``device``; default: summed from ``csr``.
        storage_note
            Where the cells came from, shown in the progress bar.
        """
        codes = CellCodes(*codes)
        return cls(None, None, device, on_device, _cells=_CSRCells(csr, codes, library, storage_note))

    def _store(self, cells: _CSRCells, on_device: bool | None) -> None:
        csr = cells.csr
        self._n_cells, self.n_genes = csr.shape
        self.nnz = int(csr.nnz)
        self.storage_note = cells.storage_note
        self.on_device = self._decide_on_device(on_device)
        storage = self.device if self.on_device else torch.device("cpu")
        self._indptr = torch.from_numpy(csr.indptr.astype(np.int64)).to(storage)
        self._indices = torch.from_numpy(csr.indices.astype(np.int64)).to(storage)
        self._values = torch.from_numpy(csr.data).to(storage)
        # a constant of the data, needed by every likelihood evaluation: compute it once
        self._log_factorial = _log_factorial(self._values)
        if not self.on_device and self.device.type == "cuda":
            self._values = self._values.pin_memory()
            self._indices = self._indices.pin_memory()
            self._log_factorial = self._log_factorial.pin_memory()
        if cells.library is None:
            library = torch.from_numpy(np.asarray(csr.sum(axis=1), dtype=np.float32).ravel())
        else:
            library = cells.library
        self.library = library.to(self.device)
        (
            self.batch_index,
            self.label_index,
            self.categorical_covariates,
            self.continuous_covariates,
        ) = cells.codes

    @property
    def n_cells(self) -> int:
        return self._n_cells

    def _decide_on_device(self, on_device: bool | None) -> bool:
        if on_device is not None or self.device.type != "cuda":
            return True if on_device is None else on_device
        needed = self.nnz * 12 + (self.n_cells + 1) * 8
        free, _ = torch.cuda.mem_get_info(self.device)
        return needed < _DEVICE_MEMORY_FRACTION * free

    @property
    def nonempty_cells(self) -> np.ndarray:
        """Indices of cells with at least one count."""
        return np.flatnonzero(self.library.cpu().numpy() > 0)

    def with_labels(self, codes: np.ndarray | torch.Tensor) -> CellData:
        """A shallow copy whose ``label_index`` is ``codes`` (``(n_cells,)`` ints): e.g. another
        obs column's classes for fine-tuning. The counts and other codes are shared, not copied."""
        return _with_labels(self, codes)

    def gather(self, cell_index: torch.Tensor) -> MiniBatch:
        """The minibatch of cells ``cell_index`` (``(B,)`` int64, any device)."""
        storage = self._indptr.device
        rows = cell_index.to(storage)
        start = self._indptr[rows]
        lengths = self._indptr[rows + 1] - start
        total = int(lengths.sum())
        row_ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=storage)
        torch.cumsum(lengths, 0, out=row_ptr[1:])
        # (the kernel writes host tensors: only when the minibatch is built where the counts are)
        kernel = _native.kernels(storage, self._values.dtype) if storage.type == self.device.type else None
        if kernel is not None:
            rows = rows.contiguous()
            nz_col = torch.empty(total, dtype=torch.int64)
            nz_val = torch.empty(total, dtype=self._values.dtype)
            nz_log_factorial = torch.empty(total, dtype=self._log_factorial.dtype)
            nz_row = torch.empty(total, dtype=torch.int64)
            kernel.csr_gather_rows(
                rows.numel(),
                rows.data_ptr(),
                self._indptr.data_ptr(),
                self._indices.data_ptr(),
                self._values.data_ptr(),
                self._log_factorial.data_ptr(),
                row_ptr.data_ptr(),
                nz_col.data_ptr(),
                nz_val.data_ptr(),
                nz_log_factorial.data_ptr(),
                nz_row.data_ptr(),
                torch.get_num_threads(),
            )
            return self._minibatch(cell_index, nz_row, nz_col, nz_val, nz_log_factorial, row_ptr)
        nz_row = torch.repeat_interleave(torch.arange(rows.numel(), device=storage), lengths, output_size=total)
        # position of each nonzero in the CSR arrays: its row's start + its rank within the row
        first_of_row = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(total, device=storage) + torch.repeat_interleave(
            start - first_of_row, lengths, output_size=total
        )
        nz_col = self._indices[position]
        nz_val = self._values[position]
        nz_log_factorial = self._log_factorial[position]
        if storage != self.device:
            nz_log_factorial = nz_log_factorial.to(self.device, non_blocking=True)
            nz_row = nz_row.to(self.device, non_blocking=True)
            nz_col = nz_col.to(self.device, non_blocking=True)
            nz_val = nz_val.to(self.device, non_blocking=True)
        if storage != self.device:
            row_ptr = row_ptr.to(self.device, non_blocking=True)
        return self._minibatch(cell_index, nz_row, nz_col, nz_val, nz_log_factorial, row_ptr)

    def _minibatch(self, cell_index, nz_row, nz_col, nz_val, nz_log_factorial, row_ptr) -> MiniBatch:
        cell_index = cell_index.to(self.device)
        return MiniBatch(
            nz_row=nz_row,
            nz_col=nz_col,
            nz_val=nz_val,
            nz_row_ptr=row_ptr,
            n_genes=self.n_genes,
            nz_log_factorial=nz_log_factorial,
            library=self.library[cell_index],
            batch_index=self.batch_index[cell_index],
            label_index=self.label_index[cell_index],
            categorical_covariates=self.categorical_covariates[cell_index],
            continuous_covariates=self.continuous_covariates[cell_index],
            cell_index=cell_index,
        )

    def iterate(
        self,
        cells: np.ndarray | torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> Iterator[MiniBatch]:
        """Minibatches over ``cells`` (indices into this data), optionally in a seeded random order.

        ``batch_sizes`` (positive, summing to ``len(cells)``) sets the size of every minibatch
        explicitly, overriding ``batch_size`` and ``drop_last``; a distributed rank uses it for its
        parts of the global minibatches.
        """
        if shuffle:
            cells = self.epoch_order(cells, generator)
        cells = index_tensor(cells).to(self.device)
        n = cells.numel()
        if batch_sizes is not None:
            yield from self._iterate_sizes(cells, checked_batch_sizes(batch_sizes, n))
            return
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        # gather many minibatches at once and slice them out: a dozen tensor ops per chunk
        # instead of per minibatch (a tenth of a small model's step on CPU), memory still bounded
        chunk = batch_size * max(1, _GATHER_ENTRIES // max(1, batch_size * self.n_genes))
        for chunk_begin in range(0, stop, chunk):
            block = self.gather(cells[chunk_begin : min(stop, chunk_begin + chunk)])
            row_ptr = block.nz_row_ptr.tolist()
            for begin in range(0, block.size, batch_size):
                yield block.select_rows(begin, min(block.size, begin + batch_size), row_ptr)

    def _iterate_sizes(self, cells: torch.Tensor, sizes: list[int]) -> Iterator[MiniBatch]:
        """Minibatches of the given sizes over ``cells``, gathered several at a time (as :meth:`iterate`)."""
        budget = max(1, _GATHER_ENTRIES // max(1, self.n_genes))  # cells per gather
        first, begin = 0, 0
        while first < len(sizes):
            last, count = first + 1, sizes[first]
            while last < len(sizes) and count + sizes[last] <= budget:
                count += sizes[last]
                last += 1
            yield from slice_minibatches(self.gather(cells[begin : begin + count]), sizes[first:last])
            first, begin = last, begin + count


def _with_labels(data, codes: np.ndarray | torch.Tensor):
    """A shallow copy of ``data`` (cells in memory or on disk) with ``label_index`` set to ``codes``."""
    labels = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes, dtype=torch.int64)
    if labels.shape != (data.n_cells,):
        raise ValueError(f"expected one label code per cell ({data.n_cells},), got shape {tuple(labels.shape)}.")
    labelled = copy.copy(data)
    labelled.label_index = labels.to(data.device)
    return labelled


class WrappedData(TrainingData):
    """Base of the training-data wrappers that attach something to each minibatch of other cells
    (:class:`~sclatent.data.neighbours.NeighbourData`, :class:`~sclatent.data.labelled.LabelledData`):
    the cells, their storage and a shuffled epoch's order are the wrapped data's."""

    data: TrainingData

    @property
    def n_cells(self) -> int:
        return self.data.n_cells

    @property
    def storage_note(self) -> str:
        """The wrapped cells' (e.g. ``"streaming from disk"``)."""
        return self.data.storage_note

    def epoch_order(self, cells: np.ndarray | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The wrapped data's order (a wrapper draws nothing here)."""
        return self.data.epoch_order(cells, generator)

