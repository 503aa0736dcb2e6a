"""Out-of-core AnnData: backed h5ad / zarr count matrices streamed from disk with bounded memory."""

import hashlib
import logging
import tracemalloc
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import sclatent
from sclatent.data import CellData, OnDiskCellData, SetupError, ondisk_settings, read_backed
from sclatent.data.ondisk import make_cell_data
from sclatent.model import VAE

TINY = dict(n_latent=3, n_hidden=16, seed=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory, csr_adata):
    folder = tmp_path_factory.mktemp("ondisk")
    adata = csr_adata()
    adata.write_h5ad(folder / "cells.h5ad")
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")  # zarr's note on v3 stores
        adata.write_zarr(folder / "cells.zarr")
    return adata, folder


def _open(folder, fmt):
    return ad.read_h5ad(folder / "cells.h5ad", backed="r") if fmt == "h5ad" else read_backed(folder / "cells.zarr")


def _digest(path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
        digest.update(str(f.stat().st_mtime_ns).encode())
    return digest.hexdigest()


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_train_and_infer_from_disk_match_memory(files, fmt, small_buffers):
    memory, folder = files
    path = folder / f"cells.{fmt}"
    before = _digest(path)
    memory = memory.copy()
    backed = _open(folder, fmt)
    VAE.setup_anndata(memory, batch_key="batch")
    VAE.setup_anndata(backed, batch_key="batch")
    model = VAE(backed, **TINY)
    model.train(max_epochs=2, batch_size=32, progress_bar=False)
    assert isinstance(model._data(), OnDiskCellData)
    assert np.isfinite(model.history["validation_elbo"]).all()
    reference = VAE(memory, **TINY)
    reference.module.load_state_dict(model.module.state_dict())
    # same weights, cells in order: the streamed latent is the in-memory one
    np.testing.assert_allclose(model.get_latent_representation(), reference.get_latent_representation(), atol=1e-6)
    held_out = model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=5)
    expected = reference.get_marginal_ll(indices=model.validation_indices, n_mc_samples=5)
    assert np.isfinite(held_out) and held_out == pytest.approx(expected, abs=1e-4)
    assert _digest(path) == before  # the user's file is never written


