"""Side-by-side benchmark of ``sclatent.model.VAE`` against scvi-tools' ``SCVI``.

For each dataset, one run: the same seeded 90/10 split of the non-empty cells for every method, the
same architecture and optimisation settings, and each method's training + evaluation in its own
fresh process (so peak RSS is per method). Reported per method:

* training wall time, seconds per epoch, cells per second, peak RSS;
* held-out marginal log-likelihood log p(x) of the test cells (importance sampling, same K);
* imputation: a second training on a corrupted copy of the training cells (10 % of the nonzero
  entries zeroed), median L1 error at the hidden entries;
* Leiden ARI / NMI of the latent space of all cells against the reference labels;

beside model-free references: an NB baseline held-out LL, a library x gene-frequency imputation
predictor, and scanpy PCA for clustering. See ``benchmarks/README.md`` for the protocol.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_vae.py                      # full run, all datasets
    PYTHONPATH=. python benchmarks/bench_vae.py --quick              # smoke run (minutes)
    PYTHONPATH=. python benchmarks/bench_vae.py --datasets mouse_brain --epochs 50
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = "/work/shared/data"

# Architecture and optimisation shared by both methods.
N_HIDDEN, N_LAYERS, N_LATENT = 128, 1, 10
GENE_LIKELIHOOD, DISPERSION = "zinb", "gene"
BATCH_SIZE = 128
TEST_FRACTION = 0.1
CORRUPTION_RATE = 0.1
# Minibatch size of the evaluation passes (marginal LL, expression, latent) for both methods.
EVAL_BATCH_SIZE = 128
# Cells per call of get_normalized_expression: scvi keeps all posterior samples of a call in memory.
EXPRESSION_CHUNK = 1024

# name -> how to load it, its reference labels and batch column, and its default number of epochs
# (scVI's heuristic min(400, 20000 / n_cells * 400) gives 400 for pbmc68k's 700 cells; for the
# 10k-cell and 5k-cell sets 100 epochs keeps a full run to well under an hour on 2 CPU threads).
DATASETS = {
    "pbmc68k": {"labels_key": "bulk_labels", "batch_key": None, "epochs": 400},
    "mouse_brain": {"labels_key": None, "batch_key": None, "epochs": 100},
    "synthetic": {"labels_key": "cell_type", "batch_key": "batch", "epochs": 100},
}
SYNTHETIC_ARGS = {"n_cells": 5000, "n_genes": 1000, "n_clusters": 5, "n_batches": 2, "seed": 0}
METHODS = ("sclatent", "scvi")
QUICK = {"epochs": 3, "n_mc_samples": 20, "imputation_samples": 5}

# Targets (checked at the end of a run).
SPEED_TARGET = 5.0  # sclatent epoch throughput >= 5x scvi's, on CPU, at mouse_brain
LL_TOLERANCE = 0.01  # sclatent held-out LL >= scvi's - 1 % of |scvi's|


# ======================================================================================== helpers


def _rss_mb() -> float:
    """Current resident set size of this process (MB), from /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB): ``VmHWM`` of ``/proc/self/status``.

    Not ``getrusage(...).ru_maxrss``: Linux keeps it across fork and exec, so a worker spawned by
    a parent holding the datasets would report the parent's peak when that is larger. ``VmHWM``
    belongs to the address space, which exec replaces.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux: best effort


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _git_state() -> dict[str, object]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def run_worker_process(script: str, spec_path: Path, threads: int) -> subprocess.CompletedProcess:
    """``python script --worker spec_path`` in a fresh process that imports this checkout, with
    ``threads`` BLAS / OpenMP threads; its output captured."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    command = [sys.executable, str(Path(script).resolve()), "--worker", str(spec_path)]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def start_worker(spec_path: str) -> dict:
    """A worker process's spec, read after the set-up every worker shares: BLAS / OpenMP and torch
    limited to ``spec["threads"]``, and anndata plus the method's library (scvi-tools for
    ``"scvi"``, else sclatent) imported before the worker takes its RSS baseline."""
    cfg = json.loads(Path(spec_path).read_text())
    _limit_threads(cfg["threads"])
    import torch

    torch.set_num_threads(cfg["threads"])
    import anndata  # noqa: F401

    if cfg["method"] == "scvi":
        import scvi  # noqa: F401
    else:
        import sclatent.model  # noqa: F401
    return cfg


def _limit_threads(threads: int) -> None:
    """Thread limits for BLAS / OpenMP (before torch is imported) and torch itself."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def _resolve_accelerator(accelerator: str) -> str:
    """``"cpu"`` or ``"cuda"``; ``"auto"`` picks CUDA when available."""
    if accelerator != "auto":
        return accelerator
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ======================================================================================== data


