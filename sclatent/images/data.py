"""Minibatches of dense arrays (images, vectors) for the same trainer that fits the cell models.

:class:`ArrayData` is the image side's :class:`~sclatent.contracts.TrainingData` (the contract
:class:`sclatent.data.CellData` implements for cells); its minibatches are :class:`ArrayBatch` es.
The arrays live on the compute device once, and minibatches are indexed there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..contracts import TrainingData, index_tensor, minibatch_sizes


@dataclass
class ArrayBatch:
    """One minibatch of items.

    Attributes
    ----------
    x
        ``(B, *item_shape)`` float32 inputs (images ``(B, C, H, W)`` or ``(B, H, W)``, vectors ``(B, D)``).
    y
        ``(B,)`` int64 labels, or None when the data have none.
    index
        ``(B,)`` int64 positions of the items in the dataset (for per-item fixed randomness).
    """

    x: torch.Tensor
    y: torch.Tensor | None
    index: torch.Tensor

    @property
    def size(self) -> int:
        return self.x.shape[0]


class ArrayData(TrainingData):
    """Items ``x`` (and optional labels ``y``) as tensors on ``device``: a :class:`~sclatent.contracts.TrainingData`.

    Parameters
    ----------
    x
        ``(N, *item_shape)`` array or tensor, converted to float32.
    y
        ``(N,)`` integer labels or None.
    device
        Where the tensors (and so the minibatches) live.
    """

    def __init__(self, x, y=None, device: torch.device | str = "cpu") -> None:
        self.x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32).to(device)
        self.y = None if y is None else torch.as_tensor(np.asarray(y), dtype=torch.int64).to(device)
        if self.y is not None and self.y.shape != (self.x.shape[0],):
            raise ValueError(f"labels must have shape ({self.x.shape[0]},), got {tuple(self.y.shape)}.")
        self.device = torch.device(device)

    @property
    def n_items(self) -> int:
        return self.x.shape[0]

    @property
    def n_cells(self) -> int:
        """The number of items (the name the contract shares with the cell data)."""
        return self.n_items

    def iterate(
        self,
        indices: np.ndarray | torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> Iterator[ArrayBatch]:
        """Minibatches over ``indices``, optionally in a seeded random order (``generator`` on CPU).

        ``batch_sizes`` (positive, summing to ``len(indices)``) sets every minibatch's size.
        """
        indices = self.epoch_order(indices, generator) if shuffle else index_tensor(indices)
        indices = indices.to(self.device)
        begin = 0
        for size in minibatch_sizes(indices.numel(), batch_size, drop_last, batch_sizes):
            index = indices[begin : begin + size]
            begin += size
            yield ArrayBatch(self.x[index], None if self.y is None else self.y[index], index)
