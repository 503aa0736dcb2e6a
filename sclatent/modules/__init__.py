"""Pure ``torch.nn.Module`` models: they know minibatches, never AnnData or training loops."""

from ._base import LossOutput
from .autoencoder import AutoencoderModule
from .contrastive import ContrastiveModule
from .gan import GANModule
from .masked import MaskedGeneModule
from .vae import VAEModule

__all__ = ["AutoencoderModule", "ContrastiveModule", "GANModule", "LossOutput", "MaskedGeneModule", "VAEModule"]