def test_epoch_order_blocks_seeded_and_complete(files, small_buffers):
    _, folder = files
    backed = _open(folder, "h5ad")
    VAE.setup_anndata(backed)
    data = OnDiskCellData(backed, sclatent.data.get_registry(backed))
    cells = np.sort(np.random.default_rng(1).choice(data.n_cells, 150, replace=False))
    order = data.epoch_order(cells, torch.Generator().manual_seed(3))
    assert order.dtype == torch.int64
    assert np.array_equal(np.sort(order.numpy()), cells)  # each cell exactly once
    assert torch.equal(order, data.epoch_order(cells, torch.Generator().manual_seed(3)))
    assert not torch.equal(order, data.epoch_order(cells, torch.Generator().manual_seed(4)))
    # each buffer is fetch_factor whole blocks of block_size consecutive cells (positions in sorted `cells`),
    # shuffled together: its first fetch_factor distinct blocks are all of its cells
    block = np.searchsorted(cells, order.numpy()) // data.block_size
    begin, n_buffers = 0, 0
    while begin < cells.size:
        members = list(dict.fromkeys(block[begin:].tolist()))[: data.fetch_factor]
        size = sum(min(data.block_size, cells.size - b * data.block_size) for b in members)
        assert set(block[begin : begin + size].tolist()) == set(members)
        begin, n_buffers = begin + size, n_buffers + 1
    assert n_buffers == -(-cells.size // data.block_size) // data.fetch_factor + 1
    # a shuffled pass visits epoch_order's order, also with explicit minibatch sizes
    visited = torch.cat(
        [b.cell_index for b in data.iterate(cells, 40, shuffle=True, generator=torch.Generator().manual_seed(3))]
    )
    assert torch.equal(visited, order)
    sizes = [50, 1, 99]
    batches = list(data.iterate(order, 7, batch_sizes=sizes))
    assert [b.size for b in batches] == sizes
    assert [b.size for b in data.iterate(cells, 40, drop_last=True)] == [40, 40, 40]
    with pytest.raises(ValueError, match="sum to the number of cells"):
        list(data.iterate(cells, 7, batch_sizes=[10, 10]))


def test_minibatches_equal_in_memory_gather(files, small_buffers):
    memory, folder = files
    memory = memory.copy()
    backed = _open(folder, "h5ad")
    VAE.setup_anndata(memory, batch_key="batch")
    VAE.setup_anndata(backed, batch_key="batch")
    registry = sclatent.data.get_registry(backed)
    on_disk = OnDiskCellData(backed, registry)
    in_memory = CellData(memory, registry)
    assert torch.equal(on_disk.library, in_memory.library)
    assert np.array_equal(on_disk.nonempty_cells, in_memory.nonempty_cells)
    order = torch.randperm(on_disk.n_cells, generator=torch.Generator().manual_seed(0))[:100]  # any order
    for batch in on_disk.iterate(order, 23):
        expected = in_memory.gather(batch.cell_index)
        assert torch.equal(batch.counts, expected.counts)
        assert torch.equal(batch.nz_log_factorial, expected.nz_log_factorial)
        assert torch.equal(batch.batch_index, expected.batch_index)
        assert torch.equal(batch.library, expected.library)
    neighbour = on_disk.gather(torch.tensor([5, 3, 5, 200]))
    assert torch.equal(neighbour.counts, in_memory.gather(torch.tensor([5, 3, 5, 200])).counts)


def test_memory_stays_bounded(tmp_path, monkeypatch, csr_adata):
    monkeypatch.setattr(ondisk_settings, "block_size", 16)
    monkeypatch.setattr(ondisk_settings, "fetch_factor", 4)
    adata = csr_adata(n_cells=3000, n_genes=200, seed=2)
    adata.write_h5ad(tmp_path / "big.h5ad")
    backed = ad.read_h5ad(tmp_path / "big.h5ad", backed="r")
    VAE.setup_anndata(backed)
    data = OnDiskCellData(backed, sclatent.data.get_registry(backed))
    matrix_bytes = data.nnz * 8  # float32 values + int32 indices
    generator = torch.Generator().manual_seed(0)
    largest = 0
    tracemalloc.start()
    try:
        for batch in data.iterate(np.arange(data.n_cells), 64, shuffle=True, generator=generator):
            largest = max(largest, data.last_read[0])
            del batch
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # rows read at once: one buffer (64 cells) + at most one minibatch of overlap
    assert largest <= data.buffer_cells + 64
    # numpy memory at peak: a few buffers' worth, far from the matrix (would fail if it were loaded)
    assert peak < matrix_bytes / 5, (peak, matrix_bytes)


def test_automatic_choice_and_log(files, caplog, capsys, monkeypatch):
    _, folder = files
    backed = _open(folder, "h5ad")
    VAE.setup_anndata(backed)
    registry = sclatent.data.get_registry(backed)
    with caplog.at_level(logging.INFO, logger="sclatent"):
        data = make_cell_data(backed, registry)
    assert type(data) is CellData and data.storage_note == "loaded from disk into memory"
    assert "adata.X is on disk" in caplog.text and "loading it into memory" in caplog.text
    caplog.clear()
    monkeypatch.setattr(ondisk_settings, "in_memory_max_bytes", 1000)
    with caplog.at_level(logging.INFO, logger="sclatent"):
        data = make_cell_data(backed, registry)
    assert isinstance(data, OnDiskCellData)
    assert "streaming it from disk" in caplog.text and "in-memory limit 0.0 MB" in caplog.text
    # an in-memory AnnData is never streamed, whatever the limit
    memory = backed.to_memory()
    assert type(make_cell_data(memory, registry)) is CellData
    # the choice shows in the progress bar, without any logging set up
    capsys.readouterr()
    VAE(backed, **TINY).train(max_epochs=1, batch_size=64)
    assert "Training VAE (streaming from disk)" in capsys.readouterr().err


def test_errors_on_disk(tmp_path, files):
    adata, folder = files
    csc = adata.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(SetupError, match=r"CSC.*tocsr"):
        VAE.setup_anndata(ad.read_h5ad(tmp_path / "csc.h5ad", backed="r"))
    with pytest.raises(SetupError, match="Layer 'raw' not found"):
        VAE.setup_anndata(_open(folder, "h5ad"), layer="raw")
    for value, message in [(np.nan, "NaN or infinite"), (-1.0, "negative")]:
        bad = adata.copy()
        bad.X = bad.X.copy()
        bad.X.data[17] = value
        path = tmp_path / f"bad_{message.split()[0]}.h5ad"
        bad.write_h5ad(path)
        before = _digest(path)
        with pytest.raises(SetupError, match=message):
            VAE.setup_anndata(ad.read_h5ad(path, backed="r"))
        # the streamed path validates in its own pass too (query data are not set up)
        good = _open(folder, "h5ad")
        VAE.setup_anndata(good)
        backed_bad = ad.read_h5ad(path, backed="r")
        with pytest.raises(SetupError, match=message):
            OnDiskCellData(backed_bad, sclatent.data.get_registry(good))
        assert _digest(path) == before


def test_normalized_expression_written_in_chunks(files, tmp_path, small_buffers):
    memory, folder = files
    memory = memory.copy()
    backed = _open(folder, "zarr")
    VAE.setup_anndata(memory, batch_key="batch")
    VAE.setup_anndata(backed, batch_key="batch")
    model, reference = VAE(backed, **TINY), VAE(memory, **TINY)
    expected = reference.get_normalized_expression(batch_size=50)
    for name in ("norm.h5ad", "norm.zarr"):
        path = model.get_normalized_expression(batch_size=50, out=tmp_path / name)
        written = ad.read_h5ad(path) if name.endswith("h5ad") else ad.read_zarr(path)
        np.testing.assert_allclose(written.X, expected.to_numpy(), rtol=1e-6)
        assert list(written.obs_names) == list(expected.index) and list(written.var_names) == model.var_names
    with pytest.raises(FileExistsError):
        model.get_normalized_expression(out=tmp_path / "norm.h5ad")


def test_dense_on_disk_and_query_gene_order(files, tmp_path, small_buffers):
    memory, _ = files
    memory = memory.copy()
    VAE.setup_anndata(memory, batch_key="batch", categorical_covariate_keys=["cell_type"])
    reference = VAE(memory, **TINY, use_observed_library=False)
    # a query with dense counts on disk and its genes in another order
    query = memory[:, np.random.default_rng(0).permutation(memory.n_vars)].copy()
    query.X = query.X.toarray()
    query.write_h5ad(tmp_path / "dense.h5ad")
    backed = ad.read_h5ad(tmp_path / "dense.h5ad", backed="r")
    np.testing.assert_allclose(
        reference.get_latent_representation(backed), reference.get_latent_representation(), atol=1e-6
    )
    # the library-size prior is computed from the backed matrix in row chunks
    from sclatent.data import library_log_prior

    for got, want in zip(
        library_log_prior(backed, reference.registry), library_log_prior(memory, reference.registry), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_other_cell_models_train_on_a_backed_anndata(files, caplog):
    """The masked and contrastive models (which build their own data) also accept a backed AnnData;
    the contrastive model's kNN table reads the matrix once, and says so."""
    adata, folder = files
    backed = ad.read_h5ad(folder / "cells.h5ad", backed="r")
    contrastive = sclatent.model.ContrastiveModel
    contrastive.setup_anndata(backed)
    with caplog.at_level(logging.WARNING, logger="sclatent"):
        model = contrastive(backed, n_latent=3, n_hidden=16, seed=0)
        model.train(max_epochs=1, progress_bar=False)
    assert "kNN table" in caplog.text
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 3) and np.isfinite(latent).all()
    in_memory = adata.copy()
    contrastive.setup_anndata(in_memory)
    reference = contrastive(in_memory, n_latent=3, n_hidden=16, seed=0)
    reference.train(max_epochs=1, progress_bar=False)
    # same cells, same seed, same neighbours: the backed run is the in-memory run
    np.testing.assert_allclose(latent, reference.get_latent_representation(), atol=1e-5)
    backed.file.close()
    masked = sclatent.model.MaskedGeneModel
    backed = ad.read_h5ad(folder / "cells.h5ad", backed="r")
    masked.setup_anndata(backed)
    pretrained = masked(backed, n_latent=3, n_hidden=16, seed=0).train(max_epochs=1, progress_bar=False)
    embedding = pretrained.get_latent_representation()
    assert embedding.shape == (adata.n_obs, 3) and np.isfinite(embedding).all()
    backed.file.close()
