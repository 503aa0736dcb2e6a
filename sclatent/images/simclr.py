"""``SimCLR``: contrastive image representations (Chen et al. 2020) on the shared trainer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..base import seeded
from ._base import ArrayModel
from .modules.simclr import ImageSimCLRModule, SimCLRHyperparameters


class SimCLR(ArrayModel):
    """Self-supervised image representations: two augmented views per image, NT-Xent between them.

    A conv encoder (or an MLP) maps each view to ``h``; a projection head maps ``h`` to the space
    where NT-Xent (:func:`sclatent.nn.contrastive.nt_xent`, the cell model's loss) pulls the
    two views of an image together and pushes the other ``2B - 2`` views of the minibatch away.
    :meth:`get_representation` returns ``h`` of the clean images; judge it with a linear probe
    (:func:`sclatent.images.metrics.linear_probe_accuracy`).

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(C, H, W)``, e.g. ``(28, 28)``.
    {hyperparameters}
    seed
        Initial weights and, by default, training.

    Examples
    --------
    >>> train, test = sclatent.datasets.mnist("train").subset(20000), sclatent.datasets.mnist("test")
    >>> model = SimCLR((28, 28), n_representation=64).train(train, max_epochs=20)
    >>> h_train, h_test = model.get_representation(train), model.get_representation(test)
    >>> linear_probe_accuracy(h_train, train.labels, h_test, test.labels)
    """

    module_class = ImageSimCLRModule
    hyperparameters_class = SimCLRHyperparameters

    def __init__(self, input_shape: tuple[int, ...], *, seed: int = 0, **hyperparameters: Any) -> None:
        # a copy of the caller's augmentations: later changes to their dict do not reach the model
        augmentations = hyperparameters.get("augmentations")
        if isinstance(augmentations, dict):
            hyperparameters["augmentations"] = dict(augmentations)
        super().__init__(input_shape, seed=seed, **hyperparameters)

    def train(self, x, y=None, max_epochs: int = 20, batch_size: int = 256, **kwargs) -> SimCLR:
        """Fit by NT-Xent (see :meth:`ArrayModel.train`); labels are ignored.

        NT-Xent's negatives are the other images of the minibatch, hence a larger default batch
        than the other models. ``history`` holds ``train_nt_xent`` (nats per image) and, with
        ``validation``, ``validation_nt_xent`` on fixed (seeded) views; early stopping watches it.
        """
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (an image needs other images as negatives), got {batch_size}.")
        return super().train(x, None, max_epochs=max_epochs, batch_size=batch_size, **kwargs)

    def get_representation(self, x, batch_size: int = 1024) -> np.ndarray:
        """``(N, n_representation)`` representation ``h`` of images ``x`` (no augmentation, no head)."""
        return self._map(lambda b: self.module.representation(b.x), x, batch_size)

    def get_projection(self, x, batch_size: int = 1024) -> np.ndarray:
        """``(N, n_projection)`` projection-head outputs ``g(h)`` (the space the loss compares)."""
        return self._map(lambda b: self.module.projection(self.module.representation(b.x)), x, batch_size)

    def views(self, x, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Two augmented views ``(N, *input_shape)`` of each image of ``x``, drawn with ``seed``."""
        x, _ = self._check_inputs(x)
        images = torch.as_tensor(x, device=self.device)
        with torch.no_grad(), seeded(seed, self.device):
            v1, v2 = self.module.views(images)
        return v1.reshape(x.shape).cpu().numpy(), v2.reshape(x.shape).cpu().numpy()
