"""Tutorial 5: synthetic cells from a cell-type-conditioned GAN, how real they look, and whether
they help a classifier on rare cell types.

Run ``python tutorials/05_gan_augmentation.py`` (needs pbmc3k in ``$SCLATENT_DATA_DIR``; a few CPU
minutes at one thread): it trains the GAN, writes the figures to ``tutorials/figures/05_*.png``
and the text with the measured numbers to ``tutorials/05_gan_augmentation.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
import scipy.sparse as sp
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, recall_score

import sclatent
from sclatent.metrics import knn_accuracy, pca_embedding, realism_metrics, split_halves
from sclatent.metrics.realism import log_normalise
from sclatent.plotting import plot_training_history

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
RARE = ["DC", "Platelet"]
N_AUGMENT = 200


def rare_recall(train_x, train_y, fit_x, test_x, test_y) -> dict[str, float]:
    """Recall of the rare types on held-out cells: logistic regression on a 50-d PCA of
    log-normalised counts (PCA fitted on the real training cells ``fit_x`` only)."""
    pca = PCA(n_components=50, random_state=0).fit(log_normalise(fit_x))
    classifier = LogisticRegression(max_iter=3000).fit(pca.transform(log_normalise(train_x)), train_y)
    predicted = classifier.predict(pca.transform(log_normalise(test_x)))
    scores = {t: float(recall_score(test_y == t, predicted == t)) for t in RARE}
    scores["macro F1"] = float(f1_score(test_y, predicted, average="macro"))
    return scores


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    text: list[str] = []

    # 1. Data: pbmc3k's labelled cells, 2,000 highly variable genes chosen on the counts
    adata = sclatent.datasets.pbmc3k()
    adata = adata[adata.obs["labelled"].astype(bool)].copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3")
    adata = adata[:, adata.var["highly_variable"]].copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).astype("category")
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    counts = adata.obs["cell_type"].value_counts()
    text.append(
        f"Data: pbmc3k, {adata.n_obs} labelled cells x {adata.n_vars} highly variable genes (seurat_v3 on counts); "
        f"types: {', '.join(f'{t} {n}' for t, n in counts.items())}."
    )

    # 2. A fixed split in halves stratified by type: the GAN sees only the first half
    first, second = split_halves(labels, seed=0)
    train = adata[first].copy()
    held_out = adata[second]
    sclatent.model.CellGAN.setup_anndata(train, labels_key="cell_type")
    gan = sclatent.model.CellGAN(train, seed=0)
    start = time.perf_counter()
    gan.train(progress_bar=False)
    seconds = time.perf_counter() - start
    text.append(
        f"Training: CellGAN (WGAN-GP, n_critic 5, lr 1e-3) on the {train.n_obs} cells of the first half, "
        f"{gan.history['epoch'][-1]} epochs (~600 generator updates) in {seconds:.0f} s on one loaded CPU thread. "
        f"The critic's Wasserstein estimate went from {max(gan.history['train_wasserstein']):.1f} (its peak) to "
        f"{gan.history['train_wasserstein'][-1]:.1f}."
    )
    plot_training_history(gan.history, FIGURES / "05_training.png")

    # 3. Synthetic cells with the held-out half's type composition
    composition = held_out.obs["cell_type"].value_counts()
    fake = ad.concat(
        [gan.sample(int(n), cell_type=t, seed=i) for i, (t, n) in enumerate(composition.items()) if n],
        index_unique="-",
    )
    x_fake, y_fake = fake.X, fake.obs["cell_type"].astype(str).to_numpy()
    x_val, y_val = held_out.X, labels[second]
    assert np.array_equal(x_fake.data, np.round(x_fake.data)) and x_fake.data.min() >= 0
    text.append(
        f"Sampling: {fake.n_obs} synthetic cells, integer counts, `obs['synthetic']` True, median total "
        f"{np.median(np.asarray(x_fake.sum(1)).ravel()):.0f} (held-out real: "
        f"{np.median(np.asarray(x_val.sum(1)).ravel()):.0f})."
    )

    # 4. Realism against the held-out half, beside the other real half and a model-free generator
    real = realism_metrics(x_val, train.X, y_val, labels[first])
    synthetic = realism_metrics(x_val, x_fake, y_val, y_fake)
    rng = np.random.default_rng(0)
    dense_train = train.X.toarray()
    rows = []
    for t, n in composition.items():
        members = labels[first] == t
        profile = dense_train[members].sum(0) / dense_train[members].sum()
        libs = rng.choice(dense_train[members].sum(1), size=int(n))
        rows.append(rng.poisson(libs[:, None] * profile[None, :]))
    baseline_x = sp.csr_matrix(np.vstack(rows).astype(np.float32))
    baseline_y = np.repeat(composition.index.astype(str).to_numpy(), composition.to_numpy())
    baseline = realism_metrics(x_val, baseline_x, y_val, baseline_y)
    text.append(
        "Realism against the held-out half (sclatent.metrics.realism; 'type-mean Poisson' draws "
        "Poisson(l x the type's mean profile) with resampled libraries: right means, no within-type structure):\n\n"
        "| metric | other real half | GAN | type-mean Poisson |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {real[k]:.3f} | {synthetic[k]:.3f} | {baseline[k]:.3f} |"
            for k, name in [
                ("c2st_auroc", "classifier two-sample AUROC (0.5: indistinguishable)"),
                ("mmd", "MMD^2, PCA of log counts, RBF"),
                ("corr_mean", "per-gene mean r"),
                ("corr_variance", "per-gene variance r"),
                ("corr_zero_fraction", "per-gene zero-fraction r"),
                ("marker_overlap", "top-20 markers per type recovered"),
            ]
        )
    )

    harder = synthetic["c2st_auroc"] < baseline["c2st_auroc"]
    verdict = (
        f"On the classifier two-sample test, the strictest of these, the GAN's cells are "
        f"{'harder' if harder else 'easier'} to tell from held-out real cells than the model-free generator's "
        f"(AUROC {synthetic['c2st_auroc']:.3f} vs {baseline['c2st_auroc']:.3f}; two real halves: "
        f"{real['c2st_auroc']:.3f}). The model-free generator gets each type's mean right by construction, so it "
        "is a strong reference for per-gene statistics; what a GAN can add is within-type structure "
        "(covariation between genes), which the two-sample test and the MMD see and per-gene summaries do not."
    )

    # 5. One UMAP of held-out real and synthetic cells together
    both = ad.concat({"real": held_out, "synthetic": fake}, label="source", index_unique="-")
    both.obs["cell_type"] = np.r_[y_val, y_fake]
    sc.pp.normalize_total(both, target_sum=1e4)
    sc.pp.log1p(both)
    sc.pp.pca(both, n_comps=50, random_state=0)
    sc.pp.neighbors(both, random_state=0)
    sc.tl.umap(both, random_state=0)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    sc.pl.umap(both, color="source", ax=axes[0], show=False, title="held-out real vs synthetic", s=8)
    for ax, source in zip(axes[1:], ("real", "synthetic")):
        sc.pl.umap(
            both[both.obs["source"] == source], color="cell_type", ax=ax, show=False, title=f"{source} cells", s=8
        )
    fig.savefig(FIGURES / "05_umap.png", dpi=110)
    plt.close(fig)

    # 6. The rare types' mean profiles, real (held out) vs synthetic
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), constrained_layout=True)
    lv, lf = log_normalise(x_val), log_normalise(x_fake)
    lt = log_normalise(train.X)
    rare_r, rare_real_r = {}, {}
    for ax, t in zip(axes, RARE):
        a, b = lv[y_val == t].mean(0), lf[y_fake == t].mean(0)
        rare_r[t] = float(np.corrcoef(a, b)[0, 1])
        # the same correlation for the real training cells of the type: the ceiling at these cell numbers
        rare_real_r[t] = float(np.corrcoef(a, lt[labels[first] == t].mean(0))[0, 1])
        ax.scatter(a, b, s=4, alpha=0.5)
        top = max(a.max(), b.max())
        ax.plot([0, top], [0, top], color="grey", lw=0.8)
        ax.set_xlabel("held-out real: mean log-normalised expression")
        ax.set_ylabel("synthetic")
        ax.set_title(f"{t}: r = {rare_r[t]:.3f} ({(y_val == t).sum()} real, {(y_fake == t).sum()} synthetic)")
    fig.savefig(FIGURES / "05_rare_means.png", dpi=110)
    plt.close(fig)
    text.append(
        "Rare types: per-gene means of synthetic vs held-out real cells correlate at "
        + ", ".join(f"{t} r = {r:.3f}" for t, r in rare_r.items())
        + "; the real training cells of the type reach "
        + ", ".join(f"{t} r = {r:.3f}" for t, r in rare_real_r.items())
        + f" (the GAN saw {(labels[first] == 'DC').sum()} DC and {(labels[first] == 'Platelet').sum()} Platelet cells)."
    )

    # 7. Augmentation: add synthetic rare cells to the training half, score on the held-out half
    x_train, y_train = train.X, labels[first]
    plain = rare_recall(x_train, y_train, x_train, x_val, y_val)
    extra = [gan.sample(N_AUGMENT, cell_type=t, seed=100 + i) for i, t in enumerate(RARE)]
    x_aug = sp.vstack([x_train] + [e.X for e in extra], format="csr")
    y_aug = np.r_[y_train, np.repeat(RARE, N_AUGMENT)]
    augmented = rare_recall(x_aug, y_aug, x_train, x_val, y_val)
    text.append(
        f"Augmentation (one seed here; `benchmarks/bench_gan.py` repeats it over seeds beside duplication, class "
        f"weights and the model-free generator): logistic regression on PCA, recall on the held-out half's "
        f"{(y_val == 'DC').sum()} DC and {(y_val == 'Platelet').sum()} Platelet cells. Real training cells only: "
        + ", ".join(f"{t} {plain[t]:.3f}" for t in [*RARE, "macro F1"])
        + f"; with {N_AUGMENT} GAN cells of each rare type added: "
        + ", ".join(f"{t} {augmented[t]:.3f}" for t in [*RARE, "macro F1"])
        + "."
    )

    # 8. What get_latent_representation returns: the critic's features, measured, not promised
    features = gan.get_latent_representation(held_out)
    pca = pca_embedding(held_out, None)
    text.append(
        "`get_latent_representation` returns the critic's last hidden layer (128 features). It is not an "
        "inferred latent; as an embedding of the held-out cells its 15-NN cell-type accuracy is "
        f"{knn_accuracy(features, y_val):.3f} (scanpy PCA: {knn_accuracy(pca, y_val):.3f})."
    )

    text.append(verdict)
    write_markdown(text)
    print("\n\n".join(text))


def write_markdown(text: list[str]) -> None:
    body = f"""# Tutorial 5: synthetic cells from a conditional GAN, and rare-type augmentation

