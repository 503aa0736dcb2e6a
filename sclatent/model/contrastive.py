"""``sclatent.model.ContrastiveModel``: SimCLR cell embeddings from count-aware augmentations."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import torch

from ..data import CellData
from ..data.neighbours import NeighbourData, neighbour_data
from ..modules.contrastive import ContrastiveHyperparameters, ContrastiveModule
from ._base import BaseModel


class ContrastiveModel(BaseModel):
    """Contrastive (SimCLR) embedding of cells: two augmented views of a cell must find each other.

    Each training step draws two views of every cell of the minibatch by binomial thinning of its
    counts, log-normalisation, mixing with one of its k nearest neighbours (CLEAR-style), random
    gene masking and Gaussian noise (:mod:`sclatent.nn.augment`); an MLP encoder maps them to the
    embedding, a projection head to the space where the NT-Xent loss compares them. The embedding
    of a cell is the encoder's output on its clean log-normalised counts; the projection head is
    used in training only. There is no generative model and no likelihood: nothing is decoded.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`ContrastiveModel.setup_anndata` (raw counts). Select genes
        first on data with many all-zero or uninformative genes (e.g. 2,000 HVGs).
    {hyperparameters}
    seed
        Seed of the initialisation and default seed of :meth:`train` (split, order, augmentations).

    Examples
    --------
    >>> import sclatent
    >>> adata = sclatent.datasets.pbmc68k_counts()
    >>> sclatent.model.ContrastiveModel.setup_anndata(adata)
    >>> model = sclatent.model.ContrastiveModel(adata)
    >>> model.train(max_epochs=100)
    >>> adata.obsm["X_sclatent_contrastive"] = model.get_latent_representation()
    """

    module_class = ContrastiveModule
    hyperparameters_class = ContrastiveHyperparameters
    name = "contrastive"

    def _module_kwargs(self) -> dict[str, Any]:
        return dict(n_genes=self.registry.n_genes, **self._module_hyperparameters())

    def _training_data(self, data: CellData, seed: int) -> CellData | NeighbourData:
        """The training cells with one kNN neighbour per cell per minibatch (for neighbour mixing)."""
        if self.module.augment.mix_max_weight == 0:
            return data
        # the data layer reads the counts (streamed when the cells are) and builds the kNN table
        n_neighbors = self.hyperparameters["n_neighbors"]
        return neighbour_data(data, self.adata, self.registry, self.train_indices, n_neighbors, seed)

    def train(
        self,
        max_epochs: int | None = 200,
        batch_size: int = 256,
        lr: float = 1e-3,
        train_size: float = 0.9,
        **kwargs: Any,
    ) -> ContrastiveModel:
        """Fit on the registered AnnData; other arguments as :meth:`sclatent.model.VAE.train`.

        Defaults: 200 epochs, minibatches of 256 cells (NT-Xent's negatives are the other cells of
        the minibatch: larger batches give a harder, more informative task), 10 % of the cells held
        out, no early stopping (``early_stopping=True`` watches the held-out NT-Xent). History:
        ``train_nt_xent`` / ``validation_nt_xent`` (nats per cell; no ``*_elbo``: there is no
        likelihood). The held-out loss uses fixed
        augmentations and minibatches of up to 1,024 cells: its number of negatives differs from
        training's (NT-Xent grows like the log of it), so compare its trend, not its level, with the
        training curve.
        """
        kwargs.setdefault("kl_warmup_epochs", 0)
        # all epochs by default: NT-Xent has no likelihood to hold out, and its held-out value (other
        # negatives, fixed views) tracks the training loss's trend only
        kwargs.setdefault("early_stopping", False)
        return super().train(max_epochs=max_epochs, batch_size=batch_size, lr=lr, train_size=train_size, **kwargs)

    # ----------------------------------------------------------------- outputs

    @torch.no_grad()
    def get_latent_representation(
        self, adata: ad.AnnData | None = None, indices=None, batch_size: int = 1024
    ) -> np.ndarray:
        """The embedding of each cell (clean counts, no augmentation, before the projection head).

        Parameters
        ----------
        adata
            Cells to embed (default: the training AnnData); must hold the model's genes.
        indices
            Cells of ``adata`` to embed (default all).
        batch_size
            Cells per forward pass.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_latent)`` float32; write it to ``adata.obsm["X_sclatent_contrastive"]`` for
            ``sc.pp.neighbors(adata, use_rep="X_sclatent_contrastive")``.
        """
        out = [self.module.embedding(batch).cpu() for batch in self._batches(adata, indices, batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.module.n_latent), np.float32)


__all__ = ["ContrastiveModel"]
