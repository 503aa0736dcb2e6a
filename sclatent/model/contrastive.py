"""``sclatent.model.ContrastiveModel``: SimCLR cell embeddings from count-aware augmentations."""

from __future__ import annotations

import logging
from typing import Any

import anndata as ad
import numpy as np
import torch

from ..data import CellData
from ..data.neighbours import NeighbourData, knn_table
from ..data.ondisk import is_on_disk, load_into_memory
from ..data.registry import gene_order_for_query, get_count_matrix
from ..modules.contrastive import ContrastiveModule
from ._base import BaseModel

# Hyperparameters of the model class that the module does not take.
_MODEL_ONLY = ("n_neighbors",)


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
    n_latent
        Embedding width.
    n_hidden, n_layers, dropout_rate
        Encoder MLP.
    n_projection, n_projection_hidden
        Projection head widths.
    temperature
        NT-Xent temperature (0.2; SimCLR's range is 0.1-0.5).
    thinning_keep
        Fraction of molecules each view keeps (binomial thinning; 1: off).
    mask_rate
        Probability of zeroing each gene of a view (0: off).
    noise_std
        Standard deviation of Gaussian noise on ``log1p`` normalised expression (0: off).
    mix_max_weight
        Each view is ``(1 - w)`` the cell and ``w`` one of its kNN neighbours, ``w ~ U(0, this)``
        (0: off, and no kNN table is built).
    n_neighbors
        ``k`` of the kNN table (scanpy PCA of log-normalised counts of the training cells; built
        at each :meth:`train`, not saved: only training needs it).
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
    name = "contrastive"

    def __init__(
        self,
        adata: ad.AnnData,
        n_latent: int = 32,
        n_hidden: int = 128,
        n_layers: int = 2,
        dropout_rate: float = 0.0,
        n_projection: int = 32,
        n_projection_hidden: int = 128,
        temperature: float = 0.2,
        thinning_keep: float = 0.5,
        mask_rate: float = 0.2,
        noise_std: float = 0.2,
        mix_max_weight: float = 0.5,
        n_neighbors: int = 15,
        seed: int = 0,
    ) -> None:
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}.")
        super().__init__(
            adata,
            seed=seed,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            n_projection=n_projection,
            n_projection_hidden=n_projection_hidden,
            temperature=temperature,
            thinning_keep=thinning_keep,
            mask_rate=mask_rate,
            noise_std=noise_std,
            mix_max_weight=mix_max_weight,
            n_neighbors=n_neighbors,
        )

    def _module_kwargs(self, adata: ad.AnnData | None) -> dict[str, Any]:
        module_settings = {k: v for k, v in self.hyperparameters.items() if k not in _MODEL_ONLY}
        return dict(n_genes=self.registry.n_genes, **module_settings)

    def _training_data(self, data: CellData, seed: int) -> CellData | NeighbourData:
        """The training cells with one kNN neighbour per cell per minibatch (for neighbour mixing)."""
        if self.module.augment.mix_max_weight == 0:
            return data
        matrix, _ = get_count_matrix(self.adata, self.registry.layer)
        if is_on_disk(matrix):
            # the kNN table comes from a PCA of every cell: read the matrix once for it
            # (set mix_max_weight=0 to train on data too large for that without neighbour mixing)
            logging.getLogger("sclatent").warning(
                "ContrastiveModel: neighbour mixing reads the on-disk count matrix into memory once to build "
                "its kNN table (mix_max_weight=0 avoids this)."
            )
            matrix = load_into_memory(matrix)
        order = gene_order_for_query(self.adata, self.registry)
        if order is not None:
            matrix = matrix[:, order]
        table = knn_table(matrix, self.train_indices, n_neighbors=self.hyperparameters["n_neighbors"], seed=seed)
        return NeighbourData(data, table)

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
        out. History: ``train_nt_xent`` / ``validation_nt_xent`` (nats per cell; also stored as
        ``*_reconstruction``, and ``*_elbo`` is its negative, by the trainer's convention). The
        held-out loss uses fixed augmentations and minibatches of up to 1,024 cells: its number of
        negatives differs from training's (NT-Xent grows like the log of it), so compare its trend,
        not its level, with the training curve.
        """
        kwargs.setdefault("kl_warmup_epochs", 0)
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
        ``(n_cells, n_latent)`` float32; write it to ``adata.obsm["X_sclatent_contrastive"]`` for
        ``sc.pp.neighbors(adata, use_rep="X_sclatent_contrastive")``.
        """
        out = [self.module.embedding(batch).cpu() for batch in self._batches(adata, indices, batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.module.n_latent), np.float32)


__all__ = ["ContrastiveModel"]
