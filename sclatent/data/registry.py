"""Registration of an AnnData: validate it and describe it in a JSON-serialisable registry.

``setup_anndata`` checks the counts and the obs columns a model will read, and stores a
:class:`Registry` on ``adata.uns[REGISTRY_KEY]`` as a JSON string (a string because h5ad cannot
store ``None`` inside a dict). Nothing else in the caller's AnnData is changed: obs columns are not
converted to categoricals, ``X`` and the layers are only read. A model is built from the registry,
saves it beside its weights, and validates query data against it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

REGISTRY_KEY = "_sclatent_registry"
REGISTRY_VERSION = 1
_CHUNK_ROWS = 4096


class SetupError(ValueError):
    """An AnnData that a model cannot use as given; the message names the fix."""


@dataclass
class Registry:
    """What a model needs to know about the AnnData it was set up on.

    All fields are plain JSON types so the registry can live in ``adata.uns`` and in a saved
    model's metadata.
    """

    layer: str | None
    batch_key: str | None
    batch_categories: list[str]
    labels_key: str | None
    label_categories: list[str]
    categorical_covariate_keys: list[str]
    categorical_covariate_categories: dict[str, list[str]]
    continuous_covariate_keys: list[str]
    var_names: list[str]
    allow_non_integer: bool = False
    n_cells: int = 0
    n_empty_cells: int = 0
    version: int = REGISTRY_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def n_batch(self) -> int:
        return max(1, len(self.batch_categories))

    @property
    def n_labels(self) -> int:
        return max(1, len(self.label_categories))

    @property
    def n_genes(self) -> int:
        return len(self.var_names)

    @property
    def n_cats_per_covariate(self) -> list[int]:
        return [len(self.categorical_covariate_categories[k]) for k in self.categorical_covariate_keys]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Registry:
        data = json.loads(text)
        version = data.get("version")
        if version != REGISTRY_VERSION:
            raise SetupError(
                f"Registry format version {version!r} is not supported by this sclatent "
                f"(expects {REGISTRY_VERSION}). Re-run setup_anndata with this version."
            )
        return cls(**data)

    def summary(self) -> str:
        parts = [f"{self.n_cells} cells x {self.n_genes} genes", f"layer={self.layer!r}"]
        if self.batch_key:
            parts.append(f"batch_key={self.batch_key!r} ({len(self.batch_categories)} batches)")
        if self.labels_key:
            parts.append(f"labels_key={self.labels_key!r} ({len(self.label_categories)} labels)")
        if self.categorical_covariate_keys:
            parts.append(f"categorical covariates {self.categorical_covariate_keys}")
        if self.continuous_covariate_keys:
            parts.append(f"continuous covariates {self.continuous_covariate_keys}")
        return ", ".join(parts)


# ----------------------------------------------------------------------------- counts


def get_count_matrix(adata: ad.AnnData, layer: str | None):
    """The count matrix of ``adata`` (``X`` or ``layers[layer]``), without copying."""
    if layer is None:
        matrix = adata.X
        where = "adata.X"
    else:
        if layer not in adata.layers:
            available = list(adata.layers.keys())
            raise SetupError(
                f"Layer {layer!r} not found in adata.layers (available: {available or 'none'}). "
                "Pass one of those names, or layer=None to use adata.X."
            )
        matrix = adata.layers[layer]
        where = f"adata.layers[{layer!r}]"
    if matrix is None:
        raise SetupError(f"{where} is empty (None). Put the raw counts there or choose another layer.")
    from .ondisk import is_on_disk, refuse_csc  # (ondisk imports this module)

    if is_on_disk(matrix):
        # left on disk: backed h5ad / zarr, read in row ranges by sclatent.data.ondisk
        refuse_csc(matrix, where)
    elif not (sp.issparse(matrix) or isinstance(matrix, np.ndarray)):
        try:
            matrix = np.asarray(matrix)
        except Exception as err:  # pragma: no cover - exotic array types
            raise SetupError(f"{where} has unsupported type {type(matrix).__name__}.") from err
    if len(matrix.shape) != 2 or tuple(matrix.shape) != (adata.n_obs, adata.n_vars):
        raise SetupError(f"{where} has shape {matrix.shape}, expected {(adata.n_obs, adata.n_vars)}.")
    if not np.issubdtype(matrix.dtype, np.number) or np.issubdtype(matrix.dtype, np.complexfloating):
        raise SetupError(f"{where} has dtype {matrix.dtype}; counts must be a real numeric type.")
    return matrix, where


def _row_chunks(matrix):
    from .ondisk import DiskMatrix, is_on_disk

    if is_on_disk(matrix):
        # raw row-range reads: anndata's CSRDataset slicing is several times slower
        for start, chunk in DiskMatrix(matrix).chunks(_CHUNK_ROWS):
            yield start, chunk.data, chunk
        return
    for start in range(0, matrix.shape[0], _CHUNK_ROWS):
        chunk = matrix[start : start + _CHUNK_ROWS]
        if sp.issparse(chunk):
            chunk = sp.csr_matrix(chunk)
            yield start, chunk.data, chunk
        else:
            chunk = np.asarray(chunk)
            yield start, chunk.ravel(), chunk


def check_counts(matrix, where: str, allow_non_integer: bool, chunks=None) -> tuple[np.ndarray, np.ndarray]:
    """Check that ``matrix`` holds finite, non-negative (integer) counts.

    Reads the matrix in row chunks, never densifying it whole (on disk too: backed h5ad, zarr).
    ``chunks``, an iterable of ``(start_row, values, chunk)``, replaces that reading (a caller
    that makes its own pass over the rows validates in the same pass).

    Returns
    -------
    cell_totals, gene_totals
        ``(n_cells,)`` and ``(n_genes,)`` float64 total counts.
    """
    n_cells, n_genes = matrix.shape
    cell_totals = np.zeros(n_cells)
    gene_totals = None  # sized by the chunks (a caller's chunks may have its own gene order)
    n_bad = n_negative = n_fraction = 0
    example_fraction = None
    for start, values, chunk in _row_chunks(matrix) if chunks is None else chunks:
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        n_bad += int((~finite).sum())
        n_negative += int((values < 0).sum())
        if not np.issubdtype(chunk.dtype, np.integer):
            fractional = finite & (values != np.round(values))
            if fractional.any():
                n_fraction += int(fractional.sum())
                example_fraction = example_fraction if example_fraction is not None else values[fractional][0]
        rows = np.asarray(chunk.sum(axis=1, dtype=np.float64)).ravel()
        cell_totals[start : start + rows.size] = rows
        column_totals = np.asarray(chunk.sum(axis=0, dtype=np.float64)).ravel()
        gene_totals = column_totals if gene_totals is None else gene_totals + column_totals
    gene_totals = np.zeros(n_genes) if gene_totals is None else gene_totals
    if n_bad:
        raise SetupError(
            f"{where} contains {n_bad} NaN or infinite values. Counts must be finite: remove the "
            "affected cells/genes or pass the raw count layer instead of a transformed one."
        )
    if n_negative:
        raise SetupError(
            f"{where} contains {n_negative} negative values; counts must be >= 0. This usually means "
            "the data were scaled or centred (sc.pp.scale); pass the raw counts via layer=... instead."
        )
    if n_fraction and not allow_non_integer:
        raise SetupError(
            f"{where} contains {n_fraction} non-integer values (e.g. {example_fraction:.4g}), but count "
            "models expect raw integer counts. Pass the raw counts (e.g. a layer saved before "
            "sc.pp.normalize_total/log1p: layer='counts'), or allow_non_integer=True (CLI: --allow-non-integer) "
            "if the values are genuinely fractional counts (e.g. from ambient-RNA correction)."
        )
    return cell_totals, gene_totals


# ----------------------------------------------------------------------------- obs columns


def _categories(adata: ad.AnnData, key: str, role: str) -> list[str]:
    if key not in adata.obs.columns:
        raise SetupError(
            f"{role} column {key!r} not found in adata.obs (columns: {list(adata.obs.columns)}). "
            f"Pass an existing column name as {role}."
        )
    column = adata.obs[key]
    n_missing = int(column.isna().sum())
    if n_missing:
        raise SetupError(
            f"adata.obs[{key!r}] ({role}) has {n_missing} missing values (NaN). Fill them "
            f"(adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).where(adata.obs[{key!r}].notna(), 'unknown')) "
            f"or drop those cells (adata = adata[adata.obs[{key!r}].notna()].copy())."
        )
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = set(column.astype(str).unique())
        return [str(c) for c in column.cat.categories if str(c) in present]
    return sorted(column.astype(str).unique().tolist())


def encode_categorical(adata: ad.AnnData, key: str, categories: list[str], role: str) -> np.ndarray:
    """``(n_cells,)`` int64 codes of ``adata.obs[key]`` in the registry's category order."""
    if key not in adata.obs.columns:
        raise SetupError(
            f"{role} column {key!r} not found in adata.obs of the query data; the model was set up "
            f"with it. Add adata.obs[{key!r}] with values among {categories[:10]}."
        )
    column = adata.obs[key]
    if column.isna().any():
        raise SetupError(f"adata.obs[{key!r}] ({role}) has {int(column.isna().sum())} missing values (NaN).")
    values = column.astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(categories)}
    unknown = sorted(set(values) - lookup.keys())
    if unknown:
        raise SetupError(
            f"adata.obs[{key!r}] ({role}) has categories the model was not trained on: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}. Known categories: {categories[:10]}"
            f"{' ...' if len(categories) > 10 else ''}. Map the query cells to known categories or "
            "retrain with them."
        )
    return np.fromiter((lookup[v] for v in values), dtype=np.int64, count=values.size)