`sclatent.model.CellGAN` is a cell-type-conditioned Wasserstein GAN with gradient penalty in the
manner of scGAN / cscGAN. Its generator maps noise, a cell type and a library size to an
expression profile (a softmax over genes); a synthetic cell is `Poisson(library x profile)`, so it
is a vector of integer counts, with the library resampled from the training cells of its type.
The critic reads log-normalised counts of real and synthetic cells alike (it sees sampled counts,
with a straight-through gradient to the profile, not the generator's smooth mean). The trainer
alternates five critic updates with one generator update, each with its own Adam.

Everything below was produced by `python tutorials/05_gan_augmentation.py`; the numbers are from
that run (one thread, on a machine shared with other jobs: the timings are inflated).

```python
import sclatent
sclatent.model.CellGAN.setup_anndata(train, labels_key="cell_type")
gan = sclatent.model.CellGAN(train)
gan.train()                                   # history: critic/generator losses, Wasserstein estimate
fake = gan.sample(200, cell_type="DC")        # AnnData: integer counts, obs["cell_type"], obs["synthetic"]
gan.sample(1000)                              # types at their training frequencies
gan.sample(5, cell_type="T cell")             # ValueError: Unknown cell_type 'T cell'; the GAN knows [...]
```

{text[0]}

{text[1]}

![training curves](figures/05_training.png)

{text[2]}

{text[3]}

{text[7]}

![held-out real and synthetic cells in one UMAP](figures/05_umap.png)

{text[4]}

![rare-type means](figures/05_rare_means.png)

{text[5]}

{text[6]}
"""
    (HERE / "05_gan_augmentation.md").write_text(body)


if __name__ == "__main__":
    main()
