"""The kNN neighbour table and the minibatches that carry one table neighbour per cell
(sclatent.data.neighbours), on simulated clusters.

Moved from the contrastive family's tests (tests/model/test_contrastive.py), the model that uses
them; the table streamed from a backed file is tested in tests/data/test_data_layer.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sclatent.data import CellData, get_registry
from sclatent.data.neighbours import NeighbourData, knn_table
from sclatent.datasets import synthetic
from sclatent.model import ContrastiveModel


def _clusters(n_cells: int = 600, n_genes: int = 100, n_batches: int = 1, seed: int = 3):
    return synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=4, n_batches=n_batches, seed=seed)


def test_knn_table_finds_reference_neighbours_in_the_same_cluster():
    adata = _clusters(n_cells=200, n_genes=200)
    reference = np.arange(0, 200, 2)  # half the cells may be drawn as neighbours
    table = knn_table(adata.X, reference, n_neighbors=5)
    assert table.shape == (200, 5) and table.dtype == np.int64
    assert np.isin(table, reference).all()
    assert not (table == np.arange(200)[:, None]).any()  # never oneself
    labels = adata.obs["cell_type"].to_numpy()
    # neighbours share the cell's type far above chance (0.25 for 4 equal types); measured 0.97
    # (0.90 with 100 genes, where 50 PCs of 100 noisy genes blur the distances)
    assert (labels[table] == labels[:, None]).mean() > 0.9


def test_neighbour_minibatches_carry_one_table_neighbour_per_cell():
    adata = _clusters(n_cells=60, n_genes=20)
    ContrastiveModel.setup_anndata(adata)
    data = CellData(adata, get_registry(adata))
    table = knn_table(adata.X, np.arange(60), n_neighbors=4)
    wrapped = NeighbourData(data, table)
    cells = np.arange(60)
    batches = list(wrapped.iterate(cells, 16, shuffle=True, generator=torch.Generator().manual_seed(0)))
    again = list(wrapped.iterate(cells, 16, shuffle=True, generator=torch.Generator().manual_seed(0)))
    for batch, repeat in zip(batches, again, strict=True):
        rows, picked = batch.cell_index.numpy(), batch.neighbour.cell_index.numpy()
        assert batch.neighbour.size == batch.size
        assert all(p in table[r] for r, p in zip(rows, picked, strict=True))
        assert torch.equal(batch.neighbour.counts, torch.as_tensor(adata.X[picked].toarray()))
        assert np.array_equal(picked, repeat.neighbour.cell_index.numpy())  # seeded
    # the plain CellData is unchanged: its minibatches carry no neighbour
    assert next(data.iterate(cells, 16)).neighbour is None
    with pytest.raises(ValueError, match="neighbour table must be"):
        NeighbourData(data, table[:10])
