"""Image building blocks: convolutional encoder and decoder, Glow steps, augmentations, pixel coding."""

from .augment import ImageAugmentation
from .conv import ConvEncoder
from .conv_decoder import ConvDecoder
from .glow import ActNorm, AffineCoupling, FlowStep, InvertibleConv1x1, Squeeze
from .pixels import binarise, bits_per_dim, dequantise

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "ConvDecoder",
    "ConvEncoder",
    "FlowStep",
    "ImageAugmentation",
    "InvertibleConv1x1",
    "Squeeze",
    "binarise",
    "bits_per_dim",
    "dequantise",
]