def load_dataset(name: str, data_dir: str | None):
    """The dataset's AnnData with counts in ``X`` and ``layers["counts"]``."""
    from sclatent import datasets

    if name == "pbmc68k":
        return datasets.pbmc68k_counts()
    if name == "mouse_brain":
        return datasets.mouse_brain_10k_chr1(data_dir=data_dir)
    if name == "synthetic":
        return datasets.synthetic(**SYNTHETIC_ARGS)
    raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")


def prepare(name: str, seed: int, workdir: Path, data_dir: str | None) -> dict:
    """Load, drop empty cells, split 90/10, corrupt the training cells; write everything to an npz.

    Every worker process reads the same npz, so all methods see exactly the same cells and counts.
    Returns what the parent needs: counts, labels, indices, corruption and a summary.
    """
    import scipy.sparse as sp

    from sclatent.metrics import corrupt_counts

    spec = DATASETS[name]
    adata = load_dataset(name, data_dir)
    counts = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X, dtype=np.float32)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    keep = np.flatnonzero(totals > 0)
    n_empty = int(adata.n_obs - keep.size)
    counts = counts[keep]
    obs = adata.obs.iloc[keep]
    n_cells = counts.shape[0]

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_cells)
    n_test = max(1, round(TEST_FRACTION * n_cells))
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])

    # Imputation: corrupt the training cells; cells left without counts cannot be trained on by
    # either method (zero library), so they and their hidden entries are dropped for everyone.
    corruption = corrupt_counts(counts[train_idx], rate=CORRUPTION_RATE, method="uniform", seed=seed)
    corr_totals = np.asarray(corruption.corrupted.sum(axis=1)).ravel()
    corr_keep = np.flatnonzero(corr_totals > 0)
    remap = np.full(len(train_idx), -1, dtype=np.int64)
    remap[corr_keep] = np.arange(corr_keep.size)
    hidden_ok = remap[corruption.rows] >= 0
    corrupted = corruption.corrupted[corr_keep]
    rows, cols, original = remap[corruption.rows[hidden_ok]], corruption.cols[hidden_ok], corruption.original[hidden_ok]

    batch_key = spec["batch_key"]
    if batch_key:
        categories = [str(c) for c in obs[batch_key].cat.categories]
        batch_codes = obs[batch_key].cat.codes.to_numpy().astype(np.int64)
    else:
        categories, batch_codes = [], np.zeros(0, dtype=np.int64)

    path = workdir / f"{name}.npz"
    np.savez(
        path,
        data=counts.data,
        indices=counts.indices,
        indptr=counts.indptr,
        shape=np.asarray(counts.shape),
        corr_data=corrupted.data,
        corr_indices=corrupted.indices,
        corr_indptr=corrupted.indptr,
        corr_shape=np.asarray(corrupted.shape),
        corr_cells=train_idx[corr_keep],
        hidden_rows=rows,
        hidden_cols=cols,
        train_idx=train_idx,
        test_idx=test_idx,
        batch_codes=batch_codes,
        obs_names=np.asarray(obs.index, dtype=str),
        var_names=np.asarray(adata.var_names, dtype=str),
    )
    labels_key = spec["labels_key"]
    labels = obs[labels_key].astype(str).to_numpy() if labels_key else None
    return {
        "path": path,
        "counts": counts,
        "labels": labels,
        "train_idx": train_idx,
        "test_idx": test_idx,
        "corrupted": corrupted,
        "hidden_rows": rows,
        "hidden_cols": cols,
        "hidden_original": original,
        "batch_categories": categories,
        "summary": {
            "n_cells_loaded": int(adata.n_obs),
            "n_empty_cells_dropped": n_empty,
            "n_cells": int(n_cells),
            "n_genes": int(counts.shape[1]),
            "n_train": int(train_idx.size),
            "n_test": int(test_idx.size),
            "nonzero_fraction": float(counts.nnz / (counts.shape[0] * counts.shape[1])),
            "median_library": float(np.median(totals[keep])),
            "batch_key": batch_key,
            "n_batches": len(categories) if batch_key else 1,
            "labels_key": labels_key,
            "n_hidden_entries": int(rows.size),
            "n_corrupted_cells_dropped_empty": int(len(train_idx) - corr_keep.size),
            "n_hidden_entries_dropped": int((~hidden_ok).sum()),
        },
    }


