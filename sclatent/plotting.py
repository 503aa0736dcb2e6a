"""Figures people would rather look at than read: training curves and UMAPs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")  # files only: the CLI and tests run without a display
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc

_TITLES = {
    "elbo": "ELBO (nats/cell, higher is better)",
    "reconstruction": "reconstruction NLL (nats/cell)",
    "kl": "KL (nats/cell)",
    "nt_xent": "NT-Xent (nats/cell)",
    "masked_nll": "NLL of hidden counts (nats/cell)",
    "wasserstein": "Wasserstein estimate (critic)",
    "gradient_penalty": "gradient penalty",
}


def training_panels(history: dict[str, list[float]]) -> list[str]:
    """The per-epoch terms worth a panel, in order of first appearance.

    Every ``train_<term>`` / ``validation_<term>`` pair is a term, except ``loss`` (the weighted
    total the others explain), terms identical to an earlier one (e.g. a contrastive model's
    ``reconstruction`` is its ``nt_xent``), and for non-variational models (KL zero throughout)
    ``kl`` and ``elbo`` (which is then just minus the reconstruction).
    """
    terms: dict[str, list[float]] = {}
    for key, values in history.items():
        for split in ("train_", "validation_"):
            if key.startswith(split):
                term = key.removeprefix(split)
                if term != "loss" and term not in terms:
                    terms[term] = values if split == "train_" else history.get(f"train_{term}", values)
    if all(v == 0 for v in terms.get("kl", [0.0])):
        terms.pop("kl", None)
        terms.pop("elbo", None)
    panels: list[str] = []
    for term, values in terms.items():
        if not any(list(values) == list(terms[other]) for other in panels):
            panels.append(term)
    return panels


def plot_training_history(
    history: dict[str, list[float]], path: str | os.PathLike | None = None, panels: list[str] | None = None
):
    """Training curves: one panel per term, training (solid) and held-out (dashed) per epoch.

    Parameters
    ----------
    history
        ``model.history``: ``epoch`` and per-epoch ``train_<term>`` / ``validation_<term>`` lists.
    path
        Save the figure there as PNG.
    panels
        Terms to plot (default :func:`training_panels`: ELBO, reconstruction and KL for a VAE,
        the reconstruction for an autoencoder, NT-Xent for a contrastive model, each player's
        loss and the Wasserstein estimate for a GAN).

    Returns
    -------
    matplotlib.figure.Figure
        The matplotlib Figure.
    """
    if not history.get("epoch"):
        raise ValueError("The model has no training history yet; train it first.")
    epochs = history["epoch"]
    panels = training_panels(history) if panels is None else list(panels)
    if not panels:
        raise ValueError("The history holds no train_/validation_ terms to plot.")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), constrained_layout=True, squeeze=False)
    axes = axes[0]
    for ax, term in zip(axes, panels):
        for split, style in (("train", "-"), ("validation", "--")):
            values = np.asarray(history.get(f"{split}_{term}") or [], dtype=float)
            scored = np.isfinite(values)  # NaN: an epoch that did not score the held-out cells
            if scored.any():
                marker = None if scored.all() else "o"
                ax.plot(np.asarray(epochs)[scored], values[scored], style, marker=marker, markersize=3, label=split)
        ax.set_title(_TITLES.get(term, term.replace("_", " ")))
        ax.set_xlabel("epoch")
        if len(epochs) > 10:
            # the first epochs dwarf the rest; zoom on the converging part
            tail = [
                v
                for s in ("train", "validation")
                for v in history.get(f"{s}_{term}", [])[len(epochs) // 10 :]
                if math.isfinite(v)
            ]
            if tail and max(tail) > min(tail):
                span = max(tail) - min(tail)
                ax.set_ylim(min(tail) - 0.05 * span, max(tail) + 0.05 * span)
        if ax.lines:
            ax.legend()
        if term == "kl" and "kl_weight" in history:
            twin = ax.twinx()
            twin.plot(epochs, history["kl_weight"], color="grey", alpha=0.5)
            twin.set_ylabel("KL weight", color="grey")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_embedding(adata: ad.AnnData, color: list[str], path: str | os.PathLike | None = None, basis: str = "umap"):
    """Scatter of ``obsm["X_<basis>"]`` coloured by each obs column in ``color``; PNG at ``path``."""
    missing = [c for c in color if c not in adata.obs.columns]
    if missing:
        raise KeyError(f"obs columns {missing} not found for colouring.")
    fig, axes = plt.subplots(1, len(color), figsize=(5.5 * len(color), 4.5), constrained_layout=True, squeeze=False)
    for ax, key in zip(axes[0], color):
        sc.pl.embedding(adata, basis=basis, color=key, ax=ax, show=False, legend_fontsize=7, title=key)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_reliability(
    predictions: dict[str, tuple], path: str | os.PathLike | None = None, n_bins: int = 10
) -> plt.Figure:
    """Reliability diagram: accuracy against confidence of the top class, one line per method.

    Parameters
    ----------
    predictions
        ``{name: (proba, labels)}``: ``(n, K)`` predicted probabilities and ``(n,)`` true class
        indices (columns of ``proba``), e.g. a model before and after temperature scaling.
    path
        PNG to write (the figure is returned either way).
    n_bins
        Equal-width bins of the top-class probability.

    Returns
    -------
    matplotlib.figure.Figure
        The diagonal is perfect calibration; each legend entry gives the method's expected
        calibration error (ECE).
    """
    from .metrics.calibration import expected_calibration_error, reliability_curve

    figure, (ax, counts) = plt.subplots(
        2, 1, figsize=(4.6, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    centres = None
    for name, (proba, labels) in predictions.items():
        curve = reliability_curve(proba, labels, n_bins)
        ece = expected_calibration_error(proba, labels, n_bins)
        used = curve["count"] > 0
        ax.plot(curve["confidence"][used], curve["accuracy"][used], marker="o", label=f"{name} (ECE {ece:.3f})")
        centres = (curve["edges"][:-1] + curve["edges"][1:]) / 2
        counts.plot(centres, curve["count"], marker=".", label=name)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("reliability of the top-class probability", fontsize=10)
    counts.set_xlabel("confidence (top-class probability)")
    counts.set_ylabel("cells")
    if path is not None:
        figure.savefig(path, dpi=120)
        plt.close(figure)
    return figure


def plot_posterior_predictive_check(check, path: str | os.PathLike | None = None) -> plt.Figure:
    """Observed vs posterior-predictive per-gene statistics of a
    :class:`~sclatent.metrics.PosteriorPredictiveCheck`: coefficient of variation, zero fraction,
    the mean-variance relation, and the coverage of the central predictive intervals.

    Parameters
    ----------
    check
        The result of :func:`sclatent.metrics.posterior_predictive_check`.
    path
        PNG to write (the figure is returned either way).

    Returns
    -------
    matplotlib.figure.Figure
        Four panels; on the first two, points on the diagonal are genes the model reproduces.
    """
    genes = check.genes
    expressed = (genes["observed_mean"] > 0) & (genes["predicted_mean"] > 0)
    g = genes[expressed]
    figure, axes = plt.subplots(1, 4, figsize=(17, 4.2), constrained_layout=True)
    ax = axes[0]
    ax.loglog(g["observed_cv"], g["predicted_cv"], ".", markersize=3, alpha=0.6)
    ax.set(xlabel="observed CV", ylabel="predicted CV", title="coefficient of variation per gene")
    ax = axes[1]
    ax.plot(genes["observed_zero_fraction"], genes["predicted_zero_fraction"], ".", markersize=3, alpha=0.6)
    ax.set(xlabel="observed zero fraction", ylabel="predicted zero fraction", title="zeros per gene")
    for ax in axes[:2]:
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color="0.5", linestyle=":", linewidth=1)
    ax = axes[2]
    ax.loglog(g["observed_mean"], g["observed_var"], ".", markersize=3, alpha=0.5, label="observed")
    ax.loglog(g["predicted_mean"], g["predicted_var"], ".", markersize=3, alpha=0.5, label="predicted")
    ax.set(xlabel="mean count", ylabel="variance", title="mean-variance relation")
    ax.legend(frameon=False)
    ax = axes[3]
    levels = [c for c in genes.columns if c.startswith("coverage_")]
    nominal = [int(c.split("_")[1]) / 100 for c in levels]
    observed = [float(genes[c].mean()) for c in levels]
    positions = np.arange(len(levels))
    ax.bar(positions - 0.18, nominal, width=0.36, color="0.75", label="nominal")
    ax.bar(positions + 0.18, observed, width=0.36, label="observed")
    ax.set_xticks(positions, [f"{round(n * 100)} % interval" for n in nominal])
    ax.set(ylim=(0, 1), ylabel="fraction of counts inside", title=f"predictive intervals ({check.n_samples} draws)")
    ax.legend(frameon=False)
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
