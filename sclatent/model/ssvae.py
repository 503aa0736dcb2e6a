"""``sclatent.model.SemiSupervisedVAE``: label transfer with a semi-supervised count VAE (scANVI's model)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..data import CellData, Registry, SetupError
from ..data import setup_anndata as _setup_anndata
from ..data.labelled import LabelledData
from ..metrics.calibration import fit_temperature
from ..modules.ssvae import _CORE_FIELDS, SemiSupervisedVAEHyperparameters, SemiSupervisedVAEModule
from ..train import split_cells
from ._base import BaseModel
from ._expression import CountExpressionOutputs
from .vae import VAE, count_vae_module_kwargs

#: Default epochs of a semi-supervised training that starts from a trained VAE's weights (scANVI
#: trains 10 after SCVI's; the classifier and M2 start from scratch, the counts' side is done).
FROM_VAE_EPOCHS = 20
#: Fewest labelled held-out cells to fit the temperature on (fewer: predictions stay untempered).
MIN_CALIBRATION_CELLS = 20


class SemiSupervisedVAE(CountExpressionOutputs, BaseModel):
    """Semi-supervised VAE for label transfer (scANVI's model: Kingma et al. 2014's M1+M2 on counts).

    A count VAE's latent ``z1`` (M1) is generated from a class ``y`` and a second latent ``z2``
    (M2); a classifier ``q(y | z1)`` is trained on the labelled cells and marginalised over for
    the unlabelled ones (the maths: :mod:`sclatent.modules.ssvae`). Usually started from a trained
    :class:`~sclatent.model.VAE` (:meth:`from_vae`) and trained briefly. After training, the
    predictions' temperature is fitted on the labelled held-out cells (temperature scaling), so
    that ``predict(soft=True)`` gives calibrated probabilities.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`SemiSupervisedVAE.setup_anndata` (raw counts, a label
        column with some cells unlabelled).
    {hyperparameters}
    seed
        Seed of the weight initialisation (and the default seed of ``train``).

    Examples
    --------
    >>> vae = sclatent.model.VAE(adata).train()                     # adata set up with batch_key=...
    >>> model = sclatent.model.SemiSupervisedVAE.from_vae(vae, labels_key="cell_type", unlabeled_category="Unknown")
    >>> model.train()
    >>> adata.obs["predicted"] = model.predict()
    >>> proba = model.predict(soft=True)                            # cells x classes, rows sum to 1
    >>> adata.obsm["X_sclatent_ssvae"] = model.get_latent_representation()
    """

    module_class = SemiSupervisedVAEModule
    hyperparameters_class = SemiSupervisedVAEHyperparameters
    name = "ssvae"
    #: Whether the weights of M1 came from a trained VAE (:meth:`from_vae`): ``train`` then
    #: defaults to ``FROM_VAE_EPOCHS`` (20) epochs.
    initialised_from_vae: ClassVar[bool] = False
    #: How the last :meth:`calibrate` went (cells, temperature, NLL before and after); None before.
    calibration: dict | None = None

    # ----------------------------------------------------------------- registration

    @staticmethod
    def setup_anndata(
        adata: ad.AnnData,
        labels_key: str | None = None,
        unlabeled_category: str | None = "Unknown",
        layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        allow_non_integer: bool = False,
    ) -> Registry:
        """Validate ``adata`` and register its counts, covariates and partial labels.

        Parameters
        ----------
        adata
            Cells x genes AnnData with raw counts.
        labels_key
            obs column of labels. Cells whose label is ``unlabeled_category`` or missing (NaN) are
            unlabelled; the others' values are the classes.
        unlabeled_category
            The value that marks an unlabelled cell (scvi-tools' convention: ``"Unknown"``).
            ``None``: every non-missing label is a class (no placeholder value).
        layer, batch_key, categorical_covariate_keys, continuous_covariate_keys, allow_non_integer
            As :func:`sclatent.data.setup_anndata`.

        Returns
        -------
        Registry
            The registry (stored as JSON in ``adata.uns``; nothing else in ``adata`` changes).

        Raises
        ------
        SetupError
            No ``labels_key``, the column is missing, no cell is labelled, fewer than two classes, or
            ``unlabeled_category`` is neither a value of the column nor accompanied by missing labels
            (a typo would otherwise turn every cell into a labelled one).
        """
        if not isinstance(adata, ad.AnnData):
            raise SetupError(f"Expected an AnnData, got {type(adata).__name__}.")
        if not labels_key:
            raise SetupError(
                "SemiSupervisedVAE needs labels: pass labels_key=<the obs column of cell-type labels>, with the "
                "unlabelled cells marked by unlabeled_category (default 'Unknown') or NaN."
            )
        if labels_key not in adata.obs.columns:
            raise SetupError(
                f"labels_key column {labels_key!r} not found in adata.obs (columns: {list(adata.obs.columns)}). "
                "Pass an existing column name as labels_key."
            )
        column = adata.obs[labels_key]
        missing = column.isna().to_numpy()
        values = column.astype(str).to_numpy()
        placeholder = np.zeros(adata.n_obs, dtype=bool) if unlabeled_category is None else values == unlabeled_category
        if unlabeled_category is not None and not placeholder.any() and not missing.any():
            shown = sorted(set(values))[:10]
            raise SetupError(
                f"unlabeled_category={unlabeled_category!r} is not a value of adata.obs[{labels_key!r}] (values: "
                f"{shown}) and no label is missing (NaN), so every cell would count as labelled. Pass the value "
                "that marks unlabelled cells as unlabeled_category, or unlabeled_category=None if every cell is "
                "labelled."
            )
        labelled = ~(missing | placeholder)
        if not labelled.any():
            raise SetupError(
                f"No cell of adata.obs[{labels_key!r}] has a label: all are {unlabeled_category!r} or NaN. "
                "Label some cells of the reference (a semi-supervised model learns its classes from them)."
            )
        classes = set(values[labelled])
        if len(classes) < 2:
            raise SetupError(
                f"adata.obs[{labels_key!r}] has {len(classes)} label class among its labelled cells "
                f"({sorted(classes)}); a classifier needs at least two."
            )
        return _setup_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            allow_non_integer=allow_non_integer,
            partial_labels=True,
            unlabeled_category=unlabeled_category,
        )

    def _check_hyperparameters(self) -> None:
        if not self.registry.partial_labels:
            raise SetupError(
                "This AnnData was set up for another model (no partial labels). Call "
                "SemiSupervisedVAE.setup_anndata(adata, labels_key=..., unlabeled_category=...) first."
            )

    def _module_kwargs(self) -> dict[str, Any]:
        return count_vae_module_kwargs(self, len(self.registry.label_categories))

    @classmethod
    def from_vae(
        cls,
        vae: VAE,
        labels_key: str | None = None,
        unlabeled_category: str | None = "Unknown",
        adata: ad.AnnData | None = None,
        **hyperparameters: Any,
    ) -> SemiSupervisedVAE:
        """A semi-supervised VAE whose count VAE (M1) starts from a trained :class:`VAE`'s weights.

        Parameters
        ----------
        vae
            A VAE with the normal prior and posterior (its encoder, decoder and dispersion are
            copied; the VAE object itself is not changed).
        labels_key, unlabeled_category
            The label column and its unlabelled marker (:meth:`setup_anndata`); ``labels_key``
            defaults to the VAE's.
        adata
            The cells (default: the VAE's AnnData); the same genes, layer, batch and covariate
            categories as the VAE's registry.
        **hyperparameters
            The classifier's settings (``classification_ratio``, ``classifier_n_hidden``, ...); the
            count VAE's are the VAE's.

        Returns
        -------
        SemiSupervisedVAE
            Untrained; ``train()`` then defaults to ``FROM_VAE_EPOCHS`` (20) epochs.
        """
        if not isinstance(vae, VAE):
            raise TypeError(f"from_vae takes a sclatent.model.VAE, got {type(vae).__name__}.")
        settings = vae.hyperparameters
        if settings["prior"] != "normal" or settings["posterior"] != "normal":
            raise ValueError(
                "from_vae needs a VAE with the normal prior and posterior (the semi-supervised model's z1 has "
                f"its own prior p(z1 | z2, y)); this one has prior={settings['prior']!r}, "
                f"posterior={settings['posterior']!r}."
            )
        clash = sorted(set(hyperparameters) & set(_CORE_FIELDS))
        if clash:
            raise ValueError(
                f"{clash} are the VAE's own settings (its weights are copied): leave them out of from_vae; "
                "only the classifier's settings may be given."
            )
        adata = vae.adata if adata is None else adata
        if adata is None:
            raise SetupError("This VAE was loaded without an AnnData; pass adata=... to from_vae.")
        reference = vae.registry
        labels_key = labels_key or reference.labels_key
        cls.setup_anndata(
            adata,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            layer=reference.layer,
            batch_key=reference.batch_key,
            categorical_covariate_keys=reference.categorical_covariate_keys,
            continuous_covariate_keys=reference.continuous_covariate_keys,
            allow_non_integer=reference.allow_non_integer,
        )
        model = cls(adata, seed=vae.seed, **{name: settings[name] for name in _CORE_FIELDS}, **hyperparameters)
        own = model.registry
        if own.var_names != reference.var_names or own.batch_categories != reference.batch_categories:
            raise SetupError(
                "from_vae needs the VAE's cells: the same genes (in order) and batch categories. Pass the AnnData the "
                "VAE was trained on (or none, to use it)."
            )
        model.module.vae.load_state_dict(vae.module.state_dict())
        model.module.vae.to(model.device)
        model.initialised_from_vae = True
        return model

    # ----------------------------------------------------------------- training

    def _split_cells(self, data: CellData, cells: np.ndarray, train_size: float, seed: int):
        """Split each class's labelled cells, and the unlabelled cells, on their own (rounding the
        training share up), so every class keeps at least one labelled training cell. A random
        split of all cells sends a class's only labelled cell to validation with probability
        ``1 - train_size``; the classifier then never sees the class. (scANVI splits labelled and
        unlabelled cells apart, rounding up likewise, but not per class.)"""
        labels = data.label_index[torch.as_tensor(cells, device=data.device)].cpu().numpy()
        return split_cells(cells, train_size, seed, groups=labels)

    def _training_data(self, data: CellData, seed: int):
        """The cells, with a minibatch of labelled training cells attached to every training step."""
        labels = data.label_index[torch.as_tensor(self.train_indices, device=data.device)].cpu().numpy()
        labelled = self.train_indices[labels >= 0]
        return data if labelled.size == 0 else LabelledData(data, labelled)

    def train(self, max_epochs: int | None = None, **kwargs: Any) -> SemiSupervisedVAE:
        """Fit on the registered AnnData, then fit the predictions' temperature.

        Parameters as :meth:`sclatent.model.VAE.train`; ``max_epochs`` defaults to
        ``FROM_VAE_EPOCHS`` (20) for a model made by :meth:`from_vae` (only the classifier and M2
        start from scratch), else to the VAE's default. ``train_size`` applies to each class's
        labelled cells and to the unlabelled cells apart, rounded up, so every class keeps at least
        one labelled training cell. A cell without a label never contributes a classification
        loss. After training, the temperature ``T`` of :meth:`predict` is fitted by maximum
        likelihood on the labelled cells among ``validation_indices`` (at least
        ``MIN_CALIBRATION_CELLS`` (20) of them; else ``T`` stays 1, with a warning);
        ``model.calibration`` records how. A query model whose classifier is frozen
        (:meth:`~sclatent.model.BaseModel.load_query_data`) keeps the reference's temperature instead.

        Returns
        -------
        SemiSupervisedVAE
            The model, trained in place.
        """
        if max_epochs is None and self.initialised_from_vae and not self.history:
            max_epochs = FROM_VAE_EPOCHS
        super().train(max_epochs=max_epochs, **kwargs)
        if self.query_freezing is None or not self.query_freezing.freeze_classifier:
            self.calibrate()  # a query model with the reference's frozen classifier keeps its temperature
        return self

    def calibrate(self, indices=None) -> dict[str, float]:
        """Fit the temperature of :meth:`predict` on labelled cells (default: the labelled held-out cells).

        Parameters
        ----------
        indices
            Cells of the model's AnnData to fit on (their labels are read from the registry's
            column); default the labelled ones among ``validation_indices``.

        Returns
        -------
        dict
            ``cells`` used, ``temperature`` and the mean negative log-likelihood before and after
            (nats); also kept as ``model.calibration``.
        """
        data = self._data()
        cells = self.validation_indices if indices is None else self._indices(data, indices)
        labels = data.label_index[torch.as_tensor(cells, device=data.device)].cpu().numpy()
        cells, labels = cells[labels >= 0], labels[labels >= 0]
        self.module.log_temperature.zero_()
        if len(cells) < MIN_CALIBRATION_CELLS:
            if indices is None:
                warnings.warn(
                    f"Only {len(cells)} labelled held-out cells (fewer than {MIN_CALIBRATION_CELLS}): the predicted "
                    "probabilities are not temperature-calibrated. Hold out more labelled cells (train_size) or call "
                    "model.calibrate(indices=...) with labelled cells the model did not train on.",
                    stacklevel=2,
                )
            self.calibration = {"cells": len(cells), "temperature": 1.0}
            return self.calibration
        logits = np.concatenate(
            [self.module.predict_logits(batch).cpu().numpy() for batch in self._batches(None, cells, 1024)]
        )
        temperature = fit_temperature(logits, labels)
        self.module.log_temperature.fill_(float(np.log(temperature)))
        rows = np.arange(len(labels))
        before = -torch.log_softmax(torch.as_tensor(logits), 1).numpy()[rows, labels].mean()
        after = -torch.log_softmax(torch.as_tensor(logits / temperature), 1).numpy()[rows, labels].mean()
        self.calibration = {"cells": len(cells), "temperature": temperature, "nll_before": before, "nll_after": after}
        return self.calibration

    @property
    def temperature(self) -> float:
        """The temperature ``T`` dividing the classifier's logits in :meth:`predict` (1: untempered)."""
        return float(torch.exp(self.module.log_temperature))

    # ----------------------------------------------------------------- outputs

    def _count_module(self):
        """The count VAE (M1) that decodes the counts: denoised and counterfactual expression
        (``get_normalized_expression(transform_batch=...)``), posterior predictive samples and the
        latent library size come from it, as for :class:`~sclatent.model.VAE`."""
        return self.module.vae

    @property
    def classes(self) -> list[str]:
        """The label classes, in the column order of ``predict(soft=True)``."""
        return list(self.registry.label_categories)

    @torch.no_grad()
    def get_latent_representation(
        self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024
    ) -> np.ndarray:
        """Posterior mean of z1 for each cell.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_latent)`` float32; write it to ``adata.obsm["X_sclatent_ssvae"]``.
        """
        out = [self.module.latent_mean(batch).cpu() for batch in self._batches(adata, indices, batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.module.n_latent), np.float32)

    @torch.no_grad()
    def predict(
        self,
        adata: ad.AnnData | None = None,
        indices=None,
        soft: bool = False,
        batch_size: int = 1024,
        calibrated: bool = True,
    ) -> np.ndarray | pd.DataFrame:
        """The classifier's label for each cell, or its (temperature-scaled) probabilities.

        Parameters
        ----------
        adata
            Cells to classify (default: the model's AnnData); a query must hold the model's genes
            (see :meth:`~sclatent.model.BaseModel.prepare_query_anndata`).
        indices
            Cells of ``adata`` to classify (default all).
        soft
            Return probabilities instead of labels.
        batch_size
            Cells per forward pass.
        calibrated
            Divide the logits by the fitted temperature (:attr:`temperature`); ``False`` gives the
            classifier's raw probabilities (to measure what calibration changed). The labels are
            the same either way.

        Returns
        -------
        numpy.ndarray or pandas.DataFrame
            ``(n_cells,)`` object array of labels (``model.classes``); with ``soft=True`` a cells x
            classes DataFrame of probabilities (rows sum to 1, index the cells' names).
        """
        scale = 1.0 if calibrated else self.temperature  # undoes predict_logits' 1 / T
        chunks = [
            torch.softmax(self.module.predict_logits(batch) * scale, dim=-1).cpu()
            for batch in self._batches(adata, indices, batch_size)
        ]
        proba = torch.cat(chunks).numpy().astype(np.float64) if chunks else np.zeros((0, len(self.classes)))
        proba /= proba.sum(1, keepdims=True).clip(min=1e-300)
        if not soft:
            return np.asarray(self.classes, dtype=object)[proba.argmax(1)]
        names = (self.adata if adata is None else adata).obs_names
        rows = names if indices is None else names[self._indices(self._data(adata), indices)]
        return pd.DataFrame(proba, index=rows, columns=self.classes)


__all__ = ["FROM_VAE_EPOCHS", "MIN_CALIBRATION_CELLS", "SemiSupervisedVAE"]
