"""Tests for sclatent.datasets: bundled, simulated and file-backed datasets (no network access)."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sclatent import datasets
from sclatent.datasets import DatasetUnavailableError, fetch_file

MNIST_LABELS = "MNIST/raw/t10k-labels-idx1-ubyte.gz"


@pytest.fixture
def shared_data(shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared data folder (tests/conftest.py), with SCLATENT_DATA_DIR pointing at it."""
    monkeypatch.setenv("SCLATENT_DATA_DIR", str(shared_data_dir))
    return shared_data_dir


@pytest.fixture
def empty_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SCLATENT_DATA_DIR", str(tmp_path))
    return tmp_path


def _is_integer_csr(x: sp.spmatrix) -> bool:
    return sp.isspmatrix_csr(x) and x.dtype == np.float32 and bool(np.all(x.data == np.rint(x.data)))


# --- pbmc68k_counts -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pbmc68k():
    return datasets.pbmc68k_counts()


def test_pbmc68k_counts_are_integer_csr(pbmc68k):
    assert pbmc68k.shape == (700, 765)
    assert _is_integer_csr(pbmc68k.X)
    assert pbmc68k.X.data.min() > 0  # explicit zeros eliminated, no negatives
    assert pbmc68k.layers["counts"] is not pbmc68k.X
    assert (pbmc68k.layers["counts"] != pbmc68k.X).nnz == 0
    assert pbmc68k.obs["bulk_labels"].dtype == "category"
    assert len(pbmc68k.obs["bulk_labels"].cat.categories) == 10
    assert not pbmc68k.obsm and not pbmc68k.obsp
    assert pbmc68k.uns["dataset"].startswith("pbmc68k_reduced")


def test_pbmc68k_counts_reproduce_scanpy_raw(pbmc68k):
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    assert list(pbmc68k.var_names) == list(src.raw.var_names)
    row_sums = np.asarray(pbmc68k.X.sum(axis=1)).ravel()
    np.testing.assert_allclose(pbmc68k.obs["n_counts"], row_sums)
    original = pbmc68k.obs["n_counts_original"].to_numpy()
    np.testing.assert_array_equal(original, src.obs["n_counts"].to_numpy())
    # The 765 kept genes hold a fraction (measured 11-28 %) of the library computed over all genes.
    fraction = row_sums / original
    assert np.all(fraction <= 1.0 + 1e-6)
    assert 0.05 < fraction.min() and fraction.max() < 0.5
    # Re-normalising the recovered counts must give back scanpy's log-normalised values.
    renorm = np.log1p(pbmc68k.X.toarray() / original[:, None] * 1e4)
    np.testing.assert_allclose(renorm, src.raw.X.toarray(), atol=2e-3)


# --- synthetic ------------------------------------------------------------------------------------


