"""Every cell-model family side by side: training time, peak memory, its own metric, common metrics.

For each dataset (the embedded PBMC counts, pbmc3k, cellbench_5cl) every family trains in a fresh
process (so peak RSS is the family's own) on the same cells with the same seed, writes its cell
embedding, and reports its own quality metric. The parent then scores every embedding with the
same common metrics:

* kNN accuracy (15 neighbours, 5-fold stratified CV) and linear-probe macro-F1 of the cell types;
* Leiden ARI / NMI against the cell types (scanpy neighbors + Leiden, resolution 1);
* label ASW (separation of types) and, where the data have batches (cellbench's three plates),
  kNN batch entropy and batch ASW (mixing of plates within each cell line).

Families: ``pca`` (scanpy: normalize_total, log1p, 50 PCs; the baseline), ``vae`` (scVI-style
ZINB VAE), ``dae`` (denoising AE), ``masked`` (masked-gene pretraining, MLP encoder), ``contrastive``
(SimCLR), ``flow`` (VAE with a RealNVP prior), ``gan`` (conditional WGAN-GP; its "embedding" is what
``CellGAN.get_latent_representation`` documents, and its own metric the classifier two-sample
AUROC of its samples against held-out real cells, 0.5 = indistinguishable).

Datasets: ``pbmc68k`` (700 cells x 765 genes, ``bulk_labels``), ``pbmc3k`` (2,638 labelled cells,
2,000 seurat_v3 highly variable genes on the counts), ``cellbench`` (the 571 cells demuxlet calls singlets: a
doublet's "cell line" is only its best guess, no ground truth; 2,000 seurat_v3 HVGs per plate;
batch = plate).

Peak memory is the worker process's peak RSS; ``+MB`` is its growth during training and
evaluation, above the RSS after the imports and data loading (torch and scanpy alone take
about 500 MB).

Run from the repository root (idle machine: timings are meaningless with other jobs running)::

    PYTHONPATH=. SCLATENT_DATA_DIR=../shared/data python benchmarks/bench_families.py
    PYTHONPATH=. python benchmarks/bench_families.py --quick --datasets pbmc68k   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _schedule import matched_schedule
from bench_vae import _peak_rss_mb  # VmHWM: ru_maxrss survives fork + exec

REPO_ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("pca", "vae", "dae", "masked", "contrastive", "flow", "gan")
DATASETS = ("pbmc68k", "pbmc3k", "cellbench")
N_HVG = 2000


# ----------------------------------------------------------------------------- data


def prepare(name: str, path: Path) -> dict:
    """Write the dataset's counts, labels and batches to ``path`` (h5ad); return its description."""
    import scanpy as sc

    import sclatent

    if name == "pbmc68k":
        adata = sclatent.datasets.pbmc68k_counts()
        labels_key, batch_key = "bulk_labels", None
    elif name == "pbmc3k":
        adata = sclatent.datasets.pbmc3k()
        adata = adata[adata.obs["cell_type"].notna()].copy()
        labels_key, batch_key = "cell_type", None
    elif name == "cellbench":
        adata = sclatent.datasets.cellbench_5cl()
        adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
        labels_key, batch_key = "cell_type", "batch"
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}.")
    if adata.n_vars > N_HVG:
        sc.pp.filter_genes(adata, min_cells=3)
        sc.pp.highly_variable_genes(adata, n_top_genes=N_HVG, flavor="seurat_v3", batch_key=batch_key, subset=True)
    adata.obs[labels_key] = adata.obs[labels_key].astype(str).astype("category")
    keep = ["bulk_labels", "cell_type", "batch"]
    adata.obs = adata.obs[[c for c in keep if c in adata.obs]]
    adata.var = adata.var[[]]
    adata.uns = {}
    adata.obsm.clear()
    adata.write_h5ad(path)
    return {"labels_key": labels_key, "batch_key": batch_key, "cells": adata.n_obs, "genes": adata.n_vars}


# ----------------------------------------------------------------------------- families (worker side)


def _epochs(n_cells: int, quick: bool, full: int) -> int:
    return 3 if quick else full


