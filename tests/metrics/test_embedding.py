"""Embedding metrics: they must tell separated from mixed, and informative from random."""

import numpy as np
import pytest

from sclatent.metrics import batch_asw, batch_entropy, knn_accuracy, label_asw, linear_probe_scores


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 100)
    batches = np.tile(["p1", "p2"], 150)
    embedding = rng.normal(size=(300, 5))
    embedding[:, 0] += np.repeat([0.0, 6.0, 12.0], 100)  # labels far apart, batches interleaved
    return embedding, labels, batches


def test_label_transfer_is_near_perfect_on_separated_types_and_near_chance_on_noise(clustered):
    embedding, labels, _ = clustered
    assert knn_accuracy(embedding, labels) > 0.97
    assert linear_probe_scores(embedding, labels)["macro_f1"] > 0.97
    noise = np.random.default_rng(1).normal(size=embedding.shape)
    # three balanced classes: chance is 1/3; 300 cells put the CV estimate within about +-0.1 of it
    assert abs(knn_accuracy(noise, labels) - 1 / 3) < 0.12
    assert abs(linear_probe_scores(noise, labels)["accuracy"] - 1 / 3) < 0.12


def test_batch_mixing_scores_mixed_high_and_separated_low(clustered):
    embedding, labels, batches = clustered
    assert batch_entropy(embedding, batches) > 0.95
    assert batch_asw(embedding, batches, labels) > 0.9
    separated = embedding.copy()
    separated[:, 1] += np.where(batches == "p1", 0.0, 20.0)
    assert batch_entropy(separated, batches) < 0.05
    assert batch_asw(separated, batches, labels) < batch_asw(embedding, batches, labels) - 0.5


def test_label_asw_orders_separated_above_noise(clustered):
    embedding, labels, _ = clustered
    noise = np.random.default_rng(2).normal(size=embedding.shape)
    assert label_asw(embedding, labels) > 0.7
    assert abs(label_asw(noise, labels) - 0.5) < 0.05


def test_bad_inputs_raise_clear_errors(clustered):
    embedding, labels, _ = clustered
    with pytest.raises(ValueError, match="one per cell"):
        knn_accuracy(embedding, labels[:-1])
    with pytest.raises(ValueError, match="NaN"):
        knn_accuracy(np.full_like(embedding, np.nan), labels)
    with pytest.raises(ValueError, match="two batches"):
        batch_entropy(embedding, np.zeros(300))
    with pytest.raises(ValueError, match="two cells"):
        knn_accuracy(embedding, np.r_[labels[:-1], ["lonely"]])
