"""``sclatent.model.DenoisingAE``: count autoencoders for imputation (DCA-style) and their variants."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import torch

from ..data import SetupError
from ..modules.autoencoder import NORMALISED_TOTAL, AutoencoderModule, DenoisingAEHyperparameters
from ._base import BaseModel


class DenoisingAE(BaseModel):
    """Denoising autoencoder with a count likelihood (the DCA objective) and its classic variants.

    The encoder reads log-normalised expression (``log1p(x / total * 1e4)``), corrupted in training;
    the decoder outputs a ZINB (default), NB or Poisson per gene, scaled by the cell's total counts,
    and the loss is the likelihood of the raw counts.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`DenoisingAE.setup_anndata` (raw counts).
    {hyperparameters}
    seed
        Seed of the initialisation and default seed of ``train``.

    Notes
    -----
    The default ``noise="masking"`` makes the model learn to predict missing counts from the
    others: the best of the four corruptions at imputation in ``benchmarks/RESULTS.md``. With
    ``linear=True`` the ``gene_likelihood`` is set to ``"gaussian"`` whatever is passed (PCA as an
    autoencoder is defined by squared error).

    Examples
    --------
    >>> import sclatent
    >>> adata = sclatent.datasets.pbmc68k_counts()
    >>> sclatent.model.DenoisingAE.setup_anndata(adata)
    >>> model = sclatent.model.DenoisingAE(adata)  # masking noise, ZINB, early stopping
    >>> model.train(max_epochs=100)
    >>> model.impute()  # adata.layers["sclatent_denoised"]
    >>> adata.obsm["X_sclatent_dae"] = model.get_latent_representation()
    """

    module_class = AutoencoderModule
    hyperparameters_class = DenoisingAEHyperparameters
    name = "dae"

    def __init__(self, adata: ad.AnnData, *, seed: int = 0, **hyperparameters: Any) -> None:
        if hyperparameters.get("linear") and hyperparameters.get("gene_likelihood") != "gaussian":
            hyperparameters["gene_likelihood"] = "gaussian"  # PCA as an autoencoder is defined by squared error
        super().__init__(adata, seed=seed, **hyperparameters)
        if self.hyperparameters["linear"]:
            self.module.input_mean.copy_(self._input_mean())

    def _module_kwargs(self) -> dict[str, Any]:
        reg = self.registry
        return dict(
            n_genes=reg.n_genes,
            n_batch=reg.n_batch,
            n_cats_per_cov=reg.n_cats_per_covariate,
            n_continuous=len(reg.continuous_covariate_keys),
            **self._module_hyperparameters(),
        )

    def _input_mean(self) -> torch.Tensor:
        """Per-gene mean of the log-normalised input over the registered cells."""
        total = torch.zeros(self.registry.n_genes)
        n = 0
        with torch.no_grad():
            for batch in self._batches(None, None, 1024):
                total += self.module.normalised_input(batch).sum(0).cpu()
                n += batch.size
        return total / max(1, n)

    def train(
        self,
        max_epochs: int | None = 300,
        train_size: float = 0.9,
        early_stopping: bool = True,
        patience: int = 15,
        **kwargs: Any,
    ) -> DenoisingAE:
        """Fit on the registered AnnData; other arguments as :meth:`sclatent.model.VAE.train`.

        Defaults: at most 300 epochs, minibatches of 128 cells, Adam at 1e-3, 10 % of the cells held
        out, and early stopping (patience 15, best epoch restored) on how well the model predicts
        counts it cannot see: a fixed 10 % of the held-out cells' nonzero counts are hidden from
        their input and scored
        (``validation_masked_nll``, see ``AutoencoderModule.masked_nll``). An autoencoder has no KL
        term to keep it from memorising the training counts; trained on, it reproduces their zeros,
        dropouts included, even while the held-out reconstruction loss still improves (measured in
        ``benchmarks/RESULTS.md``). Pass ``monitor="reconstruction"`` to stop on the plain
        reconstruction loss (the module's default), ``early_stopping=False`` to train all epochs.

        History: ``train_reconstruction`` / ``validation_reconstruction`` (negative log-likelihood
        per cell, nats; for the linear AE half the squared error), ``validation_masked_nll`` and,
        with penalties, ``train_l1`` / ``train_contractive``. No ``*_elbo``: an autoencoder has none.
        """
        kwargs.setdefault("kl_warmup_epochs", 0)
        # its own schedule (measured in benchmarks/RESULTS.md), not the VAEs' larger batches and steps
        kwargs.setdefault("batch_size", 128)
        kwargs.setdefault("lr", 1e-3)
        if early_stopping and train_size < 1.0 and self.module.validation_mask_rate > 0:
            kwargs.setdefault("monitor", "masked_nll")
            kwargs.setdefault("restore_best", True)
        return super().train(
            max_epochs=max_epochs, train_size=train_size, early_stopping=early_stopping, patience=patience, **kwargs
        )

    # ----------------------------------------------------------------- outputs

    @torch.no_grad()
    def get_latent_representation(
        self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024
    ) -> np.ndarray:
        """The code of each (clean) cell.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_latent)`` float32; write it to ``adata.obsm["X_sclatent_dae"]`` for
            ``sc.pp.neighbors(adata, use_rep="X_sclatent_dae")``.
        """
        out = []
        for batch in self._batches(adata, indices, batch_size):
            u = self.module.noise(self.module.normalised_input(batch))
            out.append(self.module.encode(u, batch).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.module.n_latent), np.float32)

    @torch.no_grad()
    def impute(
        self,
        adata: ad.AnnData | None = None,
        layer_out: str | None = "sclatent_denoised",
        return_matrix: bool = False,
        include_zero_inflation: bool = False,
        indices=None,
        batch_size: int = 1024,
    ) -> np.ndarray | None:
        """Denoised expected counts, written to ``adata.layers[layer_out]`` (``X`` and every other
        layer untouched).

        Parameters
        ----------
        adata
            Cells to impute (default: the training AnnData); genes must be the model's, in order,
            to write a layer.
        layer_out
            Layer to write (``None``: write nothing).
        return_matrix
            Also return the matrix.
        include_zero_inflation
            ZINB only. False (default): ``mu``, the mean of the count process without the excess
            zeros (DCA's denoised output). True: the ZINB's own mean ``(1 - pi) * mu``.
        indices
            Cells to impute (default all); only with ``layer_out=None``.

        Returns
        -------
        numpy.ndarray or None
            ``(n_cells, G)`` float32 expected counts in each cell's own library size when
            ``return_matrix``, else None.
        """
        target = self.adata if adata is None else adata
        if target is None:
            raise SetupError("This model was loaded without an AnnData; pass adata=... to impute.")
        if layer_out is not None:
            if indices is not None:
                raise ValueError("indices select a subset of cells; a layer needs them all. Pass layer_out=None.")
            if list(target.var_names) != self.var_names:
                raise SetupError(
                    "To write a layer the AnnData's genes must be the model's, in the same order; subset it "
                    "first (adata[:, model.var_names]) or pass layer_out=None and use the returned matrix."
                )
            if layer_out == "X" or not isinstance(layer_out, str):
                raise ValueError(f"layer_out must be a layer name (not X), got {layer_out!r}.")
        self.module.eval()
        out = [
            self.module.expected_counts(batch, include_zero_inflation).cpu()
            for batch in self._batches(adata, indices, batch_size)
        ]
        matrix = torch.cat(out).numpy() if out else np.zeros((0, self.registry.n_genes), np.float32)
        if layer_out is not None:
            target.layers[layer_out] = matrix
        return matrix if return_matrix else None

    @torch.no_grad()
    def get_reconstruction_error(self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024) -> float:
        """Mean negative log-likelihood per cell of the (clean) input, nats (linear AE: half the
        squared error on the centred log-normalised data)."""
        total, n = 0.0, 0
        for batch in self._batches(adata, indices, batch_size):
            total += float(self.module.loss(batch).terms["reconstruction"].sum())
            n += batch.size
        return total / max(1, n)


__all__ = ["NORMALISED_TOTAL", "DenoisingAE"]