def test_synthetic_shape_and_labels():
    adata = datasets.synthetic(n_cells=300, n_genes=50, n_clusters=3, n_batches=2, n_latent=4, seed=1)
    assert adata.shape == (300, 50)
    assert _is_integer_csr(adata.X)
    assert (adata.layers["counts"] != adata.X).nnz == 0
    assert list(adata.obs["cell_type"].cat.categories) == ["type_0", "type_1", "type_2"]
    assert list(adata.obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    assert adata.obs["cell_type"].value_counts().min() == 100
    assert adata.obsm["X_true_latent"].shape == (300, 4)
    assert adata.layers["true_mean"].shape == (300, 50)
    assert adata.layers["true_mean"].dtype == np.float32
    assert adata.var_names[0] == "gene_0"
    assert json.loads(json.dumps(adata.uns["synthetic_params"]))["n_clusters"] == 3


def test_synthetic_is_deterministic():
    a = datasets.synthetic(n_cells=200, n_genes=40, seed=3)
    b = datasets.synthetic(n_cells=200, n_genes=40, seed=3)
    c = datasets.synthetic(n_cells=200, n_genes=40, seed=4)
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(a.obsm["X_true_latent"], b.obsm["X_true_latent"])
    np.testing.assert_array_equal(a.obs["cell_type"], b.obs["cell_type"])
    assert (a.X != c.X).nnz > 0
    assert not np.array_equal(a.obsm["X_true_latent"], c.obsm["X_true_latent"])


def test_synthetic_has_no_empty_cells_even_with_tiny_libraries():
    adata = datasets.synthetic(n_cells=500, n_genes=100, library_size=(2, 5), zero_inflation=0.5, seed=0)
    assert adata.uns["synthetic_params"]["n_empty_cells_fixed"] > 0
    assert np.asarray(adata.X.sum(axis=1)).min() >= 1


def test_synthetic_counts_match_true_mean():
    zi = 0.1
    adata = datasets.synthetic(n_cells=2000, n_genes=100, zero_inflation=zi, seed=0)
    counts = adata.X.toarray()
    expected = (1 - zi) * adata.layers["true_mean"]
    assert counts.sum() / expected.sum() == pytest.approx(1.0, abs=0.02)
    # Per-gene means over cells follow the simulated means.
    assert np.corrcoef(counts.mean(axis=0), expected.mean(axis=0))[0, 1] > 0.99
    # Overdispersed relative to Poisson, as a negative binomial should be.
    assert counts.var(axis=0).mean() > counts.mean(axis=0).mean()


def test_synthetic_clusters_are_separated():
    adata = datasets.synthetic(n_cells=1000, n_clusters=6, seed=2)
    z = adata.obsm["X_true_latent"]
    labels = adata.obs["cell_type"].cat.codes.to_numpy()
    centres = np.stack([z[labels == k].mean(axis=0) for k in range(6)])
    spread = max(z[labels == k].std(axis=0).mean() for k in range(6))
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(6, k=1)]
    assert dist.min() > 5 * spread


# --- data_dir / manifest --------------------------------------------------------------------------


def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SCLATENT_DATA_DIR", raising=False)
    assert datasets.data_dir() == Path.home() / ".cache" / "sclatent" / "data"
    monkeypatch.setenv("SCLATENT_DATA_DIR", str(tmp_path / "env"))
    assert datasets.data_dir() == tmp_path / "env"
    assert datasets.data_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_unknown_file_is_a_key_error(empty_data_dir: Path):
    with pytest.raises(KeyError, match="no file"):
        fetch_file("pbmc3k", "pbmc3k/other.h5ad")
    with pytest.raises(KeyError, match="unknown dataset"):
        fetch_file("nope", "nope.h5ad")


# --- file-backed loaders (shared data) ------------------------------------------------------------


@pytest.mark.needs_data("pbmc3k")
def test_pbmc3k(shared_data: Path):
    adata = datasets.pbmc3k()
    assert adata.shape == (2700, 32738)
    assert _is_integer_csr(adata.X)
    assert (adata.layers["counts"] != adata.X).nnz == 0
    assert len(adata.obs["cell_type"].cat.categories) == 9
    assert adata.obs["cell_type"].isna().sum() == 62
    assert "gene_ids" in adata.var


@pytest.mark.needs_data("mouse_brain_10k_chr1")
def test_mouse_brain_10k_chr1(shared_data: Path):
    adata = datasets.mouse_brain_10k_chr1()
    assert adata.shape == (10000, 1000)
    assert _is_integer_csr(adata.X)
    assert (np.asarray(adata.X.sum(axis=1)).ravel() == 0).any()


@pytest.mark.needs_data("cellbench_5cl")
def test_cellbench_5cl(shared_data: Path):
    adata = datasets.cellbench_5cl(data_dir=shared_data)
    assert adata.shape == (909, 16039)
    assert _is_integer_csr(adata.X)
    assert set(adata.obs["cell_type"].cat.categories) == {"A549", "H838", "H2228", "H1975", "HCC827"}
    assert set(adata.obs["batch"].cat.categories) == {"plate1", "plate2", "plate3"}
    assert "demuxlet_cls" in adata.obs


