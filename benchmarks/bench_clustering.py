"""Leiden clustering of learned latents against scanpy's PCA and scvi-tools (issue 18, part 3).

Per dataset and seed, one seeded split holds out 10 % of the cells. Each VAE trains on the other
90 % with its library's defaults (``train()`` with no arguments; scvi-tools' ``SCVI(adata).train()``),
then embeds every cell (posterior means; the encoders are amortised, so held-out cells embed like the
rest). Leiden runs on a 15-neighbour graph of each embedding at resolutions 0.1-2.0 with the seed as
Leiden's seed, and the best ARI and the best NMI over the resolutions are kept (scib's convention: each
score picks its resolution). scanpy's PCA (``normalize_total``, ``log1p``, 50 PCs of the same genes)
goes through the same Leiden runs. Each VAE's held-out log p(x) is the per-cell mean over the held-out
cells (100 importance samples; scvi-tools' ``get_marginal_ll(return_mean=False)``), so a clustering
gain paid for in likelihood shows.

Datasets (counts, labels independent of any embedding where possible):

* ``pbmc``: the embedded PBMCs (700 cells, 765 genes), FACS ``bulk_labels``;
* ``pbmc3k``: the 2,638 Seurat-labelled cells, 2,000 ``seurat_v3`` HVGs, ``cell_type`` (Seurat's
  clusters of PCA: the labels were drawn from a PCA graph, which favours PCA);
* ``cellbench_5cl``: the 571 singlets, 2,000 HVGs, cell line by SNP genotype, the plate as batch;
* ``synthetic``: ``synthetic(n_cells=3000, n_genes=1000, n_clusters=8, n_batches=1,
  library_size=(300, 1500), cluster_separation=1.0)``, clusters close enough that no method is perfect.

``--sclatent-variants`` sets the sclatent VAEs compared (JSON ``{"name": {"model": {VAE options},
"train": {train() options}}}``; default: ``VAE(adata).train()``). A run with ``--no-scvi`` keeps the
scvi-tools rows already in ``--out`` (same datasets, splits and seeds) and replaces the others.
Run from the repository root (``pip install -e ".[bench]"``)::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/bench_clustering.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

DATASETS = ("pbmc", "pbmc3k", "cellbench_5cl", "synthetic")
SYNTHETIC_ARGS = {
    "n_cells": 3000,
    "n_genes": 1000,
    "n_clusters": 8,
    "n_batches": 1,
    "library_size": (300, 1500),
    "cluster_separation": 1.0,
    "seed": 0,
}
RESOLUTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
N_HVG = 2000
HELD_OUT_FRACTION = 0.1
LL_SAMPLES = 100


def load(name: str, data_dir: str | None):
    """AnnData with counts in ``X`` and ``layers["counts"]``, ``obs["label"]`` and ``obs["batch"]`` (or None)."""
    import scanpy as sc

    from sclatent import datasets

    batch_key = None
    if name == "pbmc":
        adata = datasets.pbmc68k_counts()
        adata.obs["label"] = adata.obs["bulk_labels"].astype(str)
    elif name == "pbmc3k":
        adata = datasets.pbmc3k(data_dir=data_dir)
        adata = adata[adata.obs["cell_type"].notna().to_numpy()].copy()
        adata.obs["label"] = adata.obs["cell_type"].astype(str)
    elif name == "cellbench_5cl":
        adata = datasets.cellbench_5cl(data_dir=data_dir)
        adata = adata[(adata.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()].copy()
        adata.obs["label"] = adata.obs["cell_type"].astype(str)
        adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
        batch_key = "batch"
    elif name == "synthetic":
        adata = datasets.synthetic(**SYNTHETIC_ARGS)
        adata.obs["label"] = adata.obs["cell_type"].astype(str)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    adata.X = adata.layers["counts"].copy()
    adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
    if adata.n_vars > N_HVG:
        sc.pp.highly_variable_genes(adata, n_top_genes=N_HVG, flavor="seurat_v3", layer="counts")
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    return adata, batch_key


def best_over_resolutions(embedding: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Best Leiden ARI and best NMI over ``RESOLUTIONS`` (each with its resolution), and the ARI at 1."""
    from sclatent.metrics.clustering import leiden_scores

    runs = {r: leiden_scores(embedding, labels, resolution=r, seed=seed) for r in RESOLUTIONS}
    best_ari = max(runs, key=lambda r: runs[r]["ari"])
    best_nmi = max(runs, key=lambda r: runs[r]["nmi"])
    return {
        "ari": runs[best_ari]["ari"],
        "ari_resolution": best_ari,
        "nmi": runs[best_nmi]["nmi"],
        "nmi_resolution": best_nmi,
        "ari_at_1": runs[1.0]["ari"],
    }


