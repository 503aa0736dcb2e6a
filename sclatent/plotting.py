"""Figures people would rather look at than read: training curves and UMAPs."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")  # files only: the CLI and tests run without a display
import matplotlib.pyplot as plt
import scanpy as sc


def plot_training_history(history: dict[str, list[float]], path: str | os.PathLike | None = None):
    """Loss curves: ELBO (train and held-out), reconstruction and KL per epoch.

    Returns the matplotlib Figure; saved as PNG when ``path`` is given.
    """
    if not history.get("epoch"):
        raise ValueError("The model has no training history yet; train it first.")
    epochs = history["epoch"]
    panels = [("elbo", "ELBO (nats/cell, higher is better)"), ("reconstruction", "reconstruction NLL"), ("kl", "KL")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, panels):
        for split, style in (("train", "-"), ("validation", "--")):
            values = history.get(f"{split}_{key}")
            if values:
                ax.plot(epochs, values, style, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if key == "elbo" and len(epochs) > 10:
            # the first epochs dwarf the rest; zoom on the converging part
            tail = [v for s in ("train", "validation") for v in history.get(f"{s}_elbo", [])[len(epochs) // 10 :]]
            if tail:
                span = max(tail) - min(tail)
                ax.set_ylim(min(tail) - 0.05 * span, max(tail) + 0.05 * span)
        ax.legend()
    if "kl_weight" in history:
        twin = axes[-1].twinx()
        twin.plot(epochs, history["kl_weight"], color="grey", alpha=0.5)
        twin.set_ylabel("KL weight", color="grey")
    if path is not None:
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
