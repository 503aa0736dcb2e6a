"""A small CNN digit classifier: the referee of the generative image models.

With no internet there is no Inception network, so sample quality is judged by a classifier
trained here: its accuracy and confidence on generated digits and the Frechet distance between
its penultimate features of generated and real images (an MNIST analogue of FID).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...contracts import LossOutput, Module
from ...hyperparameters import Hyperparameters, setting
from ..data import ArrayBatch
from ..nn.conv import ConvEncoder


@dataclass(frozen=True)
class DigitClassifierHyperparameters(Hyperparameters):
    """The digit classifier's hyperparameters, declared once: read by :class:`DigitClassifierModule`
    and :class:`sclatent.images.DigitClassifier`."""

    family: ClassVar[str] = "DigitClassifier"

    n_classes: int = setting(10, "Number of classes.", minimum=1)
    n_features: int = setting(128, "Width of the feature layer (what the Frechet distance compares).", minimum=1)
    dropout_rate: float = setting(0.2, "Dropout before the output layer.", minimum=0.0, maximum=1.0)


def as_image_batch(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` -> ``(B, 1, H, W)``; ``(B, C, H, W)`` unchanged."""
    return x.unsqueeze(1) if x.dim() == 3 else x


class DigitClassifierModule(Module):
    """ConvEncoder -> ReLU -> Dropout -> Linear over ``n_classes``.

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(C, H, W)`` of one image.
    **hyperparameters
        :class:`DigitClassifierHyperparameters`: ``n_classes``, ``n_features`` (width of the feature
        layer, what the Frechet distance compares) and ``dropout_rate`` (before the output layer).
    """

    # early stopping watches the 0/1 error (minimised) unless told otherwise
    default_monitor = "error"

    def __init__(self, input_shape: tuple[int, ...], **hyperparameters: Any) -> None:
        super().__init__()
        settings = DigitClassifierHyperparameters.from_dict(hyperparameters)
        channels = 1 if len(input_shape) == 2 else input_shape[0]
        self.encoder = ConvEncoder(channels, tuple(input_shape[-2:]), settings.n_features, widths=(32, 64))
        self.dropout = nn.Dropout(settings.dropout_rate)
        self.out = nn.Linear(settings.n_features, settings.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_features)`` penultimate activations (after the ReLU) of images ``x`` in [0, 1]."""
        return F.relu(self.encoder(as_image_batch(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_classes)`` logits."""
        return self.out(self.dropout(self.features(x)))

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0) -> LossOutput:
        """Terms ``cross_entropy`` (per image, nats; the loss) and the 0/1 ``error``."""
        logits = self(batch.x)
        cross_entropy = F.cross_entropy(logits, batch.y, reduction="none")
        error = (logits.argmax(-1) != batch.y).to(logits.dtype)
        return LossOutput(loss=cross_entropy.mean(), terms={"cross_entropy": cross_entropy, "error": error})
