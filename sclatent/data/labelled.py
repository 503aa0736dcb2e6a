"""Minibatches that carry a minibatch of labelled cells, for semi-supervised models.

A semi-supervised model trains its classifier on the labelled cells. When labels are rare (1 % of
the cells), a random minibatch of 128 cells holds one labelled cell or none, and the classifier
learns from almost nothing; scANVI answers this by drawing a second minibatch of labelled cells
for every training step. :class:`LabelledData` does the same on top of any cells
(:class:`~sclatent.data.CellData`, :class:`~sclatent.data.OnDiskCellData`): in training passes
each minibatch gets ``batch.labelled``, ``max(2, min(batch_size, n_labelled))`` labelled training
cells drawn uniformly with replacement (at least two: the networks' BatchNorm cannot train on one
cell); evaluation passes attach nothing (the model scores the labelled cells of the minibatch itself).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .loader import CellData, MiniBatch, WrappedData
from .ondisk import OnDiskCellData

__all__ = ["LabelledData"]


class LabelledData(WrappedData):
    """Cells whose training minibatches carry a minibatch of labelled cells (``batch.labelled``).

    Parameters
    ----------
    data
        The cells (their ``label_index`` is negative for unlabelled cells).
    labelled_cells
        Indices of the labelled cells the extra minibatches are drawn from (the training cells
        with a label: held-out labels never leak into training).

    Notes
    -----
    The labelled cells are drawn from the training pass's ``generator`` (after the pass's own
    order), so seeded training stays reproducible and checkpoints resume it exactly.
    """

    def __init__(self, data: CellData | OnDiskCellData, labelled_cells: np.ndarray) -> None:
        labelled_cells = np.asarray(labelled_cells, dtype=np.int64)
        if labelled_cells.size == 0:
            raise ValueError("LabelledData needs at least one labelled cell.")
        self.data = data
        self.labelled_cells = torch.as_tensor(labelled_cells)

    def iterate(
        self,
        cells: np.ndarray | torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> Iterator[MiniBatch]:
        training = shuffle or batch_sizes is not None
        minibatches = self.data.iterate(
            cells, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last, batch_sizes=batch_sizes
        )
        # at least two (drawn with replacement): BatchNorm in training mode refuses a one-cell batch
        size = int(max(2, min(batch_size, self.labelled_cells.numel())))
        for batch in minibatches:
            if training:
                pick = torch.randint(0, self.labelled_cells.numel(), (size,), generator=generator)
                batch.labelled = self.data.gather(self.labelled_cells[pick])
            yield batch