def _anndata_from_npz(arrays, which: str, batch_categories: list[str]):
    """``which="all"``: all non-empty cells; ``"corrupted"``: the corrupted training cells."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    prefix = "" if which == "all" else "corr_"
    matrix = sp.csr_matrix(
        (arrays[prefix + "data"], arrays[prefix + "indices"], arrays[prefix + "indptr"]),
        shape=tuple(arrays[prefix + "shape"]),
    )
    cells = np.arange(matrix.shape[0]) if which == "all" else arrays["corr_cells"]
    obs = pd.DataFrame(index=pd.Index(arrays["obs_names"][cells].astype(str)))
    if batch_categories:
        obs["batch"] = pd.Categorical.from_codes(arrays["batch_codes"][cells], categories=batch_categories)
    var = pd.DataFrame(index=pd.Index(arrays["var_names"].astype(str)))
    adata = ad.AnnData(X=matrix, obs=obs, var=var)
    adata.layers["counts"] = matrix.copy()
    return adata


# ======================================================================================== worker


def _train_sclatent(adata, batch_key, cfg) -> tuple[object, dict]:
    from sclatent.model import VAE

    VAE.setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = VAE(
        adata,
        n_latent=N_LATENT,
        n_hidden=N_HIDDEN,
        n_layers=N_LAYERS,
        dropout_rate=0.1,
        dispersion=DISPERSION,
        gene_likelihood=GENE_LIKELIHOOD,
        use_observed_library=True,
        encode_covariates=False,  # scvi-tools' default
        inject_covariates=True,  # scvi-tools' deeply_inject_covariates=True default
        seed=cfg["seed"],
    )
    start = time.perf_counter()
    model.train(
        max_epochs=cfg["epochs"],
        batch_size=BATCH_SIZE,
        lr=1e-3,  # scvi-tools' (sclatent's train() defaults to 4e-3 since issue 18)
        max_kl_weight=1.0,  # scvi-tools' ELBO (sclatent's train() defaults to 2)
        train_size=1.0,
        early_stopping=False,
        kl_warmup_epochs=cfg["kl_warmup_epochs"],
        seed=cfg["seed"],
        progress_bar=False,
        accelerator=cfg["accelerator"],
    )
    _sync(cfg["accelerator"])
    seconds = time.perf_counter() - start
    epoch_seconds = list(model.history.get("seconds", []))
    extra = {"final_train_elbo": float(model.history["train_elbo"][-1]) if model.history.get("train_elbo") else None}
    return model, {"train_seconds": seconds, "epoch_seconds": epoch_seconds, "epochs_run": len(epoch_seconds), **extra}


def _train_scvi(adata, batch_key, cfg) -> tuple[object, dict]:
    import logging

    import scvi
    import torch
    from lightning.pytorch import Callback

    for logger_name in ("lightning", "lightning.pytorch", "lightning_fabric", "scvi"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    scvi.settings.seed = cfg["seed"]
    torch.set_num_threads(cfg["threads"])  # scvi.settings.seed may not touch threads; set again

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            _sync(cfg["accelerator"])
            self.seconds.append(time.perf_counter() - self._start)

    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = scvi.model.SCVI(
        adata,
        n_hidden=N_HIDDEN,
        n_latent=N_LATENT,
        n_layers=N_LAYERS,
        dropout_rate=0.1,
        dispersion=DISPERSION,
        gene_likelihood=GENE_LIKELIHOOD,
        use_observed_lib_size=True,
        encode_covariates=False,
        deeply_inject_covariates=True,
    )
    timer = EpochTimer()
    # An explicit train_size keeps a last minibatch of 1-2 cells (scvi only warns), and BatchNorm
    # fails on a single cell; sclatent folds a 1-cell remainder away, so do the same here.
    datasplitter_kwargs = {"drop_last": True} if adata.n_obs % BATCH_SIZE == 1 else None
    start = time.perf_counter()
    model.train(
        max_epochs=cfg["epochs"],
        accelerator=cfg["accelerator"],
        devices=1,
        train_size=1.0,  # explicit 1.0: no validation cells (DataSplitter then keeps a tiny last batch)
        batch_size=BATCH_SIZE,
        early_stopping=False,
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
        plan_kwargs={"n_epochs_kl_warmup": cfg["kl_warmup_epochs"]},
        datasplitter_kwargs=datasplitter_kwargs,
        callbacks=[timer],
    )
    _sync(cfg["accelerator"])
    seconds = time.perf_counter() - start
    elbo = model.history.get("elbo_train") if model.history else None
    extra = {"final_train_elbo": float(-elbo.iloc[-1, 0]) if elbo is not None and len(elbo) else None}
    return model, {"train_seconds": seconds, "epoch_seconds": timer.seconds, "epochs_run": len(timer.seconds), **extra}


def _trained_cells(model) -> dict:
    """How many cells each library trained and validated on (checks that train_size=1.0 took)."""
    train = getattr(model, "train_indices", None)
    validation = getattr(model, "validation_indices", None)
    return {
        "n_cells_trained_on": None if train is None else len(train),
        "n_cells_validated_on": None if validation is None else len(validation),
    }


def _sync(accelerator: str) -> None:
    if accelerator == "cuda":
        import torch

        torch.cuda.synchronize()


def _expected_counts(method: str, model, n_cells: int, n_samples: int) -> np.ndarray:
    """Decoder means at each cell's own library (px_rate / mu), averaged over posterior draws."""
    out = []
    for start in range(0, n_cells, EXPRESSION_CHUNK):
        idx = np.arange(start, min(n_cells, start + EXPRESSION_CHUNK))
        if method == "sclatent":
            values = model.get_normalized_expression(
                indices=idx, library_size="latent", n_samples=n_samples, return_numpy=True, batch_size=EVAL_BATCH_SIZE
            )
        else:
            values = model.get_normalized_expression(
                indices=idx,
                library_size="latent",
                n_samples=n_samples,
                return_mean=True,
                return_numpy=True,
                batch_size=EVAL_BATCH_SIZE,
            )
        out.append(np.asarray(values, dtype=np.float32))
    return np.concatenate(out)


