"""Reference -> query mapping (scArches, Lotfollahi et al. 2022) for the count VAEs: the one mechanism.

:meth:`BaseModel.prepare_query_anndata <sclatent.model.BaseModel.prepare_query_anndata>` and
:meth:`BaseModel.load_query_data <sclatent.model.BaseModel.load_query_data>` are thin classmethods
over the functions here; the growing itself is the modules' (``add_batch_categories`` of
:class:`~sclatent.modules.VAEModule` and :class:`~sclatent.modules.ssvae.SemiSupervisedVAEModule`,
through :meth:`sclatent.nn.MLP.add_categories`).

How a query model is made (:func:`load_query_model`):

1. Genes: a query whose genes are not the reference's, in order, is first aligned by
   :func:`prepare_query_anndata` (a copy: extra genes dropped, missing ones zero-filled with a
   warning, refused above :data:`MAX_MISSING_FRACTION`).
2. Registry: the reference's, with the query's batch categories the reference does not know
   appended after its own (:func:`query_registry`; stored in the query AnnData's ``uns``). Labels and
   covariates are validated by the data layer (a label the reference does not know is
   :func:`sclatent.data.registry.encode_labels`' error).
3. Module: one of the reference's shapes gets a copy of the reference's state dict, then grows by
   the new batches (``module.add_batch_categories``), whose mask of new entries it returns. The
   result is a module of the class's shapes for the query registry, so ``Model.load(dir, adata)``
   rebuilds a saved query model like any other.
4. Freezing (``freeze=True``, :func:`freeze_for_query`): parameters with new entries train under a
   gradient mask declared on the module (:meth:`sclatent.contracts.Module.restrict_gradients`): every
   step kind zeroes the gradient of their old entries before the optimiser steps, so the count VAE's
   fused pass still trains a query; every other parameter gets ``requires_grad=False`` (the
   optimiser then leaves it out) unless an option unfreezes it; every BatchNorm whose affine
   parameters are frozen is held (:meth:`sclatent.nn.blocks.BatchNorm1d.hold`): it normalises with
   the reference's running statistics in training too, so they do not move and a query batch's
   shift is not cancelled by the minibatch's own statistics (with train-mode BatchNorm the new
   batch rows of a one-batch query would get no gradient at all: their shift is the same for every
   cell of the minibatch).
   Adam's L2 weight decay, which would move frozen entries of a partly trained parameter, is
   refused: a frozen query model trains with ``weight_decay=0``.

The freezing is training-time state of the model object (:class:`QueryFreezing`, on
``model.query_freezing``): it is not saved, and a saved query model loaded again trains every
parameter like any model of its class (call ``load_query_data`` again to map another query).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from ..base import seeded
from ..data import REGISTRY_KEY, Registry, SetupError, setup_anndata
from ..data.loader import obs_codes, resolve_device
from ..data.registry import library_log_prior
from ..modules.ssvae import SemiSupervisedVAEModule
from ..modules.vae import VAEModule
from ..nn.blocks import MLP, BatchNorm1d, Dropout

#: Largest fraction of the reference's genes a query may lack (they are filled with zeros). A
#: missing gene reads as "not expressed" to the encoder and moves every query cell; scvi-tools warns
#: below 80 % of the reference's genes (its ``MIN_VAR_NAME_RATIO``), and more than a fifth missing is
#: usually another gene naming (symbols vs Ensembl IDs) or another panel, not a few filtered genes.
MAX_MISSING_FRACTION = 0.2

#: Module classes whose models can map query data: they grow batch rows (``add_batch_categories``).
QUERY_MODULES = (VAEModule, SemiSupervisedVAEModule)


# ----------------------------------------------------------------------------- genes


def prepare_query_anndata(
    adata: ad.AnnData, registry: Registry, max_missing_fraction: float = MAX_MISSING_FRACTION
) -> ad.AnnData:
    """A new AnnData with the registry's genes, in its order: extra genes dropped, missing ones zeros.

    ``X`` and every layer are aligned (sparse matrices stay sparse, in their format and dtype);
    ``obs``, ``obsm``, ``obsp`` and ``uns`` are copied (a registry in ``uns`` is left out); ``var``
    is reindexed (NaN for the missing genes); ``varm``, ``varp`` and ``raw`` are dropped. A backed
    AnnData is read into memory. ``adata`` itself is not changed.

    Raises
    ------
    SetupError
        ``adata`` is not an AnnData, its gene names repeat, or more than ``max_missing_fraction``
        of the registry's genes are missing (the message gives the numbers and the fix).
    """
    if not isinstance(adata, ad.AnnData):
        raise SetupError(f"Expected an AnnData, got {type(adata).__name__}.")
    if not 0.0 <= max_missing_fraction <= 1.0:
        raise ValueError(f"max_missing_fraction must be in [0, 1], got {max_missing_fraction}.")
    query = pd.Index(adata.var_names.astype(str))
    if not query.is_unique:
        raise SetupError("The query AnnData's var_names are not unique; call adata.var_names_make_unique() first.")
    reference = pd.Index(registry.var_names)
    position = query.get_indexer(reference)
    missing = reference[position < 0]
    n_ref, n_missing = len(reference), len(missing)
    n_extra = len(query) - (n_ref - n_missing)
    if n_missing > max_missing_fraction * n_ref:
        raise SetupError(
            f"The query has {n_ref - n_missing} of the reference model's {n_ref} genes: {n_missing} "
            f"({100 * n_missing / n_ref:.1f} %) are missing, more than max_missing_fraction="
            f"{max_missing_fraction:g} ({100 * max_missing_fraction:g} %). Missing genes would be filled with zeros, "
            "which the encoder reads as 'not expressed', and place the query cells wrongly. Check that query and "
            f"reference name genes alike (reference genes begin {list(reference[:3])}, query genes "
            f"{list(query[:3])}: gene symbols vs Ensembl IDs?) and cover the same genes; to pad anyway, pass "
            "max_missing_fraction=<a larger fraction>."
        )
    if n_missing:
        warnings.warn(
            f"The query lacks {n_missing} of the reference model's {n_ref} genes ({100 * n_missing / n_ref:.1f} %, "
            f"e.g. {list(missing[:5])}); they are filled with zeros, which the model reads as 'not expressed'."
            + (f" {n_extra} query genes the reference does not have are dropped." if n_extra else ""),
            stacklevel=3,
        )
    source = adata.to_memory() if adata.isbacked else adata
    uns = {key: copy.deepcopy(value) for key, value in source.uns.items() if key != REGISTRY_KEY}
    return ad.AnnData(
        X=_aligned(source.X, position, n_ref),
        obs=source.obs.copy(),
        var=source.var.set_axis(query).reindex(reference),
        layers={key: _aligned(matrix, position, n_ref) for key, matrix in source.layers.items()},
        obsm={key: value.copy() for key, value in source.obsm.items()},
        obsp={key: value.copy() for key, value in source.obsp.items()},
        uns=uns,
    )


def _aligned(matrix: Any, position: np.ndarray, n_genes: int) -> Any:
    """``(n_cells, n_genes)`` matrix whose column ``j`` is ``matrix[:, position[j]]``, zeros where ``position < 0``."""
    if matrix is None:
        return None
    present = np.flatnonzero(position >= 0)
    if not sp.issparse(matrix):
        matrix = np.asarray(matrix)
        out = np.zeros((matrix.shape[0], n_genes), dtype=matrix.dtype)
        out[:, present] = matrix[:, position[present]]
        return out
    if matrix.format not in ("csr", "csc"):
        matrix = matrix.tocsr()
    taken = matrix[:, position[present]]  # the present genes, in the reference's order
    if taken.format == "csr":  # renumber the columns: taken's column k is gene present[k]
        parts = (taken.data, present[taken.indices].astype(taken.indices.dtype), taken.indptr)
    else:  # CSC: empty columns for the missing genes
        counts = np.zeros(n_genes + 1, dtype=taken.indptr.dtype)
        counts[present + 1] = np.diff(taken.indptr)
        parts = (taken.data, taken.indices, np.cumsum(counts, dtype=taken.indptr.dtype))
    return type(taken)(parts, shape=(matrix.shape[0], n_genes))


# ----------------------------------------------------------------------------- registry


def query_registry(adata: ad.AnnData, reference: Registry) -> Registry:
    """Validate the query ``adata`` (genes already the reference's) and store its registry in ``adata.uns``.

    The registry is the reference's, with the batch categories of the query that the reference
    does not know appended after the reference's own, and the query's cell counts. Counts, batch,
    labels and covariates are validated as ``setup_anndata`` and the data layer do; on an error
    ``adata.uns`` is left as it was.

    Raises
    ------
    SetupError
        The reference has no batch key, the query lacks its column, no query batch is new, or the
        data layer refuses the query (counts, an unknown label or covariate category, ...).
    """
    key = reference.batch_key
    if not key:
        raise SetupError(
            "The reference model was set up without a batch_key, and query mapping (scArches) adapts a model "
            "to a query only through new batch categories: there is nothing it could learn. Embed the query "
            "with the reference model as it is (reference_model.get_latent_representation(prepared_query), "
            "after prepare_query_anndata), or set the reference up with batch_key=... and train it again."
        )
    if key not in adata.obs.columns:
        raise SetupError(
            f"The query has no adata.obs[{key!r}] column: the reference model was set up with batch_key={key!r}, "
            "and query mapping learns the query's batches as new categories of it. Add the column naming each "
            f"query cell's batch, e.g. query.obs[{key!r}] = 'query' for one batch (values the reference knows, "
            f"{reference.batch_categories[:5]}, are mapped with the reference's own parameters)."
        )
    previous = adata.uns.get(REGISTRY_KEY)
    try:
        with warnings.catch_warnings():
            # genes absent from the query are zero columns by construction (prepare_query_anndata warned)
            warnings.filterwarnings("ignore", message=r".*genes have zero counts in every cell")
            own = setup_anndata(
                adata,
                layer=reference.layer,
                batch_key=key,
                categorical_covariate_keys=reference.categorical_covariate_keys,
                continuous_covariate_keys=reference.continuous_covariate_keys,
                allow_non_integer=reference.allow_non_integer,
            )
        known = set(reference.batch_categories)
        new = [c for c in own.batch_categories if c not in known]
        if not new:
            raise SetupError(
                f"Every batch of the query ({own.batch_categories[:5]}) is a batch of the reference model: query "
                "mapping has no new batch to learn. Embed these cells with the reference model as it is "
                "(reference_model.get_latent_representation(prepared_query)), or name the query's batches "
                f"apart in adata.obs[{key!r}] to map them as new batches."
            )
        registry = Registry.from_json(reference.to_json())  # a copy: the reference's is never changed
        registry.batch_categories = [*reference.batch_categories, *new]
        registry.n_cells, registry.n_empty_cells = own.n_cells, own.n_empty_cells
        obs_codes(adata, registry, torch.device("cpu"))  # batch, labels, covariates: the data layer's errors
    except BaseException:
        if previous is None:
            adata.uns.pop(REGISTRY_KEY, None)
        else:
            adata.uns[REGISTRY_KEY] = previous
        raise
    adata.uns[REGISTRY_KEY] = registry.to_json()
    return registry


# ----------------------------------------------------------------------------- freezing


@dataclass
class QueryFreezing:
    """What trains in a query model made by ``load_query_data(..., freeze=True)`` (training-time state).

    Attributes
    ----------
    masks
        Parameters that train in part: name -> bool mask of the parameter's shape, True on the
        entries that train (the new batches'); the trainer zeroes the others' gradients
        (:meth:`sclatent.contracts.Module.restrict_gradients`).
    trainable
        Parameters that train entirely (unfrozen by an option, e.g. ``freeze_expression=False``).
    held_batchnorm
        BatchNorm layers (module names) held: normalising with their running statistics in
        training too (``BatchNorm1d.hold``), which therefore do not move: those
        whose affine parameters are frozen.
    freeze_classifier
        Whether the classifier (semi-supervised models) is frozen: its temperature is then kept too
        (also when its hidden-layer shifts adapt to the query: ``adapt_classifier``, listed in
        ``trainable``).
    """

    masks: dict[str, torch.Tensor]
    trainable: tuple[str, ...]
    held_batchnorm: tuple[str, ...]
    freeze_classifier: bool

    def __repr__(self) -> str:
        return (
            f"QueryFreezing(partly_trained={self.partly_trained}, trainable={list(self.trainable)}, "
            f"held_batchnorm={list(self.held_batchnorm)}, freeze_classifier={self.freeze_classifier})"
        )

    @property
    def partly_trained(self) -> dict[str, str]:
        """Each partly trained parameter with how many of its entries train, e.g. ``"32 of 96"``."""
        return {name: f"{int(mask.sum())} of {mask.numel()}" for name, mask in self.masks.items()}

    def weight_decay(self, requested: float | None) -> float:
        """The weight decay to train with: 0, the default; any other value is refused.

        Adam's L2 decay adds ``weight_decay * parameter`` to every entry's gradient after the
        masks, so it would move the frozen (reference) entries of the partly trained parameters.
        """
        if not requested:
            return 0.0
        raise ValueError(
            f"weight_decay={requested} would move the frozen reference entries of the query model's partly "
            f"trained parameters ({sorted(self.masks)[:3]} ...): Adam's L2 decay adds weight_decay * parameter to "
            "every entry's gradient. Train a query model with weight_decay=0 (its default), or map the query with "
            "load_query_data(..., freeze=False) to train every parameter."
        )


def freeze_for_query(
    module: nn.Module,
    masks: dict[str, torch.Tensor],
    *,
    freeze_dropout: bool = False,
    freeze_expression: bool = True,
    freeze_decoder_first_layer: bool = True,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = True,
    freeze_classifier: bool = True,
    adapt_classifier: bool = True,
) -> QueryFreezing:
    """Freeze ``module`` (a grown :data:`QUERY_MODULES` module) for query training, in place.

    ``masks`` (from ``add_batch_categories``) name the partly trained parameters. Options unfreeze
    whole parts, as scvi-tools' ``load_query_data``: the encoders' first layer (the expression
    weights, ``freeze_expression=False``), the decoder's first layer, the encoders' or the
    decoder's BatchNorm (affine parameters and running statistics), the classifier. Dropout is
    switched off in training with ``freeze_dropout``. With ``adapt_classifier``, a frozen
    classifier's hidden-layer biases (``SemiSupervisedVAEModule.classifier_shifts``) train.
    """
    vae = module.vae if isinstance(module, SemiSupervisedVAEModule) else module
    encoders: list[MLP] = [vae.z_encoder.body] + ([] if vae.use_observed_library else [vae.l_encoder.body])
    decoder: MLP = vae.decoder.body
    trained: list[nn.Module] = []

    def first_layer(mlp: MLP) -> list[nn.Module]:
        layer = mlp.layers[0]
        return [layer.linear] + ([layer.continuous] if layer.continuous is not None else [])

    def norms(mlp: MLP) -> list[nn.Module]:
        return [m for m in mlp.post.modules() if isinstance(m, nn.BatchNorm1d)]

    if not freeze_expression:
        trained += [part for mlp in encoders for part in first_layer(mlp)]
    if not freeze_decoder_first_layer:
        trained += first_layer(decoder)
    if not freeze_batchnorm_encoder:
        trained += [norm for mlp in encoders for norm in norms(mlp)]
    if not freeze_batchnorm_decoder:
        trained += norms(decoder)
    if isinstance(module, SemiSupervisedVAEModule) and not freeze_classifier:
        trained.append(module.classifier)
    trained_ids = {id(p) for part in trained for p in part.parameters()}
    if isinstance(module, SemiSupervisedVAEModule) and freeze_classifier and adapt_classifier:
        trained_ids |= {id(p) for p in module.classifier_shifts()}
    unknown = sorted(set(masks) - {name for name, _ in module.named_parameters()})
    if unknown:
        raise ValueError(f"masks name parameters {unknown} that {type(module).__name__} does not have.")
    freezing = QueryFreezing(masks, (), (), freeze_classifier)
    trainable = []
    for name, parameter in module.named_parameters():
        if id(parameter) in trained_ids:
            parameter.requires_grad_(True)
            trainable.append(name)
        elif name in masks:
            parameter.requires_grad_(True)
            pass  # trains through its mask (module.restrict_gradients, below)
        else:
            parameter.requires_grad_(False)
    held = []
    for name, part in module.named_modules():
        if isinstance(part, nn.BatchNorm1d) and id(part.weight) not in trained_ids:
            # held: normalised with the reference's running statistics in training too (its
            # statistics unchanged, and a query batch's covariate shift is not cancelled by the
            # minibatch's own statistics: the new rows then get a gradient)
            if isinstance(part, BatchNorm1d):
                part.hold()
            part.momentum = 0.0
            held.append(name)
        if freeze_dropout and isinstance(part, Dropout | nn.Dropout):
            part.p = 0.0
    module.restrict_gradients(masks)
    freezing.trainable, freezing.held_batchnorm = tuple(trainable), tuple(held)
    return freezing


# ----------------------------------------------------------------------------- the query model


def load_query_model(
    cls: type,
    adata: ad.AnnData,
    reference_model: Any,
    freeze: bool = True,
    accelerator: str = "cpu",
    **freeze_options: bool,
) -> Any:
    """The query model of ``cls`` for ``adata`` mapped onto ``reference_model`` (see the module docstring).

    ``reference_model`` and its module are only read. Returns a model of ``cls`` whose registry
    lists the reference's batches then the query's new ones, on ``adata`` (or on its aligned copy
    when its genes differ from the reference's), untrained, with ``query_freezing`` set when
    ``freeze``.
    """
    if not issubclass(cls.module_class, QUERY_MODULES):
        raise SetupError(
            f"{cls.__name__} cannot map query data: its module ({cls.module_class.__name__}) cannot grow parameters "
            "for new batches. Query mapping (scArches) is available for sclatent.model.VAE and "
            "sclatent.model.SemiSupervisedVAE."
        )
    if not isinstance(reference_model, cls):
        raise TypeError(
            f"{cls.__name__}.load_query_data maps onto a trained {cls.__name__}, got {type(reference_model).__name__}."
        )
    reference = reference_model.registry
    if not isinstance(adata, ad.AnnData):
        raise SetupError(f"Expected an AnnData, got {type(adata).__name__}.")
    if list(adata.var_names.astype(str)) != reference.var_names:
        adata = prepare_query_anndata(adata, reference)  # a copy: the caller's AnnData is not changed
    registry = query_registry(adata, reference)
    n_new = registry.n_batch - reference.n_batch
    model = cls.__new__(cls)
    model._attach(None, reference, validated=False)  # the reference's shapes, to take its weights
    model.train_indices = np.zeros(0, dtype=np.int64)
    model.validation_indices = np.zeros(0, dtype=np.int64)
    model._init_state(reference_model.seed, dict(reference_model.hyperparameters))
    with seeded(reference_model.seed):
        module = cls.module_class(**model._module_kwargs())
        module.load_state_dict(reference_model.module.state_dict())
        model._attach(adata, registry, validated=True)
        means = variances = None
        if not model.hyperparameters["use_observed_library"]:  # the query's own prior for its batches
            means, variances = library_log_prior(adata, registry, source=model._count_source())
            means, variances = means[reference.n_batch :], variances[reference.n_batch :]
        masks = module.add_batch_categories(n_new, means, variances)
    model.module = module.to(resolve_device(accelerator))
    model.module.eval()
    if freeze:
        model.query_freezing = freeze_for_query(module, masks, **freeze_options)
    return model


__all__ = [
    "MAX_MISSING_FRACTION",
    "QUERY_MODULES",
    "QueryFreezing",
    "freeze_for_query",
    "load_query_model",
    "prepare_query_anndata",
    "query_registry",
]
