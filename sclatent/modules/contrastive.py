"""Contrastive cell embeddings (SimCLR) as a pure ``torch.nn.Module``, with a generic NT-Xent loss.

For a minibatch of ``B`` cells::

    v1, v2 = aug(x), aug(x)                 two random count-aware views per cell   (B, G) each
    h      = f(v)                           encoder MLP -> linear, the embedding      (B, n_latent)
    p      = g(h)                           projection head, training only           (B, n_projection)
    loss   = NT-Xent(p1, p2; tau)           each view must pick its partner among the other 2B - 2

The embedding a user gets is ``h`` of the clean log-normalised cell; the projection head is
discarded (SimCLR: the layer before the head keeps more information than the one the loss sees).

:func:`~sclatent.nn.contrastive.nt_xent` and :class:`~sclatent.nn.contrastive.ProjectionHead` know
nothing of cells: they live in :mod:`sclatent.nn.contrastive`, shared with the image SimCLR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..contracts import LossOutput, Module
from ..data.loader import MiniBatch
from ..hyperparameters import Hyperparameters, setting
from ..nn import MLP
from ..nn.augment import CountAugmentation, log_normalise
from ..nn.contrastive import EVALUATION_SEED, ProjectionHead, nt_xent


@dataclass(frozen=True)
class ContrastiveHyperparameters(Hyperparameters):
    """The contrastive model's hyperparameters, declared once: read by :class:`ContrastiveModule`,
    :class:`sclatent.model.ContrastiveModel` and the ``fit-contrastive`` command."""

    family: ClassVar[str] = "ContrastiveModel"

    n_latent: int = setting(32, "Embedding width (the encoder's output).", minimum=1)
    n_hidden: int = setting(128, "Width of the encoder MLP's hidden layers.", minimum=1)
    n_layers: int = setting(2, "Hidden layers of the encoder MLP (Linear, BatchNorm, ReLU).", minimum=1)
    dropout_rate: float = setting(0.0, "Dropout in the encoder MLP.")
    n_projection: int = setting(32, "Output width of the projection head.", minimum=1)
    n_projection_hidden: int = setting(128, "Hidden width of the projection head.", minimum=1)
    temperature: float = setting(0.2, "NT-Xent temperature (> 0; SimCLR's range is 0.1-0.5).")
    thinning_keep: float = setting(0.5, "Fraction of molecules each view keeps (binomial thinning; 1: off).")
    mask_rate: float = setting(0.2, "Probability of zeroing each gene of a view (0: off).")
    noise_std: float = setting(0.2, "Standard deviation of Gaussian noise on log1p normalised expression (0: off).")
    mix_max_weight: float = setting(
        0.5,
        "Each view is (1 - w) the cell and w one of its kNN neighbours, w ~ U(0, this) (0: off, and no kNN table "
        "is built).",
    )
    n_neighbors: int = setting(
        15,
        "k of the kNN table (PCA of log-normalised counts of the training cells; built at each train, not saved).",
        minimum=1,
        module=False,
    )

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")


class ContrastiveModule(Module):
    """SimCLR on single-cell counts: count-aware views, an MLP encoder, a projection head, NT-Xent.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    **hyperparameters
        :class:`ContrastiveHyperparameters` that the module takes (``n_neighbors`` is the model's):
        ``n_latent`` (width of the embedding ``h``, the encoder's output); ``n_hidden``,
        ``n_layers``, ``dropout_rate`` (encoder MLP, Linear -> BatchNorm -> ReLU [-> Dropout],
        before the linear embedding layer); ``n_projection``, ``n_projection_hidden`` (output and
        hidden widths of the projection head); ``temperature`` (NT-Xent); ``thinning_keep``,
        ``mask_rate``, ``noise_std``, ``mix_max_weight`` (augmentation strengths,
        :class:`sclatent.nn.augment.CountAugmentation`).
    """

    default_monitor = "nt_xent"

    def __init__(self, n_genes: int, **hyperparameters: Any) -> None:
        super().__init__()
        settings = ContrastiveHyperparameters.from_dict(hyperparameters)
        n_latent, n_hidden, n_layers = settings.n_latent, settings.n_hidden, settings.n_layers
        self.n_genes, self.n_latent, self.temperature = n_genes, n_latent, float(settings.temperature)
        self.augment = CountAugmentation(
            settings.thinning_keep, settings.mask_rate, settings.noise_std, settings.mix_max_weight
        )
        self.encoder = MLP(n_genes, n_hidden, n_layers=n_layers, dropout_rate=settings.dropout_rate)
        self.embed = nn.Linear(n_hidden, n_latent)
        self.projection = ProjectionHead(n_latent, settings.n_projection, settings.n_projection_hidden)

    # -------------------------------------------------------------------- pieces

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """``(B, G)`` log-normalised input -> ``(B, n_latent)`` embedding."""
        return self.embed(self.encoder(u))

    def embedding(self, batch: MiniBatch) -> torch.Tensor:
        """``(B, n_latent)`` embedding of the clean cells (no augmentation, no projection head)."""
        return self.encode(log_normalise(batch.counts))

    def views(self, batch: MiniBatch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent augmented views ``(B, G)`` of the batch's cells.

        Neighbour mixing uses ``batch.neighbour`` (one sampled kNN neighbour per cell, delivered by
        :class:`sclatent.data.neighbours.NeighbourData`); without it that step is skipped.
        """
        neighbour = getattr(batch, "neighbour", None)
        neighbour_counts = None if neighbour is None else neighbour.counts
        args = (batch.nz_row, batch.nz_col, batch.nz_val, batch.size, batch.n_genes, neighbour_counts, generator)
        return self.augment(*args), self.augment(*args)

    # -------------------------------------------------------------------- objective

    def loss(self, batch: MiniBatch, kl_weight: float = 1.0) -> LossOutput:
        """Per-cell NT-Xent (``nt_xent``, nats; the mean over the cell's two views as anchors). No
        likelihood and no ELBO; ``kl_weight`` is unused (no KL).

        In evaluation mode the views come from a generator seeded with
        :data:`sclatent.nn.contrastive.EVALUATION_SEED`, so the held-out loss is deterministic.
        """
        generator = None
        if not self.training:
            generator = torch.Generator(device=batch.nz_val.device).manual_seed(EVALUATION_SEED)
        v1, v2 = self.views(batch, generator)
        # one pass over both views: BatchNorm sees 2B cells, as in SimCLR
        h = self.encode(torch.cat([v1, v2]))
        p1, p2 = self.projection(h).chunk(2)
        per_anchor = nt_xent(p1, p2, self.temperature)
        per_cell = 0.5 * (per_anchor[: batch.size] + per_anchor[batch.size :])
        return LossOutput(loss=per_cell.mean(), terms={"nt_xent": per_cell})