def run_worker(spec_path: str) -> None:
    """One method, one task, in this (fresh) process; writes a JSON result and npy arrays."""
    cfg = start_worker(spec_path)
    import torch

    arrays = dict(np.load(cfg["npz"], allow_pickle=False))
    batch_key = "batch" if cfg["batch_categories"] else None
    out_dir = Path(cfg["out_dir"])
    method, task = cfg["method"], cfg["task"]
    train = _train_sclatent if method == "sclatent" else _train_scvi
    result: dict = {"method": method, "task": task, "torch_threads": torch.get_num_threads()}

    if task == "heldout":
        adata_all = _anndata_from_npz(arrays, "all", cfg["batch_categories"])
        adata_train = adata_all[arrays["train_idx"]].copy()
        adata_test = adata_all[arrays["test_idx"]].copy()
        result["rss_before_model_mb"] = _rss_mb()
        model, timing = train(adata_train, batch_key, cfg)
        result.update(timing)
        result.update(_trained_cells(model))
        result["peak_rss_after_training_mb"] = _peak_rss_mb()
        start = time.perf_counter()
        # Per-cell values from both, averaged here. (scvi's return_mean=True averages per-minibatch
        # means, so a short last minibatch weighs as much as a full one.)
        per_cell = model.get_marginal_ll(
            adata_test, n_mc_samples=cfg["n_mc_samples"], batch_size=EVAL_BATCH_SIZE, return_mean=False
        )
        per_cell = np.asarray(per_cell, dtype=np.float64).ravel()
        _sync(cfg["accelerator"])
        result["marginal_ll_seconds"] = time.perf_counter() - start
        result["heldout_marginal_ll"] = float(per_cell.mean())
        result["heldout_marginal_ll_sem"] = float(per_cell.std(ddof=1) / math.sqrt(per_cell.size))
        result["n_test_cells_scored"] = int(per_cell.size)
        # what a mean of per-minibatch means (scvi's return_mean=True) would report, for reference
        chunks = [per_cell[i : i + EVAL_BATCH_SIZE] for i in range(0, per_cell.size, EVAL_BATCH_SIZE)]
        result["heldout_marginal_ll_mean_of_batch_means"] = float(np.mean([c.mean() for c in chunks]))
        latent = np.asarray(model.get_latent_representation(adata_all, batch_size=EVAL_BATCH_SIZE), dtype=np.float32)
        np.save(out_dir / f"{method}_latent.npy", latent)
    elif task == "imputation":
        adata_corr = _anndata_from_npz(arrays, "corrupted", cfg["batch_categories"])
        result["rss_before_model_mb"] = _rss_mb()
        model, timing = train(adata_corr, batch_key, cfg)
        result.update(timing)
        result.update(_trained_cells(model))
        result["peak_rss_after_training_mb"] = _peak_rss_mb()
        expected = _expected_counts(method, model, adata_corr.n_obs, cfg["imputation_samples"])
        values = expected[arrays["hidden_rows"], arrays["hidden_cols"]]
        np.save(out_dir / f"{method}_imputed.npy", values.astype(np.float64))
    else:
        raise ValueError(f"unknown task {task!r}")

    result["peak_rss_mb"] = _peak_rss_mb()
    result["device"] = str(model.device)
    (out_dir / f"{method}_{task}.json").write_text(json.dumps(result))


