"""Sample quality of image generators, judged by a classifier trained here (no Inception network).

* :func:`frechet_distance`: the Frechet (2-Wasserstein) distance between Gaussians fitted to two
  sets of features, ``|m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Heusel et al. 2017's FID
  with a digit classifier's features instead of Inception's).
* :func:`classifier_scores`: accuracy against intended labels, mean confidence and the entropy
  of the predicted-class histogram (a collapsed generator covers few classes).
"""

from __future__ import annotations

import numpy as np


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of ``(N, d)`` and ``(M, d)`` feature sets.

    Both sets need more items than dimensions for a full-rank covariance to be meaningful;
    compare distances computed with the same sample sizes (the estimate is biased upward for
    small samples).
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, d) and (M, d) with the same d, got {a.shape} and {b.shape}.")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each feature set needs at least two items.")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^{1/2}) = sum of sqrt eigenvalues of the symmetric PSD S_a^{1/2} S_b S_a^{1/2}:
    # eigh stays accurate for the singular covariances of ReLU features (dead units), where
    # scipy's sqrtm of the non-symmetric product does not
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def classifier_scores(probabilities: np.ndarray, intended: np.ndarray | None = None) -> dict[str, float]:
    """Summaries of a classifier's ``(N, K)`` probabilities on generated images.

    Returns
    -------
    dict
        ``confidence`` (mean max probability), ``class_entropy`` (entropy in nats of the histogram
        of predicted classes; ``log K`` when all classes are equally covered) and, with
        ``intended`` labels ``(N,)``, ``accuracy`` (the generator produced the digit it was asked for).
    """
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(-1)
    histogram = np.bincount(predicted, minlength=probabilities.shape[1]) / len(predicted)
    nonzero = histogram[histogram > 0]
    scores = {
        "confidence": float(probabilities.max(-1).mean()),
        "class_entropy": float(-(nonzero * np.log(nonzero)).sum()),
    }
    if intended is not None:
        scores["accuracy"] = float((predicted == np.asarray(intended)).mean())
    return scores


def linear_probe_accuracy(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of logistic regression fitted on frozen training features (a linear probe).

    The protocol of SimCLR / MAE evaluations: standardise with the training features' statistics,
    fit multinomial logistic regression on ``(N, d)`` training features, score on held-out ones.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_features, test_features = np.asarray(train_features), np.asarray(test_features)
    if train_features.ndim != 2 or test_features.shape[1:] != train_features.shape[1:]:
        raise ValueError(
            f"features must be (N, d) and (M, d) with the same d, got {train_features.shape} and {test_features.shape}."
        )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    probe.fit(train_features, np.asarray(train_labels))
    return float((probe.predict(test_features) == np.asarray(test_labels)).mean())


def gaussian_baseline_samples(
    images: np.ndarray, n: int, labels: np.ndarray | None = None, seed: int = 0, intended: np.ndarray | None = None
) -> np.ndarray:
    """A model-free generator: ``n`` draws of a Gaussian with the images' pixel mean and covariance, clipped to [0, 1].

    The reference any trained generator of ``(N, *shape)`` images should beat. With ``labels``
    ``(N,)`` one Gaussian is fitted per class and draw ``i`` comes from class ``intended[i]``
    (default ``arange(n) % n_classes``), the baseline of a class-conditional generator.

    Returns
    -------
    numpy.ndarray
        ``(n, *shape)`` float32 array in [0, 1].
    """
    images = np.asarray(images, dtype=np.float64)
    shape, flat = images.shape[1:], images.reshape(len(images), -1)
    rng = np.random.default_rng(seed)

    def draw(x: np.ndarray, m: int) -> np.ndarray:
        # the symmetric square root of the (PSD, often singular) covariance: exact for any rank
        w, v = np.linalg.eigh(np.cov(x, rowvar=False))
        root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        return x.mean(0) + rng.standard_normal((m, x.shape[1])) @ root

    if labels is None:
        out = draw(flat, n)
    else:
        labels = np.asarray(labels)
        classes = np.unique(labels)
        intended = classes[np.arange(n) % len(classes)] if intended is None else np.asarray(intended)
        out = np.zeros((n, flat.shape[1]))
        for c in np.unique(intended):
            if (labels == c).sum() < 2:
                raise ValueError(f"class {c} has fewer than two images: cannot fit its Gaussian.")
            out[intended == c] = draw(flat[labels == c], int((intended == c).sum()))
    return np.clip(out, 0.0, 1.0).reshape(n, *shape).astype(np.float32)


def generator_scores(classifier, samples, reference, intended: np.ndarray | None = None) -> dict[str, float]:
    """Quality of ``samples`` judged by a trained ``classifier`` (e.g. :class:`sclatent.images.DigitClassifier`).

    :func:`classifier_scores` of the classifier's probabilities on ``samples`` plus ``frechet``,
    the :func:`frechet_distance` between its features of ``samples`` and of real ``reference``
    images. Use the same number of samples and reference images whenever distances are compared.
    """
    scores = classifier_scores(classifier.predict_proba(samples), intended)
    scores["frechet"] = frechet_distance(classifier.features(samples), classifier.features(reference))
    return scores


def labels_per_class(labels: np.ndarray, n_per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random ``n_per_class`` items of every class (few-label probes).

    Raises a ValueError when a class has fewer than ``n_per_class`` items.
    """
    labels = np.asarray(labels)
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < n_per_class:
            raise ValueError(f"class {label} has {len(members)} items, fewer than n_per_class={n_per_class}.")
        chosen.append(rng.choice(members, size=n_per_class, replace=False))
    return np.sort(np.concatenate(chosen))
