"""Imputation benchmark: ``sclatent.model.DenoisingAE`` against the VAEs and model-free baselines.

For each dataset and each way of hiding 10 % of the entries (``sclatent.metrics.corrupt_counts``):

* ``uniform``: 10 % of the nonzero counts set to zero (the scVI paper's protocol, its "uniform
  zero-inflation");
* ``binomial``: 10 % of the nonzero counts thinned to Binomial(x, 0.2) (the paper's "binomial data
  corruption");
* ``entries`` (added here): 10 % of all entries hidden, zeros included (the hidden true zeros are
  scored too, so over-prediction at zeros counts);

every method is fitted on the same corrupted matrix (all non-empty cells; cells emptied by the
corruption are dropped, with their hidden entries, for everyone) and scored by the median L1 error
between its expected counts and the true counts at the hidden entries. Methods:

* ``dae``: ``sclatent.model.DenoisingAE`` with its defaults (DCA's architecture: 64-32-64, ZINB,
  masking input noise 0.1; 10 % of the cells held out, early stopping (patience 15, best epoch
  restored) on the likelihood of 10 % of their nonzero counts hidden from the input, at most the
  dataset's epochs), expected counts ``l * rho`` at each cell's own library;
* ``dae_fixed``: the same model trained for the dataset's full epochs on all cells (no early
  stopping), to show what early stopping does to this metric;
* ``vae``: ``sclatent.model.VAE`` with scVI's architecture (as in ``bench_vae.py``: fixed epochs);
* ``vae_es``: the same VAE with the DAE's early stopping (10 % held out, patience 15);
* ``scvi``: scvi-tools' ``SCVI``, same settings: decoder means at the observed library averaged over
  posterior draws;
* ``knn``: kNN smoothing (library x the mean normalised profile of the cell and its 15 neighbours in
  PCA space), ``diffusion``: MAGIC-like diffusion (3 steps of a Markov matrix on the same graph),
  ``lib_x_gene_mean``: library x the gene's share of all counts (no model).

The model methods each train in a fresh process (so peak RSS is per method) and record wall time,
seconds per epoch and peak RSS. The latent spaces of the ``uniform`` runs are also clustered
(Leiden ARI / NMI against the reference labels, where the dataset has them), beside scanpy PCA of
the same corrupted matrix.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_impute.py                      # full run
    PYTHONPATH=. python benchmarks/bench_impute.py --quick              # smoke run (3 epochs)
    PYTHONPATH=. python benchmarks/bench_impute.py --datasets pbmc68k --methods dae,scvi,knn
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

from bench_vae import (
    BATCH_SIZE,
    DATASETS,
    DEFAULT_DATA_DIR,
    DISPERSION,
    EVAL_BATCH_SIZE,
    GENE_LIKELIHOOD,
    N_HIDDEN,
    N_LATENT,
    N_LAYERS,
    REPO_ROOT,
    SYNTHETIC_ARGS,
    _cpu_model,
    _expected_counts,
    _fmt,
    _json_default,
    _limit_threads,
    _peak_rss_mb,
    _resolve_accelerator,
    _rss_mb,
    _slug,
    _sync,
    _train_sclatent,
    _train_scvi,
    _trained_cells,
    environment,
    load_dataset,
    pca_embedding,
    start_worker,
    warn_if_busy,
)

CORRUPTIONS = ("uniform", "entries", "binomial")
CORRUPTION_RATE = 0.1
MODEL_METHODS = ("dae", "dae_fixed", "vae", "vae_es", "scvi")
EARLY_STOPPING = {"train_size": 0.9, "early_stopping": True, "patience": 15}
BASELINE_METHODS = ("knn", "diffusion", "lib_x_gene_mean")
METHODS = (*MODEL_METHODS, *BASELINE_METHODS)
N_NEIGHBORS, DIFFUSION_T = 15, 3
QUICK = {"epochs": 3, "imputation_samples": 5}
# The targets, checked on the real datasets for the scVI protocol.
TARGET_DATASETS = ("pbmc68k", "mouse_brain")
TIME_RATIO_TARGET = 1.0  # dae train seconds / scvi train seconds below this ("a fraction of scvi's")


# ======================================================================================== data


def prepare(name: str, seed: int, workdir: Path, data_dir: str | None, corruptions: list[str]) -> dict:
    """Load, drop empty cells, corrupt each way; one npz per corruption for the worker processes."""
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
    labels_key, batch_key = spec["labels_key"], spec["batch_key"]
    labels = obs[labels_key].astype(str).to_numpy() if labels_key else None
    if batch_key:
        categories = [str(c) for c in obs[batch_key].cat.categories]
        batch_codes = obs[batch_key].cat.codes.to_numpy().astype(np.int64)
    else:
        categories, batch_codes = [], np.zeros(counts.shape[0], dtype=np.int64)

    out: dict = {
        "counts": counts,
        "labels": labels,
        "batch_categories": categories,
        "corruptions": {},
        "summary": {
            "n_cells_loaded": int(adata.n_obs),
            "n_empty_cells_dropped": n_empty,
            "n_cells": int(counts.shape[0]),
            "n_genes": int(counts.shape[1]),
            "nonzero_fraction": float(counts.nnz / (counts.shape[0] * counts.shape[1])),
            "median_library": float(np.median(totals[keep])),
            "batch_key": batch_key,
            "n_batches": len(categories) if batch_key else 1,
            "labels_key": labels_key,
            "corruptions": {},
        },
    }
    for method in corruptions:
        c = corrupt_counts(counts, rate=CORRUPTION_RATE, method=method, seed=seed)
        # cells left without counts cannot be trained on (zero library): dropped for every method
        corr_totals = np.asarray(c.corrupted.sum(axis=1)).ravel()
        cells = np.flatnonzero(corr_totals > 0)
        remap = np.full(counts.shape[0], -1, dtype=np.int64)
        remap[cells] = np.arange(cells.size)
        ok = remap[c.rows] >= 0
        corrupted = c.corrupted[cells]
        rows, cols, original = remap[c.rows[ok]], c.cols[ok], c.original[ok].astype(np.float64)
        path = workdir / f"{name}_{method}.npz"
        np.savez(
            path,
            data=corrupted.data,
            indices=corrupted.indices,
            indptr=corrupted.indptr,
            shape=np.asarray(corrupted.shape),
            hidden_rows=rows,
            hidden_cols=cols,
            batch_codes=batch_codes[cells],
            obs_names=np.asarray(obs.index[cells], dtype=str),
            var_names=np.asarray(adata.var_names, dtype=str),
        )
        out["corruptions"][method] = {
            "path": path,
            "corrupted": corrupted,
            "cells": cells,
            "rows": rows,
            "cols": cols,
            "original": original,
        }
        out["summary"]["corruptions"][method] = {
            "n_hidden_entries": int(rows.size),
            "hidden_zero_fraction": float((original == 0).mean()) if original.size else None,
            "n_cells": int(cells.size),
            "n_cells_dropped_empty": int(counts.shape[0] - cells.size),
            "n_hidden_entries_dropped": int((~ok).sum()),
        }
    return out


def _anndata_from_npz(arrays, batch_categories: list[str]):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    matrix = sp.csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=tuple(arrays["shape"]))
    obs = pd.DataFrame(index=pd.Index(arrays["obs_names"].astype(str)))
    if batch_categories:
        obs["batch"] = pd.Categorical.from_codes(arrays["batch_codes"], categories=batch_categories)
    var = pd.DataFrame(index=pd.Index(arrays["var_names"].astype(str)))
    adata = ad.AnnData(X=matrix, obs=obs, var=var)
    adata.layers["counts"] = matrix.copy()
    return adata


# ======================================================================================== worker


def _train_dae(adata, batch_key, cfg) -> tuple[object, dict]:
    from sclatent.model import DenoisingAE

    DenoisingAE.setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = DenoisingAE(adata, seed=cfg["seed"])  # the defaults: 32 latent, 64 hidden, ZINB, masking noise 0.1
    stopping = EARLY_STOPPING if cfg["method"] == "dae" else {"train_size": 1.0, "early_stopping": False}
    timing = _timed_training(model, cfg, **stopping)
    rec = model.history.get("train_reconstruction")
    return model, {**timing, "final_train_reconstruction": float(rec[-1]) if rec else None}


def _timed_training(model, cfg, **train_kwargs) -> dict:
    """``model.train`` with the benchmark's shared settings; wall time and per-epoch seconds."""
    start = time.perf_counter()
    model.train(
        max_epochs=cfg["epochs"],
        batch_size=BATCH_SIZE,
        lr=1e-3,  # scvi-tools' (sclatent's train() defaults to 4e-3 since issue 18)
        max_kl_weight=1.0,  # scvi-tools' ELBO (sclatent's train() defaults to 2)
        seed=cfg["seed"],
        progress_bar=False,
        accelerator=cfg["accelerator"],
        **train_kwargs,
    )
    _sync(cfg["accelerator"])
    epoch_seconds = list(model.history.get("seconds", []))
    return {
        "train_seconds": time.perf_counter() - start,
        "epoch_seconds": epoch_seconds,
        "epochs_run": len(epoch_seconds),
    }


