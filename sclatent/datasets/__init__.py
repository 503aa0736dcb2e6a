"""Datasets: bundled, simulated and file-backed single-cell count matrices.

``pbmc68k_counts``, ``synthetic`` and ``digits`` need no files. The file-backed loaders read from the data
directory (``SCLATENT_DATA_DIR``, default ``~/.cache/sclatent/data``) and verify each file against
the packaged manifest; nothing is downloaded at import time.
"""

from ._domains import DOMAIN_KINDS, domain_transform, rotate, unpaired_domains
from ._files import (
    DatasetUnavailableError,
    cellbench_5cl,
    data_dir,
    fetch_file,
    mnist_files,
    mouse_brain_10k_chr1,
    pbmc3k,
)
from ._images import ImageSet, digits, mnist
from ._pbmc68k import pbmc68k_counts
from ._synthetic import synthetic
from ._synthetic_h5ad import synthetic_h5ad
from ._toy2d import (
    ENERGIES,
    U1,
    U2,
    U3,
    U4,
    density_grid,
    energy,
    gaussian_mixture,
    log_normaliser,
    rings,
    two_moons,
)

__all__ = [
    "DOMAIN_KINDS",
    "ENERGIES",
    "U1",
    "U2",
    "U3",
    "U4",
    "DatasetUnavailableError",
    "ImageSet",
    "cellbench_5cl",
    "data_dir",
    "density_grid",
    "digits",
    "domain_transform",
    "energy",
    "fetch_file",
    "gaussian_mixture",
    "log_normaliser",
    "mnist",
    "mnist_files",
    "mouse_brain_10k_chr1",
    "pbmc3k",
    "pbmc68k_counts",
    "rings",
    "rotate",
    "synthetic",
    "synthetic_h5ad",
    "two_moons",
    "unpaired_domains",
]
