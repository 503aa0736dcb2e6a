"""Clustering of an embedding with Scanpy (kNN graph, Leiden) and agreement with labels."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def neighbors_umap_leiden(
    adata: ad.AnnData,
    use_rep: str,
    key_added: str = "leiden",
    resolution: float = 1.0,
    n_neighbors: int = 15,
    umap: bool = True,
    seed: int = 0,
) -> None:
    """``sc.pp.neighbors`` on ``obsm[use_rep]``, then Leiden (and UMAP) in place on ``adata``."""
    sc.pp.neighbors(adata, use_rep=use_rep, n_neighbors=n_neighbors, random_state=seed)
    sc.tl.leiden(adata, resolution=resolution, key_added=key_added, random_state=seed, flavor="igraph", n_iterations=2)
    if umap:
        sc.tl.umap(adata, random_state=seed)


def leiden_scores(
    embedding: np.ndarray,
    labels: np.ndarray,
    resolution: float = 1.0,
    n_neighbors: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    """ARI and NMI between Leiden clusters of ``embedding`` and ``labels``.

    Parameters
    ----------
    embedding
        ``(n_cells, d)`` representation.
    labels
        ``(n_cells,)`` reference labels.

    Returns
    -------
    dict
        ``{"ari": ..., "nmi": ..., "n_clusters": ...}``.
    """
    scratch = ad.AnnData(np.zeros((embedding.shape[0], 1), dtype=np.float32))
    scratch.obsm["rep"] = np.asarray(embedding, dtype=np.float32)
    neighbors_umap_leiden(scratch, "rep", resolution=resolution, n_neighbors=n_neighbors, umap=False, seed=seed)
    clusters = scratch.obs["leiden"].to_numpy()
    labels = np.asarray(labels).astype(str)
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "n_clusters": len(np.unique(clusters)),
    }
