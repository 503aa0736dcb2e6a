"""Contrastive learning pieces for any modality: SimCLR's NT-Xent loss and projection head.

:func:`nt_xent` and :class:`ProjectionHead` know nothing of cells or images: they take any
``(N, d)`` pairs of views. Used by the cell contrastive model (:mod:`sclatent.modules.contrastive`)
and the image SimCLR (:mod:`sclatent.images.modules.simclr`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Seed of the fixed augmentations drawn in evaluation mode: the validation loss of an epoch is
#: then a deterministic function of the parameters and comparable across epochs.
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
    torch.Tensor
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