# ======================================================================================== parent


def run_method(method: str, task: str, prepared: dict, args, name: str, workdir: Path, epochs: int) -> dict:
    """Run one worker process and return its result dict (with ``error`` on failure)."""
    cfg = {
        "method": method,
        "task": task,
        "npz": str(prepared["path"]),
        "out_dir": str(workdir),
        "batch_categories": prepared["batch_categories"],
        "epochs": epochs,
        "kl_warmup_epochs": args.kl_warmup if args.kl_warmup is not None else epochs // 3,
        "n_mc_samples": args.n_mc_samples,
        "imputation_samples": args.imputation_samples,
        "threads": args.threads,
        "accelerator": args.accelerator_resolved,
        "seed": args.seed,
    }
    spec = workdir / f"{name}_{method}_{task}_spec.json"
    spec.write_text(json.dumps(cfg))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    out = workdir / f"{method}_{task}.json"
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-25:])
        print(f"  !! {method} {task} failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}", "stderr_tail": tail}
    if args.verbose and proc.stderr.strip():
        print(proc.stderr, flush=True)
    result = json.loads(out.read_text())
    out.unlink()
    result["process_seconds"] = wall
    n_cells = prepared["summary"]["n_train"] if task == "heldout" else prepared["corrupted"].shape[0]
    runs = result.get("epochs_run") or epochs
    result["seconds_per_epoch"] = result["train_seconds"] / runs
    result["median_epoch_seconds"] = float(np.median(result["epoch_seconds"])) if result["epoch_seconds"] else None
    result["cells_per_second"] = n_cells * runs / result["train_seconds"]
    result["n_train_cells"] = int(n_cells)
    return result


def pca_embedding(counts, seed: int) -> np.ndarray:
    """scanpy: normalize_total(1e4), log1p, 50 PCs."""
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(counts.copy())
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    n_comps = min(50, min(adata.shape) - 1)
    sc.pp.pca(adata, n_comps=n_comps, random_state=seed)
    return np.asarray(adata.obsm["X_pca"], dtype=np.float32)