def _train_vae_early_stopping(adata, batch_key, cfg) -> tuple[object, dict]:
    """sclatent's VAE (scVI's architecture) with the DAE's early stopping."""
    from sclatent.model import VAE

    VAE.setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = VAE(adata, n_latent=10, n_hidden=128, n_layers=1, encode_covariates=False, seed=cfg["seed"])
    return model, _timed_training(
        model, cfg, kl_warmup_epochs=cfg["kl_warmup_epochs"], restore_best=False, **EARLY_STOPPING
    )


def _dae_expected_counts(model, n_cells: int) -> np.ndarray:
    out = []
    for start in range(0, n_cells, 4096):
        idx = np.arange(start, min(n_cells, start + 4096))
        out.append(model.impute(layer_out=None, return_matrix=True, indices=idx, batch_size=1024))
    return np.concatenate(out)


def run_worker(spec_path: str) -> None:
    """One model on one corrupted matrix, in this (fresh) process; writes a JSON result and npy arrays."""
    cfg = start_worker(spec_path)
    import torch

    arrays = dict(np.load(cfg["npz"], allow_pickle=False))
    batch_key = "batch" if cfg["batch_categories"] else None
    out_dir, method, tag = Path(cfg["out_dir"]), cfg["method"], cfg["tag"]
    result: dict = {"method": method, "corruption": cfg["corruption"], "torch_threads": torch.get_num_threads()}

    adata = _anndata_from_npz(arrays, cfg["batch_categories"])
    result["rss_before_model_mb"] = _rss_mb()
    train = {
        "dae": _train_dae,
        "dae_fixed": _train_dae,
        "vae": _train_sclatent,
        "vae_es": _train_vae_early_stopping,
        "scvi": _train_scvi,
    }[method]
    model, timing = train(adata, batch_key, cfg)
    result.update(timing)
    result.update(_trained_cells(model))
    result["peak_rss_after_training_mb"] = _peak_rss_mb()

    start = time.perf_counter()
    if method.startswith("dae"):
        expected = _dae_expected_counts(model, adata.n_obs)
    else:
        expected = _expected_counts("scvi" if method == "scvi" else "sclatent", model, adata.n_obs, cfg["samples"])
    result["impute_seconds"] = time.perf_counter() - start
    values = expected[arrays["hidden_rows"], arrays["hidden_cols"]]
    np.save(out_dir / f"{tag}_imputed.npy", values.astype(np.float64))
    del expected
    if cfg["save_latent"]:
        latent = model.get_latent_representation(adata, batch_size=EVAL_BATCH_SIZE)
        np.save(out_dir / f"{tag}_latent.npy", np.asarray(latent, dtype=np.float32))

    result["peak_rss_mb"] = _peak_rss_mb()
    result["device"] = str(model.device)
    (out_dir / f"{tag}.json").write_text(json.dumps(result))


