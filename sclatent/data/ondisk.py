"""Out-of-core cells: minibatches streamed from a count matrix on disk, with bounded memory.

A backed AnnData (``anndata.read_h5ad(path, backed="r")``) or a zarr store (:func:`read_backed`)
keeps its count matrix on disk as CSR (``indptr``, ``indices``, ``data`` arrays). When that
matrix would not fit comfortably in RAM, :func:`make_cell_data` returns an
:class:`OnDiskCellData`, which has the interface the trainer and the models use from
:class:`~sclatent.data.CellData` (``iterate``, ``epoch_order``, ``gather``, ``n_cells``,
``n_genes``, ``nonempty_cells``, ``with_labels``, ``library`` and the per-cell codes: both are
:class:`~sclatent.contracts.TrainingData`) but reads the matrix in contiguous row ranges, a
buffer at a time; otherwise the matrix is loaded and the in-memory :class:`~sclatent.data.CellData`
is used (the default path when the data fit).

Epoch order (block sampling, as in scDataset): the sorted cells are cut into blocks of
``block_size`` consecutive cells, the blocks are put in a seeded random order, and each run of
``fetch_factor`` blocks (a buffer) is shuffled cell by cell. A buffer is read as ``fetch_factor``
contiguous row ranges (two array slices each; for a subset of the cells, such as the training
split, wanted rows closer than ``merge_gap`` are read as one range and the rows between dropped),
so disk reads stay sequential while a minibatch still mixes cells from ``fetch_factor`` places in
the file.

Why not the ``scdataset`` package (0.3.0, read in full): its ``scDataset`` is a torch
``IterableDataset`` built for a ``DataLoader``. (1) Its shuffling comes from its own numpy RNG,
seeded from a base seed plus an internal epoch counter that advances on every ``iter()``; our
trainer draws every epoch's randomness from one ``torch.Generator`` (checkpoints save and restore
it), and ``iterate(shuffle=True, generator=g)`` must equal ``iterate(epoch_order(cells, g))`` for
distributed training; neither can be expressed through its API. (2) It cuts minibatches within
each fetch, so a fetch that is not a multiple of the batch size yields a short minibatch per
fetch (and ``drop_last`` drops cells per fetch): the number of steps and the cells seen per
epoch differ from the in-memory path, and explicit per-rank ``batch_sizes`` are not supported.
(3) It detects ``torch.distributed`` itself and splits fetches round-robin across ranks, which
would fight our own distributed split. What we would reuse is about thirty lines (block
permutation + shuffle within a buffer); the reading, CSR assembly and minibatch building are ours
in either case. So we write it here rather than add a dependency.

Memory: per-cell vectors stay in memory, about 36 bytes per cell (the CSR ``indptr``, 8 bytes;
library size, 4; batch and label codes, 8 each; the covariates; the cell order of an epoch, 8);
10 million cells take about 360 MB. The count matrix itself is never loaded: at most one buffer
(``block_size * fetch_factor`` cells, plus up to ``merge_gap`` skipped rows per contiguous run)
is held at a time.

Layering: this file imports :mod:`sclatent.data._counts` (on-disk reading: :class:`DiskMatrix`,
``is_on_disk``, ``load_into_memory``, ``row_totals``, re-exported here), ``registry`` and
``loader`` (a buffer is a small :class:`~sclatent.data.CellData` made by ``CellData.from_csr``);
only ``neighbours`` builds on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..contracts import TrainingData, minibatch_sizes
from ._counts import (
    CountSource,
    DiskMatrix,
    clean_csr,
    is_on_disk,
    load_into_memory,
    refuse_csc,
    row_totals,
)
from .loader import CellData, MiniBatch, _with_labels, obs_codes, slice_minibatches
from .registry import Registry, check_counts, count_source

__all__ = [
    "DiskMatrix",
    "MatrixWriter",
    "OnDiskCellData",
    "OnDiskSettings",
    "available_memory",
    "is_on_disk",
    "load_into_memory",
    "make_cell_data",
    "ondisk_settings",
    "read_backed",
    "refuse_csc",
    "row_totals",
]

logger = logging.getLogger("sclatent")

# ``sclatent.contracts.minibatch_sizes`` under its former name here
_minibatch_sizes = minibatch_sizes


@dataclass
class OnDiskSettings:
    """User-adjustable settings of the on-disk path (``sclatent.data.ondisk_settings``).

    Attributes
    ----------
    in_memory_max_bytes
        A backed matrix whose in-memory footprint (about 24 bytes per nonzero) is below this many
        bytes is loaded into memory; above it, it is streamed. ``None`` (default) uses
        ``in_memory_fraction`` of the RAM available when the data are first used. Set ``0`` to
        always stream, ``float("inf")`` to always load.
    in_memory_fraction
        Fraction of the available RAM (``os.sysconf``) used when ``in_memory_max_bytes`` is None.
    block_size
        Consecutive cells read as one block. Measured on a 60k x 2k CSR h5ad (400 nonzeros per cell,
        page cache warm, one busy core), raw reads of random blocks: 8.5k rows/s at 1 row per
        block, 120k at 16, 390k at 64, 840k at 256 (anndata's row slicing: 12k at 64); shuffled
        128-cell minibatches out of ``iterate`` with 4096-cell buffers: 14k cells/s at 1, 47k at 16,
        59k at 64, 67k at 256, about the in-memory path's 54k, against 2.8k cells/s for the VAE's
        training steps on the same data. 64 is within 10% of the fastest while a minibatch still
        draws from ~64 places in the file (the time is noisy on the shared 2-core test machine).
    fetch_factor
        Blocks per buffer (shuffled together cell by cell). 64 blocks of 64 cells: a 4096-cell
        buffer, ~20 MB at 400 nonzeros per cell.
    merge_gap
        Two wanted row runs closer than this many rows are read as one range (the rows between are
        read and dropped): one disk request costs more than a few rows of data.
    """

    in_memory_max_bytes: float | None = None
    in_memory_fraction: float = 0.5
    block_size: int = 64
    fetch_factor: int = 64
    merge_gap: int = 16


ondisk_settings = OnDiskSettings()


# ----------------------------------------------------------------------------- reading


def read_backed(path: str | os.PathLike) -> ad.AnnData:
    """Open an ``.h5ad`` file or a ``.zarr`` store with its count matrices left on disk.

    ``.h5ad``: ``anndata.read_h5ad(path, backed="r")`` (``X`` stays on disk; anndata loads the
    layers into memory). ``.zarr``: an AnnData whose ``X`` and sparse layers are
    ``anndata.io.sparse_dataset`` views of the store (read lazily), with ``obs``, ``var`` and
    ``uns`` in memory; dense layers and ``obsm``/``varm``/``obsp`` are not attached (read them
    with ``anndata.io.read_elem`` if needed). Nothing is ever written to the file or store.

    Examples
    --------
    >>> adata = sclatent.data.read_backed("atlas.zarr")
    >>> sclatent.model.VAE.setup_anndata(adata, batch_key="donor")
    >>> sclatent.model.VAE(adata).train()  # streamed from disk when it would not fit in RAM
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.suffix == ".h5ad":
        return ad.read_h5ad(path, backed="r")
    if path.suffix != ".zarr" and not (path / "zarr.json").exists() and not (path / ".zgroup").exists():
        raise ValueError(f"{path}: expected an .h5ad file or a .zarr store (directory).")
    import zarr

    store = zarr.open_group(path, mode="r")
    read = ad.io.read_elem

    def lazy(element):
        encoding = element.attrs.get("encoding-type")
        return ad.io.sparse_dataset(element) if encoding in ("csr_matrix", "csc_matrix") else None

    x = lazy(store["X"]) if "X" in store else None
    if x is None and "X" in store:
        x = store["X"]  # dense on disk: streamed by row ranges
    layers = {}
    if "layers" in store:
        for name in store["layers"]:
            matrix = lazy(store["layers"][name])
            if matrix is not None:
                layers[name] = matrix
    uns = read(store["uns"]) if "uns" in store else {}
    return ad.AnnData(X=x, obs=read(store["obs"]), var=read(store["var"]), uns=uns, layers=layers or None)


# ----------------------------------------------------------------------------- automatic choice


def available_memory() -> int:
    """Bytes of RAM available now (``os.sysconf``; 0 where the platform cannot tell)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def _megabytes(n: float) -> str:
    if n == float("inf"):
        return "unlimited"
    return f"{n / 1e6:,.1f} MB" if n < 1e10 else f"{n / 1e9:,.1f} GB"


def make_cell_data(
    adata: ad.AnnData,
    registry: Registry,
    device: torch.device | str = "cpu",
    on_device: bool | None = None,
    validate: bool = True,
    in_memory: bool | None = None,
    source: CountSource | None = None,
) -> CellData | OnDiskCellData:
    """The cells of ``adata``: in memory (:class:`CellData`) unless the matrix is on disk and too big.

    An in-memory AnnData always gives a :class:`CellData`. A matrix on disk (backed h5ad, zarr) is
    loaded into memory when its estimated footprint is below ``ondisk_settings.in_memory_max_bytes``
    (default: ``in_memory_fraction`` of the available RAM), else streamed by an
    :class:`OnDiskCellData`. The choice and the sizes are logged (logger ``"sclatent"``, INFO) and
    kept on the returned object as ``storage_note`` (shown in the training progress bar).

    Parameters
    ----------
    in_memory
        Force the choice (True: load, False: stream); None decides from the size.
    source
        The counts of ``adata`` already located (:func:`sclatent.data.registry.count_source`);
        default: located here, once, and handed to the cells (``data.source``).
    """
    source = count_source(adata, registry) if source is None else source
    if not source.on_disk:
        return CellData(adata, registry, device, on_device, validate=validate, source=source)
    reader = source.reader()  # refuses CSC with the fix
    needed = reader.in_memory_bytes
    if in_memory is None:
        limit = ondisk_settings.in_memory_max_bytes
        if limit is None:
            limit = ondisk_settings.in_memory_fraction * available_memory()
        in_memory = needed <= limit
        reason = f"in-memory limit {_megabytes(limit)}"
    else:
        reason = "as requested"
    layout = f"CSR, {reader.nnz:,} nonzeros" if reader.sparse else "dense"
    choice = "loading it into memory" if in_memory else "streaming it from disk"
    logger.info(
        "sclatent: %s is on disk (%d cells x %d genes, %s, %s on disk, ~%s in memory; %s): %s.",
        source.where,
        reader.shape[0],
        reader.shape[1],
        layout,
        _megabytes(reader.disk_bytes),
        _megabytes(needed),
        reason,
        choice,
    )
    if in_memory:  # storage_note "loaded from disk into memory"
        return CellData(adata, registry, device, on_device, validate=validate, source=source)
    return OnDiskCellData(adata, registry, device, validate=validate, source=source, reader=reader)


# ----------------------------------------------------------------------------- the cells


class OnDiskCellData(TrainingData):
    """The cells of a registered AnnData whose count matrix stays on disk (CSR, or dense by rows).

    Per-cell vectors live in memory (about 36 bytes per cell: ``indptr``, library size, codes,
    covariates); the count matrix is read a buffer at a time (see the module docstring). The
    constructor makes one chunked pass over the matrix that validates the counts and computes the
    library sizes (and so the non-empty cells).

    Parameters
    ----------
    adata
        Set-up AnnData whose counts (``X`` or the registered layer) are an ``anndata.abc.CSRDataset``
        (backed h5ad, :func:`read_backed` zarr) or a dense h5py/zarr array.
    registry
        The registry to read ``adata`` with (the model's, for query data).
    device
        Compute device; minibatches are built there.
    validate
        Check the counts during the pass (cheap next to the reading; always on by default).
    block_size, fetch_factor, merge_gap
        See :class:`OnDiskSettings` (defaults from ``ondisk_settings``).
    source, reader
        The counts of ``adata`` already located (:func:`sclatent.data.registry.count_source`) and
        their :class:`DiskMatrix`; default: made here. ``source`` is kept as ``data.source``.
    """

    storage_note = "streaming from disk"
    on_device = False

    def __init__(
        self,
        adata: ad.AnnData,
        registry: Registry,
        device: torch.device | str = "cpu",
        validate: bool = True,
        block_size: int | None = None,
        fetch_factor: int | None = None,
        merge_gap: int | None = None,
        *,
        source: CountSource | None = None,
        reader: DiskMatrix | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.source = count_source(adata, registry) if source is None else source
        if not self.source.on_disk:
            raise ValueError(f"{self.source.where} is in memory: use CellData (or make_cell_data) for it.")
        self._reader = self.source.reader() if reader is None else reader
        self._column_order = self.source.column_order
        self._n_cells = self._reader.shape[0]
        self.n_genes = registry.n_genes
        self.block_size = int(block_size or ondisk_settings.block_size)
        self.fetch_factor = int(fetch_factor or ondisk_settings.fetch_factor)
        self.merge_gap = int(ondisk_settings.merge_gap if merge_gap is None else merge_gap)
        if self.block_size < 1 or self.fetch_factor < 1 or self.merge_gap < 0:
            raise ValueError("block_size and fetch_factor must be >= 1 and merge_gap >= 0.")

        library = np.zeros(self.n_cells, dtype=np.float32)
        nnz = 0

        def chunks() -> Iterator[tuple[int, np.ndarray, sp.csr_matrix]]:
            # one pass: check_counts reads the raw chunks, the library comes from the same chunks
            # cleaned exactly as the in-memory path cleans its matrix (so the sizes match bit for bit)
            nonlocal nnz
            for start, chunk in self._reader.chunks():
                if self._column_order is not None:
                    chunk = chunk[:, self._column_order]
                clean = clean_csr(chunk.copy())
                library[start : start + clean.shape[0]] = np.asarray(clean.sum(axis=1), dtype=np.float32).ravel()
                nnz += clean.nnz
                yield start, chunk.data, chunk

        if validate:
            check_counts(self.source.matrix, self.source.where, registry.allow_non_integer, chunks=chunks())
        else:
            for _ in chunks():
                pass
        self.nnz = nnz

        self.library = torch.from_numpy(library).to(self.device)
        (
            self.batch_index,
            self.label_index,
            self.categorical_covariates,
            self.continuous_covariates,
        ) = obs_codes(adata, registry, self.device)
        # what the last window read (rows, runs): lets tests and benchmarks check the memory bound
        self.last_read: tuple[int, int] = (0, 0)

    @property
    def n_cells(self) -> int:
        return self._n_cells

    @staticmethod
    def _clean(csr: sp.csr_matrix) -> sp.csr_matrix:
        """float32, duplicates summed, stored zeros dropped: :func:`sclatent.data._counts.clean_csr`."""
        return clean_csr(csr)

    @property
    def buffer_cells(self) -> int:
        """Cells per buffer: ``block_size * fetch_factor``."""
        return self.block_size * self.fetch_factor

    @property
    def nonempty_cells(self) -> np.ndarray:
        """Indices of cells with at least one count."""
        return np.flatnonzero(self.library.cpu().numpy() > 0)

    def with_labels(self, codes: np.ndarray | torch.Tensor) -> OnDiskCellData:
        """A shallow copy whose ``label_index`` is ``codes`` (``(n_cells,)`` ints), as :meth:`CellData.with_labels`."""
        return _with_labels(self, codes)

    # ----------------------------------------------------------------- order

    def epoch_order(self, cells: np.ndarray | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n,)`` int64: the order in which a shuffled epoch visits ``cells`` (block sampling).

        The sorted ``cells`` are cut into blocks of ``block_size`` consecutive cells; the blocks
        are permuted, and every ``fetch_factor`` consecutive blocks of that permutation (a buffer)
        are shuffled cell by cell. All randomness comes from ``generator`` (CPU), so the same
        generator state gives the same order, and ``iterate(cells, shuffle=True, generator=g)``
        visits ``epoch_order(cells, g)``.
        """
        cells = np.sort(_as_numpy(cells))
        n = cells.size
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        n_blocks = -(-n // self.block_size)
        blocks = torch.randperm(n_blocks, generator=generator).numpy()
        # positions of the blocks' cells, block after block in the permuted order
        positions = (blocks[:, None] * self.block_size + np.arange(self.block_size)[None, :]).ravel()
        positions = positions[positions < n]
        sizes = np.minimum(self.block_size, n - blocks * self.block_size)
        ends = np.cumsum(sizes)[self.fetch_factor - 1 :: self.fetch_factor].tolist()
        if not ends or ends[-1] != n:
            ends.append(n)
        order, begin = [], 0
        for end in ends:
            within = torch.randperm(end - begin, generator=generator).numpy()
            order.append(positions[begin:end][within])
            begin = end
        return torch.from_numpy(cells[np.concatenate(order)])

    # ----------------------------------------------------------------- reading

    def _read_window(self, cells: np.ndarray) -> tuple[CellData, np.ndarray]:
        """The rows of ``cells`` (any order, repeats allowed) read as contiguous runs.

        Returns the buffer (the distinct cells, sorted, as a small :class:`CellData` on the device)
        and each cell's local row in it.
        """
        wanted = np.unique(cells)
        breaks = np.flatnonzero(np.diff(wanted) > self.merge_gap + 1) + 1
        starts = wanted[np.r_[0, breaks]]
        stops = wanted[np.r_[breaks - 1, wanted.size - 1]] + 1
        csr = self._reader.read_runs(starts, stops)
        lengths = stops - starts
        self.last_read = (int(lengths.sum()), int(starts.size))
        if csr.shape[0] > wanted.size:
            # drop the rows read only to merge runs before any per-value work
            offsets = np.cumsum(lengths) - lengths
            run = np.searchsorted(starts, wanted, side="right") - 1
            csr = csr[offsets[run] + wanted - starts[run]]
        if self._column_order is not None:
            csr = csr[:, self._column_order]
        local = torch.from_numpy(wanted).to(self.device)
        codes = (self.batch_index, self.label_index, self.categorical_covariates, self.continuous_covariates)
        # a buffer is small: put it where the minibatches are gathered, as the in-memory path does
        buffer = CellData.from_csr(
            clean_csr(csr),
            [c[local] for c in codes],
            self.device,
            on_device=True,
            library=self.library[local],
            storage_note=self.storage_note,
        )
        return buffer, np.searchsorted(wanted, cells)

    def gather(self, cell_index: torch.Tensor) -> MiniBatch:
        """The minibatch of cells ``cell_index`` (``(B,)`` int64), read from disk."""
        cells = _as_numpy(cell_index)
        buffer, local = self._read_window(cells)
        batch = buffer.gather(torch.from_numpy(local))
        batch.cell_index = torch.from_numpy(cells).to(self.device)
        return batch

    def iterate(
        self,
        cells: np.ndarray | torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> Iterator[MiniBatch]:
        """Minibatches over ``cells``, read from disk a buffer at a time.

        Parameters
        ----------
        cells
            Indices into this data; without ``shuffle`` they are visited in the order given (any
            order: each buffer-sized window of it is read as contiguous row runs).
        batch_size
            Cells per minibatch (the last one may be smaller unless ``drop_last``).
        shuffle, generator
            Visit ``epoch_order(cells, generator)`` instead (block sampling).
        drop_last
            Drop a final minibatch smaller than ``batch_size``.
        batch_sizes
            Explicit minibatch sizes (positive, summing to ``len(cells)``), overriding
            ``batch_size`` and ``drop_last``.

        Notes
        -----
        Memory: at most one window is held, ``ceil(buffer_cells / batch_size)`` minibatches
        (about ``buffer_cells`` cells) plus up to ``merge_gap`` unwanted rows per contiguous run.
        """
        order = self.epoch_order(cells, generator).numpy() if shuffle else _as_numpy(cells)
        sizes = minibatch_sizes(order.size, batch_size, drop_last, batch_sizes)
        first, begin = 0, 0
        while first < len(sizes):
            last, count = first + 1, sizes[first]
            while last < len(sizes) and count + sizes[last] <= max(self.buffer_cells, sizes[first]):
                count += sizes[last]
                last += 1
            window = order[begin : begin + count]
            buffer, local = self._read_window(window)
            block = buffer.gather(torch.from_numpy(local))
            block.cell_index = torch.from_numpy(window).to(self.device)
            yield from slice_minibatches(block, sizes[first:last])
            first, begin = last, begin + count


def _as_numpy(cells: np.ndarray | torch.Tensor) -> np.ndarray:
    if torch.is_tensor(cells):
        return cells.detach().cpu().numpy().astype(np.int64, copy=False)
    return np.asarray(cells, dtype=np.int64)


# ----------------------------------------------------------------------------- writing results


class MatrixWriter:
    """A dense ``(n_obs, n_vars)`` float32 AnnData written to disk row block by row block.

    Writes the AnnData on-disk layout (``X`` as a dense array, ``obs``/``var`` with the names),
    so the result opens with ``anndata.read_h5ad(path, backed="r")`` (``.h5ad``) or
    ``anndata.read_zarr(path)`` / :func:`read_backed` (``.zarr``). Use as a context manager.

    Parameters
    ----------
    path
        Output ``.h5ad`` file or ``.zarr`` directory (must not exist).
    obs_names, var_names
        Row and column names.
    chunk_rows
        Rows per on-disk chunk.
    """

    def __init__(self, path: str | os.PathLike, obs_names, var_names, chunk_rows: int = 1024) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; choose a new path or delete it first.")
        if self.path.suffix not in (".h5ad", ".zarr"):
            raise ValueError(f"out={str(self.path)!r}: use a path ending in .h5ad or .zarr.")
        shape = (len(obs_names), len(var_names))
        chunks = (max(1, min(chunk_rows, shape[0])), max(1, shape[1]))
        obs = pd.DataFrame(index=pd.Index([str(v) for v in obs_names]))
        var = pd.DataFrame(index=pd.Index([str(v) for v in var_names]))
        if self.path.suffix == ".h5ad":
            import h5py

            self._file = h5py.File(self.path, "w")
            self._x = self._file.create_dataset("X", shape=shape, dtype="float32", chunks=chunks)
        else:
            import zarr

            self._file = zarr.open_group(self.path, mode="w")
            self._x = self._file.create_array("X", shape=shape, dtype="float32", chunks=chunks)
        self._file.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        self._x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        # zarr: say "no shards" (small arrays) rather than leave anndata to warn about its default
        kwargs = {} if self.path.suffix == ".h5ad" else {"dataset_kwargs": {"shards": None}}
        ad.io.write_elem(self._file, "obs", obs, **kwargs)
        ad.io.write_elem(self._file, "var", var, **kwargs)
        self.n_written = 0

    def write(self, rows: np.ndarray) -> None:
        """Append ``(b, n_vars)`` rows."""
        self._x[self.n_written : self.n_written + rows.shape[0]] = rows
        self.n_written += rows.shape[0]

    def close(self) -> None:
        if hasattr(self._file, "close"):
            self._file.close()

    def __enter__(self) -> MatrixWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
