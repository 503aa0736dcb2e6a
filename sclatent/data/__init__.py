"""Data registration (``setup_anndata``), validation and minibatch loaders."""

from .loader import CellData, MiniBatch, resolve_device
from .ondisk import OnDiskCellData, OnDiskSettings, ondisk_settings, read_backed
from .registry import REGISTRY_KEY, Registry, SetupError, get_registry, setup_anndata

__all__ = [
    "REGISTRY_KEY",
    "CellData",
    "MiniBatch",
    "OnDiskCellData",
    "OnDiskSettings",
    "Registry",
    "SetupError",
    "get_registry",
    "ondisk_settings",
    "read_backed",
    "resolve_device",
    "setup_anndata",
]
