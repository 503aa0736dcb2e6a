"""The layering of sclatent.data: no import circle, the count matrix located once per AnnData, one
CSR-to-tensors path (CellData.from_csr), and the data-layer functions the models use (fine-tuning
and kNN tables streamed from disk)."""

import ast
import collections
import logging
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import sclatent
from sclatent.contracts import TrainingData
from sclatent.data import CellData, OnDiskCellData, ondisk_settings, setup_anndata
from sclatent.data.loader import obs_codes
from sclatent.data.neighbours import NeighbourData, knn_table, streamed_knn_table
from sclatent.data.ondisk import make_cell_data
from sclatent.data.registry import count_source, library_log_prior
from sclatent.model import VAE

DATA_PACKAGE = Path(sclatent.data.__file__).parent
TINY = dict(n_latent=3, n_hidden=16, seed=0)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory, csr_adata):
    adata = csr_adata()
    path = tmp_path_factory.mktemp("layer") / "cells.h5ad"
    adata.write_h5ad(path)
    return adata, path


# ----------------------------------------------------------------------------- layering


def _package_imports() -> dict[str, set[str]]:
    """Each module of sclatent.data -> the modules of sclatent.data it imports (anywhere in the file)."""
    graph = {}
    for path in DATA_PACKAGE.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported.add(node.module or "__init__")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sclatent.data"):
                imported.add(node.module.removeprefix("sclatent.data").lstrip(".") or "__init__")
            elif isinstance(node, ast.ImportFrom) and node.level == 2 and node.module in (None, "data"):
                imported.update(a.name for a in node.names if a.name in ("data",))
        graph[path.stem] = imported
    return graph


def test_the_data_package_imports_downwards_only():
    graph = _package_imports()
    assert graph["_counts"] == set()  # the bottom
    assert graph["registry"] == {"_counts"}
    assert graph["loader"] <= {"_counts", "registry"}
    assert graph["ondisk"] <= {"_counts", "registry", "loader"}
    assert graph["neighbours"] <= {"_counts", "registry", "loader", "ondisk"}
    assert graph["labelled"] <= {"_counts", "registry", "loader", "ondisk"}
    order = ["_counts", "registry", "loader", "ondisk", "neighbours", "labelled"]
    for module, imported in graph.items():
        if module != "__init__":
            assert "__init__" not in imported, module
            assert all(order.index(other) < order.index(module) for other in imported), (module, imported)


def test_names_stay_importable_where_they_were():
    import sclatent.data.loader as loader
    import sclatent.data.ondisk as ondisk
    import sclatent.data.registry as registry

    for module, names in {
        sclatent.data: [
            *("REGISTRY_KEY", "CellData", "MiniBatch", "OnDiskCellData", "OnDiskSettings", "Registry"),
            *("SetupError", "get_registry", "ondisk_settings", "read_backed", "resolve_device", "setup_anndata"),
        ],
        registry: [
            *("REGISTRY_KEY", "Registry", "SetupError", "get_count_matrix", "check_counts", "get_registry"),
            *("encode_categorical", "encode_continuous", "setup_anndata", "gene_order_for_query"),
        ],
        loader: [
            *("CellData", "MiniBatch", "resolve_device", "obs_codes", "slice_minibatches", "checked_batch_sizes"),
            *("_index_tensor", "_GATHER_ENTRIES", "_native"),
        ],
        ondisk: [
            *("OnDiskSettings", "ondisk_settings", "is_on_disk", "refuse_csc", "DiskMatrix", "load_into_memory"),
            *("row_totals", "read_backed", "available_memory", "make_cell_data", "OnDiskCellData", "MatrixWriter"),
            "_minibatch_sizes",
        ],
    }.items():
        missing = [name for name in names if not hasattr(module, name)]
        assert not missing, (module.__name__, missing)
    assert registry.SetupError is sclatent.data._counts.SetupError


