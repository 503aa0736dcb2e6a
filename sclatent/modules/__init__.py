"""Pure ``torch.nn.Module`` models of cells: they know minibatches, never AnnData or training loops.

Each family is one file declaring its hyperparameters once (a :class:`~sclatent.hyperparameters.Hyperparameters`
dataclass) and its module on the contract of :mod:`sclatent.contracts` (``loss(batch) -> LossOutput``).
"""

from ..contracts import LossOutput
from .autoencoder import AutoencoderModule, DenoisingAEHyperparameters
from .contrastive import ContrastiveHyperparameters, ContrastiveModule
from .gan import CellGANHyperparameters, GANModule
from .masked import MaskedGeneModelHyperparameters, MaskedGeneModule
from .ssvae import SemiSupervisedVAEHyperparameters, SemiSupervisedVAEModule
from .vae import VAEHyperparameters, VAEModule

__all__ = [
    "AutoencoderModule",
    "CellGANHyperparameters",
    "ContrastiveHyperparameters",
    "ContrastiveModule",
    "DenoisingAEHyperparameters",
    "GANModule",
    "LossOutput",
    "MaskedGeneModelHyperparameters",
    "MaskedGeneModule",
    "SemiSupervisedVAEHyperparameters",
    "SemiSupervisedVAEModule",
    "VAEHyperparameters",
    "VAEModule",
]
