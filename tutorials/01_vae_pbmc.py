"""Tutorial 1: the count VAE on PBMCs, end to end.

Run ``python tutorials/01_vae_pbmc.py``: it trains the model, writes the figures to
``tutorials/figures/`` and the text with the measured numbers to ``tutorials/01_vae_pbmc.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import sclatent
from sclatent.metrics import nb_baseline_log_likelihood, neighbors_umap_leiden
from sclatent.plotting import plot_embedding, plot_training_history

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
MARKERS = ["CD79A", "NKG7", "CST3", "FCGR3A", "PPBP", "CD3D"]


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    torch.set_num_threads(2)
    text: list[str] = []

    # 1. Data: integer counts recovered from scanpy's bundled pbmc68k_reduced
    adata = sclatent.datasets.pbmc68k_counts()
    text.append(
        f"Data: {adata.n_obs} cells x {adata.n_vars} genes, {adata.obs['bulk_labels'].nunique()} labelled types."
    )

    # 2. Register, build, train
    sclatent.model.VAE.setup_anndata(adata, labels_key="bulk_labels")
    model = sclatent.model.VAE(adata, n_latent=10, gene_likelihood="zinb", seed=0)
    start = time.perf_counter()
    model.train(progress_bar=False)
    seconds = time.perf_counter() - start
    text.append(f"Training: {model.history['epoch'][-1]} epochs in {seconds:.1f} s on {model.device}.")
    plot_training_history(model.history, FIGURES / "01_training.png")

    # 3. Latent -> neighbors, UMAP, Leiden (Scanpy), beside scanpy's PCA workflow
    adata.obsm["X_sclatent_vae"] = model.get_latent_representation()
    neighbors_umap_leiden(adata, "X_sclatent_vae", key_added="leiden_vae")
    labels = adata.obs["bulk_labels"].astype(str)
    vae_scores = (
        adjusted_rand_score(labels, adata.obs["leiden_vae"]),
        normalized_mutual_info_score(labels, adata.obs["leiden_vae"]),
    )
    pca = sc.AnnData(adata.X.copy())
    sc.pp.normalize_total(pca, target_sum=1e4)
    sc.pp.log1p(pca)
    sc.pp.pca(pca, n_comps=50, random_state=0)
    adata.obsm["X_pca_baseline"] = pca.obsm["X_pca"]
    scratch = adata.copy()
    neighbors_umap_leiden(scratch, "X_pca_baseline", key_added="leiden_pca", umap=False)
    pca_scores = (
        adjusted_rand_score(labels, scratch.obs["leiden_pca"]),
        normalized_mutual_info_score(labels, scratch.obs["leiden_pca"]),
    )
    plot_embedding(adata, ["leiden_vae", "bulk_labels"], FIGURES / "01_umap.png")
    text.append(
        f"Leiden vs bulk_labels: VAE latent ARI {vae_scores[0]:.3f} / NMI {vae_scores[1]:.3f}; "
        f"scanpy PCA ARI {pca_scores[0]:.3f} / NMI {pca_scores[1]:.3f}."
    )

    # 4. Held-out likelihood beside a model-free baseline
    held_out = model.validation_indices
    ll = model.get_marginal_ll(indices=held_out, n_mc_samples=1000)
    baseline = nb_baseline_log_likelihood(adata.X, model.train_indices, held_out)
    text.append(
        f"Held-out marginal log-likelihood ({len(held_out)} cells, 1000 importance samples): {ll:.1f} nats/cell; "
        f"NB with library size x gene mean: {baseline:.1f}."
    )

    # 5. Denoised expression of marker genes on the UMAP
    normalized = model.get_normalized_expression(library_size=1e4)
    adata.layers["sclatent_normalized"] = normalized.to_numpy()
    markers = [g for g in MARKERS if g in adata.var_names]
    fig = sc.pl.umap(adata, color=markers, layer="sclatent_normalized", show=False, return_fig=True, ncols=3)
    fig.savefig(FIGURES / "01_markers.png", dpi=100)
    plt.close(fig)

    # 6. Posterior predictive check: per-gene mean and zero fraction of sampled vs observed counts
    sampled = model.posterior_predictive_sample(seed=0)
    observed = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), constrained_layout=True)
    for ax, stat, name in (
        (axes[0], np.mean, "mean count"),
        (axes[1], lambda m, axis: (m == 0).mean(axis), "zero fraction"),
    ):
        obs_stat, sim_stat = stat(observed, axis=0), stat(sampled, axis=0)
        ax.scatter(obs_stat, sim_stat, s=4)
        lim = [0, max(obs_stat.max(), sim_stat.max())]
        ax.plot(lim, lim, color="grey", lw=1)
        ax.set_xlabel(f"observed {name}")
        ax.set_ylabel(f"posterior predictive {name}")
        r = np.corrcoef(obs_stat, sim_stat)[0, 1]
        ax.set_title(f"per gene, r = {r:.3f}")
        text.append(f"Posterior predictive vs observed per-gene {name}: r = {r:.3f}.")
    fig.savefig(FIGURES / "01_ppc.png", dpi=100)
    plt.close(fig)

    # 7. Save and load
    model.save(HERE / "_pbmc_vae_model", overwrite=True)
    loaded = sclatent.model.VAE.load(HERE / "_pbmc_vae_model", adata=adata)
    same = np.array_equal(loaded.get_latent_representation(), adata.obsm["X_sclatent_vae"])
    text.append(f"Reloaded model gives an identical latent: {same}.")

    write_markdown(text)


def write_markdown(results: list[str]) -> None:
    body = f"""# Tutorial 1: the count VAE on PBMCs

Generated by `python tutorials/01_vae_pbmc.py` (numbers below are from that run, 2 CPU threads).

```python
import sclatent, scanpy as sc
adata = sclatent.datasets.pbmc68k_counts()                    # integer counts, obs["bulk_labels"]
sclatent.model.VAE.setup_anndata(adata, labels_key="bulk_labels")
model = sclatent.model.VAE(adata, n_latent=10, gene_likelihood="zinb")
model.train()                                                  # progress bar; model.history
adata.obsm["X_sclatent_vae"] = model.get_latent_representation()
sc.pp.neighbors(adata, use_rep="X_sclatent_vae"); sc.tl.umap(adata); sc.tl.leiden(adata)
model.get_marginal_ll(indices=model.validation_indices)       # held-out log p(x), nats/cell
adata.layers["sclatent_normalized"] = model.get_normalized_expression(library_size=1e4).to_numpy()
```

## Results

{chr(10).join("- " + line for line in results)}

## Training curves
ELBO (train and the 10% held out), reconstruction and KL per epoch; the grey line is the KL
warm-up weight.

![training](figures/01_training.png)

## The latent, clustered
UMAP of the VAE latent, coloured by Leiden cluster and by the provided labels.

![umap](figures/01_umap.png)

## Denoised marker genes
`get_normalized_expression(library_size=1e4)`: the decoder's mean expression per 10k counts.

![markers](figures/01_markers.png)

## Posterior predictive check
Counts sampled from the fitted model against the data, gene by gene.

![ppc](figures/01_ppc.png)
"""
    (HERE / "01_vae_pbmc.md").write_text(body)


if __name__ == "__main__":
    main()
