"""Batch integration scored with scib-metrics (issue 18, part 4): sclatent against scvi-tools and Harmony.

Per dataset every contender embeds all cells (batches and labels as below), each in its own fresh
process (wall time and peak RSS per contender, 2 threads), and scib-metrics' ``Benchmarker`` scores
the embeddings with its default metrics (Luecken et al. 2022): bio conservation (isolated labels,
k-means NMI / ARI, label silhouette, cLISI) and batch correction (BRAS, iLISI, kBET per label,
graph connectivity, PCR comparison against the unintegrated PCA), their means, and the overall
score ``0.6 * bio + 0.4 * batch``, unscaled (``min_max_scale=False``: comparable across runs).

Contenders, each with its library's defaults and the batch as its covariate:

* sclatent: ``VAE`` (``train()``), ``SemiSupervisedVAE.from_vae`` with every label (as scANVI),
  ``DenoisingAE``, ``ContrastiveModel``, ``MaskedGeneModel``;
* scvi-tools: ``SCVI`` and ``SCANVI.from_scvi_model`` with every label;
* Harmony (``harmonypy``) on the 50 PCs below, and those 50 PCs unintegrated (scanpy:
  ``normalize_total``, ``log1p``, ``pca``).

Datasets: cellbench_5cl (the 571 singlets, three plates, cell lines by SNP genotype; 2,000
``seurat_v3`` HVGs), pbmc3k + the embedded PBMCs joined on the 765 genes they share (two datasets as
batches; labels mapped to the shared vocabulary of ``bench_label_transfer.py``, types found in one
dataset only kept under their own name), and a simulation with strong batch effects
(``synthetic(n_cells=3000, n_genes=1000, n_clusters=6, n_batches=3, batch_effect=1.5)``).

Run from the repository root (``pip install -e ".[bench]"`` for scvi-tools, scib-metrics and
harmonypy)::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/bench_integration.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_label_transfer import BULK_LABELS_TO_COARSE, PBMC3K_TO_COARSE
from bench_vae import _limit_threads, _peak_rss_mb, _version, run_worker_process

DATASETS = ("cellbench_5cl", "pbmc_joined", "synthetic")
SYNTHETIC_ARGS = {"n_cells": 3000, "n_genes": 1000, "n_clusters": 6, "n_batches": 3, "batch_effect": 1.5, "seed": 0}
METHODS = {
    "pca": "PCA (unintegrated)",
    "harmony": "Harmony (harmonypy on PCA)",
    "vae": "sclatent VAE",
    "ssvae": "sclatent SemiSupervisedVAE",
    "dae": "sclatent DenoisingAE",
    "contrastive": "sclatent ContrastiveModel",
    "masked": "sclatent MaskedGeneModel",
    "scvi": "scvi-tools SCVI",
    "scanvi": "scvi-tools SCANVI",
}
SCLATENT = ("vae", "ssvae", "dae", "contrastive", "masked")
N_HVG = 2000
N_PCS = 50


# ======================================================================================== data


def load(name: str, data_dir: str | None):
    """AnnData with raw counts in ``X`` and ``layers["counts"]``, ``obs["batch"]``, ``obs["label"]``."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    from sclatent import datasets

    if name == "cellbench_5cl":
        full = datasets.cellbench_5cl(data_dir=data_dir)
        adata = full[(full.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()].copy()
        batch, label = adata.obs["batch"].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()
        counts = adata.layers["counts"]
        var_names = adata.var_names
    elif name == "pbmc_joined":
        pbmc3k = datasets.pbmc3k(data_dir=data_dir)
        pbmc3k = pbmc3k[pbmc3k.obs["cell_type"].notna().to_numpy()]
        embedded = datasets.pbmc68k_counts()
        var_names = embedded.var_names
        counts = sp.vstack(
            [sp.csr_matrix(pbmc3k[:, var_names].layers["counts"]), sp.csr_matrix(embedded.layers["counts"])]
        )
        ref = pbmc3k.obs["cell_type"].astype(str).to_numpy()
        query = embedded.obs["bulk_labels"].astype(str).to_numpy()
        label = np.concatenate(
            [[PBMC3K_TO_COARSE.get(t) or t for t in ref], [BULK_LABELS_TO_COARSE.get(t) or t for t in query]]
        )
        batch = np.asarray(["pbmc3k"] * len(ref) + ["embedded PBMCs"] * len(query))
    elif name == "synthetic":
        adata = datasets.synthetic(**SYNTHETIC_ARGS)
        counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
        batch, label = adata.obs["batch"].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()
        var_names = adata.var_names
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    counts = sp.csr_matrix(counts, dtype=np.float32)
    obs = pd.DataFrame({"batch": pd.Categorical(batch), "label": pd.Categorical(label)})
    obs.index = pd.Index([f"cell{i}" for i in range(counts.shape[0])])
    out = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(np.asarray(var_names, dtype=str))))
    out.layers["counts"] = counts.copy()
    out = out[np.asarray(counts.sum(axis=1)).ravel() > 0].copy()
    if out.n_vars > N_HVG:
        sc.pp.highly_variable_genes(out, n_top_genes=N_HVG, flavor="seurat_v3", layer="counts")
        out = out[:, out.var["highly_variable"].to_numpy()].copy()
    return out