def bench_dataset(name: str, args, root: Path) -> dict:
    from sclatent.metrics import leiden_scores, library_gene_mean_predictor, nb_baseline_log_likelihood

    workdir = root / name
    workdir.mkdir()
    epochs = args.epochs if args.epochs is not None else (QUICK["epochs"] if args.quick else DATASETS[name]["epochs"])
    t0 = time.perf_counter()
    prepared = prepare(name, args.seed, workdir, args.data_dir)
    summary = prepared["summary"]
    print(
        f"\n=== {name}: {summary['n_cells_loaded']} cells x {summary['n_genes']} genes; "
        f"dropped {summary['n_empty_cells_dropped']} cell(s) with zero counts; "
        f"{summary['n_train']} train / {summary['n_test']} test cells (seed {args.seed}); "
        f"{epochs} epochs, KL warm-up {args.kl_warmup if args.kl_warmup is not None else epochs // 3}",
        flush=True,
    )
    results: dict = {"dataset": summary, "epochs": epochs}
    for task in ("heldout", "imputation"):
        for method in METHODS:
            print(f"  running {method} ({task}) ...", flush=True)
            results.setdefault(method, {})[task] = run_method(method, task, prepared, args, name, workdir, epochs)

    # model-free references
    counts = prepared["counts"]
    results["nb_baseline_heldout_ll"] = nb_baseline_log_likelihood(counts, prepared["train_idx"], prepared["test_idx"])
    truth = prepared["hidden_original"]
    baseline = library_gene_mean_predictor(prepared["corrupted"], prepared["hidden_rows"], prepared["hidden_cols"])
    results["baseline_imputation_median_l1"] = float(np.median(np.abs(baseline - truth)))
    for method in METHODS:
        path = workdir / f"{method}_imputed.npy"
        if path.exists():
            results[method]["imputation"]["median_l1"] = float(np.median(np.abs(np.load(path) - truth)))

    labels = prepared["labels"]
    if labels is not None and not args.no_leiden:
        results["leiden"] = {"labels_key": summary["labels_key"]}
        for method in METHODS:
            path = workdir / f"{method}_latent.npy"
            if path.exists():
                results["leiden"][method] = leiden_scores(np.load(path), labels, seed=args.seed)
        results["leiden"]["pca"] = leiden_scores(pca_embedding(counts, args.seed), labels, seed=args.seed)
    results["bench_seconds"] = time.perf_counter() - t0
    print_table(name, results)
    return results


# ======================================================================================== report


def _get(results: dict, method: str, task: str, key: str):
    value = results.get(method, {}).get(task, {}).get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def print_table(name: str, r: dict) -> None:
    rows: list[tuple[str, str, str, str]] = []

    def speed_row(label: str, task: str, key: str, spec: str, faster_is_lower: bool) -> None:
        a, b = _get(r, "sclatent", task, key), _get(r, "scvi", task, key)
        ratio = None
        if a and b:
            ratio = b / a if faster_is_lower else a / b
        rows.append((label, _fmt(a, spec), _fmt(b, spec), f"{_fmt(ratio, '.2f')}x" if ratio else "-"))

    speed_row("train wall time (s)", "heldout", "train_seconds", ".1f", True)
    speed_row("s / epoch (wall / epochs)", "heldout", "seconds_per_epoch", ".3f", True)
    speed_row("median epoch (s)", "heldout", "median_epoch_seconds", ".3f", True)
    speed_row("cells / s", "heldout", "cells_per_second", ".0f", False)
    for label, key in (("peak RSS (MB)", "peak_rss_mb"), ("RSS before model (MB)", "rss_before_model_mb")):
        a, b = _get(r, "sclatent", "heldout", key), _get(r, "scvi", "heldout", key)
        rows.append((label, _fmt(a, ".0f"), _fmt(b, ".0f"), f"{a / b:.2f}x" if a and b else "-"))
    speed_row("marginal LL eval (s)", "heldout", "marginal_ll_seconds", ".1f", True)

    a, b = _get(r, "sclatent", "heldout", "heldout_marginal_ll"), _get(r, "scvi", "heldout", "heldout_marginal_ll")
    diff = f"{a - b:+.2f} nats ({100 * (a - b) / abs(b):+.2f}%)" if a is not None and b is not None else "-"
    rows.append(("held-out log p(x) (nats/cell)", _fmt(a, ".2f"), _fmt(b, ".2f"), diff))
    sa, sb = (
        _get(r, "sclatent", "heldout", "heldout_marginal_ll_sem"),
        _get(r, "scvi", "heldout", "heldout_marginal_ll_sem"),
    )
    rows.append(("  +- s.e.m. over test cells", _fmt(sa, ".2f"), _fmt(sb, ".2f"), ""))
    rows.append(("  NB baseline (no latent)", _fmt(r.get("nb_baseline_heldout_ll"), ".2f"), "", ""))

    a, b = _get(r, "sclatent", "imputation", "median_l1"), _get(r, "scvi", "imputation", "median_l1")
    diff = f"{a - b:+.4f}" if a is not None and b is not None else "-"
    rows.append(("imputation median L1", _fmt(a, ".4f"), _fmt(b, ".4f"), diff))
    rows.append(("  library x gene-mean baseline", _fmt(r.get("baseline_imputation_median_l1"), ".4f"), "", ""))
    speed_row("  imputation train s / epoch", "imputation", "seconds_per_epoch", ".3f", True)

    leiden = r.get("leiden")
    if leiden:
        for metric in ("ari", "nmi"):
            a = leiden.get("sclatent", {}).get(metric)
            b = leiden.get("scvi", {}).get(metric)
            diff = f"{a - b:+.3f}" if a is not None and b is not None else "-"
            rows.append((f"Leiden {metric.upper()} vs {leiden['labels_key']}", _fmt(a, ".3f"), _fmt(b, ".3f"), diff))
            rows.append((f"  scanpy PCA {metric.upper()}", _fmt(leiden.get("pca", {}).get(metric), ".3f"), "", ""))
    else:
        rows.append(("Leiden ARI / NMI", "no labels", "", ""))

    widths = [max(len(row[i]) for row in [("", "sclatent", "scvi-tools", "ratio / diff"), *rows]) for i in range(4)]
    header = ("", "sclatent", "scvi-tools", "ratio / diff")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(f"\n{name} ({r['dataset']['n_train']} train / {r['dataset']['n_test']} test cells, {r['epochs']} epochs)")
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("ratio: speed = scvi time / sclatent time (>1: sclatent faster); RSS = sclatent / scvi", flush=True)