@pytest.mark.needs_data("MNIST")
def test_mnist_files(shared_data: Path):
    files = datasets.mnist_files()
    assert set(files) == {"train_images", "train_labels", "test_images", "test_labels"}
    with gzip.open(files["test_labels"], "rb") as fh:
        raw = fh.read()
    assert int.from_bytes(raw[4:8], "big") == 10000


@pytest.mark.needs_data("MNIST")
def test_recompressed_mnist_is_accepted(shared_data: Path, empty_data_dir: Path):
    target = empty_data_dir / MNIST_LABELS
    target.parent.mkdir(parents=True)
    # Same content, different compressed bytes: accepted because MNIST is checked on the content.
    content = gzip.decompress((shared_data / MNIST_LABELS).read_bytes())
    target.write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    assert target.read_bytes() != (shared_data / MNIST_LABELS).read_bytes()
    assert fetch_file("mnist", MNIST_LABELS) == target


@pytest.mark.needs_data("MNIST")
def test_download_is_verified_and_placed(shared_data: Path, empty_data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    payload = (shared_data / MNIST_LABELS).read_bytes()
    seen = []

    def fake_urlopen(url, *args, **kwargs):
        seen.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    path = datasets.fetch_file("mnist", MNIST_LABELS, data_dir=empty_data_dir)
    assert path == empty_data_dir / MNIST_LABELS
    assert path.read_bytes() == payload
    assert seen == ["https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# --- failure modes (no shared data needed) --------------------------------------------------------


def test_corrupt_h5ad_is_refused(empty_data_dir: Path):
    bogus = empty_data_dir / "pbmc3k" / "pbmc3k.h5ad"
    bogus.parent.mkdir(parents=True)
    bogus.write_bytes(b"not an h5ad file")
    with pytest.raises(DatasetUnavailableError, match="checksum") as info:
        datasets.pbmc3k()
    assert str(bogus) in str(info.value)
    assert "436e782c8ab02e328650ffb5c5cfa4dd7a9b85b3da1c6ce487c0e747f0af344f" in str(info.value)


def test_corrupt_mnist_is_refused(empty_data_dir: Path):
    target = empty_data_dir / MNIST_LABELS
    target.parent.mkdir(parents=True)
    target.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(100)))
    with pytest.raises(DatasetUnavailableError, match=r"checksum.*27ae3e4e09519cfbb04c329615203637"):
        fetch_file("mnist", MNIST_LABELS)
    target.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetUnavailableError, match="checksum"):
        fetch_file("mnist", MNIST_LABELS)


def test_missing_file_without_url(empty_data_dir: Path):
    with pytest.raises(DatasetUnavailableError, match="SCLATENT_DATA_DIR") as info:
        datasets.cellbench_5cl()
    message = str(info.value)
    assert "missing" in message
    assert str(empty_data_dir) in message
    assert "GSE118767" in message