@pytest.mark.parametrize("storage", ["memory", "backed", "streamed"])
def test_the_count_matrix_is_located_once_per_entry_point(h5ad, storage, monkeypatch):
    """setup_anndata locates the counts once; the model once more when it first builds its data."""
    adata, path = h5ad
    if storage == "memory":
        adata = adata.copy()
    else:
        adata = ad.read_h5ad(path, backed="r")
        monkeypatch.setattr(ondisk_settings, "in_memory_max_bytes", 0 if storage == "streamed" else None)
    calls = collections.Counter()

    def count(name):
        original = getattr(sclatent.data._counts, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        # every binding of the function in the package (a module that imported it by name too)
        for module in list(sys.modules.values()):
            if (module.__name__ or "").startswith("sclatent") and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counted)

    count("get_count_matrix")
    count("is_on_disk")

    def step(function):
        calls.clear()
        result = function()
        return result, (calls["get_count_matrix"], calls["is_on_disk"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, at_setup = step(lambda: VAE.setup_anndata(adata, batch_key="batch"))
        model, at_init = step(lambda: VAE(adata, **TINY))
        _, at_train = step(lambda: model.train(max_epochs=1, batch_size=64, progress_bar=False))
        latent, at_latent = step(model.get_latent_representation)
    assert (at_setup, at_init, at_train, at_latent) == ((1, 1), (0, 0), (1, 1), (0, 0))
    assert latent.shape == (adata.n_obs, 3)
    expected = {"memory": CellData, "backed": CellData, "streamed": OnDiskCellData}[storage]
    assert type(model._data()) is expected
    assert model._data().source.on_disk == (storage != "memory")


# ----------------------------------------------------------------------------- cells


def test_from_csr_is_the_constructor_s_path(h5ad):
    adata, _ = h5ad
    adata = adata.copy()
    registry = setup_anndata(adata, batch_key="batch")
    data = CellData(adata, registry)
    assert isinstance(data, TrainingData) and data.storage_note == "" and data.n_cells == adata.n_obs
    source = count_source(adata, registry)
    rebuilt = CellData.from_csr(source.to_csr(), obs_codes(adata, registry, torch.device("cpu")))
    cells = torch.tensor([7, 0, 239, 7, 100])
    for name in ("counts", "nz_log_factorial", "library", "batch_index", "label_index", "cell_index"):
        assert torch.equal(getattr(rebuilt.gather(cells), name), getattr(data.gather(cells), name)), name
    assert rebuilt.source is None and data.source is not None


def test_on_disk_buffers_are_cells_made_by_from_csr(h5ad, small_buffers, monkeypatch):
    _, path = h5ad
    backed = ad.read_h5ad(path, backed="r")
    registry = setup_anndata(backed, batch_key="batch")
    data = make_cell_data(backed, registry)
    assert isinstance(data, OnDiskCellData) and isinstance(data, TrainingData)
    assert data.storage_note == "streaming from disk" and data.n_cells == backed.n_obs
    made = []
    original = CellData.from_csr.__func__

    def spy(cls, *args, **kwargs):
        made.append(original(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(CellData, "from_csr", classmethod(spy))
    batches = list(data.iterate(np.arange(backed.n_obs), 50))
    assert sum(b.size for b in batches) == backed.n_obs
    assert made and all(type(buffer) is CellData for buffer in made)
    loaded = make_cell_data(backed, registry, in_memory=True)
    assert type(loaded) is CellData and loaded.storage_note == "loaded from disk into memory"


def test_with_labels_is_a_relabelled_shallow_copy(h5ad, small_buffers):
    adata, path = h5ad
    memory = adata.copy()
    backed = ad.read_h5ad(path, backed="r")
    for cells in (memory, backed):
        data = make_cell_data(cells, setup_anndata(cells, batch_key="batch"))
        codes = np.arange(cells.n_obs) % 3
        labelled = data.with_labels(codes)
        assert type(labelled) is type(data) and labelled is not data
        assert torch.equal(labelled.label_index, torch.as_tensor(codes))
        assert not data.label_index.any()  # the original keeps its codes
        assert labelled.library is data.library  # the rest is shared
        batch = next(labelled.iterate(np.array([5, 1, 2]), 3))
        assert batch.label_index.tolist() == [2, 1, 2]
        with pytest.raises(ValueError, match="one label code per cell"):
            data.with_labels(codes[:-1])


def test_library_log_prior_is_the_model_s(h5ad):
    adata, path = h5ad
    adata = adata.copy()
    registry = setup_anndata(adata, batch_key="batch")
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    codes = (adata.obs["batch"].astype(str).to_numpy() == registry.batch_categories[1]).astype(int)
    means, variances = library_log_prior(adata, registry)
    for b in range(2):
        logs = np.log(totals[(codes == b) & (totals > 0)])
        assert means[b] == logs.mean() and variances[b] == max(logs.var(), 1e-3)
    backed = ad.read_h5ad(path, backed="r")
    np.testing.assert_allclose(library_log_prior(backed, registry), (means, variances), rtol=1e-6)


# ----------------------------------------------------------------------------- what models use


def test_fine_tune_streams_a_backed_anndata(h5ad, small_buffers):
    adata, path = h5ad
    backed = ad.read_h5ad(path, backed="r")
    masked = sclatent.model.MaskedGeneModel
    masked.setup_anndata(backed)
    model = masked(backed, **TINY).train(max_epochs=1, batch_size=64, progress_bar=False)
    assert isinstance(model._data(), OnDiskCellData)
    model.fine_tune(labels_key="cell_type", fraction_labelled=0.5, max_epochs=3, batch_size=32, progress_bar=False)
    assert isinstance(model._data(), OnDiskCellData)
    assert not model._data().label_index.any()  # the cached training cells keep the registry's (no) labels
    predicted = model.predict()
    assert predicted.shape == (backed.n_obs,) and set(predicted) <= set(adata.obs["cell_type"].astype(str))
    assert len(model.history["fine_tune_train_accuracy"]) == 3
    backed.file.close()


def test_streamed_knn_table_finds_the_in_memory_neighbours(h5ad):
    adata, path = h5ad
    backed = ad.read_h5ad(path, backed="r")
    registry = setup_anndata(backed)
    reference = np.arange(0, adata.n_obs, 2)
    streamed = streamed_knn_table(count_source(backed, registry), reference, n_neighbors=5, n_pcs=10)
    in_memory = knn_table(adata.X, reference, n_neighbors=5, n_pcs=10)
    assert streamed.shape == in_memory.shape == (adata.n_obs, 5)
    assert np.isin(streamed, reference).all()
    assert (streamed != np.arange(adata.n_obs)[:, None]).all()
    shared = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(streamed, in_memory, strict=True)])
    assert shared > 0.7, shared
    clusters = adata.obs["cell_type"].to_numpy()
    purity = [(clusters[table] == clusters[:, None]).mean() for table in (streamed, in_memory)]
    assert purity[0] > purity[1] - 0.05, purity  # neighbours as often in the same cluster


def test_contrastive_model_streams_its_knn_table(h5ad, small_buffers, monkeypatch, caplog):
    """Streamed cells give a streamed kNN table: the matrix is never read whole, and no warning says so."""
    _, path = h5ad
    backed = ad.read_h5ad(path, backed="r")
    contrastive = sclatent.model.ContrastiveModel
    contrastive.setup_anndata(backed)

    def refuse(*args, **kwargs):
        raise AssertionError("the on-disk matrix was read whole")

    for module in list(sys.modules.values()):
        if (module.__name__ or "").startswith("sclatent.data") and hasattr(module, "load_into_memory"):
            monkeypatch.setattr(module, "load_into_memory", refuse)
    with caplog.at_level(logging.INFO, logger="sclatent"):
        model = contrastive(backed, n_latent=3, n_hidden=16, n_neighbors=5, seed=0)
        model.train(max_epochs=1, batch_size=64, progress_bar=False)
    assert "incremental PCA" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "memory" in r.getMessage()]
    training = model._training_data(model._data(), seed=0)
    assert isinstance(training, NeighbourData) and training.storage_note == "streaming from disk"
    latent = model.get_latent_representation()
    assert latent.shape == (backed.n_obs, 3) and np.isfinite(latent).all()
    backed.file.close()
