"""A small CNN digit classifier: the referee of the generative image models.

With no internet there is no Inception network, so sample quality is judged by a classifier
trained here: its accuracy and confidence on generated digits and the Frechet distance between
its penultimate features of generated and real images (an MNIST analogue of FID).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.arrays import ArrayBatch
from ..nn.conv import ConvEncoder
from ._base import LossOutput


def as_image_batch(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` -> ``(B, 1, H, W)``; ``(B, C, H, W)`` unchanged."""
    return x.unsqueeze(1) if x.dim() == 3 else x


class DigitClassifierModule(nn.Module):
    """ConvEncoder -> ReLU -> Dropout -> Linear over ``n_classes``.

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(C, H, W)`` of one image.
    n_classes
        Number of classes.
    n_features
        Width of the feature layer (what the Frechet distance compares).
    dropout_rate
        Dropout before the output layer.
    """

    def __init__(
        self, input_shape: tuple[int, ...], n_classes: int = 10, n_features: int = 128, dropout_rate: float = 0.2
    ) -> None:
        super().__init__()
        channels = 1 if len(input_shape) == 2 else input_shape[0]
        self.encoder = ConvEncoder(channels, tuple(input_shape[-2:]), n_features, widths=(32, 64))
        self.dropout = nn.Dropout(dropout_rate)
        self.out = nn.Linear(n_features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_features)`` penultimate activations (after the ReLU) of images ``x`` in [0, 1]."""
        return F.relu(self.encoder(as_image_batch(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_classes)`` logits."""
        return self.out(self.dropout(self.features(x)))

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0) -> LossOutput:
        """Cross-entropy per image (``reconstruction``, nats) and the 0/1 ``error`` (``extra``)."""
        logits = self(batch.x)
        cross_entropy = F.cross_entropy(logits, batch.y, reduction="none")
        error = (logits.argmax(-1) != batch.y).to(logits.dtype)
        zeros = torch.zeros_like(cross_entropy)
        return LossOutput(loss=cross_entropy.mean(), reconstruction=cross_entropy, kl=zeros, extra={"error": error})
