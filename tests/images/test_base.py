"""The image/vector foundation: ArrayData, pixel transforms, the ArrayModel base (through
DigitClassifier), the classifier-based sample-quality metrics and the image grid plot. The MNIST and
digits loaders are tested in tests/datasets/test_images.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from sclatent import datasets
from sclatent.images import DigitClassifier
from sclatent.images.data import ArrayData
from sclatent.images.metrics import classifier_scores, frechet_distance, linear_probe_accuracy
from sclatent.images.nn.pixels import binarise, bits_per_dim, dequantise
from sclatent.images.plotting import plot_image_grid

# --- ArrayData and pixel transforms -----------------------------------------------------------------


def test_array_data_iterates_every_item_once_in_seeded_order():
    x, y = np.arange(23 * 2, dtype=np.float32).reshape(23, 2), np.arange(23) % 5
    data = ArrayData(x, y)
    batches = list(data.iterate(np.arange(23), 5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    seen = torch.cat([b.index for b in batches])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    for batch in batches:
        np.testing.assert_array_equal(batch.x.numpy(), x[batch.index.numpy()])
        np.testing.assert_array_equal(batch.y.numpy(), y[batch.index.numpy()])
    again = list(data.iterate(np.arange(23), 5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat([b.index for b in again]), seen)
    assert [b.size for b in data.iterate(np.arange(23), 5, drop_last=True)] == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="labels"):
        ArrayData(x, y[:-1])


def test_binarisation_fixed_and_dynamic():
    x = torch.tensor([[0.0, 0.2, 0.5, 0.51, 1.0]])
    assert binarise(x, "fixed").tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]
    p = torch.full((200_000,), 0.3)
    draws = binarise(p, "dynamic", generator=torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    assert abs(draws.mean().item() - 0.3) < 0.005  # Bernoulli(0.3): standard error 0.001
    again = binarise(p, "dynamic", generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    with pytest.raises(ValueError, match="binarisation"):
        binarise(x, "otsu")


def test_dequantisation_stays_in_its_bin():
    levels = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    y = dequantise(levels, 256, generator=torch.Generator().manual_seed(1))
    assert y.min() >= 0.0 and y.max() < 1.0
    assert torch.equal(torch.floor(y * 256).long(), levels)


def test_bits_per_dim_of_the_uniform_density_is_log2_levels():
    # the uniform density on [0, 1)^D has NLL 0: every one of 256 levels is equally likely, 8 bits
    assert bits_per_dim(0.0, 784, 256) == pytest.approx(8.0)
    assert bits_per_dim(-784 * math.log(2.0), 784, 256) == pytest.approx(7.0)


# --- metrics ---------------------------------------------------------------------------------------


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3000, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(3000, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # singular covariances (dead ReLU units) stay finite and non-negative
    singular = np.c_[a, np.zeros(len(a))]
    assert 0.0 <= frechet_distance(singular, np.c_[b, np.zeros(len(b))]) < np.inf
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(a, b[:, :3])


def test_classifier_scores():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    scores = classifier_scores(probabilities, intended=np.array([0, 1, 1, 0]))
    assert scores["confidence"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["class_entropy"] == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))


def test_linear_probe_accuracy_separates_separable_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    features = rng.normal(size=(600, 5)) + 4.0 * np.eye(3, 5)[labels]
    assert linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:]) > 0.95
    noise = rng.normal(size=(600, 5))
    assert linear_probe_accuracy(noise[:400], labels[:400], noise[400:], labels[400:]) < 0.5


# --- ArrayModel through the digit classifier --------------------------------------------------------


@pytest.fixture(scope="module")
def digit_splits():
    return datasets.digits("train"), datasets.digits("test")


@pytest.fixture(scope="module")
def trained_classifier(digit_splits):
    train, test = digit_splits
    return DigitClassifier(train.shape, seed=0).train(train, max_epochs=8, validation=test, progress_bar=False)


def test_classifier_learns_digits_and_keeps_history(trained_classifier, digit_splits):
    _, test = digit_splits
    assert (trained_classifier.predict(test) == test.labels).mean() > 0.9
    history = trained_classifier.history
    assert history["epoch"] == list(range(1, 9))
    assert history["train_cross_entropy"][-1] < history["train_cross_entropy"][0]
    assert history["validation_error"][-1] < 0.1
    probabilities = trained_classifier.predict_proba(test)
    assert probabilities.shape == (len(test), 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    assert trained_classifier.features(test).shape == (len(test), 128)


def test_classifier_training_is_seeded(digit_splits):
    train, _ = digit_splits
    small = train.subset(200)
    runs = [DigitClassifier(small.shape, seed=5).train(small, max_epochs=2, progress_bar=False) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].predict_proba(small), runs[1].predict_proba(small))
    other = DigitClassifier(small.shape, seed=6).train(small, max_epochs=2, progress_bar=False)
    assert not np.array_equal(other.predict_proba(small), runs[0].predict_proba(small))


def test_save_load_round_trip(trained_classifier, digit_splits, tmp_path: Path):
    _, test = digit_splits
    trained_classifier.save(tmp_path / "clf")
    loaded = DigitClassifier.load(tmp_path / "clf")
    np.testing.assert_array_equal(loaded.predict_proba(test), trained_classifier.predict_proba(test))
    assert loaded.history == trained_classifier.history and loaded.input_shape == (8, 8)
    with pytest.raises(FileExistsError, match="overwrite"):
        trained_classifier.save(tmp_path / "clf")
    from sclatent.images import ArrayModel

    class OtherModel(ArrayModel):
        module_class = DigitClassifier.module_class

    with pytest.raises(TypeError, match="DigitClassifier"):
        OtherModel.load(tmp_path / "clf")
    with pytest.raises(FileNotFoundError, match="saved sclatent model"):
        DigitClassifier.load(tmp_path / "nothing")


def test_input_errors_name_the_fix(digit_splits):
    train, _ = digit_splits
    model = DigitClassifier((8, 8))
    x = train.unit()
    with pytest.raises(ValueError, match="rescale"):
        model.train(train.images.astype(np.float32), train.labels, max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="input_shape"):
        model.train(x[:, :7, :7], train.labels, max_epochs=1, progress_bar=False)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.train(bad, train.labels, max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="needs labels"):
        model.train(x, max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="integer"):
        model.train(x, train.labels.astype(float), max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="max_epochs"):
        model.train(train, max_epochs=0, progress_bar=False)
    assert not model.is_trained
    # same number of pixels, other layout: reshaped rather than refused
    assert model.predict(x.reshape(len(x), 64)).shape == (len(x),)


def test_plot_image_grid(tmp_path: Path):
    images = np.random.default_rng(0).random((10, 8, 8))
    fig = plot_image_grid(images, tmp_path / "grid.png", n_columns=5, title="digits")
    assert (tmp_path / "grid.png").stat().st_size > 0 and fig is not None
    plot_image_grid(torch.rand(4, 1, 8, 8), tmp_path / "grid4.png")
    with pytest.raises(ValueError, match="grey-scale"):
        plot_image_grid(np.zeros((2, 3, 8, 8)))
