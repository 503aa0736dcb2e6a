"""Pure ``torch.nn.Module`` image/vector models: they know minibatches of arrays, never training loops."""

from .autoencoder import ImageAutoencoderModule
from .classifier import DigitClassifierModule
from .cyclegan import CycleGANModule
from .density_flow import EnergyFlowModule, SampleFlowModule
from .flow import ImageFlowModule
from .gan import ImageGANModule
from .masked import MaskedImageAutoencoderModule
from .simclr import ImageSimCLRModule
from .vae import ImageVAEModule

__all__ = [
    "CycleGANModule",
    "DigitClassifierModule",
    "EnergyFlowModule",
    "ImageAutoencoderModule",
    "ImageFlowModule",
    "ImageGANModule",
    "ImageSimCLRModule",
    "ImageVAEModule",
    "MaskedImageAutoencoderModule",
    "SampleFlowModule",
]
