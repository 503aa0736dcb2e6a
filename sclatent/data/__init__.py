"""Data registration (``setup_anndata``), validation and minibatch loaders."""

from .loader import CellData, MiniBatch, resolve_device
from .registry import REGISTRY_KEY, Registry, SetupError, get_registry, setup_anndata

__all__ = [
    "REGISTRY_KEY",
    "CellData",
    "MiniBatch",
    "Registry",
    "SetupError",
    "get_registry",
    "resolve_device",
    "setup_anndata",
]
