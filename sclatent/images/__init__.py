"""Image and vector models on the machinery of the cell models (same trainer, blocks, save/load).

Every class takes arrays ``(N, *input_shape)`` (or a :class:`sclatent.datasets.ImageSet`),
trains with ``.train(...)`` into ``.history``, and saves/loads like the AnnData models.
"""

from ._base import ArrayModel
from .classifier import DigitClassifier

__all__ = ["ArrayModel", "DigitClassifier"]
