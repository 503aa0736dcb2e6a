"""Contrastive (SimCLR) cell embeddings against the VAE and scanpy PCA on labelled real data.

Question: do count-aware contrastive views give an embedding that separates cell types (and
mixes plates) as well as a generative model or plain PCA?

Datasets (same preparation as ``bench_families.py``):

* ``cellbench``: CellBench 5 cell lines on 3 plates, the 571 cells demuxlet calls singlets (a
  doublet carries two cell lines' RNA and only a best-guess label, so it has no ground truth;
  keeping the 338 doublets would score every method on label noise), 2,000 seurat_v3 HVGs on the
  counts with ``batch_key="batch"`` (per-plate ranking); batch = plate.
* ``pbmc3k``: the 2,638 cells with Seurat-tutorial labels, 2,000 seurat_v3 HVGs on the counts.

Methods: ``pca`` (scanpy normalize_total / log1p / 50 PCs), ``vae`` (sclatent's ZINB VAE, 10-d,
default epochs, ``batch_key`` on cellbench), ``contrastive`` (defaults: 32-d, all four
augmentations, 200 epochs, batch 256) and ``contrastive_nomix`` (the same without kNN-neighbour
mixing: the ablation of the CLEAR-style augmentation). Metrics (:mod:`sclatent.metrics`): kNN
accuracy and linear-probe accuracy / macro-F1 (5-fold CV), Leiden ARI / NMI (resolution 1) and
the Leiden ARI at the resolution whose cluster count is closest to the number of types (a
diagnostic that knows that number), label ASW, and on cellbench kNN batch entropy and batch ASW
(1 = plates mixed within each cell line).

Run from the repository root (one thread; timings are inflated when the machine is shared)::

    OMP_NUM_THREADS=1 PYTHONPATH=. SCLATENT_DATA_DIR=../shared/data python benchmarks/bench_contrastive.py
    ... python benchmarks/bench_contrastive.py --quick      # 3 epochs each: a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _schedule import matched_schedule

from sclatent.model._base import default_max_epochs

HERE = Path(__file__).resolve().parent
N_HVG = 2000
METHODS = ("pca", "vae", "contrastive", "contrastive_nomix")


def load(name: str):
    """The prepared AnnData, its labels key and batch key (None without batches)."""
    import scanpy as sc

    import sclatent

    if name == "cellbench":
        adata = sclatent.datasets.cellbench_5cl()
        adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
        batch_key = "batch"
    elif name == "pbmc3k":
        adata = sclatent.datasets.pbmc3k()
        adata = adata[adata.obs["cell_type"].notna()].copy()
        batch_key = None
    else:
        raise ValueError(f"unknown dataset {name!r}")
    sc.pp.filter_genes(adata, min_cells=3)
    sc.pp.highly_variable_genes(adata, n_top_genes=N_HVG, flavor="seurat_v3", batch_key=batch_key, subset=True)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).astype("category")
    return adata, "cell_type", batch_key


def embed(method: str, adata, batch_key: str | None, seed: int, quick: bool) -> tuple[np.ndarray, dict]:
    """The method's ``(n_cells, d)`` embedding and facts about its training."""
    import sclatent
    from sclatent.metrics import pca_embedding

    if method == "pca":
        return pca_embedding(adata, None), {"epochs": 0}
    adata = adata.copy()
    if method == "vae":
        sclatent.model.VAE.setup_anndata(adata, batch_key=batch_key)
        model = sclatent.model.VAE(adata, seed=seed)
    else:
        sclatent.model.ContrastiveModel.setup_anndata(adata)
        mix = 0.0 if method == "contrastive_nomix" else 0.5
        model = sclatent.model.ContrastiveModel(adata, mix_max_weight=mix, seed=seed)
    if method == "vae":  # the schedule these rows were recorded with (train()'s defaults before issue 18)
        epochs = 3 if quick else default_max_epochs(adata.n_obs)
        model.train(max_epochs=epochs, accelerator="cpu", progress_bar=False, **matched_schedule(epochs))
    else:
        model.train(max_epochs=3 if quick else 200, accelerator="cpu", progress_bar=False)
    facts = {"epochs": len(model.history["epoch"])}
    if "validation_nt_xent" in model.history:
        facts["validation_nt_xent_first"] = model.history["validation_nt_xent"][0]
        facts["validation_nt_xent_last"] = model.history["validation_nt_xent"][-1]
    return model.get_latent_representation(), facts


RESOLUTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def leiden_at_label_count(embedding: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """Leiden ARI at the resolution (from :data:`RESOLUTIONS`) whose cluster count is closest to the
    number of labels (ties: the lower resolution). A diagnostic that uses the labels' count: it
    separates "the types are apart" from "Leiden at resolution 1 cuts them into more pieces"."""
    from sclatent.metrics import leiden_scores

    target = len(np.unique(labels))
    best = None
    for resolution in RESOLUTIONS:
        found = leiden_scores(embedding, labels, resolution=resolution, seed=seed)
        gap = abs(found["n_clusters"] - target)
        if best is None or gap < best[0]:
            best = (gap, resolution, found)
        if found["n_clusters"] > target:
            break  # cluster counts grow with the resolution
    _, resolution, found = best
    return {"matched_ari": found["ari"], "matched_resolution": resolution, "matched_clusters": found["n_clusters"]}


def score(embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray | None, seed: int) -> dict:
    from sclatent.metrics import (
        batch_asw,
        batch_entropy,
        knn_accuracy,
        label_asw,
        leiden_scores,
        linear_probe_scores,
    )

    probe = linear_probe_scores(embedding, labels, seed=seed)
    leiden = leiden_scores(embedding, labels, seed=seed)
    out = {
        "knn_accuracy": knn_accuracy(embedding, labels, seed=seed),
        "probe_accuracy": probe["accuracy"],
        "probe_macro_f1": probe["macro_f1"],
        "leiden_ari": leiden["ari"],
        "leiden_nmi": leiden["nmi"],
        "leiden_clusters": leiden["n_clusters"],
        "label_asw": label_asw(embedding, labels),
        **leiden_at_label_count(embedding, labels, seed),
    }
    if batches is not None:
        out["batch_entropy"] = batch_entropy(embedding, batches)
        out["batch_asw"] = batch_asw(embedding, batches, labels)
    return out


COLUMNS = [
    ("knn_accuracy", "kNN acc"),
    ("probe_accuracy", "probe acc"),
    ("probe_macro_f1", "probe F1"),
    ("leiden_ari", "Leiden ARI"),
    ("leiden_nmi", "Leiden NMI"),
    ("leiden_clusters", "clusters"),
    ("matched_ari", "ARI at k = types"),
    ("label_asw", "label ASW"),
    ("batch_entropy", "batch entropy"),
    ("batch_asw", "batch ASW"),
    ("train_seconds", "train s"),
]


def table(results: list[dict]) -> str:
    lines = ["| dataset | method | " + " | ".join(c[1] for c in COLUMNS) + " |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 2))
    for row in results:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif key == "leiden_clusters":
                cells.append(str(int(value)))
            elif key == "train_seconds":
                cells.append(f"{value:.0f}")
            else:
                cells.append(f"{value:.3f}")
        lines.append(f"| {row['dataset']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["cellbench", "pbmc3k"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results_contrastive.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for name in args.datasets:
        adata, labels_key, batch_key = load(name)
        labels = adata.obs[labels_key].astype(str).to_numpy()
        batches = adata.obs[batch_key].astype(str).to_numpy() if batch_key else None
        print(f"{name}: {adata.n_obs} cells x {adata.n_vars} genes", flush=True)
        for method in args.methods:
            start = time.perf_counter()
            embedding, facts = embed(method, adata, batch_key, args.seed, args.quick)
            seconds = time.perf_counter() - start
            row = {"dataset": name, "method": method, "dim": int(embedding.shape[1]), "train_seconds": seconds}
            row.update(facts)
            row.update(score(embedding, labels, batches, args.seed))
            results.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print()
    print(table(results))
    meta = {
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=. SCLATENT_DATA_DIR=../shared/data "
        "python benchmarks/bench_contrastive.py" + (" --quick" if args.quick else ""),
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "note": "timings on a shared 2-core machine (other jobs running): indicative only",
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