def embed_sclatent(adata, batch_key, train_cells, held_out, seed: int, variant: dict) -> tuple[np.ndarray, dict]:
    from sclatent.model import VAE

    train = adata[train_cells].copy()
    VAE.setup_anndata(train, layer="counts", batch_key=batch_key)
    start = time.perf_counter()
    model = VAE(train, seed=seed, **variant.get("model", {})).train(progress_bar=False, **variant.get("train", {}))
    seconds = time.perf_counter() - start
    everything = adata.copy()
    VAE.setup_anndata(everything, layer="counts", batch_key=batch_key)
    embedding = model.get_latent_representation(everything)
    log_likelihood = model.get_marginal_ll(adata[held_out].copy(), n_mc_samples=LL_SAMPLES, seed=0)
    return embedding, {
        "held_out_log_likelihood": float(log_likelihood),
        "train_seconds": seconds,
        "epochs_run": int(model.history["epoch"][-1]),
    }


def embed_scvi(adata, batch_key, train_cells, held_out, seed: int) -> tuple[np.ndarray, dict]:
    import scvi

    scvi.settings.seed = seed
    train = adata[train_cells].copy()
    scvi.model.SCVI.setup_anndata(train, layer="counts", batch_key=batch_key)
    model = scvi.model.SCVI(train)
    start = time.perf_counter()
    model.train(accelerator="cpu", enable_progress_bar=False)
    seconds = time.perf_counter() - start
    everything = adata.copy()
    embedding = model.get_latent_representation(everything)
    per_cell = model.get_marginal_ll(adata[held_out].copy(), n_mc_samples=LL_SAMPLES, return_mean=False)
    return embedding, {
        "held_out_log_likelihood": float(np.mean(np.asarray(per_cell))),
        "train_seconds": seconds,
        "epochs_run": len(model.history["elbo_train"]),
    }