def run_family(family: str, adata, labels_key: str, batch_key: str | None, seed: int, quick: bool) -> dict:
    """Train ``family`` on ``adata``; return its embedding, own metric and epochs."""
    import sclatent
    from sclatent.metrics import pca_embedding

    model_cls = {
        "vae": lambda: sclatent.model.VAE,
        "flow": lambda: sclatent.model.VAE,
        "dae": lambda: sclatent.model.DenoisingAE,
    }
    if family == "pca":
        embedding = pca_embedding(adata, None)
        return {"embedding": embedding, "own_metric": None, "own_metric_name": "-", "epochs": 0}
    if family in ("vae", "flow"):
        cls = model_cls[family]()
        cls.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key)
        prior = {"vae": {}, "flow": {"prior": "realnvp"}}[family]
        model = cls(adata, seed=seed, **prior)
        epochs = _epochs(adata.n_obs, quick, 200)
        model.train(max_epochs=epochs, progress_bar=False, **matched_schedule(epochs))
        n_samples = 20 if quick else 200
        own = model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=n_samples)
        return {
            "embedding": model.get_latent_representation(),
            "own_metric": own,
            "own_metric_name": f"held-out LL ({n_samples} IS), nats/cell",
            "epochs": len(model.history["epoch"]),
        }
    if family == "dae":
        cls = model_cls[family]()
        cls.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key)
        model = cls(adata, seed=seed)
        model.train(max_epochs=_epochs(adata.n_obs, quick, 300), progress_bar=False)
        own = model.get_reconstruction_error(indices=model.validation_indices)
        return {
            "embedding": model.get_latent_representation(),
            "own_metric": own,
            "own_metric_name": "held-out NLL (clean input), nats/cell",
            "epochs": len(model.history["epoch"]),
        }
    if family == "masked":
        sclatent.model.MaskedGeneModel.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key)
        model = sclatent.model.MaskedGeneModel(adata, seed=seed)
        model.train(max_epochs=_epochs(adata.n_obs, quick, 200), progress_bar=False)
        return {
            "embedding": model.get_latent_representation(),
            "own_metric": model.get_masked_nll(indices=model.validation_indices),
            "own_metric_name": f"held-out NLL of {model.n_masked} hidden genes, nats/cell",
            "epochs": len(model.history["epoch"]),
        }
    if family == "contrastive":
        sclatent.model.ContrastiveModel.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key)
        model = sclatent.model.ContrastiveModel(adata, seed=seed)
        model.train(max_epochs=_epochs(adata.n_obs, quick, 200), progress_bar=False)
        return {
            "embedding": model.get_latent_representation(),
            "own_metric": model.history["validation_nt_xent"][-1],
            "own_metric_name": "held-out NT-Xent, nats/cell",
            "epochs": len(model.history["epoch"]),
        }
    if family == "gan":
        from sclatent.metrics.realism import classifier_two_sample_auroc, split_halves

        # trained on one type-stratified half; its samples are scored against the other half
        first, second = split_halves(adata.obs[labels_key].to_numpy(), seed=seed)
        train = adata[first].copy()
        sclatent.model.CellGAN.setup_anndata(train, labels_key=labels_key)
        model = sclatent.model.CellGAN(train, seed=seed)
        model.train(max_epochs=3 if quick else None, progress_bar=False)
        synthetic = model.sample(len(second), seed=seed)
        auroc = classifier_two_sample_auroc(adata[second].X, synthetic.X, seed=seed)
        return {
            "embedding": model.get_latent_representation(adata),
            "own_metric": auroc,
            "own_metric_name": "C2ST AUROC of samples vs held-out half (0.5 ideal)",
            "epochs": len(model.history["epoch"]),
        }
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}.")


