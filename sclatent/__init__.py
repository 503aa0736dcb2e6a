"""sclatent: deep latent-variable models for single-cell counts, AnnData-native."""

__version__ = "0.1.0"

from . import data, datasets, distributions, images, model, modules, nn

__all__ = ["__version__", "data", "datasets", "distributions", "images", "model", "modules", "nn"]