def test_missing_file_offline_download(empty_data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    url = "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DatasetUnavailableError, match="SCLATENT_DATA_DIR") as info:
        fetch_file("mnist", MNIST_LABELS)
    assert url in str(info.value)
    assert "missing" in str(info.value)
    # The failed download leaves no partial file behind.
    assert not any(p.is_file() for p in empty_data_dir.rglob("*"))


def test_bad_download_is_not_kept(empty_data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(gzip.compress(b"wrong")))
    with pytest.raises(DatasetUnavailableError, match="checksum"):
        fetch_file("mnist", MNIST_LABELS)
    assert not any(p.is_file() for p in empty_data_dir.rglob("*"))


@pytest.mark.needs_data("pbmc3k")
def test_shared_copy_is_not_written_to(shared_data: Path):
    # Verification is cached in memory only: the (read-only) data folder must stay untouched.
    before = sorted(p.relative_to(shared_data) for p in shared_data.rglob("*"))
    fetch_file("pbmc3k", "pbmc3k/pbmc3k.h5ad")
    fetch_file("pbmc3k", "pbmc3k/pbmc3k.h5ad")
    assert sorted(p.relative_to(shared_data) for p in shared_data.rglob("*")) == before


@pytest.mark.needs_data("MNIST")
def test_changed_file_is_verified_again(shared_data: Path, empty_data_dir: Path):
    # The in-memory cache is keyed by mtime and size, so a file replaced after a successful check is re-checked.
    target = empty_data_dir / MNIST_LABELS
    target.parent.mkdir(parents=True)
    shutil.copy(shared_data / MNIST_LABELS, target)
    fetch_file("mnist", MNIST_LABELS)
    target.write_bytes(gzip.compress(b"tampered"))
    with pytest.raises(DatasetUnavailableError, match="checksum"):
        fetch_file("mnist", MNIST_LABELS)


def test_synthetic_h5ad_is_a_regular_backed_csr_file(tmp_path):
    import anndata as ad

    from sclatent.datasets import synthetic_h5ad

    path = synthetic_h5ad(tmp_path / "a.h5ad", n_cells=2500, n_genes=300, chunk_cells=1000, seed=1, progress_bar=False)
    again = synthetic_h5ad(tmp_path / "b.h5ad", n_cells=2500, n_genes=300, chunk_cells=1000, seed=1, progress_bar=False)
    full = ad.read_h5ad(path)
    assert full.shape == (2500, 300)
    assert sp.isspmatrix_csr(full.X) and full.X.dtype == np.float32
    assert (ad.read_h5ad(again).X != full.X).nnz == 0  # deterministic in the seed
    counts = full.X.toarray()
    assert np.all(counts >= 0) and np.all(counts == np.round(counts))
    assert np.all(counts.sum(axis=1) > 0)  # no empty cells
    assert set(full.obs["cell_type"].cat.categories) == {f"type_{k}" for k in range(8)}
    # chunk boundaries (1000, 2000) leave no seams: rows read backed match the in-memory matrix
    backed = ad.read_h5ad(path, backed="r")
    np.testing.assert_array_equal(backed.X[990:2010].toarray(), counts[990:2010])
    backed.file.close()
    # clusters shape expression: per-type mean profiles differ far more than within-type noise
    types = full.obs["cell_type"].cat.codes.to_numpy()
    profiles = np.stack([counts[types == k].mean(axis=0) for k in range(8)])
    assert np.corrcoef(profiles).min() < 0.9


def test_synthetic_planted_differential_expression_and_its_truth():
    from sclatent.datasets import synthetic

    plain = synthetic(n_cells=300, n_genes=80, n_clusters=3, seed=4)
    explicit = synthetic(n_cells=300, n_genes=80, n_clusters=3, seed=4, de_fraction=0.0)
    assert (plain.X != explicit.X).nnz == 0 and "true_log2_fold_change" not in plain.varm
    planted = synthetic(
        n_cells=3000, n_genes=80, n_clusters=3, seed=4, de_fraction=0.2, cluster_separation=0.0, batch_effect=1.0
    )
    effect, truth = planted.varm["de_log2_fold_change"], planted.varm["true_log2_fold_change"]
    assert effect.shape == truth.shape == (80, 3)
    assert ((effect != 0).sum(0) == 16).all()
    magnitudes = np.abs(effect[effect != 0])
    assert magnitudes.min() >= 0.3 and magnitudes.max() <= 1.3
    # with every type at the same latent position, the truth is the planted effect up to the
    # softmax's renormalisation (a per-type constant) and the other types' own effects
    for k in range(3):
        alone = (np.delete(effect, k, axis=1) == 0).all(1)  # genes no other type moves
        assert np.corrcoef(truth[alone, k], effect[alone, k])[0, 1] > 0.95
        untouched = (effect == 0).all(1)
        assert np.abs(truth[untouched, k]).max() < 0.3
    assert planted.uns["synthetic_params"]["de_fraction"] == 0.2
    with pytest.raises(ValueError, match="de_fraction"):
        synthetic(n_cells=30, n_genes=10, de_fraction=1.5)