def bench_dataset(name: str, args, variants: dict[str, dict]) -> dict:
    from sclatent.metrics import pca_embedding

    adata, batch_key = load(name, args.data_dir)
    labels = adata.obs["label"].astype(str).to_numpy()
    pca = pca_embedding(adata, layer="counts")
    runs: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        order = np.random.default_rng(seed).permutation(adata.n_obs)
        n_held_out = round(HELD_OUT_FRACTION * adata.n_obs)
        held_out, train_cells = np.sort(order[:n_held_out]), np.sort(order[n_held_out:])
        contenders = ["scanpy PCA (50 PCs)", *variants] + ([] if args.no_scvi else ["scvi-tools SCVI"])
        for contender in contenders:
            if contender in variants:
                embedding, extra = embed_sclatent(adata, batch_key, train_cells, held_out, seed, variants[contender])
            elif contender == "scvi-tools SCVI":
                embedding, extra = embed_scvi(adata, batch_key, train_cells, held_out, seed)
            else:
                embedding, extra = pca, {}
            scores = {**best_over_resolutions(embedding, labels, seed), **extra, "seed": seed}
            runs.setdefault(contender, []).append(scores)
            ll = extra.get("held_out_log_likelihood")
            print(
                f"{name:14s} seed {seed} {contender:28s} ARI {scores['ari']:.3f} (res {scores['ari_resolution']}) "
                f"NMI {scores['nmi']:.3f}" + (f"  held-out log p(x) {ll:.1f}" if ll is not None else ""),
                flush=True,
            )
    return {"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "batch_key": batch_key, "runs": runs}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Mean and sd over seeds of each contender's scores."""
    return {
        contender: {
            key: {"mean": float(np.mean([r[key] for r in rows])), "sd": float(np.std([r[key] for r in rows]))}
            for key in ("ari", "nmi", "held_out_log_likelihood", "train_seconds")
            if key in rows[0]
        }
        for contender, rows in runs.items()
    }


def check_targets(report: dict) -> dict:
    """Issue 18, part 3, per sclatent variant: mean ARI and NMI >= the best of scvi-tools and PCA per dataset."""
    checks: dict[str, dict] = {}
    for name, result in report["datasets"].items():
        summary = result["summary"]
        others = [c for c in summary if not c.startswith("sclatent")]
        for metric in ("ari", "nmi"):
            best_other = max(others, key=lambda c: summary[c][metric]["mean"])
            for variant in (c for c in summary if c.startswith("sclatent")):
                value, other = summary[variant][metric]["mean"], summary[best_other][metric]["mean"]
                checks.setdefault(variant, {})[f"{name} {metric}"] = {
                    "value": value, "best other": best_other, "other value": other, "met": value >= other
                }
    return checks


def plot(report: dict, path: Path) -> None:
    """Bar chart of mean best ARI and NMI (sd as error bars) per dataset and contender."""
    import matplotlib.pyplot as plt

    names = list(report["datasets"])
    contenders = list(report["datasets"][names[0]]["summary"])
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6), sharey="row", squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for column, name in enumerate(names):
        summary = report["datasets"][name]["summary"]
        for row, metric in enumerate(("ari", "nmi")):
            ax = axes[row, column]
            means = [summary[c][metric]["mean"] if c in summary else np.nan for c in contenders]
            sds = [summary[c][metric]["sd"] if c in summary else 0.0 for c in contenders]
            ax.bar(range(len(contenders)), means, yerr=sds, color=colours[: len(contenders)], capsize=2)
            low = np.nanmin(np.asarray(means) - np.asarray(sds))
            ax.set_ylim(max(0.0, low - 0.05), 1.0)
            ax.set_xticks([])
            ax.set_title(f"{name}: best {metric.upper()}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i]) for i in range(len(contenders))]
    fig.legend(handles, contenders, loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(report: dict) -> None:
    for name, result in report["datasets"].items():
        print(f"\n{name} ({result['n_cells']} cells, {result['n_genes']} genes; mean ± sd over seeds)")
        print(f"{'contender':30s} {'best ARI':>15s} {'best NMI':>15s} {'held-out log p(x)':>20s} {'train s':>8s}")
        for contender, s in result["summary"].items():
            ll = s.get("held_out_log_likelihood")
            ll_text = f"{ll['mean']:.1f} ± {ll['sd']:.1f}" if ll else "-"
            secs = f"{s['train_seconds']['mean']:.0f}" if "train_seconds" in s else "-"
            print(f"{contender:30s} {s['ari']['mean']:.3f} ± {s['ari']['sd']:.3f}  {s['nmi']['mean']:.3f} ± "
                  f"{s['nmi']['sd']:.3f} {ll_text:>20s} {secs:>8s}")
    print("\ntargets (mean >= the best of scvi-tools and PCA on every dataset):")
    for variant, checks in report["targets"].items():
        missed = [f"{key} {c['value']:.3f} < {c['best other']} {c['other value']:.3f}"
                  for key, c in checks.items() if not c["met"]]
        print(f"  {variant}: " + ("all met" if not missed else "MISSED " + "; ".join(missed)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sclatent-variants", default='{"sclatent VAE (defaults)": {}}',
                        help='JSON {name: {"model": {...}, "train": {...}}}; names must start with "sclatent"')
    parser.add_argument("--no-scvi", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results_clustering.json")
    parser.add_argument("--figure", default="benchmarks/figures/clustering_scores.png")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute the summary, targets and figure of --out without training")
    args = parser.parse_args(argv)
    if args.rescore:
        report = json.loads(Path(args.out).read_text())
        for result in report["datasets"].values():
            result["summary"] = summarise(result["runs"])
        report["targets"] = check_targets(report)
        print_summary(report)
        plot(report, Path(args.figure))
        Path(args.out).write_text(json.dumps(report, indent=2))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    variants = json.loads(args.sclatent_variants)
    if not all(name.startswith("sclatent") for name in variants):
        parser.error("--sclatent-variants names must start with 'sclatent'")
    previous = json.loads(Path(args.out).read_text()) if args.no_scvi and Path(args.out).exists() else None
    report = {"resolutions": list(RESOLUTIONS), "seeds": args.seeds, "variants": variants, "datasets": {}}
    for name in args.datasets.split(","):
        result = bench_dataset(name, args, variants)
        kept = (previous or {}).get("datasets", {}).get(name, {}).get("runs", {})
        if "scvi-tools SCVI" in kept and len(kept["scvi-tools SCVI"]) == args.seeds:
            result["runs"]["scvi-tools SCVI"] = kept["scvi-tools SCVI"]
        result["summary"] = summarise(result["runs"])
        report["datasets"][name] = result
    report["targets"] = check_targets(report)
    print_summary(report)
    plot(report, Path(args.figure))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
