"""Figures of the image/vector models: image grids, 2-D latents and embeddings, densities, translations.

Training curves are shared with the cell models: :func:`sclatent.plotting.plot_training_history`.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the CLI and tests run without a display
import matplotlib.pyplot as plt


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
    matplotlib.figure.Figure
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


def plot_points_by_label(
    points,
    labels,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    ax=None,
    point_size: float = 3.0,
):
    """2-D points ``(N, 2)`` (an embedding, a PCA, a 2-D latent) coloured by integer ``labels`` ``(N,)``.

    One tab10 colour per class with a legend; drawn on ``ax`` when given (then nothing is saved
    unless ``path`` is), else on a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        The matplotlib Figure.
    """
    import numpy as np

    points, labels = np.asarray(points), np.asarray(labels)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"expected 2-D points (N, 2), got shape {points.shape}.")
    if labels.shape != (len(points),):
        raise ValueError(f"labels must have shape ({len(points)},), got {labels.shape}.")
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 4.6), constrained_layout=True)
    else:
        fig = ax.figure
    colours = plt.get_cmap("tab10")
    for i, label in enumerate(np.unique(labels)):
        members = labels == label
        ax.scatter(*points[members].T, s=point_size, color=colours(i % 10), label=str(label), alpha=0.7, linewidths=0)
    ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_latent_manifold(
    grid,
    coords,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    cmap: str = "gray_r",
):
    """Decoded images over a 2-D latent plane (:meth:`sclatent.images.ImageVAE.decode_grid`) as one picture.

    Parameters
    ----------
    grid
        ``(n, n, H, W)`` images in [0, 1]; ``grid[i, j]`` at ``z = (coords[j], coords[n - 1 - i])``.
    coords
        ``(n,)`` ascending latent coordinates of the columns (and, reversed, of the rows).
    path
        Save the figure there as PNG.

    Returns
    -------
    matplotlib.figure.Figure
        The matplotlib Figure.
    """
    import numpy as np

    grid, coords = np.asarray(grid), np.asarray(coords)
    if grid.ndim != 4 or grid.shape[0] != grid.shape[1] or grid.shape[0] != len(coords):
        raise ValueError(f"expected a grid (n, n, H, W) with n = len(coords) = {len(coords)}, got {grid.shape}.")
    n, _, h, w = grid.shape
    canvas = grid.transpose(0, 2, 1, 3).reshape(n * h, n * w)
    fig, ax = plt.subplots(figsize=(6.4, 6.0), constrained_layout=True)
    ax.imshow(np.clip(canvas, 0.0, 1.0), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ticks = np.linspace(0, n - 1, min(n, 5)).round().astype(int)
    ax.set_xticks(ticks * w + (w - 1) / 2, [f"{coords[j]:.2f}" for j in ticks])
    ax.set_yticks(ticks * h + (h - 1) / 2, [f"{coords[n - 1 - i]:.2f}" for i in ticks])
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    if title:
        ax.set_title(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_density_panels(
    rows: list[list],
    extent: tuple[float, float, float, float],
    path: str | os.PathLike | None = None,
    row_titles: list[str] | None = None,
    column_titles: list[str] | None = None,
    cmap: str = "viridis",
):
    """2-D densities on grids tiled into rows x columns of panels (e.g. target energies above fitted flows).

    Parameters
    ----------
    rows
        ``rows[i][j]``: an ``(n, n)`` array of density values, ``[iy, ix]`` indexed (``imshow`` order).
    extent
        ``(xmin, xmax, ymin, ymax)`` of every grid.
    path
        Save the figure there as PNG.
    row_titles, column_titles
        Labels of the rows (left) and columns (top).

    Returns
    -------
    matplotlib.figure.Figure
        The matplotlib Figure.
    """
    import numpy as np

    n_rows, n_columns = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(
        n_rows, n_columns, figsize=(2.6 * n_columns, 2.6 * n_rows), constrained_layout=True, squeeze=False
    )
    for i, row in enumerate(rows):
        for j in range(n_columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.set_axis_off()
                continue
            ax.imshow(np.asarray(row[j]), origin="lower", extent=extent, cmap=cmap, interpolation="nearest")
            if i == 0 and column_titles:
                ax.set_title(column_titles[j])
            if j == 0 and row_titles:
                ax.set_ylabel(row_titles[i])
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def plot_translations(
    rows,
    row_titles: list[str] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    cmap: str = "gray_r",
):
    """Rows of grey-scale images side by side, one row per stage (e.g. ``a``, ``G(a)``, ``F(G(a))``).

    Parameters
    ----------
    rows
        Sequence of arrays ``(N, H, W)`` with values in [0, 1] and the same ``N``: column ``j`` shows
        item ``j`` through the stages.
    row_titles
        A label per row (left).
    path
        Save the figure there as PNG.
    title
        Figure title.
    cmap
        Matplotlib colour map; ``"gray_r"`` draws ink dark on white.

    Returns
    -------
    matplotlib.figure.Figure
        The matplotlib Figure.
    """
    import numpy as np

    rows = [np.asarray(r.detach().cpu() if hasattr(r, "detach") else r) for r in rows]
    rows = [r[:, 0] if r.ndim == 4 and r.shape[1] == 1 else r for r in rows]
    if not rows or any(r.ndim != 3 or r.shape != rows[0].shape for r in rows):
        raise ValueError(f"expected rows of grey-scale images (N, H, W) of one shape, got {[r.shape for r in rows]}.")
    if row_titles is not None and len(row_titles) != len(rows):
        raise ValueError(f"got {len(row_titles)} row titles for {len(rows)} rows.")
    n, h, w = rows[0].shape
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(min(14, 0.5 * n + 1.5), 0.55 * len(rows) + 0.6), constrained_layout=True, squeeze=False
    )
    for i, images in enumerate(rows):
        canvas = np.full((h, n * (w + 1) - 1), np.nan)
        for j, image in enumerate(images):
            canvas[:, j * (w + 1) : j * (w + 1) + w] = image
        ax = axes[i, 0]
        ax.imshow(canvas, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if row_titles is not None:
            ax.set_ylabel(row_titles[i], rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
