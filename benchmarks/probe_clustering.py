"""Why does the VAE latent cluster worse than PCA on pbmc3k? (issue 18, part 3: a first probe.)

pbmc3k (the Seurat-labelled cells, 2,000 ``seurat_v3`` HVGs): Leiden on a 15-neighbour graph at
resolutions 0.1-2.0, the best ARI and the best NMI over resolutions (scib's convention optimises the
resolution per score), for scanpy's PCA (50 PCs of log-normalised counts) and for VAE variants: the
defaults (400 epochs, ``n_latent=10``), a wider latent, fewer epochs, early stopping on the held-out
ELBO (best epoch restored), a posterior sample instead of the mean, and with early stopping and 30
latent dimensions the NB likelihood, two hidden layers or 256 hidden units. Each VAE's held-out log p(x)
(its 10 % validation cells, 100 importance samples, nats/cell) is printed beside, so a clustering
gain bought with likelihood shows. Run from the repository root::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_clustering.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_clustering import best_over_resolutions

# train()'s schedule when this probe was first run (before issue 18 changed the defaults)
BEFORE = {"batch_size": 128, "lr": 1e-3, "kl_warmup_epochs": 133, "early_stopping": False, "max_kl_weight": 1.0}
# issue 18's first defaults, before max_kl_weight became 2 (bench_clustering.py)
ISSUE_18 = {"max_kl_weight": 1.0}
EARLY = {**BEFORE, "max_epochs": 400, "early_stopping": True, "restore_best": True, "patience": 45}
VARIANTS = {
    "defaults (400 epochs, n_latent 10)": ({}, {**BEFORE, "max_epochs": 400}),
    "n_latent 30": ({"n_latent": 30}, {**BEFORE, "max_epochs": 400}),
    "100 epochs": ({}, {**BEFORE, "max_epochs": 100, "kl_warmup_epochs": 33}),
    "early stopping": ({}, EARLY),
    "n_latent 30, early stopping": ({"n_latent": 30}, EARLY),
    "n_latent 30, NB, early stopping": ({"n_latent": 30, "gene_likelihood": "nb"}, EARLY),
    "n_latent 30, 2 layers, early stopping": ({"n_latent": 30, "n_layers": 2}, EARLY),
    "n_latent 30, 256 hidden, early stopping": ({"n_latent": 30, "n_hidden": 256}, EARLY),
    "train() defaults of issue 18": ({}, ISSUE_18),
    "issue-18 defaults, n_latent 30": ({"n_latent": 30}, ISSUE_18),
    "issue-18 defaults, n_latent 30, 2 layers": ({"n_latent": 30, "n_layers": 2}, ISSUE_18),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=None, help="VARIANTS names separated by semicolons (default: all)")
    parser.add_argument("--out", default="benchmarks/results_probe_clustering.json")
    args = parser.parse_args()
    import scanpy as sc
    import torch

    from sclatent import datasets
    from sclatent.metrics import pca_embedding
    from sclatent.model import VAE

    torch.set_num_threads(2)
    adata = datasets.pbmc3k()
    adata = adata[adata.obs["cell_type"].notna().to_numpy()].copy()
    adata.X = adata.layers["counts"].copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3")
    adata = adata[:, adata.var["highly_variable"]].copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    # a partial run (--variants) updates the rows it ran and keeps the others
    report = json.loads(Path(args.out).read_text()) if args.variants and Path(args.out).exists() else {}
    chosen = args.variants.split(";") if args.variants else list(VARIANTS)
    scores = best_over_resolutions(pca_embedding(adata, layer="counts"), labels)
    report["scanpy PCA (50 PCs)"] = scores
    print(f"{'scanpy PCA (50 PCs)':34s} ARI {scores['ari']:.3f} (res {scores['ari_resolution']})  NMI "
          f"{scores['nmi']:.3f}  ARI at res 1 {scores['ari_at_1']:.3f}", flush=True)
    for name in chosen:
        model_options, train_options = VARIANTS[name]
        data = adata.copy()
        VAE.setup_anndata(data, layer="counts")
        start = time.perf_counter()
        model = VAE(data, seed=args.seed, **model_options).train(progress_bar=False, **train_options)
        seconds = time.perf_counter() - start
        held_out = model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=100, seed=0)
        epochs = model.history["epoch"][-1] if model.history.get("epoch") else None
        embeddings = {name: model.get_latent_representation()}
        if name.startswith("defaults"):
            embeddings["posterior sample (defaults)"] = model.get_latent_representation(give_mean=False, seed=0)
        for label, embedding in embeddings.items():
            scores = best_over_resolutions(embedding, labels)
            scores.update(held_out_log_likelihood=held_out, train_seconds=seconds, epochs_run=epochs)
            report[label] = scores
            print(f"{label:34s} ARI {scores['ari']:.3f} (res {scores['ari_resolution']})  NMI {scores['nmi']:.3f}  "
                  f"ARI at res 1 {scores['ari_at_1']:.3f}  held-out log p(x) {held_out:.1f}  "
                  f"({seconds:.0f} s, {epochs} epochs)", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
