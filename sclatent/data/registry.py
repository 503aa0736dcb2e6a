"""Registration of an AnnData: validate it and describe it in a JSON-serialisable registry.

``setup_anndata`` checks the counts and the obs columns a model will read, and stores a
:class:`Registry` on ``adata.uns[REGISTRY_KEY]`` as a JSON string (a string because h5ad cannot
store ``None`` inside a dict). Nothing else in the caller's AnnData is changed: obs columns are not
converted to categoricals, ``X`` and the layers are only read. A model is built from the registry,
saves it beside its weights, and validates query data against it.

Layering: this file imports only :mod:`sclatent.data._counts` (where the count matrix is, and its
chunked reading); :func:`count_source` joins the two for a model: the counts of an AnnData in the
model's gene order, located once. ``loader``, ``ondisk`` and ``neighbours`` build on both.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from ._counts import CountSource, SetupError, check_counts, get_count_matrix

__all__ = [
    "REGISTRY_KEY",
    "REGISTRY_VERSION",
    "UNLABELLED",
    "CountSource",
    "Registry",
    "SetupError",
    "check_counts",
    "count_source",
    "encode_categorical",
    "encode_continuous",
    "encode_labels",
    "gene_order_for_query",
    "get_count_matrix",
    "get_registry",
    "library_log_prior",
    "setup_anndata",
]

REGISTRY_KEY = "_sclatent_registry"
REGISTRY_VERSION = 1


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
    #: The labels are a target known for some cells only (semi-supervised models): cells whose label
    #: is NaN or ``unlabeled_category`` are unlabelled (code -1), and query data may lack the column.
    partial_labels: bool = False
    unlabeled_category: str | None = None
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
            if self.partial_labels:
                parts[-1] = parts[-1][:-1] + f", unlabelled: {self.unlabeled_category!r} or NaN)"
        if self.categorical_covariate_keys:
            parts.append(f"categorical covariates {self.categorical_covariate_keys}")
        if self.continuous_covariate_keys:
            parts.append(f"continuous covariates {self.continuous_covariate_keys}")
        return ", ".join(parts)


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


#: The label code of an unlabelled cell (registries with ``partial_labels``).
UNLABELLED = -1


def _is_unlabelled(column: pd.Series, unlabeled_category: str | None) -> np.ndarray:
    missing = column.isna().to_numpy()
    if unlabeled_category is None:
        return missing
    return missing | (column.astype(str).to_numpy() == str(unlabeled_category))


def _partial_label_categories(adata: ad.AnnData, key: str, unlabeled_category: str | None) -> list[str]:
    """The label categories of the labelled cells (NaN and ``unlabeled_category`` left out)."""
    if key not in adata.obs.columns:
        raise SetupError(
            f"labels_key column {key!r} not found in adata.obs (columns: {list(adata.obs.columns)}). "
            "Pass an existing column name as labels_key."
        )
    column = adata.obs[key]
    labelled = ~_is_unlabelled(column, unlabeled_category)
    present = set(column[labelled].astype(str))
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories if str(c) in present]
    return sorted(present)


def encode_labels(adata: ad.AnnData, registry: Registry) -> np.ndarray:
    """``(n_cells,)`` int64 label codes of ``adata`` in the registry's order.

    For a registry with ``partial_labels``, unlabelled cells (NaN, ``unlabeled_category``, or every
    cell when the column is absent, as in query data) get :data:`UNLABELLED`, and a label the
    registry does not know is an error naming it; otherwise as :func:`encode_categorical`.
    """
    if not registry.partial_labels:
        return encode_categorical(adata, registry.labels_key, registry.label_categories, "labels_key")
    codes = np.full(adata.n_obs, UNLABELLED, dtype=np.int64)
    if registry.labels_key not in adata.obs.columns:
        return codes
    column = adata.obs[registry.labels_key]
    labelled = ~_is_unlabelled(column, registry.unlabeled_category)
    values = column.astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(registry.label_categories)}
    unknown = sorted(set(values[labelled]) - lookup.keys())
    if unknown:
        raise SetupError(
            f"adata.obs[{registry.labels_key!r}] has labels the model does not know: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''} (known: {registry.label_categories[:10]}"
            f"{' ...' if len(registry.label_categories) > 10 else ''}). A model cannot learn a label from query "
            f"cells: set those cells to {registry.unlabeled_category!r} (or NaN) to map them as unlabelled cells, "
            "or add labelled examples to the reference and train it again."
        )
    codes[labelled] = [lookup[v] for v in values[labelled]]
    return codes


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
    partial_labels: bool = False,
    unlabeled_category: str | None = None,
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
    partial_labels, unlabeled_category
        The labels are a target known for some cells only (semi-supervised models): cells whose
        label is NaN or ``unlabeled_category`` are unlabelled and left out of the label categories.

    Returns
    -------
    Registry
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
    source = CountSource.of(adata, layer)  # located once: the check below reads through it
    where = source.where
    cell_totals, gene_totals = source.check(allow_non_integer)
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
        label_categories=(
            []
            if not labels_key
            else _partial_label_categories(adata, labels_key, unlabeled_category)
            if partial_labels
            else _categories(adata, labels_key, "labels_key")
        ),
        categorical_covariate_keys=categorical_covariate_keys,
        categorical_covariate_categories={
            k: _categories(adata, k, "categorical_covariate_keys") for k in categorical_covariate_keys
        },
        continuous_covariate_keys=continuous_covariate_keys,
        var_names=[str(v) for v in adata.var_names],
        allow_non_integer=allow_non_integer,
        n_cells=int(adata.n_obs),
        n_empty_cells=n_empty,
        partial_labels=bool(partial_labels),
        unlabeled_category=None if unlabeled_category is None else str(unlabeled_category),
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


def count_source(adata: ad.AnnData, registry: Registry) -> CountSource:
    """The counts of ``adata`` as ``registry`` reads them: its layer, its genes in its order.

    Locates the matrix once (:func:`get_count_matrix`) and checks the genes
    (:func:`gene_order_for_query`: a :class:`SetupError` names missing ones); pass the result to
    whatever reads the counts instead of locating them again.
    """
    source = CountSource.of(adata, registry.layer)
    order = gene_order_for_query(adata, registry)
    return source if order is None else CountSource(source.matrix, source.where, source.on_disk, order)


def library_log_prior(
    adata: ad.AnnData, registry: Registry, source: CountSource | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the log library size of the non-empty cells in each batch.

    Returns two ``(n_batch,)`` arrays (a variance is at least 1e-3; a batch without non-empty cells
    gets mean 0 and variance 1). The totals are summed in row chunks when the matrix is on disk.
    ``source`` (default: :func:`count_source` of ``adata``) saves locating the counts again.
    """
    source = count_source(adata, registry) if source is None else source
    totals = source.cell_totals()
    if registry.batch_key:
        codes = encode_categorical(adata, registry.batch_key, registry.batch_categories, "batch_key")
    else:
        codes = np.zeros(adata.n_obs, dtype=np.int64)
    means, variances = np.zeros(registry.n_batch), np.ones(registry.n_batch)
    for b in range(registry.n_batch):
        logs = np.log(totals[(codes == b) & (totals > 0)])
        if logs.size:
            means[b] = logs.mean()
            variances[b] = max(logs.var(), 1e-3)
    return means, variances
