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
