"""Neural building blocks shared by the modules: MLPs with covariate injection, encoders, decoders."""

from .blocks import MLP, CountDecoder, GaussianEncoder

__all__ = ["MLP", "CountDecoder", "GaussianEncoder"]
