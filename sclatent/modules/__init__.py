"""Pure ``torch.nn.Module`` models: they know minibatches, never AnnData or training loops."""

from ._base import LossOutput
from .vae import VAEModule

__all__ = ["LossOutput", "VAEModule"]
