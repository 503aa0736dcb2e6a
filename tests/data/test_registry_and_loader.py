"""Tests for sclatent.data: setup_anndata / registry validation and the CellData minibatch loader."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sclatent.data import REGISTRY_KEY, CellData, Registry, SetupError, get_registry, setup_anndata
from sclatent.data.registry import gene_order_for_query
from sclatent.distributions import count_log_likelihood, log_prob

N_CELLS, N_GENES = 20, 8
BATCHES = np.array(["b", "a", "c", "b", "a"] * 4, dtype=object)
# categorical labels: category order is not alphabetical and "Mono" is never used
LABEL_CATEGORIES = ["T", "B", "NK", "Mono"]
LABELS = ["NK", "T", "B", "T"] * 5


def make_counts(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(2.0, 1.5, (N_CELLS, N_GENES))).astype(np.int64)
    counts[:, 0] += 1  # no empty cells
    counts[0] += 1  # no empty genes
    return counts


def as_format(counts: np.ndarray, fmt: str):
    dense_dtype = {"dense_f32": np.float32, "dense_f64": np.float64, "dense_i32": np.int32, "dense_i64": np.int64}
    if fmt in dense_dtype:
        return counts.astype(dense_dtype[fmt])
    kind, dtype = fmt.split("_")
    dtype = {"f32": np.float32, "i32": np.int32, "f64": np.float64}[dtype]
    return (sp.csr_matrix if kind == "csr" else sp.csc_matrix)(counts.astype(dtype))


FORMATS = ["dense_f32", "dense_f64", "dense_i32", "dense_i64", "csr_f32", "csr_i32", "csc_f32", "csc_i32", "csr_f64"]


def make_adata(counts: np.ndarray | None = None, fmt: str = "dense_f32", seed: int = 0) -> ad.AnnData:
    counts = make_counts(seed) if counts is None else counts
    n_obs, n_vars = counts.shape
    obs = pd.DataFrame(
        {
            "batch": BATCHES[:n_obs].copy(),
            "cell_type": pd.Categorical(LABELS[:n_obs], categories=LABEL_CATEGORIES),
            "n_counts_ext": np.arange(n_obs, dtype=np.float64),
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame({"symbol": [f"SYM{j}" for j in range(n_vars)]}, index=[f"g{j}" for j in range(n_vars)])
    adata = ad.AnnData(X=as_format(counts, fmt), obs=obs, var=var)
    adata.layers["counts"] = as_format(counts, fmt)
    adata.obsm["X_pca"] = np.random.default_rng(1).normal(size=(n_obs, 2))
    adata.uns["note"] = "kept"
    return adata


def _matrix_state(m):
    if sp.issparse(m):
        return (type(m), m.dtype, m.shape, m.data.copy(), m.indices.copy(), m.indptr.copy())
    return (type(m), m.dtype, m.shape, np.array(m, copy=True))


def _same_matrix(a, b) -> bool:
    if a[:3] != b[:3]:
        return False
    return all(np.array_equal(x, y, equal_nan=x.dtype.kind == "f") for x, y in zip(a[3:], b[3:], strict=True))


def snapshot(adata: ad.AnnData) -> dict:
    return {
        "X": _matrix_state(adata.X),
        "layers": {k: _matrix_state(v) for k, v in adata.layers.items()},
        "obs": adata.obs.copy(deep=True),
        "obs_dtypes": adata.obs.dtypes.copy(),
        "obs_names": adata.obs_names.copy(),
        "var": adata.var.copy(deep=True),
        "var_names": adata.var_names.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns": {k: v for k, v in adata.uns.items() if k != REGISTRY_KEY},
    }


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    after = snapshot(adata)
    assert _same_matrix(after["X"], before["X"]), "adata.X changed"
    assert after["layers"].keys() == before["layers"].keys()
    for key in before["layers"]:
        assert _same_matrix(after["layers"][key], before["layers"][key]), f"layer {key} changed"
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    pd.testing.assert_series_equal(after["obs_dtypes"], before["obs_dtypes"])
    pd.testing.assert_index_equal(after["obs_names"], before["obs_names"])
    pd.testing.assert_frame_equal(after["var"], before["var"])
    pd.testing.assert_index_equal(after["var_names"], before["var_names"])
    assert after["obsm"].keys() == before["obsm"].keys()
    for key in before["obsm"]:
        np.testing.assert_array_equal(after["obsm"][key], before["obsm"][key])
    assert after["uns"] == before["uns"]


# ----------------------------------------------------------------------------- setup_anndata and registry


@pytest.mark.parametrize("fmt", ["dense_f32", "csr_f32", "csc_i32"])
def test_setup_stores_json_registry_and_leaves_adata_unchanged(fmt):
    adata = make_adata(fmt=fmt)
    before = snapshot(adata)
    assert adata.obs["batch"].dtype == object
    registry = setup_anndata(adata, layer="counts", batch_key="batch", labels_key="cell_type")
    assert_unchanged(adata, before)
    assert adata.obs["batch"].dtype == object  # a string column must not become categorical
    assert not isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype)
    stored = adata.uns[REGISTRY_KEY]
    assert isinstance(stored, str)
    assert json.loads(stored)["batch_key"] == "batch"
    assert get_registry(adata) == registry
    assert Registry.from_json(registry.to_json()) == registry
    assert registry.layer == "counts"
    assert registry.var_names == [f"g{j}" for j in range(N_GENES)]
    assert registry.batch_categories == ["a", "b", "c"]
    assert registry.label_categories == ["T", "B", "NK"]  # category order, unused "Mono" dropped
    assert (registry.n_batch, registry.n_labels, registry.n_genes) == (3, 3, N_GENES)
    assert registry.n_cells == N_CELLS and registry.n_empty_cells == 0
    assert registry.allow_non_integer is False


def test_setup_twice_overwrites_registry():
    adata = make_adata()
    setup_anndata(adata, batch_key="batch")
    registry = setup_anndata(adata)
    assert get_registry(adata) == registry
    assert get_registry(adata).batch_key is None


def test_setup_emits_no_warning_on_clean_data():
    adata = make_adata()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_anndata(adata, batch_key="batch", labels_key="cell_type")


# ----------------------------------------------------------------------------- errors leave adata untouched


def _set(adata, i, j, value, fmt):
    """Write one entry into X (in whatever format it is) without changing the format."""
    if sp.issparse(adata.X):
        m = adata.X.tolil()
        m[i, j] = value
        adata.X = type(adata.X)(m, dtype=adata.X.dtype)
    else:
        adata.X[i, j] = value


def _bad_value(value, fmt="dense_f32"):
    def build():
        adata = make_adata(fmt=fmt)
        _set(adata, 3, 2, value, fmt)
        return adata

    return build


def _obs_nan(key):
    def build():
        adata = make_adata()
        if key == "batch":
            values = adata.obs["batch"].to_numpy(copy=True)
            values[4] = None
            adata.obs["batch"] = pd.Series(values, index=adata.obs_names, dtype=object)
        else:
            codes = adata.obs["cell_type"].cat.codes.to_numpy(copy=True)
            codes[7] = -1  # NaN in a categorical
            adata.obs["cell_type"] = pd.Categorical.from_codes(codes, categories=LABEL_CATEGORIES)
        return adata

    return build


def _no_genes():
    adata = make_adata()
    return ad.AnnData(np.zeros((N_CELLS, 0), dtype=np.float32), obs=adata.obs.copy())


def _no_cells():
    return ad.AnnData(np.zeros((0, N_GENES), dtype=np.float32), var=make_adata().var.copy())


def _all_empty():
    return make_adata(counts=np.zeros((N_CELLS, N_GENES), dtype=np.int64))


def _duplicate_genes():
    adata = make_adata()
    adata.var_names = ["g0", "g1", "g2", "g0", "g4", "g5", "g6", "g7"]
    return adata


ERROR_CASES = {
    # id: (build, setup kwargs, regexes the message must match: the problem, then the fix)
    "non_integer": (_bad_value(0.5), {}, ["non-integer", "0.5", "raw counts", "allow_non_integer=True"]),
    "non_integer_csr": (_bad_value(2.25, "csr_f32"), {}, ["1 non-integer", "allow_non_integer=True"]),
    "negative": (_bad_value(-1.0), {}, ["negative", "raw counts", "layer="]),
    "negative_csc": (_bad_value(-3.0, "csc_f32"), {}, ["1 negative", "layer="]),
    "nan": (_bad_value(np.nan), {}, ["NaN", "finite", "raw count layer"]),
    "inf": (_bad_value(np.inf), {}, ["infinite", "finite", "raw count layer"]),
    "nan_csr": (_bad_value(np.nan, "csr_f32"), {}, ["1 NaN", "finite"]),
    "unknown_layer": (make_adata, {"layer": "raw"}, ["'raw'", "not found", "counts", "layer=None"]),
    "batch_key_missing": (make_adata, {"batch_key": "sample"}, ["'sample'", "not found", "cell_type", "batch_key"]),
    "labels_key_missing": (make_adata, {"labels_key": "celltype"}, ["'celltype'", "not found", "labels_key"]),
    "batch_nan": (_obs_nan("batch"), {"batch_key": "batch"}, ["'batch'", "1 missing", "[Ff]ill", "drop"]),
    "labels_nan": (_obs_nan("cell_type"), {"labels_key": "cell_type"}, ["'cell_type'", "1 missing", "[Ff]ill"]),
    "no_genes": (_no_genes, {}, ["no genes", "n_vars == 0"]),
    "no_cells": (_no_cells, {}, ["no cells", "n_obs == 0"]),
    "all_cells_empty": (_all_empty, {}, ["All 20 cells", "zero total counts"]),
    "duplicate_var_names": (_duplicate_genes, {}, ["var_names", "not unique", r"var_names_make_unique\(\)"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_setup_errors_leave_adata_untouched(case):
    build, kwargs, patterns = ERROR_CASES[case]
    adata = build()
    before = snapshot(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the all-empty case may warn before raising
        with pytest.raises(SetupError) as info:
            setup_anndata(adata, **kwargs)
    message = str(info.value)
    for pattern in patterns:
        assert pd.Series([message]).str.contains(pattern).item(), (pattern, message)
    assert REGISTRY_KEY not in adata.uns
    assert_unchanged(adata, before)
    with pytest.raises(SetupError, match="not been set up"):
        get_registry(adata)


def test_setup_error_is_a_value_error():
    assert issubclass(SetupError, ValueError)


def test_unknown_layer_when_no_layers_exist():
    adata = make_adata()
    del adata.layers["counts"]
    with pytest.raises(SetupError, match="available: none"):
        setup_anndata(adata, layer="counts")


def test_allow_non_integer_accepts_fractional_counts():
    adata = _bad_value(0.5)()
    before = snapshot(adata)
    registry = setup_anndata(adata, allow_non_integer=True)
    assert registry.allow_non_integer is True
    assert get_registry(adata).allow_non_integer is True
    assert_unchanged(adata, before)
    # and CellData reads them without rounding
    batch = CellData(adata, registry).gather(torch.tensor([3]))
    assert batch.counts[0, 2].item() == 0.5
    # allow_non_integer never accepts negative values
    adata = _bad_value(-0.5)()
    with pytest.raises(SetupError, match="negative"):
        setup_anndata(adata, allow_non_integer=True)
    assert REGISTRY_KEY not in adata.uns


def test_non_integer_in_unused_x_is_fine_when_layer_has_counts():
    adata = make_adata()
    adata.X = np.log1p(adata.X)  # normalised X, raw counts in a layer: the usual scanpy workflow
    with pytest.raises(SetupError, match="non-integer"):
        setup_anndata(adata)
    registry = setup_anndata(adata, layer="counts")
    batch = CellData(adata, registry).gather(torch.arange(N_CELLS))
    np.testing.assert_array_equal(batch.counts.numpy(), make_counts().astype(np.float32))


def test_unsupported_registry_version():
    adata = make_adata()
    setup_anndata(adata)
    data = json.loads(adata.uns[REGISTRY_KEY])
    data["version"] = 99
    adata.uns[REGISTRY_KEY] = json.dumps(data)
    with pytest.raises(SetupError, match="99") as info:
        get_registry(adata)
    assert "setup_anndata" in str(info.value)
    data.pop("version")
    with pytest.raises(SetupError, match="None"):
        Registry.from_json(json.dumps(data))


def test_get_registry_without_setup():
    with pytest.raises(SetupError, match="setup_anndata"):
        get_registry(make_adata())


# ----------------------------------------------------------------------------- warnings


def test_warns_on_cells_with_zero_total_counts():
    counts = make_counts()
    counts[[2, 11]] = 0
    adata = make_adata(counts=counts)
    before = snapshot(adata)
    with pytest.warns(UserWarning, match="2 of 20 cells have zero total counts"):
        registry = setup_anndata(adata)
    assert registry.n_empty_cells == 2
    assert_unchanged(adata, before)
    data = CellData(adata, registry)
    np.testing.assert_array_equal(data.nonempty_cells, np.setdiff1d(np.arange(N_CELLS), [2, 11]))


@pytest.mark.parametrize("fmt", ["dense_i64", "csr_f32", "csc_f32"])
def test_warns_on_all_zero_genes(fmt):
    counts = make_counts()
    counts[:, [3, 6]] = 0
    adata = make_adata(counts=counts, fmt=fmt)
    before = snapshot(adata)
    with pytest.warns(UserWarning, match="2 of 8 genes have zero counts in every cell"):
        setup_anndata(adata)
    assert_unchanged(adata, before)
    assert REGISTRY_KEY in adata.uns


# ----------------------------------------------------------------------------- CellData / gather

REQUEST = [5, 0, 19, 5, 3, 12, 0]  # out of order, with repeats


def _expected_codes(values, categories):
    return np.array([categories.index(str(v)) for v in values], dtype=np.int64)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gather_all_formats(fmt):
    counts = make_counts()
    adata = make_adata(counts=counts, fmt=fmt)
    registry = setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    before = snapshot(adata)
    data = CellData(adata, registry)
    assert (data.n_cells, data.n_genes, data.nnz) == (N_CELLS, N_GENES, int((counts > 0).sum()))
    idx = torch.tensor(REQUEST)
    mb = data.gather(idx)
    rows = counts[REQUEST].astype(np.float32)

    assert mb.size == len(REQUEST)
    assert mb.counts.dtype == torch.float32 and mb.counts.shape == (len(REQUEST), N_GENES)
    np.testing.assert_array_equal(mb.counts.numpy(), rows)

    assert mb.nz_row.dtype == torch.int64 and mb.nz_col.dtype == torch.int64 and mb.nz_val.dtype == torch.float32
    got = sorted(zip(mb.nz_row.tolist(), mb.nz_col.tolist(), mb.nz_val.tolist(), strict=True))
    r, c = np.nonzero(rows)
    assert got == sorted(zip(r.tolist(), c.tolist(), rows[r, c].tolist(), strict=True))

    np.testing.assert_array_equal(mb.library.numpy(), rows.sum(1))
    np.testing.assert_array_equal(mb.batch_index.numpy(), _expected_codes(BATCHES[REQUEST], ["a", "b", "c"]))
    np.testing.assert_array_equal(
        mb.label_index.numpy(), _expected_codes(np.array(LABELS)[REQUEST], registry.label_categories)
    )
    assert mb.batch_index.dtype == torch.int64 and mb.label_index.dtype == torch.int64
    np.testing.assert_array_equal(mb.cell_index.numpy(), REQUEST)
    assert mb.categorical_covariates.shape == (len(REQUEST), 0)
    assert mb.continuous_covariates.shape == (len(REQUEST), 0)
    assert_unchanged(adata, before)


def test_gather_identical_across_formats():
    idx = torch.tensor(REQUEST)
    batches = []
    for fmt in FORMATS:
        adata = make_adata(fmt=fmt)
        batches.append(CellData(adata, setup_anndata(adata, batch_key="batch")).gather(idx))
    ref = batches[0]
    for mb in batches[1:]:
        for name in ("counts", "nz_row", "nz_col", "nz_val", "library", "batch_index", "label_index", "cell_index"):
            assert torch.equal(getattr(mb, name), getattr(ref, name)), name


def test_gather_without_keys_gives_zero_codes():
    adata = make_adata()
    data = CellData(adata, setup_anndata(adata))
    mb = data.gather(torch.tensor([1, 2, 3]))
    assert torch.equal(mb.batch_index, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(mb.label_index, torch.zeros(3, dtype=torch.int64))


def test_gather_with_empty_rows_and_empty_request():
    counts = make_counts()
    counts[[4, 9]] = 0
    adata = make_adata(counts=counts, fmt="csr_f32")
    with pytest.warns(UserWarning, match="2 of 20 cells"):
        registry = setup_anndata(adata)
    data = CellData(adata, registry)
    mb = data.gather(torch.tensor([4, 9, 4]))
    assert mb.nz_val.numel() == 0
    assert torch.equal(mb.counts, torch.zeros(3, N_GENES))
    assert torch.equal(mb.library, torch.zeros(3))
    mb = data.gather(torch.tensor([9, 1, 4]))
    assert set(mb.nz_row.tolist()) == {1}
    np.testing.assert_array_equal(mb.counts.numpy(), counts[[9, 1, 4]].astype(np.float32))
    empty = data.gather(torch.zeros(0, dtype=torch.int64))
    assert empty.counts.shape == (0, N_GENES) and empty.nz_val.numel() == 0


def test_gather_sparse_input_with_explicit_zeros():
    """Stored zeros in a sparse X are not counts: nz_val holds only the nonzero entries.

    (The sparse likelihood treats every nz entry as x > 0 for its correction term, so a stored zero
    would make the ZINB log-likelihood wrong.)
    """
    counts = make_counts()
    csr = sp.csr_matrix(counts.astype(np.float32))
    csr.data[::3] = 0.0  # explicit zeros, still stored
    assert csr.nnz == int((counts > 0).sum())
    dense = csr.toarray()
    adata = ad.AnnData(csr)
    data = CellData(adata, setup_anndata(adata))
    mb = data.gather(torch.arange(N_CELLS))
    np.testing.assert_array_equal(mb.counts.numpy(), dense)
    assert torch.all(mb.nz_val > 0)
    assert mb.nz_val.numel() == int((dense > 0).sum())
    # the consequence that matters: the sparse ZINB likelihood of the minibatch equals the dense one
    gen = torch.Generator().manual_seed(0)
    log_mu = torch.randn(N_CELLS, N_GENES, generator=gen, dtype=torch.float64)
    theta = torch.rand(N_GENES, generator=gen, dtype=torch.float64) + 0.5
    zi = torch.randn(N_CELLS, N_GENES, generator=gen, dtype=torch.float64)
    sparse = count_log_likelihood("zinb", log_mu, theta, zi, mb.nz_row, mb.nz_col, mb.nz_val.double())
    dense_ll = log_prob("zinb", mb.counts.double(), log_mu.exp(), theta, zi).sum(-1)
    torch.testing.assert_close(sparse, dense_ll, rtol=1e-10, atol=1e-10)


def test_gather_non_canonical_csr_sums_duplicates():
    """A CSR with duplicate (summed) entries and unsorted indices is read as its dense equivalent."""
    indptr = np.array([0, 3, 5])
    indices = np.array([2, 0, 2, 1, 1])
    data = np.array([1.0, 4.0, 2.0, 3.0, 5.0], dtype=np.float32)
    csr = sp.csr_matrix((data, indices, indptr), shape=(2, 3))
    dense = csr.toarray()
    np.testing.assert_array_equal(dense, [[4, 0, 3], [0, 8, 0]])
    adata = ad.AnnData(csr)
    mb = CellData(adata, setup_anndata(adata)).gather(torch.tensor([1, 0]))
    np.testing.assert_array_equal(adata.X.toarray(), dense)  # the caller's matrix still reads the same
    np.testing.assert_array_equal(mb.counts.numpy(), dense[[1, 0]])
    np.testing.assert_array_equal(mb.library.numpy(), [8, 7])
    assert sorted(zip(mb.nz_row.tolist(), mb.nz_col.tolist(), mb.nz_val.tolist())) == [
        (0, 1, 8.0),
        (1, 0, 4.0),
        (1, 2, 3.0),
    ]


def test_celldata_does_not_modify_adata():
    adata = make_adata(fmt="csr_f32")
    registry = setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    before = snapshot(adata)
    data = CellData(adata, registry)
    for mb in data.iterate(np.arange(N_CELLS), 7, shuffle=True, generator=torch.Generator().manual_seed(0)):
        mb.counts.add_(1.0)
        mb.nz_val.mul_(3.0)
    assert_unchanged(adata, before)
    np.testing.assert_array_equal(data.gather(torch.arange(N_CELLS)).counts.numpy(), make_counts())


# ----------------------------------------------------------------------------- iterate


@pytest.fixture
def cell_data():
    adata = make_adata(fmt="csr_f32")
    return CellData(adata, setup_anndata(adata, batch_key="batch"))


def _flat(batches):
    return [cell for batch in batches for cell in batch]


def _order(data, **kwargs):
    return [mb.cell_index.tolist() for mb in data.iterate(np.arange(N_CELLS), **kwargs)]


def test_iterate_without_shuffle_is_in_order(cell_data):
    batches = _order(cell_data, batch_size=6)
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    assert _flat(batches) == list(range(N_CELLS))


def test_iterate_shuffle_covers_each_cell_once_and_is_reproducible(cell_data):
    first = _order(cell_data, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(123))
    again = _order(cell_data, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(123))
    other = _order(cell_data, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(124))
    flat = _flat(first)
    assert sorted(flat) == list(range(N_CELLS))
    assert [len(b) for b in first] == [6, 6, 6, 2]
    assert first == again
    assert _flat(other) != flat
    assert flat != list(range(N_CELLS))


def test_iterate_batches_match_gather(cell_data):
    counts = make_counts().astype(np.float32)
    for mb in cell_data.iterate(np.arange(N_CELLS), 7, shuffle=True, generator=torch.Generator().manual_seed(5)):
        np.testing.assert_array_equal(mb.counts.numpy(), counts[mb.cell_index.numpy()])
        np.testing.assert_array_equal(mb.library.numpy(), counts[mb.cell_index.numpy()].sum(1))


def test_iterate_drop_last(cell_data):
    batches = _order(cell_data, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(7), drop_last=True)
    assert [len(b) for b in batches] == [6, 6, 6]
    flat = _flat(batches)
    assert len(set(flat)) == 18
    # the dropped cells are the tail of the same permutation
    full = _flat(_order(cell_data, batch_size=6, shuffle=True, generator=torch.Generator().manual_seed(7)))
    assert flat == full[:18]
    # an exact multiple drops nothing
    assert [len(b) for b in _order(cell_data, batch_size=5, drop_last=True)] == [5, 5, 5, 5]


def test_iterate_over_a_subset(cell_data):
    subset = np.array([17, 2, 9, 4, 11])
    batches = list(cell_data.iterate(subset, 2, shuffle=True, generator=torch.Generator().manual_seed(0)))
    flat = torch.cat([mb.cell_index for mb in batches]).tolist()
    assert sorted(flat) == sorted(subset.tolist())
    unshuffled = torch.cat([mb.cell_index for mb in cell_data.iterate(torch.tensor(subset), 2)]).tolist()
    assert unshuffled == subset.tolist()


# ----------------------------------------------------------------------------- query data


@pytest.fixture
def trained():
    adata = make_adata(fmt="csr_f32")
    registry = setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    return adata, registry


def _query(adata, genes, fmt="csr_f32", extra=None):
    counts = make_counts()
    full = pd.DataFrame(counts, columns=adata.var_names)
    if extra is not None:
        for name, column in extra.items():
            full[name] = column
    sub = full[genes].to_numpy()
    q = ad.AnnData(as_format(sub, fmt), obs=adata.obs.copy(), var=pd.DataFrame(index=list(genes)))
    q.layers["counts"] = as_format(sub, fmt)
    return q


@pytest.mark.parametrize("fmt", ["csr_f32", "dense_i32", "csc_f32"])
def test_query_with_permuted_genes_is_reordered(trained, fmt):
    adata, registry = trained
    perm = np.random.default_rng(3).permutation(N_GENES)
    assert not np.array_equal(perm, np.arange(N_GENES))
    query = _query(adata, [f"g{j}" for j in perm], fmt=fmt)
    before = snapshot(query)
    order = gene_order_for_query(query, registry)
    np.testing.assert_array_equal(query.var_names.to_numpy()[order], registry.var_names)
    mb = CellData(query, registry).gather(torch.tensor(REQUEST))
    ref = CellData(adata, registry).gather(torch.tensor(REQUEST))
    np.testing.assert_array_equal(mb.counts.numpy(), make_counts()[REQUEST].astype(np.float32))
    for name in ("counts", "nz_row", "nz_col", "nz_val", "library", "batch_index", "label_index"):
        assert torch.equal(getattr(mb, name), getattr(ref, name)), name
    assert_unchanged(query, before)


def test_query_in_training_order_needs_no_reordering(trained):
    adata, registry = trained
    assert gene_order_for_query(_query(adata, list(adata.var_names)), registry) is None


def test_query_missing_genes_raises(trained):
    adata, registry = trained
    query = _query(adata, ["g2", "g3", "g4", "g5", "g7", "g6"])
    with pytest.raises(SetupError, match="lacks 2") as info:
        CellData(query, registry)
    assert "'g0'" in str(info.value) and "'g1'" in str(info.value)
    with pytest.raises(SetupError, match="'g1'"):
        gene_order_for_query(query, registry)


def test_query_extra_genes_are_ignored(trained):
    adata, registry = trained
    extra = {"xA": np.arange(N_CELLS) + 1, "xB": np.full(N_CELLS, 7)}
    genes = ["xA", "g3", "g0", "g7", "xB", "g1", "g2", "g6", "g5", "g4"]
    query = _query(adata, genes, extra=extra)
    data = CellData(query, registry)
    assert data.n_genes == N_GENES
    mb = data.gather(torch.arange(N_CELLS))
    np.testing.assert_array_equal(mb.counts.numpy(), make_counts().astype(np.float32))
    np.testing.assert_array_equal(mb.library.numpy(), make_counts().sum(1))


def test_query_unknown_batch_category_raises(trained):
    adata, registry = trained
    query = _query(adata, list(adata.var_names))
    batch = query.obs["batch"].to_numpy(copy=True)
    batch[[1, 6]] = "zzz_new_batch"
    query.obs["batch"] = batch
    with pytest.raises(SetupError, match="zzz_new_batch") as info:
        CellData(query, registry)
    assert "'batch'" in str(info.value)


def test_query_batch_codes_follow_registry_order(trained):
    """A query whose batch column is categorical with another category order gets the training codes."""
    adata, registry = trained
    query = _query(adata, list(adata.var_names))
    query.obs["batch"] = pd.Categorical(query.obs["batch"].astype(str), categories=["c", "b", "a", "unused"])
    mb = CellData(query, registry).gather(torch.tensor(REQUEST))
    np.testing.assert_array_equal(mb.batch_index.numpy(), _expected_codes(BATCHES[REQUEST], ["a", "b", "c"]))


def test_query_missing_batch_column_raises(trained):
    adata, registry = trained
    query = _query(adata, list(adata.var_names))
    del query.obs["batch"]
    with pytest.raises(SetupError, match="'batch'"):
        CellData(query, registry)


def test_query_validates_its_counts(trained):
    adata, registry = trained
    query = _query(adata, list(adata.var_names), fmt="dense_f32")
    query.X[2, 2] = -1.0
    with pytest.raises(SetupError, match="negative"):
        CellData(query, registry)


def test_query_with_duplicate_gene_names_raises_setup_error(trained):
    """A query whose var_names repeat a training gene is ambiguous: a SetupError naming the fix, as in setup."""
    adata, registry = trained
    counts = make_counts()
    query = ad.AnnData(np.hstack([counts, counts[:, :1]]).astype(np.float32), obs=adata.obs.copy())
    query.var_names = [*adata.var_names, "g0"]
    with pytest.raises(SetupError, match="unique"):
        CellData(query, registry)
