"""Datasets: bundled, simulated and file-backed single-cell count matrices.

``pbmc68k_counts``, ``synthetic`` and ``digits`` need no files. The file-backed loaders read from the data
directory (``SCLATENT_DATA_DIR``, default ``~/.cache/sclatent/data``) and verify each file against
the packaged manifest; nothing is downloaded at import time.
"""

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

__all__ = [
    "DatasetUnavailableError",
    "ImageSet",
    "cellbench_5cl",
    "data_dir",
    "digits",
    "fetch_file",
    "mnist",
    "mnist_files",
    "mouse_brain_10k_chr1",
    "pbmc3k",
    "pbmc68k_counts",
    "synthetic",
]