# ======================================================================================== worker


def _pca(adata, seed: int) -> np.ndarray:
    import scanpy as sc

    work = adata.copy()
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    sc.pp.pca(work, n_comps=N_PCS, random_state=seed)
    return np.asarray(work.obsm["X_pca"], dtype=np.float32)


def embed(method: str, adata, seed: int) -> np.ndarray:
    """The contender's embedding of every cell of ``adata`` (trained on all of them)."""
    if method == "pca":
        return _pca(adata, seed)
    if method == "harmony":
        import harmonypy

        result = harmonypy.run_harmony(_pca(adata, seed), adata.obs, ["batch"], random_state=seed)
        corrected = np.asarray(result.Z_corr)
        return (corrected.T if corrected.shape[0] != adata.n_obs else corrected).astype(np.float32)
    if method in ("scvi", "scanvi"):
        import logging

        import scvi

        for name in ("lightning", "lightning.pytorch", "lightning_fabric", "scvi"):
            logging.getLogger(name).setLevel(logging.ERROR)
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
        model = scvi.model.SCVI(adata)
        model.train(accelerator="cpu", devices=1, enable_progress_bar=False)
        if method == "scanvi":
            model = scvi.model.SCANVI.from_scvi_model(model, unlabeled_category="Unknown", labels_key="label")
            model.train(accelerator="cpu", devices=1, enable_progress_bar=False)
        return np.asarray(model.get_latent_representation(), dtype=np.float32)
    import sclatent.model as models

    common = {"progress_bar": False, "accelerator": "cpu", "seed": seed}
    if method in ("vae", "ssvae"):
        models.VAE.setup_anndata(adata, layer="counts", batch_key="batch", labels_key="label")
        model = models.VAE(adata, seed=seed).train(**common)
        if method == "ssvae":
            model = models.SemiSupervisedVAE.from_vae(model, labels_key="label", unlabeled_category=None)
            model.train(**common)
        return model.get_latent_representation()
    cls = {"dae": models.DenoisingAE, "contrastive": models.ContrastiveModel, "masked": models.MaskedGeneModel}[method]
    cls.setup_anndata(adata, layer="counts", batch_key="batch")
    return cls(adata, seed=seed).train(**common).get_latent_representation()


