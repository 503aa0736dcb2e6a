"""The image datasets (sclatent.datasets): the MNIST loader against the shared files, the bundled 8x8
digits' seeded stratified split and ImageSet.subset.

Moved from the image foundation's tests (tests/images/test_base.py); MNIST tests skip where the shared
data folder lacks MNIST (tests/conftest.py).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from sclatent import datasets
from sclatent.datasets import DatasetUnavailableError, ImageSet

MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


@pytest.fixture(scope="module")
def mnist_test(shared_data_dir: Path) -> ImageSet:
    try:
        return datasets.mnist("test", shared_data_dir)
    except DatasetUnavailableError as err:
        pytest.skip(f"MNIST not available: {err}")


# --- loaders ---------------------------------------------------------------------------------------


@pytest.mark.needs_data("MNIST")
def test_mnist_shapes_labels_and_class_counts(mnist_test: ImageSet, shared_data_dir: Path):
    train = datasets.mnist("train", shared_data_dir)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert mnist_test.images.shape == (10000, 28, 28) and mnist_test.levels == 256
    # the published training class counts (shared/data/README.md)
    expected = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(train.labels).tolist() == expected
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    unit = mnist_test.unit()
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == 1.0
    assert not train.images.flags.writeable  # cached arrays cannot be corrupted by a caller


@pytest.mark.needs_data("MNIST")
def test_mnist_loader_refuses_a_corrupted_file(mnist_test: ImageSet, tmp_path: Path, shared_data_dir: Path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES[:3]:
        (raw / name).symlink_to(shared_data_dir / "MNIST" / "raw" / name)
    content = bytearray(gzip.decompress((shared_data_dir / "MNIST" / "raw" / MNIST_FILES[3]).read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed: a valid idx file with the wrong content
    (raw / MNIST_FILES[3]).write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DatasetUnavailableError, match="checksum"):
        datasets.mnist("test", tmp_path)


def test_mnist_split_name_is_checked():
    with pytest.raises(ValueError, match="split"):
        datasets.mnist("validation")


def test_digits_split_is_stratified_disjoint_and_seeded():
    full = datasets.digits()
    train, test = datasets.digits("train"), datasets.digits("test")
    assert full.images.shape == (1797, 8, 8) and full.levels == 17 and full.images.max() == 16
    assert len(train) + len(test) == len(full)
    # stratified: every class keeps ~20% of its images in the test split
    fractions = np.bincount(test.labels) / np.bincount(full.labels)
    assert np.all(np.abs(fractions - 0.2) < 0.01)
    again = datasets.digits("test")
    np.testing.assert_array_equal(again.images, test.images)
    other = datasets.digits("test", seed=1)
    assert not np.array_equal(other.images, test.images)


def test_imageset_subset():
    full = datasets.digits()
    sub = full.subset(100, seed=3)
    assert len(sub) == 100 and sub.levels == 17
    np.testing.assert_array_equal(sub.images, full.subset(100, seed=3).images)
    threes = full.subset(classes=[3])
    assert set(threes.labels) == {3} and len(threes) == (full.labels == 3).sum()
