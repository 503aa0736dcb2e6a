"""Quality of a cell embedding: label transfer (kNN, linear probe), label separation, batch mixing.

All functions take an ``(n_cells, d)`` embedding and per-cell labels or batches as arrays, so
they score any representation alike (a model's latent, PCA, raw log counts).
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, silhouette_samples
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def _as_arrays(embedding: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    embedding = np.asarray(embedding, dtype=np.float64)
    if embedding.ndim != 2:
        raise ValueError(f"embedding must be 2-D (n_cells, d), got shape {embedding.shape}.")
    if not np.isfinite(embedding).all():
        raise ValueError("embedding holds NaN or inf values.")
    out = [embedding]
    for column in columns:
        column = np.asarray(column).astype(str)
        if column.shape != (embedding.shape[0],):
            raise ValueError(f"expected {embedding.shape[0]} labels (one per cell), got shape {column.shape}.")
        out.append(column)
    return tuple(out)


def _folds(labels: np.ndarray, n_splits: int, seed: int) -> StratifiedKFold:
    # stratified folds cannot have more splits than the rarest class has members
    smallest = np.unique(labels, return_counts=True)[1].min()
    n_splits = int(min(n_splits, smallest))
    if n_splits < 2:
        raise ValueError("every label needs at least two cells for cross-validated scores.")
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def _cross_validated_predictions(classifier, embedding: np.ndarray, labels: np.ndarray, n_splits: int, seed: int):
    predicted = np.empty_like(labels)
    for train, test in _folds(labels, n_splits, seed).split(embedding, labels):
        classifier.fit(embedding[train], labels[train])
        predicted[test] = classifier.predict(embedding[test])
    return predicted


def knn_accuracy(
    embedding: np.ndarray, labels: np.ndarray, n_neighbors: int = 15, n_splits: int = 5, seed: int = 0
) -> float:
    """Cross-validated accuracy of a kNN classifier (Euclidean, majority vote) on the embedding.

    Parameters
    ----------
    embedding
        ``(n_cells, d)`` representation.
    labels
        ``(n_cells,)`` cell types.
    n_neighbors
        Neighbours voting for each held-out cell.
    n_splits, seed
        Stratified folds (fewer when a label has fewer cells) and their shuffling seed.

    Returns
    -------
    float
        Fraction of cells whose label is predicted correctly when held out, in [0, 1].
    """
    embedding, labels = _as_arrays(embedding, labels)
    classifier = KNeighborsClassifier(n_neighbors=n_neighbors)
    return float(accuracy_score(labels, _cross_validated_predictions(classifier, embedding, labels, n_splits, seed)))


def linear_probe_scores(
    embedding: np.ndarray, labels: np.ndarray, n_splits: int = 5, seed: int = 0
) -> dict[str, float]:
    """Cross-validated logistic regression on the standardised embedding (a linear probe).

    Returns
    -------
    dict
        ``{"accuracy": ..., "macro_f1": ...}`` of the held-out predictions, each in [0, 1].
    """
    embedding, labels = _as_arrays(embedding, labels)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    predicted = _cross_validated_predictions(classifier, embedding, labels, n_splits, seed)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro")),
    }


def batch_entropy(embedding: np.ndarray, batches: np.ndarray, n_neighbors: int = 50) -> float:
    """Mean normalised Shannon entropy of the batches among each cell's nearest neighbours.

    For cell ``i`` with neighbour batch frequencies ``p_i`` (itself excluded), ``H_i =
    -sum p log p / log(n_batches)``. 1 means every neighbourhood holds the batches equally
    (perfect mixing), 0 that neighbourhoods are single-batch. With unequal batch sizes even a
    perfectly mixed embedding scores below 1 (the entropy of the batch proportions).

    Returns
    -------
    float
        Mean ``H_i`` over cells, in [0, 1].
    """
    embedding, batches = _as_arrays(embedding, batches)
    categories, codes = np.unique(batches, return_inverse=True)
    if len(categories) < 2:
        raise ValueError("batch_entropy needs at least two batches.")
    k = min(n_neighbors, embedding.shape[0] - 1)
    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding)
    neighbour_codes = codes[neighbours[:, 1:]]
    frequencies = np.stack([(neighbour_codes == c).mean(axis=1) for c in range(len(categories))], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(frequencies > 0, frequencies * np.log(frequencies), 0.0)
    return float(np.mean(-terms.sum(axis=1) / np.log(len(categories))))


def batch_asw(embedding: np.ndarray, batches: np.ndarray, labels: np.ndarray) -> float:
    """Batch average silhouette width as in scib: within each label, ``1 - |silhouette on batch|``.

    Cells of a label present in only one batch are skipped (their batch silhouette is undefined).

    Returns
    -------
    float
        Mean over labels of the mean per-cell ``1 - |s|``, in [0, 1]; 1 means batches are mixed
        within every cell type.
    """
    embedding, batches, labels = _as_arrays(embedding, batches, labels)
    scores = []
    for label in np.unique(labels):
        cells = labels == label
        if len(np.unique(batches[cells])) < 2 or cells.sum() < 3:
            continue
        silhouettes = silhouette_samples(embedding[cells], batches[cells])
        scores.append(np.mean(1.0 - np.abs(silhouettes)))
    if not scores:
        raise ValueError("batch_asw needs at least one label present in two or more batches.")
    return float(np.mean(scores))


def label_asw(embedding: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette of the labels rescaled to [0, 1] (``(s + 1) / 2``); 1 means compact, separated types."""
    embedding, labels = _as_arrays(embedding, labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("label_asw needs at least two labels.")
    return float((np.mean(silhouette_samples(embedding, labels)) + 1.0) / 2.0)