def encode_continuous(adata: ad.AnnData, keys: list[str]) -> np.ndarray:
    """``(n_cells, len(keys))`` float32 continuous covariates, checked finite."""
    columns = []
    for key in keys:
        if key not in adata.obs.columns:
            raise SetupError(
                f"continuous_covariate_keys column {key!r} not found in adata.obs (columns: {list(adata.obs.columns)})."
            )
        try:
            values = pd.to_numeric(adata.obs[key]).to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise SetupError(f"adata.obs[{key!r}] must be numeric to be a continuous covariate.") from err
        if not np.isfinite(values).all():
            raise SetupError(f"adata.obs[{key!r}] has NaN or infinite values; fill or drop those cells.")
        columns.append(values.astype(np.float32))
    return np.stack(columns, axis=1) if columns else np.zeros((adata.n_obs, 0), dtype=np.float32)


# ----------------------------------------------------------------------------- entry points


def setup_anndata(
    adata: ad.AnnData,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
    allow_non_integer: bool = False,
) -> Registry:
    """Validate ``adata`` and store a registry on ``adata.uns[REGISTRY_KEY]``.

    Parameters
    ----------
    adata
        Cells x genes AnnData holding raw counts (dense or CSR/CSC, int or float).
    layer
        Layer with the counts; ``None`` uses ``adata.X``.
    batch_key, labels_key
        obs columns with the batch and the cell-type label (optional).
    categorical_covariate_keys, continuous_covariate_keys
        Further obs columns injected into the networks.
    allow_non_integer
        Accept fractional values (errors by default, since count models expect integers).

    Returns
    -------
    The :class:`Registry`, also stored (as JSON) on ``adata.uns``.

    Notes
    -----
    Cells with zero total counts are allowed with a warning; models train without them and still
    return a representation for them.
    """
    if not isinstance(adata, ad.AnnData):
        raise SetupError(f"Expected an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise SetupError("adata has no cells (n_obs == 0); pass an AnnData with at least one cell.")
    if adata.n_vars == 0:
        raise SetupError("adata has no genes (n_vars == 0); the count matrix must have at least one gene.")
    if not adata.var_names.is_unique:
        raise SetupError("adata.var_names are not unique; call adata.var_names_make_unique() first.")
    matrix, where = get_count_matrix(adata, layer)
    cell_totals, gene_totals = check_counts(matrix, where, allow_non_integer)
    n_empty = int((cell_totals == 0).sum())
    if n_empty == adata.n_obs:
        raise SetupError(
            f"All {n_empty} cells in {where} have zero total counts; nothing to learn from. "
            "Check that the right layer holds the counts (layer=...)."
        )
    if n_empty:
        warnings.warn(
            f"{n_empty} of {adata.n_obs} cells have zero total counts; models train without them "
            "(they still get a latent representation). Remove them with "
            "sc.pp.filter_cells(adata, min_counts=1) to silence this.",
            stacklevel=2,
        )
    n_empty_genes = int((gene_totals == 0).sum())
    if n_empty_genes:
        warnings.warn(
            f"{n_empty_genes} of {adata.n_vars} genes have zero counts in every cell; they cost time "
            "and carry no information. Remove them with sc.pp.filter_genes(adata, min_cells=1).",
            stacklevel=2,
        )
    categorical_covariate_keys = list(categorical_covariate_keys or [])
    continuous_covariate_keys = list(continuous_covariate_keys or [])
    registry = Registry(
        layer=layer,
        batch_key=batch_key,
        batch_categories=_categories(adata, batch_key, "batch_key") if batch_key else [],
        labels_key=labels_key,
        label_categories=_categories(adata, labels_key, "labels_key") if labels_key else [],
        categorical_covariate_keys=categorical_covariate_keys,
        categorical_covariate_categories={
            k: _categories(adata, k, "categorical_covariate_keys") for k in categorical_covariate_keys
        },
        continuous_covariate_keys=continuous_covariate_keys,
        var_names=[str(v) for v in adata.var_names],
        allow_non_integer=allow_non_integer,
        n_cells=int(adata.n_obs),
        n_empty_cells=n_empty,
    )
    encode_continuous(adata, continuous_covariate_keys)  # validates the columns
    adata.uns[REGISTRY_KEY] = registry.to_json()
    return registry


def get_registry(adata: ad.AnnData) -> Registry:
    """The registry that ``setup_anndata`` stored on ``adata``."""
    if REGISTRY_KEY not in adata.uns:
        raise SetupError(
            "This AnnData has not been set up. Call Model.setup_anndata(adata, layer=..., batch_key=...) first."
        )
    return Registry.from_json(adata.uns[REGISTRY_KEY])


def gene_order_for_query(adata: ad.AnnData, registry: Registry) -> np.ndarray | None:
    """Column indices that put ``adata``'s genes in the training order (None if already so).

    Raises a :class:`SetupError` naming the missing genes when the query lacks any.
    """
    query = adata.var_names
    if not query.is_unique:
        raise SetupError("The query AnnData's var_names are not unique; call adata.var_names_make_unique() first.")
    if len(query) == registry.n_genes and np.array_equal(query.to_numpy(dtype=str), registry.var_names):
        return None
    position = pd.Index(query).get_indexer(registry.var_names)
    missing = [g for g, p in zip(registry.var_names, position, strict=True) if p < 0]
    if missing:
        raise SetupError(
            f"The query AnnData lacks {len(missing)} of the model's {registry.n_genes} genes "
            f"(e.g. {missing[:5]}). Subset or pad the query to the training genes, in any order: "
            "adata[:, model.var_names] after adding the missing genes as zero columns."
        )
    return position
