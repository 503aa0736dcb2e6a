"""sclatent: deep latent-variable models for single-cell counts, AnnData-native."""

from . import data, datasets, distributions, images, model, modules, nn
from ._persistence import ModelLoadError
from ._version import __version__

__all__ = ["ModelLoadError", "__version__", "data", "datasets", "distributions", "images", "model", "modules", "nn"]