def check_targets(all_results: dict, accelerator: str) -> dict:
    targets: dict = {}
    mb = all_results.get("mouse_brain")
    if mb and accelerator == "cpu":
        a, b = _get(mb, "sclatent", "heldout", "seconds_per_epoch"), _get(mb, "scvi", "heldout", "seconds_per_epoch")
        ratio = b / a if a and b else None
        targets["speed_mouse_brain_cpu"] = {
            "target": f"sclatent epochs/s >= {SPEED_TARGET:g}x scvi's (CPU, mouse_brain 10k x 1000)",
            "ratio": ratio,
            "holds": bool(ratio is not None and ratio >= SPEED_TARGET),
        }
    elif mb:
        targets["speed_mouse_brain_cpu"] = {"target": "CPU only", "holds": None, "note": f"ran on {accelerator}"}
    for name, r in all_results.items():
        a, b = _get(r, "sclatent", "heldout", "heldout_marginal_ll"), _get(r, "scvi", "heldout", "heldout_marginal_ll")
        if a is not None and b is not None:
            targets[f"heldout_ll_{name}"] = {
                "target": "sclatent held-out LL >= scvi's - 1% of |scvi's|",
                "sclatent": a,
                "scvi": b,
                "threshold": b - LL_TOLERANCE * abs(b),
                "holds": bool(a >= b - LL_TOLERANCE * abs(b)),
            }
        a, b = _get(r, "sclatent", "imputation", "median_l1"), _get(r, "scvi", "imputation", "median_l1")
        if a is not None and b is not None:
            targets[f"imputation_{name}"] = {
                "target": "sclatent imputation median L1 <= scvi's",
                "sclatent": a,
                "scvi": b,
                "holds": bool(a <= b),
            }
    print("\nTargets")
    for key, t in targets.items():
        verdict = {True: "HOLDS", False: "FAILS", None: "n/a"}[t["holds"]]
        detail = ""
        if "ratio" in t:
            detail = f"ratio {_fmt(t['ratio'], '.2f')}x"
        elif "threshold" in t:
            detail = f"{t['sclatent']:.2f} vs {t['scvi']:.2f} (threshold {t['threshold']:.2f})"
        elif "sclatent" in t:
            detail = f"{t['sclatent']:.4f} vs {t['scvi']:.4f}"
        print(f"  {verdict:5s}  {key}: {t['target']}; {detail}")
    return targets


