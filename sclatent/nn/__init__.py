"""Neural building blocks shared by the modules: MLPs with covariate injection, encoders, decoders."""

from .blocks import MLP, CountDecoder, GaussianEncoder
from .sparse import SparseLinear, SparseRows

__all__ = ["MLP", "CountDecoder", "GaussianEncoder", "SparseLinear", "SparseRows"]
