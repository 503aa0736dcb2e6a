"""What the data-layer tests share: the small simulated AnnData they write to backed files, and
the small streaming buffers that make a 240-cell pass read many of them."""

from __future__ import annotations

import warnings

import pytest
import scipy.sparse as sp

from sclatent.data import ondisk_settings
from sclatent.datasets import synthetic


@pytest.fixture(scope="session")
def csr_adata():
    """Factory ``csr_adata(n_cells=240, n_genes=30, seed=0)``: simulated counts in two batches, X as
    CSR and no dense ``true_mean`` layer (``read_backed`` leaves dense layers out)."""

    def build(n_cells: int = 240, n_genes: int = 30, seed: int = 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = synthetic(n_cells=n_cells, n_genes=n_genes, n_batches=2, seed=seed)
        del adata.layers["true_mean"]
        adata.X = sp.csr_matrix(adata.X)
        return adata

    return build


@pytest.fixture
def small_buffers(monkeypatch):
    """Every backed matrix is streamed (OnDiskCellData), in buffers of 8 x 4 cells; restored afterwards."""
    monkeypatch.setattr(ondisk_settings, "in_memory_max_bytes", 0)
    monkeypatch.setattr(ondisk_settings, "block_size", 8)
    monkeypatch.setattr(ondisk_settings, "fetch_factor", 4)