def environment(args) -> dict:
    import torch

    env = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "accelerator": args.accelerator_resolved,
        "torch": torch.__version__,
        "scvi-tools": _version("scvi-tools"),
        "lightning": _version("lightning"),
        "scanpy": _version("scanpy"),
        "anndata": _version("anndata"),
        "numpy": np.__version__,
        "sclatent": getattr(__import__("sclatent"), "__version__", None),
        "git": _git_state(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if args.accelerator_resolved == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def warn_if_busy(env: dict) -> None:
    """Say so when other processes were running at the start: the timings would not be representative."""
    load = env["load_average_at_start"]
    if load and load[0] > 0.5:
        print(
            f"warning: load average {load[0]:.1f} on {os.cpu_count()} core(s): other processes are running, "
            "so the timings of this run are not representative",
            flush=True,
        )


def default_out(args) -> Path:
    if args.accelerator_resolved == "cuda":
        import torch

        machine = "cuda-" + _slug(torch.cuda.get_device_name(0))
    else:
        machine = f"cpu-{_slug(_cpu_model())}-{args.threads}t"
    return REPO_ROOT / "benchmarks" / f"results_{machine}{'_quick' if args.quick else ''}.json"


def parse_args(argv=None) -> argparse.Namespace:
    epochs_doc = ", ".join(f"{k}: {v['epochs']}" for k, v in DATASETS.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of %(default)s")
    p.add_argument(
        "--epochs", type=int, default=None, help=f"epochs for every dataset (default per dataset: {epochs_doc})"
    )
    p.add_argument(
        "--kl-warmup", type=int, default=None, help="KL warm-up epochs for both methods (default epochs // 3)"
    )
    p.add_argument("--n-mc-samples", type=int, default=None, help="importance samples for log p(x), both (default 200)")
    p.add_argument(
        "--imputation-samples",
        type=int,
        default=None,
        help="posterior draws averaged for the expected counts, both methods (default 25)",
    )
    p.add_argument("--accelerator", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch / BLAS threads per method process (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the corruption and both models")
    p.add_argument("--data-dir", default=os.environ.get("SCLATENT_DATA_DIR") or DEFAULT_DATA_DIR)
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results_<machine>.json)")
    p.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK['epochs']} epochs, {QUICK['n_mc_samples']} samples"
    )
    p.add_argument("--no-leiden", action="store_true", help="skip the clustering scores")
    p.add_argument("--verbose", action="store_true", help="show the worker processes' stderr")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n_mc_samples is None:
        args.n_mc_samples = QUICK["n_mc_samples"] if args.quick else 200
    if args.imputation_samples is None:
        args.imputation_samples = QUICK["imputation_samples"] if args.quick else 25
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    _limit_threads(args.threads)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    args.accelerator_resolved = _resolve_accelerator(args.accelerator)
    os.environ.setdefault("SCLATENT_DATA_DIR", args.data_dir)
    out = Path(args.out) if args.out else default_out(args)
    env = environment(args)
    print(
        f"sclatent {env['sclatent']} vs scvi-tools {env['scvi-tools']} | torch {env['torch']} | {env['cpu_model']} | "
        f"{args.threads} thread(s) | {args.accelerator_resolved} | {args.n_mc_samples} importance samples",
        flush=True,
    )
    warn_if_busy(env)
    start = time.perf_counter()
    all_results: dict = {}
    with tempfile.TemporaryDirectory(prefix="sclatent_bench_") as tmp:
        for name in names:
            all_results[name] = bench_dataset(name, args, Path(tmp))
    targets = check_targets(all_results, args.accelerator_resolved)
    total = time.perf_counter() - start
    settings = {
        "n_hidden": N_HIDDEN,
        "n_layers": N_LAYERS,
        "n_latent": N_LATENT,
        "gene_likelihood": GENE_LIKELIHOOD,
        "dispersion": DISPERSION,
        "library": "observed",
        "encode_covariates": False,
        "inject_covariates_all_layers": True,
        "dropout_rate": 0.1,
        "batch_size": BATCH_SIZE,
        "optimizer": "Adam lr 1e-3, weight_decay 1e-6, eps 0.01 (both libraries' defaults)",
        "kl_warmup_epochs": args.kl_warmup if args.kl_warmup is not None else "epochs // 3",
        "early_stopping": False,
        "test_fraction": TEST_FRACTION,
        "n_mc_samples": args.n_mc_samples,
        "corruption": {"rate": CORRUPTION_RATE, "method": "uniform"},
        "imputation_posterior_samples": args.imputation_samples,
        "seed": args.seed,
        "quick": args.quick,
        "synthetic_args": SYNTHETIC_ARGS,
    }
    report = {
        "environment": env,
        "settings": settings,
        "results": all_results,
        "targets": targets,
        "total_seconds": total,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json_default))
    print(f"\nTotal {total / 60:.1f} min; wrote {out}")
    failed = any(
        "error" in r.get(m, {}).get(t, {}) for r in all_results.values() for m in METHODS for t in r.get(m, {})
    )
    return 1 if failed else 0


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
