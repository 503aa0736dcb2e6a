"""Figures people would rather look at than read: training curves and UMAPs."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")  # files only: the CLI and tests run without a display
import matplotlib.pyplot as plt
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
            values = history.get(f"{split}_{term}")
            if values:
                ax.plot(epochs, values, style, label=split)
        ax.set_title(_TITLES.get(term, term.replace("_", " ")))
        ax.set_xlabel("epoch")
        if len(epochs) > 10:
            # the first epochs dwarf the rest; zoom on the converging part
            tail = [v for s in ("train", "validation") for v in history.get(f"{s}_{term}", [])[len(epochs) // 10 :]]
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


def plot_image_grid(
    images,
    path: str | os.PathLike | None = None,
    n_columns: int | None = None,
    title: str | None = None,
    cmap: str = "gray_r",
):
    """Images ``(N, H, W)`` (or ``(N, 1, H, W)``, values in [0, 1]) tiled into one grid figure.

    Parameters
    ----------
    images
        Array or tensor of grey-scale images.
    path
        Save the figure there as PNG.
    n_columns
        Images per row (default: a near-square grid).
    title
        Figure title.
    cmap
        Matplotlib colour map; ``"gray_r"`` draws ink dark on white.

    Returns
    -------
    The matplotlib Figure.
    """
    import numpy as np

    images = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3:
        raise ValueError(f"expected grey-scale images (N, H, W), got shape {images.shape}.")
    n, h, w = images.shape
    n_columns = n_columns or int(np.ceil(np.sqrt(n)))
    n_rows = int(np.ceil(n / n_columns))
    canvas = np.ones((n_rows * (h + 1) + 1, n_columns * (w + 1) + 1)) * np.nan
    for i, image in enumerate(images):
        r, c = divmod(i, n_columns)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = image
    fig, ax = plt.subplots(figsize=(min(12, 0.45 * n_columns + 1), min(12, 0.45 * n_rows + 1)), constrained_layout=True)
    ax.imshow(canvas, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