# ======================================================================================== parent


def run_model(method: str, corruption: str, prepared: dict, args, name: str, workdir: Path, epochs: int) -> dict:
    """Run one worker process and return its result dict (with ``error`` on failure)."""
    tag = f"{name}_{corruption}_{method}"
    cfg = {
        "method": method,
        "corruption": corruption,
        "tag": tag,
        "npz": str(prepared["corruptions"][corruption]["path"]),
        "out_dir": str(workdir),
        "batch_categories": prepared["batch_categories"],
        "epochs": epochs,
        "kl_warmup_epochs": epochs // 3,  # VAE / scvi only (as bench_vae)
        "samples": args.imputation_samples,
        "threads": args.threads,
        "accelerator": args.accelerator_resolved,
        "seed": args.seed,
        "save_latent": corruption == "uniform" and prepared["labels"] is not None and not args.no_leiden,
    }
    spec = workdir / f"{tag}_spec.json"
    spec.write_text(json.dumps(cfg))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    out = workdir / f"{tag}.json"
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-25:])
        print(f"  !! {method} ({corruption}) failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}", "stderr_tail": tail}
    if args.verbose and proc.stderr.strip():
        print(proc.stderr, flush=True)
    result = json.loads(out.read_text())
    out.unlink()
    result["process_seconds"] = wall
    runs = result.get("epochs_run") or epochs
    result["seconds_per_epoch"] = result["train_seconds"] / runs
    result["median_epoch_seconds"] = float(np.median(result["epoch_seconds"])) if result["epoch_seconds"] else None
    imputed = workdir / f"{tag}_imputed.npy"
    if imputed.exists():
        result.update(_scores(np.load(imputed), prepared["corruptions"][corruption]["original"]))
        imputed.unlink()
    return result


