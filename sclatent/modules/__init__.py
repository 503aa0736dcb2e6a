"""Pure ``torch.nn.Module`` models: they know minibatches, never AnnData or training loops."""

from ._base import LossOutput
from .autoencoder import AutoencoderModule
from .vae import VAEModule

__all__ = ["AutoencoderModule", "LossOutput", "VAEModule"]
