"""Image datasets: MNIST from the data directory and scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ._files import DatasetUnavailableError, mnist_files

_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers of the idx3-ubyte / idx1-ubyte formats


@dataclass(frozen=True)
class ImageSet:
    """Grey-scale images with digit labels.

    Attributes
    ----------
    images
        ``(N, H, W)`` uint8 grey levels ``0 .. levels - 1`` (0 is background).
    labels
        ``(N,)`` int64 classes.
    levels
        Number of grey levels (256 for MNIST, 17 for the 8x8 digits): what dequantisation and
        bits/dim count.
    name
        Where the images come from, e.g. ``"mnist-train"``.
    """

    images: np.ndarray
    labels: np.ndarray
    levels: int
    name: str

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def unit(self) -> np.ndarray:
        """``(N, H, W)`` float32 intensities in ``[0, 1]`` (grey level / (levels - 1))."""
        return self.images.astype(np.float32) / (self.levels - 1)

    def subset(self, n: int | None = None, seed: int = 0, classes: list[int] | None = None) -> ImageSet:
        """A seeded random subset of ``n`` images (all when None), optionally of some classes only."""
        keep = np.arange(len(self))
        if classes is not None:
            keep = keep[np.isin(self.labels, classes)]
        if n is not None and n < len(keep):
            keep = np.sort(np.random.default_rng(seed).choice(keep, size=n, replace=False))
        return ImageSet(self.images[keep], self.labels[keep], self.levels, self.name)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    header = np.frombuffer(raw[:4], dtype=">i4")[0]
    if header != magic:
        raise DatasetUnavailableError(
            f"{path} is not an idx file of the expected kind (magic {header}, expected {magic})."
        )
    n_dims = magic & 0xFF
    dims = np.frombuffer(raw[4 : 4 + 4 * n_dims], dtype=">i4").astype(int)
    data = np.frombuffer(raw[4 + 4 * n_dims :], dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise DatasetUnavailableError(f"{path} is truncated: {data.size} values for shape {tuple(dims)}.")
    return data.reshape(dims)


@lru_cache(maxsize=4)
def _mnist_arrays(split: str, root: str | None) -> tuple[np.ndarray, np.ndarray]:
    files = mnist_files(root)
    images = _read_idx(files[f"{split}_images"], _IDX_IMAGES)
    labels = _read_idx(files[f"{split}_labels"], _IDX_LABELS).astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist(split: str = "train", data_dir: str | os.PathLike[str] | None = None) -> ImageSet:
    """MNIST (LeCun et al. 1998): 60,000 training or 10,000 test 28x28 digits.

    Read from ``<data_dir>/MNIST/raw/*.gz`` (the torchvision layout; ``data_dir`` defaults to
    ``$SCLATENT_DATA_DIR``), each file verified by the md5 of its uncompressed bytes.

    Parameters
    ----------
    split
        ``"train"`` or ``"test"``.
    data_dir
        Folder holding ``MNIST/raw``.

    Returns
    -------
    ImageSet
        ``images`` ``(N, 28, 28)`` uint8, ``labels`` ``(N,)``, 256 grey levels.

    Raises
    ------
    DatasetUnavailableError
        A file is missing (and cannot be downloaded) or fails its checksum.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    images, labels = _mnist_arrays(split, None if data_dir is None else str(data_dir))
    return ImageSet(images, labels, 256, f"mnist-{split}")


def digits(split: str | None = None, test_fraction: float = 0.2, seed: int = 0) -> ImageSet:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 17 grey levels); no files needed.

    Parameters
    ----------
    split
        ``None`` for all images, or ``"train"`` / ``"test"`` for a seeded stratified split with
        ``test_fraction`` of each class held out.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)  # integers 0..16 stored as float
    labels = bunch.target.astype(np.int64)
    if split is None:
        return ImageSet(images, labels, 17, "digits")
    if split not in ("train", "test"):
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}.")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test[rng.choice(members, size=round(test_fraction * len(members)), replace=False)] = True
    keep = test if split == "test" else ~test
    return ImageSet(images[keep], labels[keep], 17, f"digits-{split}")
