"""Calibration of predicted class probabilities: expected calibration error, reliability curves,
and temperature scaling.

A classifier is calibrated when, among the cells it gives probability ``p`` for its top class, a
fraction ``p`` is right. The expected calibration error (ECE, Naeini et al. 2015; Guo et al.
2017) bins the cells by their top probability and averages ``|accuracy - confidence|`` over the
bins, weighted by their sizes: 0 for a calibrated classifier, up to 1. Temperature scaling (Guo et
al. 2017) divides the logits by one number ``T`` fitted on held-out labelled cells by maximum
likelihood: it changes the probabilities, never the predicted class.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

__all__ = ["expected_calibration_error", "fit_temperature", "reliability_curve"]


def _top(proba: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.asarray(labels)
    if proba.ndim != 2 or labels.shape != (proba.shape[0],):
        raise ValueError(f"expected proba (n, K) and labels (n,), got {proba.shape} and {labels.shape}.")
    return proba.max(1), proba.argmax(1) == labels


def reliability_curve(proba: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Confidence and accuracy per bin of the top-class probability (equal-width bins on [0, 1]).

    Parameters
    ----------
    proba
        ``(n, K)`` predicted probabilities (rows sum to 1).
    labels
        ``(n,)`` true class indices (columns of ``proba``).
    n_bins
        Number of bins.

    Returns
    -------
    dict
        ``edges`` ``(n_bins + 1,)``; per bin ``confidence`` (mean top probability), ``accuracy``
        (fraction right) and ``count`` (cells); empty bins have NaN confidence and accuracy.
    """
    confidence, correct = _top(proba, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=n_bins) / count
    return {"edges": edges, "confidence": mean_confidence, "accuracy": accuracy, "count": count}


def expected_calibration_error(proba: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: ``sum_bins (n_bin / n) |accuracy_bin - confidence_bin|`` over equal-width bins of the
    top-class probability (15 bins, as Guo et al. 2017). 0 is perfectly calibrated."""
    curve = reliability_curve(proba, labels, n_bins)
    used = curve["count"] > 0
    weights = curve["count"][used] / curve["count"].sum()
    return float(np.sum(weights * np.abs(curve["accuracy"][used] - curve["confidence"][used])))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)``.

    Parameters
    ----------
    logits
        ``(n, K)`` untempered logits of labelled held-out cells.
    labels
        ``(n,)`` their true class indices.
    bounds
        Range searched for ``T`` (the NLL is smooth and unimodal in ``log T``; bounded Brent search).

    Returns
    -------
    float
        ``T`` (> 1 softens over-confident predictions).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"expected logits (n > 0, K) and labels (n,), got {logits.shape} and {labels.shape}.")
    rows = np.arange(labels.size)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    low, high = np.log(bounds[0]), np.log(bounds[1])
    found = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))
