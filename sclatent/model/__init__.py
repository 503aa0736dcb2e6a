"""AnnData-facing models: ``setup_anndata`` -> ``Model(adata)`` -> ``train`` -> outputs."""

from ._base import BaseModel
from ._expression import CountExpressionOutputs
from ._query import QueryFreezing
from .autoencoder import DenoisingAE
from .contrastive import ContrastiveModel
from .gan import CellGAN
from .masked import MaskedGeneModel
from .ssvae import SemiSupervisedVAE
from .vae import VAE

__all__ = [
    "VAE",
    "BaseModel",
    "CellGAN",
    "ContrastiveModel",
    "CountExpressionOutputs",
    "DenoisingAE",
    "MaskedGeneModel",
    "QueryFreezing",
    "SemiSupervisedVAE",
]
