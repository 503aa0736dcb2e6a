"""Image and vector models on the machinery of the cell models (same trainer, blocks, save/load).

Every class takes arrays ``(N, *input_shape)`` (or a :class:`sclatent.datasets.ImageSet`),
trains with ``.train(...)`` into ``.history``, and saves/loads like the AnnData models.

The wing keeps its own pieces: pure-torch modules in :mod:`sclatent.images.modules`, blocks in
:mod:`sclatent.images.nn`, data in :mod:`sclatent.images.data`, metrics in
:mod:`sclatent.images.metrics`, figures in :mod:`sclatent.images.plotting` and commands in
:mod:`sclatent.cli.images`. It shares only the generic core (trainer, likelihood maths,
:mod:`sclatent.nn` blocks, datasets) with the cell models.
"""

from ._base import ArrayModel
from .autoencoder import ImageAutoencoder
from .classifier import DigitClassifier
from .cyclegan import CycleGAN, evaluate_translation
from .flow import DensityFlow, EnergyFlow, ImageFlow
from .gan import ImageGAN, evaluate_image_gan
from .masked import MaskedImageAutoencoder
from .simclr import SimCLR
from .vae import ImageVAE

__all__ = [
    "ArrayModel",
    "CycleGAN",
    "DensityFlow",
    "DigitClassifier",
    "EnergyFlow",
    "ImageAutoencoder",
    "ImageFlow",
    "ImageGAN",
    "ImageVAE",
    "MaskedImageAutoencoder",
    "SimCLR",
    "evaluate_image_gan",
    "evaluate_translation",
]
