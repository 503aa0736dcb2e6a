"""Random feature masks: exactly ``k`` of ``n`` features hidden per row.

Shared by the masked pretraining of cells (genes hidden per cell, :mod:`sclatent.modules.masked`)
and of images (patches hidden per image, :mod:`sclatent.images.modules.masked`).
"""

from __future__ import annotations

import torch


def n_masked_features(n_features: int, mask_rate: float) -> int:
    """Features hidden per row: ``round(mask_rate * n_features)``, at least 1 and at most ``n_features - 1``."""
    return int(min(n_features - 1, max(1, round(mask_rate * n_features))))


def draw_feature_mask(
    n_rows: int, n_features: int, mask_rate: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """``(n_rows, n_features)`` bool mask with exactly :func:`n_masked_features` True entries per row.

    Each row's hidden features are a uniform random subset (the top-k of i.i.d. uniform scores),
    drawn regardless of the values: zeros are hidden as often as nonzeros.
    """
    k = n_masked_features(n_features, mask_rate)
    scores = torch.rand(n_rows, n_features, generator=generator, device=device)
    mask = torch.zeros(n_rows, n_features, dtype=torch.bool, device=scores.device)
    return mask.scatter_(1, scores.topk(k, dim=1).indices, True)
