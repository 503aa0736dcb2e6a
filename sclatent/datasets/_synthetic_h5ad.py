"""A large synthetic count matrix written to an h5ad file chunk by chunk, never whole in memory.

For out-of-core tests and benchmarks: the simulation of :func:`sclatent.datasets.synthetic`
(clusters in a latent space, a nonlinear map to gene proportions, log-normal libraries, ZINB
counts), generated ``chunk_cells`` cells at a time and appended to the CSR arrays of ``X`` in an
h5ad file that ``anndata.read_h5ad(path, backed="r")`` opens. Peak memory is one dense chunk
(``chunk_cells x n_genes`` float64, 160 MB at the defaults) plus the obs table.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ._synthetic import (
    _DISPERSION_LOG_SD,
    _WITHIN_SD,
    _balanced_labels,
    _cluster_centres,
    _expression_profiles,
    _log_library_params,
    _zinb_counts,
)


def synthetic_h5ad(
    path: str | os.PathLike,
    n_cells: int = 1_000_000,
    n_genes: int = 2000,
    n_clusters: int = 8,
    n_batches: int = 2,
    n_latent: int = 5,
    zero_inflation: float = 0.1,
    dispersion: float = 5.0,
    library_size: tuple[float, float] | float = (75, 500),
    batch_effect: float = 0.5,
    chunk_cells: int = 10_000,
    seed: int = 0,
    progress_bar: bool = True,
) -> Path:
    """Write ZINB counts of ``n_cells`` cells to ``path`` (h5ad, ``X`` as CSR), chunk by chunk.

    The generative process is that of :func:`sclatent.datasets.synthetic` (see there); the gene
    parameters and cluster centres are drawn once, each chunk of cells from its own random stream
    (``numpy.random.SeedSequence(seed).spawn``), so the file is a deterministic function of the
    arguments (except ``progress_bar``). At the defaults about 7 % of the entries are nonzero
    (1,000,000 x 2,000: ~140 M nonzeros, ~1.1 GB of CSR on disk, written in ~3 minutes on 1 core).

    Parameters
    ----------
    path
        Output ``.h5ad`` file (overwritten).
    n_cells, n_genes, n_clusters, n_batches, n_latent, zero_inflation, dispersion, library_size, batch_effect
        As in :func:`sclatent.datasets.synthetic`; the default library range is lower, giving a
        realistic ~7 % density at 2,000 genes.
    chunk_cells
        Cells simulated and written at a time (memory: ``chunk_cells * n_genes * 8`` bytes).
    seed
        Seed of everything random.
    progress_bar
        Show a tqdm bar over the chunks.

    Returns
    -------
    pathlib.Path
        The path written. ``X``: CSR float32 counts (int64 ``indptr``, int32 ``indices``); ``obs``:
        ``cell_type`` and ``batch`` (categoricals, as in ``synthetic``); ``var_names`` ``gene_0, ...``;
        ``uns["synthetic_params"]``: the arguments. No ``true_mean`` layer (it would be dense).
    """
    if n_cells < max(n_clusters, n_batches) or min(n_genes, n_clusters, n_batches, n_latent, chunk_cells) < 1:
        raise ValueError("n_cells must be >= n_clusters and n_batches; every size must be >= 1.")
    path = Path(path)
    log_lib_mean, log_lib_sd = _log_library_params(library_size)
    root = np.random.SeedSequence(seed)
    global_rng = np.random.default_rng(root.spawn(1)[0])
    centres = _cluster_centres(global_rng, n_clusters, n_latent)
    cluster = _balanced_labels(global_rng, n_cells, n_clusters)
    batch = _balanced_labels(global_rng, n_cells, n_batches)
    baseline = global_rng.standard_normal(n_genes)
    w_lin = global_rng.standard_normal((n_latent, n_genes)) / np.sqrt(n_latent)
    w_nonlin = global_rng.standard_normal((n_latent, n_genes)) / np.sqrt(n_latent)
    batch_shift = batch_effect * global_rng.standard_normal((n_batches, n_genes))
    theta = dispersion * np.exp(_DISPERSION_LOG_SD * global_rng.standard_normal(n_genes))

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(cluster, categories=[f"type_{k}" for k in range(n_clusters)]),
            "batch": pd.Categorical.from_codes(batch, categories=[f"batch_{k}" for k in range(n_batches)]),
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index([f"gene_{j}" for j in range(n_genes)]))
    params = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_clusters": n_clusters,
        "n_batches": n_batches,
        "n_latent": n_latent,
        "zero_inflation": zero_inflation,
        "dispersion": dispersion,
        "library_size": list(library_size) if not np.isscalar(library_size) else library_size,
        "batch_effect": batch_effect,
        "seed": seed,
    }
    # the skeleton (obs, var, uns) through anndata, so the file is a regular h5ad; X is added below
    ad.AnnData(obs=obs, var=var, uns={"synthetic_params": params}).write_h5ad(path)

    chunk_seeds = root.spawn(1 + -(-n_cells // chunk_cells))[1:]
    with h5py.File(path, "a") as file:
        if "X" in file:
            del file["X"]
        group = file.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.array([n_cells, n_genes], dtype=np.int64)
        # chunked, growable arrays; ~1 MB chunks keep appends and contiguous row reads efficient
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = np.zeros(n_cells + 1, dtype=np.int64)
        starts = range(0, n_cells, chunk_cells)
        for chunk, begin in enumerate(
            tqdm(starts, desc="Writing synthetic h5ad", unit="chunk", disable=not progress_bar)
        ):
            end = min(n_cells, begin + chunk_cells)
            rng = np.random.default_rng(chunk_seeds[chunk])
            z = centres[cluster[begin:end]] + _WITHIN_SD * rng.standard_normal((end - begin, n_latent))
            probs = _expression_profiles(z, batch[begin:end], baseline, w_lin, w_nonlin, batch_shift)
            library = np.exp(log_lib_mean + log_lib_sd * rng.standard_normal(end - begin))
            counts = _zinb_counts(rng, library[:, None] * probs, theta, zero_inflation)
            empty = np.flatnonzero(counts.sum(axis=1) == 0)
            counts[empty, np.argmax(probs[empty], axis=1)] = 1.0  # every cell keeps a positive library
            rows, cols = np.nonzero(counts)
            offset = int(indptr[begin])
            indptr[begin + 1 : end + 1] = offset + np.cumsum(np.bincount(rows, minlength=end - begin))
            new_size = offset + rows.size
            data.resize((new_size,))
            indices.resize((new_size,))
            data[offset:new_size] = counts[rows, cols].astype(np.float32)
            indices[offset:new_size] = cols.astype(np.int32)
        group.create_dataset("indptr", data=indptr)
    return path