def run_worker(spec_path: str) -> None:
    cfg = json.loads(Path(spec_path).read_text())
    _limit_threads(cfg["threads"])
    import anndata as ad
    import torch

    torch.set_num_threads(cfg["threads"])
    adata = ad.read_h5ad(cfg["data"])
    start = time.perf_counter()
    embedding = embed(cfg["method"], adata, cfg["seed"])
    seconds = time.perf_counter() - start
    np.save(cfg["out"] + ".npy", np.asarray(embedding, dtype=np.float32))
    Path(cfg["out"] + ".json").write_text(json.dumps({"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}))


def run_method(method: str, data_path: Path, args, workdir: Path) -> dict:
    out = workdir / f"{method}"
    spec = {"method": method, "data": str(data_path), "seed": args.seed, "threads": args.threads, "out": str(out)}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_worker_process(__file__, spec_path, args.threads)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-20:])
        print(f"  !! {method} failed:\n{tail}", flush=True)
        return {"error": tail}
    result = json.loads(Path(str(out) + ".json").read_text())
    result["embedding"] = np.load(str(out) + ".npy")
    return result


# ======================================================================================== parent


def score(adata, embeddings: dict[str, np.ndarray], threads: int):
    """scib-metrics' Benchmarker on ``embeddings`` (obsm keys = method names): the results table."""
    from scib_metrics.benchmark import Benchmarker

    scored = adata.copy()
    for method, embedding in embeddings.items():
        scored.obsm[method] = embedding
    bench = Benchmarker(
        scored,
        batch_key="batch",
        label_key="label",
        embedding_obsm_keys=list(embeddings),
        pre_integrated_embedding_obsm_key="pca",
        n_jobs=threads,
        progress_bar=False,
    )
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    return table[table.index != "Metric Type"].astype(float)


def plot(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    names = list(report["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        scores = report["datasets"][name]["scores"]
        methods = [m for m in METHODS if m in scores]
        y = np.arange(len(methods))
        for offset, (column, colour) in enumerate(
            [("Total", "black"), ("Bio conservation", "tab:green"), ("Batch correction", "tab:blue")]
        ):
            values = [scores[m][column] for m in methods]
            ax.barh(y + (offset - 1) * 0.27, values, height=0.27, color=colour, label=column)
        ax.set_yticks(y, [METHODS[m] for m in methods], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(name)
        ax.set_xlabel("scib-metrics score (unscaled)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=os.environ.get("SCLATENT_DATA_DIR"))
    p.add_argument("--out", default="benchmarks/results_integration.json")
    p.add_argument("--figure", default="benchmarks/figures/integration_scores.png")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    import pandas as pd

    methods = args.methods.split(",")
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "versions": {k: _version(k) for k in ("torch", "scvi-tools", "scib-metrics", "harmonypy", "sclatent")},
        "datasets": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            adata = load(name, args.data_dir)
            data_path = Path(tmp) / f"{name}.h5ad"
            adata.write_h5ad(data_path)
            counts = adata.obs.groupby(["batch", "label"], observed=True).size()
            print(f"\n{name}: {adata.n_obs} cells x {adata.n_vars} genes, batches "
                  f"{dict(adata.obs['batch'].value_counts())}", flush=True)
            runs = {m: run_method(m, data_path, args, Path(tmp)) for m in methods}
            embeddings = {m: r.pop("embedding") for m, r in runs.items() if "error" not in r}
            if "pca" not in embeddings:
                raise RuntimeError("the unintegrated PCA is the scib reference embedding; it must run")
            scoring_start = time.perf_counter()
            table = score(adata, embeddings, args.threads)
            scores = {m: {k: float(v) for k, v in table.loc[m].items()} for m in embeddings}
            entry = {
                "cells": int(adata.n_obs),
                "genes": int(adata.n_vars),
                "cells_per_batch_and_label": {f"{b} / {lab}": int(n) for (b, lab), n in counts.items()},
                "runs": runs,
                "scores": scores,
                "scoring_seconds": time.perf_counter() - scoring_start,
            }
            frame = pd.DataFrame(scores).T
            frame["seconds"] = [runs[m]["seconds"] for m in frame.index]
            frame["peak RSS MB"] = [runs[m]["peak_rss_mb"] for m in frame.index]
            frame.index = [METHODS[m] for m in frame.index]
            with pd.option_context("display.width", 250, "display.max_columns", 30):
                print(frame.round(3).sort_values("Total", ascending=False).to_string(), flush=True)
            ours = {m: scores[m]["Total"] for m in SCLATENT if m in scores}
            theirs = {m: scores[m]["Total"] for m in scores if m not in SCLATENT}
            if ours and theirs:
                best, rival = max(ours, key=ours.get), max(theirs, key=theirs.get)
                entry["target"] = {
                    "best_sclatent": best,
                    "best_other": rival,
                    "met": bool(ours[best] > theirs[rival]),
                }
                print(f"  target (sclatent's best has the highest overall score): "
                      f"{'MET' if ours[best] > theirs[rival] else 'MISSED'}: {METHODS[best]} {ours[best]:.3f} vs "
                      f"{METHODS[rival]} {theirs[rival]:.3f}", flush=True)
            report["datasets"][name] = entry
    report["total_seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(report, indent=1))
    figure = Path(args.figure)
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot(report, figure)
    print(f"\nTotal {report['total_seconds'] / 60:.1f} min; wrote {args.out} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