def worker(spec_path: str) -> None:
    """Child process: train one family on one dataset, write embedding and measurements."""
    import anndata as ad
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    adata = ad.read_h5ad(spec["data"])
    import sclatent  # noqa: F401  (imported before the baseline RSS is taken)

    # the current RSS after imports and data (not the peak: an import's transient peak would hide
    # the training's own growth); /proc/self/statm counts pages
    baseline_mb = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    start = time.perf_counter()
    result = run_family(spec["family"], adata, spec["labels_key"], spec["batch_key"], spec["seed"], spec["quick"])
    seconds = time.perf_counter() - start
    np.save(spec["embedding"], np.asarray(result.pop("embedding"), dtype=np.float32))
    result["seconds"] = seconds
    result["peak_rss_mb"] = _peak_rss_mb()
    result["rss_growth_mb"] = result["peak_rss_mb"] - baseline_mb
    Path(spec["result"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent


def common_metrics(embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray | None, seed: int) -> dict:
    from sclatent.metrics import (
        batch_asw,
        batch_entropy,
        knn_accuracy,
        label_asw,
        leiden_scores,
        linear_probe_scores,
    )

    scores = {
        "knn_accuracy": knn_accuracy(embedding, labels, seed=seed),
        "probe_macro_f1": linear_probe_scores(embedding, labels, seed=seed)["macro_f1"],
        "label_asw": label_asw(embedding, labels),
    }
    leiden = leiden_scores(embedding, labels, seed=seed)
    scores.update(leiden_ari=leiden["ari"], leiden_nmi=leiden["nmi"])
    if batches is not None:
        scores["batch_entropy"] = batch_entropy(embedding, batches)
        scores["batch_asw"] = batch_asw(embedding, batches, labels)
    return scores


def run_one(family: str, dataset: str, info: dict, args, workdir: Path) -> dict:
    spec = {
        "family": family,
        "data": str(workdir / f"{dataset}.h5ad"),
        "labels_key": info["labels_key"],
        "batch_key": info["batch_key"],
        "seed": args.seed,
        "quick": args.quick,
        "threads": args.threads,
        "embedding": str(workdir / f"{dataset}_{family}.npy"),
        "result": str(workdir / f"{dataset}_{family}.json"),
    }
    spec_path = workdir / f"{dataset}_{family}_spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec_path)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(Path(spec["result"]).read_text())


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(dataset: str, info: dict, results: dict) -> None:
    has_batch = info["batch_key"] is not None
    print(f"\n== {dataset}: {info['cells']} cells x {info['genes']} genes ==")
    header = f"{'family':<12}{'train s':>9}{'peak MB':>9}{'+MB':>6}{'kNN acc':>9}{'probe F1':>9}"
    header += f"{'ARI':>7}{'NMI':>7}{'lblASW':>8}"
    if has_batch:
        header += f"{'bEntropy':>9}{'bASW':>7}"
    print(header + "  own metric")
    for family, r in results.items():
        if "error" in r:
            print(f"{family:<12} failed: {r['error']}")
            continue
        row = (
            f"{family:<12}{_fmt(r['seconds'], '.1f'):>9}{_fmt(r['peak_rss_mb'], '.0f'):>9}"
            f"{_fmt(r['rss_growth_mb'], '.0f'):>6}"
            f"{r['knn_accuracy']:>9.3f}{r['probe_macro_f1']:>9.3f}{r['leiden_ari']:>7.3f}{r['leiden_nmi']:>7.3f}"
            f"{r['label_asw']:>8.3f}"
        )
        if has_batch:
            row += f"{r['batch_entropy']:>9.3f}{r['batch_asw']:>7.3f}"
        own = "" if r["own_metric"] is None else f"  {r['own_metric']:.4g} ({r['own_metric_name']}, {r['epochs']} ep)"
        print(row + own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 epochs per model: a smoke run")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results_families.json)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    import platform

    import anndata as ad

    os.environ.setdefault("MPLBACKEND", "Agg")
    all_results = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for dataset in args.datasets.split(","):
            info = prepare(dataset, workdir / f"{dataset}.h5ad")
            obs = ad.read_h5ad(workdir / f"{dataset}.h5ad").obs
            labels = obs[info["labels_key"]].astype(str).to_numpy()
            batches = obs[info["batch_key"]].astype(str).to_numpy() if info["batch_key"] else None
            results = {}
            for family in args.families.split(","):
                r = run_one(family, dataset, info, args, workdir)
                if "error" not in r:
                    embedding = np.load(workdir / f"{dataset}_{family}.npy")
                    r.update(common_metrics(embedding, labels, batches, args.seed))
                results[family] = r
                print(f"  {dataset}/{family}: done", file=sys.stderr)
            print_table(dataset, info, results)
            all_results[dataset] = {"info": info, "results": results}
    output = Path(args.output) if args.output else REPO_ROOT / "benchmarks" / "results_families.json"
    output.write_text(json.dumps(all_results, indent=1, default=float))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