def run_baseline(method: str, corruption: dict, seed: int) -> dict:
    from sclatent.metrics import diffusion_predictor, knn_smoothing_predictor, library_gene_mean_predictor

    matrix, rows, cols = corruption["corrupted"], corruption["rows"], corruption["cols"]
    start = time.perf_counter()
    if method == "knn":
        values = knn_smoothing_predictor(matrix, rows, cols, n_neighbors=N_NEIGHBORS, seed=seed)
    elif method == "diffusion":
        values = diffusion_predictor(matrix, rows, cols, n_neighbors=N_NEIGHBORS, t=DIFFUSION_T, seed=seed)
    else:
        values = library_gene_mean_predictor(matrix, rows, cols)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **_scores(np.asarray(values, dtype=np.float64), corruption["original"])}


def _scores(values: np.ndarray, original: np.ndarray) -> dict:
    """Median L1 at the hidden entries, and separately at the hidden nonzeros / zeros (entries)."""
    error = np.abs(values - original)
    scores = {"median_l1": float(np.median(error)), "mean_l1": float(error.mean())}
    nonzero = original > 0
    if not nonzero.all():
        scores["median_l1_hidden_nonzero"] = float(np.median(error[nonzero])) if nonzero.any() else None
        scores["median_l1_hidden_zero"] = float(np.median(error[~nonzero]))
    return scores


def bench_dataset(name: str, args, root: Path) -> dict:
    from sclatent.metrics import leiden_scores

    workdir = root / name
    workdir.mkdir()
    epochs = args.epochs if args.epochs is not None else (QUICK["epochs"] if args.quick else DATASETS[name]["epochs"])
    t0 = time.perf_counter()
    prepared = prepare(name, args.seed, workdir, args.data_dir, args.corruptions)
    summary = prepared["summary"]
    print(
        f"\n=== {name}: {summary['n_cells']} non-empty cells x {summary['n_genes']} genes "
        f"(dropped {summary['n_empty_cells_dropped']} empty); {epochs} epochs; hidden entries: "
        + ", ".join(f"{k} {v['n_hidden_entries']}" for k, v in summary["corruptions"].items()),
        flush=True,
    )
    results: dict = {"dataset": summary, "epochs": epochs, "methods": {}}
    for corruption in args.corruptions:
        for method in args.methods:
            print(f"  {corruption:8s} {method} ...", flush=True)
            if method in MODEL_METHODS:
                r = run_model(method, corruption, prepared, args, name, workdir, epochs)
            else:
                r = run_baseline(method, prepared["corruptions"][corruption], args.seed)
            results["methods"].setdefault(method, {})[corruption] = r

    labels = prepared["labels"]
    if labels is not None and not args.no_leiden and "uniform" in args.corruptions:
        uniform = prepared["corruptions"]["uniform"]
        cell_labels = labels[uniform["cells"]]
        results["leiden"] = {"labels_key": summary["labels_key"], "on": "uniform-corrupted cells"}
        for method in args.methods:
            path = workdir / f"{name}_uniform_{method}_latent.npy"
            if path.exists():
                results["leiden"][method] = leiden_scores(np.load(path), cell_labels, seed=args.seed)
        embedding = pca_embedding(uniform["corrupted"], args.seed)
        results["leiden"]["pca"] = leiden_scores(embedding, cell_labels, seed=args.seed)
    results["bench_seconds"] = time.perf_counter() - t0
    print_table(name, results, args)
    return results


