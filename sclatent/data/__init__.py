"""Data registration (``setup_anndata``), validation and minibatch loaders.

Layering, bottom up (each file imports only the ones before it): ``_counts`` (where an AnnData's
count matrix is, :class:`CountSource`, on-disk and chunked reading, ``check_counts``),
``registry`` (``setup_anndata``, :class:`Registry`, obs codes, ``count_source``), ``loader``
(:class:`CellData`, :class:`MiniBatch`), ``ondisk`` (:class:`OnDiskCellData`, ``make_cell_data``)
and ``neighbours`` (kNN neighbours for contrastive models).
"""

from ._counts import CountSource
from .loader import CellData, MiniBatch, WrappedData, resolve_device
from .ondisk import OnDiskCellData, OnDiskSettings, ondisk_settings, read_backed
from .registry import (
    REGISTRY_KEY,
    Registry,
    SetupError,
    count_source,
    get_registry,
    library_log_prior,
    setup_anndata,
)

__all__ = [
    "REGISTRY_KEY",
    "CellData",
    "CountSource",
    "MiniBatch",
    "OnDiskCellData",
    "OnDiskSettings",
    "Registry",
    "SetupError",
    "WrappedData",
    "count_source",
    "get_registry",
    "library_log_prior",
    "ondisk_settings",
    "read_backed",
    "resolve_device",
    "setup_anndata",
]
