"""``sclatent.model.MaskedGeneModel``: masked-gene pretraining (BERT-style) and label fine-tuning."""

from __future__ import annotations

import math
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..data import SetupError, resolve_device
from ..modules.masked import MaskedGeneModelHyperparameters, MaskedGeneModule, draw_gene_mask, n_masked_genes
from ..train import TrainingPlan, fit
from ._base import BaseModel

# optimiser steps a default fine-tuning run takes, whatever the number of labelled cells
_FINE_TUNE_STEPS = 300


def labelled_subset(
    labels: np.ndarray, fraction: float, seed: int = 0, candidates: np.ndarray | None = None
) -> np.ndarray:
    """The cells whose labels a fine-tuning run may use: a seeded fraction of ``candidates``.

    ``max(1, round(fraction * n))`` of the ``n`` candidate cells (default: all cells), drawn
    stratified by label when every class can be represented (at least one draw per class and two
    candidates per class), else uniformly at random (e.g. 1 % of 490 cells is 5 cells: fewer than
    ten classes, so some classes get no labelled cell at all).

    Parameters
    ----------
    labels
        ``(n_cells,)`` labels of all cells (only the candidates' are read).
    fraction
        In ``(0, 1]``.
    seed
        Seed of the draw.
    candidates
        Indices of the cells that may be labelled (e.g. a training split); default all.

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices into ``labels``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction_labelled must be in (0, 1], got {fraction}.")
    labels = np.asarray(labels).astype(str)
    # sorted: the draw depends on the set of candidates, not on the order they were given in
    candidates = np.arange(len(labels)) if candidates is None else np.sort(np.asarray(candidates, dtype=np.int64))
    n = max(1, round(fraction * len(candidates)))
    if n >= len(candidates):
        return np.sort(candidates)
    sub = labels[candidates]
    classes, counts = np.unique(sub, return_counts=True)
    if n >= len(classes) and counts.min() >= 2 and len(candidates) - n >= len(classes):
        from sklearn.model_selection import train_test_split

        chosen, _ = train_test_split(candidates, train_size=n, stratify=sub, random_state=seed)
        return np.sort(chosen)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=n, replace=False))


class MaskedGeneModel(BaseModel):
    """Masked-gene pretraining: hide genes of each cell, predict their counts from the rest.

    A random ``mask_rate`` (15 %) of each cell's genes, zeros included, is hidden from the encoder;
    a count decoder predicts them with a negative binomial (or ZINB / Poisson) whose mean is the
    cell's *visible* library size times a softmax over genes (see
    :mod:`sclatent.modules.masked`). The encoder's output is the cell embedding; :meth:`fine_tune`
    puts a classifier head on it and trains on (a fraction of) a label column, of this AnnData or
    of another one with the same genes.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`MaskedGeneModel.setup_anndata` (raw counts).
    {hyperparameters}
    seed
        Seed of the initialisation and default seed of :meth:`train` and :meth:`fine_tune`.

    Notes
    -----
    ``model.n_masked`` is the number of genes hidden per cell. The transformer's defaults (64
    tokens, width 64, 4 heads, 2 layers) take seconds per CPU epoch on 3k cells.

    Examples
    --------
    >>> import sclatent
    >>> pbmc = sclatent.datasets.pbmc68k_counts()
    >>> ref = sclatent.datasets.pbmc3k()[:, pbmc.var_names].copy()   # same genes, same order
    >>> sclatent.model.MaskedGeneModel.setup_anndata(ref)
    >>> model = sclatent.model.MaskedGeneModel(ref)
    >>> model.train()                                                # masked-gene pretraining
    >>> model.fine_tune(pbmc, labels_key="bulk_labels", fraction_labelled=0.1)
    >>> pbmc.obs["predicted"] = model.predict()                      # pbmc is now the model's data
    >>> pbmc.obsm["X_sclatent_masked"] = model.get_latent_representation()
    """

    module_class = MaskedGeneModule
    hyperparameters_class = MaskedGeneModelHyperparameters
    name = "masked"
    # the cells whose labels the last fine_tune used (indices into its AnnData)
    labelled_indices: np.ndarray = np.zeros(0, dtype=np.int64)

    def _module_kwargs(self) -> dict[str, Any]:
        reg = self.registry
        classifier = self.hyperparameters.get("classifier")
        return dict(
            n_genes=reg.n_genes,
            n_batch=reg.n_batch,
            n_cats_per_cov=reg.n_cats_per_covariate,
            n_continuous=len(reg.continuous_covariate_keys),
            n_classes=len(classifier["classes"]) if classifier else 0,
            **self._module_hyperparameters(),
        )

    @property
    def n_masked(self) -> int:
        """Genes hidden per cell in pretraining."""
        return n_masked_genes(self.registry.n_genes, self.module.mask_rate)

    @property
    def classes(self) -> list[str]:
        """Label categories of the classifier head, in the column order of :meth:`predict_proba`."""
        classifier = self.hyperparameters.get("classifier")
        if not classifier:
            raise RuntimeError("This model has no classifier yet; call fine_tune(labels_key=...) first.")
        return list(classifier["classes"])

    # ----------------------------------------------------------------- pretraining

    def train(
        self,
        max_epochs: int | None = 200,
        train_size: float = 0.9,
        early_stopping: bool = True,
        patience: int = 10,
        **kwargs: Any,
    ) -> MaskedGeneModel:
        """Masked-gene pretraining on the registered AnnData (labels unused).

        Defaults: at most 200 epochs, minibatches of 128 cells, Adam at 1e-3, 10 % of the cells held
        out, early stopping (patience 10, best epoch restored) on the held-out cells' masked-gene
        NLL, with one fixed mask (the same genes every epoch). Other arguments as :meth:`sclatent.model.VAE.train`.

        History: ``train_reconstruction`` / ``validation_reconstruction``: negative log-likelihood
        of the hidden counts per cell (nats, summed over the ``n_masked`` hidden genes; what early
        stopping watches by default). No ``*_elbo``: the objective is not an evidence lower bound.
        """
        kwargs.setdefault("kl_warmup_epochs", 0)
        # its own schedule (measured in benchmarks/RESULTS.md), not the VAEs' larger batches and steps
        kwargs.setdefault("batch_size", 128)
        kwargs.setdefault("lr", 1e-3)
        if early_stopping and train_size < 1.0:
            kwargs.setdefault("restore_best", True)
        self.module.objective = "masked"
        # a classifier head from an earlier fine_tune gets no gradient here; frozen, the optimiser
        # leaves it alone (it would otherwise apply weight decay and momentum to it)
        head = list(self.module.classifier.parameters()) if self.module.classifier is not None else []
        for p in head:
            p.requires_grad_(False)
        try:
            return super().train(
                max_epochs=max_epochs, train_size=train_size, early_stopping=early_stopping, patience=patience, **kwargs
            )
        finally:
            for p in head:
                p.requires_grad_(True)

    # ----------------------------------------------------------------- fine-tuning

    def fine_tune(
        self,
        adata: ad.AnnData | None = None,
        labels_key: str | None = None,
        fraction_labelled: float = 1.0,
        indices=None,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        freeze_encoder: bool = False,
        mask_input: bool = True,
        seed: int | None = None,
        accelerator: str = "auto",
        progress_bar: bool = True,
    ) -> MaskedGeneModel:
        """Put a fresh linear classifier on the encoder and train both on labelled cells.

        Parameters
        ----------
        adata
            Cells to fine-tune on; default the model's AnnData. Another AnnData must hold the
            model's genes (any order; checked as for query data) with counts where the registry
            says (same layer). It then becomes the model's AnnData: :meth:`predict` and
            :meth:`get_latent_representation` default to it.
        labels_key
            obs column of labels (default: the registry's ``labels_key``). Cells with a missing
            label (NaN) are never used.
        fraction_labelled
            Fraction in ``(0, 1]`` of the candidate cells whose labels are used, drawn by
            :func:`labelled_subset` (stratified when possible; ``model.labelled_indices``).
        indices
            Candidate cells (e.g. a training split; the others stay unseen); default all labelled.
        max_epochs
            Default: enough epochs for about 300 optimiser steps (300 epochs for 5 cells, 75
            for 490 at batch size 128).
        batch_size, lr, weight_decay
            Adam settings.
        freeze_encoder
            Train the head only (a linear probe of the pretrained embedding).
        mask_input
            Hide ``mask_rate`` of the genes from the input in training as in pretraining (an
            augmentation, and the input distribution the encoder was trained on); prediction
            always sees all genes.
        seed
            Seed of the subset, the head's initialisation and the minibatch order.

        Returns
        -------
        MaskedGeneModel
            The model. The head's classes (all non-missing labels of ``adata``) are ``model.classes``;
            the per-epoch cross-entropy and accuracy on the labelled cells are in
            ``model.history["fine_tune_train_cross_entropy"]`` / ``["fine_tune_train_accuracy"]``.
        """
        target = self.adata if adata is None else adata
        if target is None:
            raise SetupError("This model was loaded without an AnnData; pass adata=... to fine_tune.")
        if not isinstance(target, ad.AnnData):
            raise SetupError(f"Expected an AnnData, got {type(target).__name__}.")
        labels_key = labels_key or self.registry.labels_key
        if not labels_key:
            raise SetupError("fine_tune needs labels: pass labels_key=<an obs column>.")
        if labels_key not in target.obs.columns:
            raise SetupError(
                f"labels_key column {labels_key!r} not found in adata.obs (columns: {list(target.obs.columns)}). "
                "Pass an existing column name as labels_key."
            )
        if not 0.0 < fraction_labelled <= 1.0:
            raise ValueError(f"fraction_labelled must be in (0, 1], got {fraction_labelled}.")
        codes, classes = _encode_labels(target.obs[labels_key])
        if len(classes) < 2:
            raise SetupError(f"adata.obs[{labels_key!r}] has {len(classes)} label category; a classifier needs two.")
        seed = self.seed if seed is None else seed
        device = resolve_device(accelerator)
        self.module.to(device)
        # the cells as training reads them (in memory or streamed from disk; a new AnnData's genes and
        # counts validated), relabelled below with this column's codes in a copy (the cached data keep theirs)
        data = self._data(target)
        candidates = np.flatnonzero(codes >= 0) if indices is None else self._indices(data, indices)
        candidates = candidates[codes[candidates] >= 0]
        candidates = candidates[data.library[torch.as_tensor(candidates, device=device)].cpu().numpy() > 0]
        if len(candidates) == 0:
            raise SetupError(f"No candidate cell has both counts and a label in adata.obs[{labels_key!r}].")
        labelled = labelled_subset(target.obs[labels_key].to_numpy(), fraction_labelled, seed, candidates)
        data = data.with_labels(np.maximum(codes, 0))

        if max_epochs is None:
            max_epochs = max(1, math.ceil(_FINE_TUNE_STEPS / math.ceil(len(labelled) / batch_size)))
        torch.manual_seed(seed)
        self.module.set_classifier(len(classes))
        frozen = list(self.module.decoder.parameters())
        if self.module.log_theta is not None:
            frozen.append(self.module.log_theta)
        if freeze_encoder:
            frozen += list(self.module.encoder.parameters())
            frozen += list(self.module.code.parameters()) if self.module.code is not None else []
        for p in frozen:
            p.requires_grad_(False)
        self.module.objective, self.module.mask_when_classifying = "classify", mask_input
        try:
            plan = TrainingPlan(max_epochs=int(max_epochs), batch_size=batch_size, lr=lr, weight_decay=weight_decay)
            history = fit(
                self.module,
                data,
                labelled,
                np.zeros(0, dtype=np.int64),
                plan,
                seed=seed,
                progress_bar=progress_bar,
                description=f"Fine-tuning {type(self).__name__}",
            )
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.module.objective = "masked"
        kept = ("epoch", "train_cross_entropy", "train_accuracy")
        self.history.update({f"fine_tune_{k}": v for k, v in history.items() if k in kept})
        self.hyperparameters["classifier"] = {"labels_key": labels_key, "classes": classes}
        self.labelled_indices = labelled
        if target is not self.adata:
            self._attach(target, self.registry, validated=True)
        return self

    # ----------------------------------------------------------------- outputs

    @torch.no_grad()
    def get_latent_representation(
        self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024
    ) -> np.ndarray:
        """The encoder's embedding of each cell, all genes visible.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_latent)`` float32; write it to ``adata.obsm["X_sclatent_masked"]``.
        """
        out = [self.module.encode(batch.counts).cpu() for batch in self._batches(adata, indices, batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.module.n_latent), np.float32)

    @torch.no_grad()
    def predict_proba(self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024) -> np.ndarray:
        """Class probabilities of the fine-tuned head, all genes visible.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_classes)`` float32, rows summing to 1, columns in ``model.classes`` order.
        """
        classes = self.classes
        out = [
            torch.softmax(self.module.class_logits(batch.counts), dim=-1).cpu()
            for batch in self._batches(adata, indices, batch_size)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, len(classes)), np.float32)

    def predict(self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024) -> np.ndarray:
        """The most probable label of each cell: ``(n_cells,)`` object array of ``model.classes``."""
        proba = self.predict_proba(adata, indices, batch_size)
        return np.asarray(self.classes, dtype=object)[proba.argmax(1)]

    @torch.no_grad()
    def get_masked_nll(
        self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024, seed: int = 0
    ) -> float:
        """Mean negative log-likelihood per cell of ``n_masked`` hidden genes given the rest, nats.

        The hidden genes are drawn with ``seed`` (the same for the same cells in the same order).
        """
        generator = torch.Generator().manual_seed(seed)
        total, n = 0.0, 0
        for batch in self._batches(adata, indices, batch_size):
            hidden = draw_gene_mask(batch.size, self.registry.n_genes, self.module.mask_rate, generator)
            nll, _ = self.module.masked_nll(batch, hidden.to(batch.nz_val.device))
            total += float(nll.sum())
            n += batch.size
        return total / max(1, n)


def _encode_labels(column: pd.Series) -> tuple[np.ndarray, list[str]]:
    """``(codes, classes)``: int64 codes (``-1`` for missing labels) and the category names
    (a categorical's order, else sorted)."""
    present = column.notna().to_numpy()
    values = column.astype(str).to_numpy()
    if isinstance(column.dtype, pd.CategoricalDtype):
        seen = set(values[present])
        classes = [str(c) for c in column.cat.categories if str(c) in seen]
    else:
        classes = sorted(set(values[present]))
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.array([lookup[v] if ok else -1 for v, ok in zip(values, present, strict=True)], dtype=np.int64)
    return codes, classes


__all__ = ["MaskedGeneModel", "labelled_subset"]