# ======================================================================================== report


def _num(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _median_over_runs(runs: dict, key: str):
    values = [_num(r.get(key)) for r in runs.values()]
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def print_table(name: str, r: dict, args) -> None:
    corruptions = [c for c in CORRUPTIONS if c in args.corruptions]
    leiden = r.get("leiden") or {}
    header = ["method", *(f"L1 {c}" for c in corruptions), "train s", "s/epoch", "peak RSS MB", "ARI", "NMI"]
    rows = []
    for method in [*args.methods, "pca"]:
        if method == "pca":
            if "pca" not in leiden:
                continue
            runs = {}
        else:
            runs = r["methods"].get(method, {})
        cells = [method if method != "pca" else "scanpy PCA (clustering only)"]
        for c in corruptions:
            run = runs.get(c, {})
            cells.append("error" if "error" in run else _fmt(_num(run.get("median_l1")), ".4f") if run else "")
        if method in MODEL_METHODS:
            cells += [
                _fmt(_median_over_runs(runs, "train_seconds"), ".1f"),
                _fmt(_median_over_runs(runs, "seconds_per_epoch"), ".3f"),
                _fmt(_median_over_runs(runs, "peak_rss_mb"), ".0f"),
            ]
        elif method in BASELINE_METHODS:
            cells += [_fmt(_median_over_runs(runs, "seconds"), ".1f") + "*", "", ""]
        else:
            cells += ["", "", ""]
        scores = leiden.get(method, {})
        cells += [_fmt(_num(scores.get("ari")), ".3f"), _fmt(_num(scores.get("nmi")), ".3f")]
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt_row(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    d = r["dataset"]
    print(f"\n{name} ({d['n_cells']} cells x {d['n_genes']} genes, {r['epochs']} epochs, rate {CORRUPTION_RATE})")
    line = fmt_row(header)
    print(line)
    print("-" * len(line))
    for row in rows:
        print(fmt_row(row))
    print(
        "median L1 at the hidden entries (lower is better); train s, s/epoch, peak RSS: median over the corruption "
        "runs; * baselines: seconds to predict; ARI / NMI: Leiden on the latent of the uniform run"
        + ("" if leiden else " (no labels: skipped)")
    )
    ratio = _dae_vs_scvi(r)
    if ratio:
        diffs = ", ".join(f"{c} {_fmt(ratio['l1_diff'].get(c), '+.4f')}" for c in corruptions)
        time_ratio = ratio["train_time_ratio"]
        speedup = f" (scvi / dae {1 / time_ratio:.1f}x)" if time_ratio else ""
        print(
            f"dae vs scvi: L1 diff (dae - scvi) {diffs}; train time ratio dae / scvi {_fmt(time_ratio, '.3f')}{speedup}"
        )
    print(flush=True)


def _dae_vs_scvi(r: dict) -> dict | None:
    dae, scvi = r["methods"].get("dae"), r["methods"].get("scvi")
    if not dae or not scvi:
        return None
    l1_diff = {}
    for c in CORRUPTIONS:
        a, b = _num(dae.get(c, {}).get("median_l1")), _num(scvi.get(c, {}).get("median_l1"))
        l1_diff[c] = a - b if a is not None and b is not None else None
    a, b = _median_over_runs(dae, "train_seconds"), _median_over_runs(scvi, "train_seconds")
    return {"l1_diff": l1_diff, "train_time_ratio": a / b if a and b else None}


def check_targets(all_results: dict) -> dict:
    targets: dict = {}
    for name in TARGET_DATASETS:
        r = all_results.get(name)
        if not r:
            continue
        dae, scvi = r["methods"].get("dae", {}), r["methods"].get("scvi", {})
        a, b = _num(dae.get("uniform", {}).get("median_l1")), _num(scvi.get("uniform", {}).get("median_l1"))
        if a is not None and b is not None:
            targets[f"imputation_{name}"] = {
                "target": "DAE median L1 <= scvi's (uniform: the scVI protocol)",
                "dae": a,
                "scvi": b,
                "holds": bool(a <= b),
            }
        ratio = (_dae_vs_scvi(r) or {}).get("train_time_ratio")
        if ratio is not None:
            targets[f"train_time_{name}"] = {
                "target": f"DAE train time / scvi's < {TIME_RATIO_TARGET:g}",
                "ratio": ratio,
                "holds": bool(ratio < TIME_RATIO_TARGET),
            }
    print("Targets")
    if not targets:
        print("  none checked (they need dae and scvi on pbmc68k or mouse_brain)")
    for key, t in targets.items():
        verdict = {True: "HOLDS", False: "FAILS"}[t["holds"]]
        detail = f"ratio {t['ratio']:.3f}" if "ratio" in t else f"{t['dae']:.4f} vs {t['scvi']:.4f}"
        print(f"  {verdict:5s}  {key}: {t['target']}; {detail}")
    return targets


def default_out(args) -> Path:
    if args.accelerator_resolved == "cuda":
        import torch

        machine = "cuda-" + _slug(torch.cuda.get_device_name(0))
    else:
        machine = f"cpu-{_slug(_cpu_model())}-{args.threads}t"
    return REPO_ROOT / "benchmarks" / f"results_impute_{machine}{'_quick' if args.quick else ''}.json"


def _csv(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    epochs_doc = ", ".join(f"{k}: {v['epochs']}" for k, v in DATASETS.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of %(default)s")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s")
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated subset of %(default)s")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs of every model (default {epochs_doc})")
    p.add_argument(
        "--imputation-samples",
        type=int,
        default=None,
        help="posterior draws averaged for the VAEs' expected counts (default 25, --quick 5)",
    )
    p.add_argument("--accelerator", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch / BLAS threads per process (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions, the models and the baselines")
    p.add_argument("--data-dir", default=os.environ.get("SCLATENT_DATA_DIR") or DEFAULT_DATA_DIR)
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results_impute_<machine>.json)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK['epochs']} epochs")
    p.add_argument("--no-leiden", action="store_true", help="skip the clustering scores")
    p.add_argument("--verbose", action="store_true", help="show the worker processes' stderr")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.imputation_samples is None:
        args.imputation_samples = QUICK["imputation_samples"] if args.quick else 25
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    _limit_threads(args.threads)
    names = _csv(args.datasets, tuple(DATASETS), "dataset(s)")
    args.methods = _csv(args.methods, METHODS, "method(s)")
    args.corruptions = _csv(args.corruptions, CORRUPTIONS, "corruption(s)")
    args.accelerator_resolved = _resolve_accelerator(args.accelerator)
    os.environ.setdefault("SCLATENT_DATA_DIR", args.data_dir)
    out = Path(args.out) if args.out else default_out(args)
    env = environment(args)
    print(
        f"sclatent {env['sclatent']} vs scvi-tools {env['scvi-tools']} | torch {env['torch']} | {env['cpu_model']} | "
        f"{args.threads} thread(s) | {args.accelerator_resolved} | methods {','.join(args.methods)}",
        flush=True,
    )
    warn_if_busy(env)
    start = time.perf_counter()
    all_results: dict = {}
    with tempfile.TemporaryDirectory(prefix="sclatent_bench_impute_") as tmp:
        for name in names:
            all_results[name] = bench_dataset(name, args, Path(tmp))
    targets = check_targets(all_results)
    total = time.perf_counter() - start
    settings = {
        "corruption_rate": CORRUPTION_RATE,
        "corruptions": args.corruptions,
        "methods": args.methods,
        "dae": "DenoisingAE defaults (n_latent 32, n_hidden 64, 1 layer, ZINB, masking noise 0.1, "
        "masked-count early stopping)",
        "vae_scvi": {
            "n_hidden": N_HIDDEN,
            "n_layers": N_LAYERS,
            "n_latent": N_LATENT,
            "gene_likelihood": GENE_LIKELIHOOD,
            "dispersion": DISPERSION,
            "kl_warmup_epochs": "epochs // 3",
            "imputation_posterior_samples": args.imputation_samples,
        },
        "batch_size": BATCH_SIZE,
        "train_size": 1.0,
        "early_stopping": False,
        "baselines": {"n_neighbors": N_NEIGHBORS, "diffusion_t": DIFFUSION_T, "pca_comps": 50},
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
    failed = any("error" in run for r in all_results.values() for m in r["methods"].values() for run in m.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
