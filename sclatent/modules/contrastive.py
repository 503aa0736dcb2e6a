"""Contrastive cell embeddings (SimCLR) as a pure ``torch.nn.Module``, with a generic NT-Xent loss.

For a minibatch of ``B`` cells::

    v1, v2 = aug(x), aug(x)                 two random count-aware views per cell   (B, G) each
    h      = f(v)                           encoder MLP -> linear, the embedding      (B, n_latent)
    p      = g(h)                           projection head, training only           (B, n_projection)
    loss   = NT-Xent(p1, p2; tau)           each view must pick its partner among the other 2B - 2

The embedding a user gets is ``h`` of the clean log-normalised cell; the projection head is
discarded (SimCLR: the layer before the head keeps more information than the one the loss sees).

:func:`nt_xent` and :class:`ProjectionHead` know nothing of cells: they take any ``(N, d)``
pairs of views, so an image or another modality can reuse them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.loader import MiniBatch
from ..nn import MLP
from ..nn.augment import CountAugmentation, log_normalise
from ._base import LossOutput

# Seed of the fixed augmentations drawn in evaluation mode: the validation loss of an epoch is
# then a deterministic function of the parameters and comparable across epochs.
EVALUATION_SEED = 0


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Normalised-temperature cross entropy (SimCLR's NT-Xent) of ``N`` pairs of views.

    With ``z = normalise([z1; z2])`` (``2N`` unit vectors) and ``s_ij = z_i . z_j / temperature``,
    anchor ``i``'s loss is ``-log(exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik))``, ``p(i)`` its partner
    (``i +- N``): a ``2N - 1``-way classification of the partner against every other view.

    Parameters
    ----------
    z1, z2
        ``(N, d)`` projections of the two views, row ``n`` of each from the same item.
    temperature
        ``tau > 0``; smaller sharpens the softmax onto the hardest negatives.

    Returns
    -------
    ``(2N,)`` per-anchor losses (nats): the views of ``z1`` first, then those of ``z2``. Averaging
    entries ``n`` and ``n + N`` gives a per-item loss; the mean is SimCLR's objective.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"the two views must be (N, d) of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    similarity = (z @ z.T) / temperature
    # a view is never its own negative: drop the diagonal from the softmax
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, partner, reduction="none")


class ProjectionHead(nn.Module):
    """SimCLR's projection ``g``: Linear -> BatchNorm -> ReLU -> Linear, ``(N, n_in) -> (N, n_out)``."""

    def __init__(self, n_in: int, n_out: int = 32, n_hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_in, n_hidden), nn.BatchNorm1d(n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ContrastiveModule(nn.Module):
    """SimCLR on single-cell counts: count-aware views, an MLP encoder, a projection head, NT-Xent.

    Parameters
    ----------
    n_genes
        Number of genes ``G``.
    n_latent
        Width of the embedding ``h`` (the encoder's output).
    n_hidden, n_layers, dropout_rate
        Encoder MLP (Linear -> BatchNorm -> ReLU [-> Dropout]) before the linear embedding layer.
    n_projection, n_projection_hidden
        Output and hidden widths of the projection head.
    temperature
        NT-Xent temperature.
    thinning_keep, mask_rate, noise_std, mix_max_weight
        Augmentation strengths (:class:`sclatent.nn.augment.CountAugmentation`).
    """

    def __init__(
        self,
        n_genes: int,
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
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if min(n_latent, n_hidden, n_layers, n_projection, n_projection_hidden) < 1:
            raise ValueError("n_latent, n_hidden, n_layers, n_projection and n_projection_hidden must be >= 1.")
        self.n_genes, self.n_latent, self.temperature = n_genes, n_latent, float(temperature)
        self.augment = CountAugmentation(thinning_keep, mask_rate, noise_std, mix_max_weight)
        self.encoder = MLP(n_genes, n_hidden, n_layers=n_layers, dropout_rate=dropout_rate)
        self.embed = nn.Linear(n_hidden, n_latent)
        self.projection = ProjectionHead(n_latent, n_projection, n_projection_hidden)

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
        """Per-cell NT-Xent (``reconstruction`` and ``extra["nt_xent"]``, nats; the mean over the
        cell's two views as anchors). ``kl_weight`` is unused (no KL; ``kl`` is zeros).

        In evaluation mode the views come from a generator seeded with :data:`EVALUATION_SEED`, so
        the held-out loss is deterministic.
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
        return LossOutput(
            loss=per_cell.mean(), reconstruction=per_cell, kl=torch.zeros_like(per_cell), extra={"nt_xent": per_cell}
        )
