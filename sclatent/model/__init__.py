"""AnnData-facing models: ``setup_anndata`` -> ``Model(adata)`` -> ``train`` -> outputs."""

from ._base import BaseModel
from .autoencoder import DenoisingAE
from .vae import VAE

__all__ = ["VAE", "BaseModel", "DenoisingAE"]
