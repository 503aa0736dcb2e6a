"""Time to a good model (issue 18, part 1): sclatent's default ``train()`` against scvi-tools' default.

A user calls ``model.train()`` with no arguments and judges what comes out. Per dataset, one seeded
split holds out 10 % of the cells, which neither library ever sees; each library then trains its
default model with its default training on the other 90 % (scvi-tools: ``SCVI(adata).train()``,
``min(400, 20000 / n * 400)`` epochs, no early stopping; sclatent: ``VAE(adata).train()``) and is
scored by the held-out log p(x): the per-cell mean of ``get_marginal_ll(n_mc_samples=1000,
return_mean=False)`` on the held-out cells (both libraries' importance-sampled estimate with the
encoder as proposal). Each (library, variant) runs in its own fresh process with 2 torch threads.

Target: sclatent's held-out log p(x) >= scvi-tools' and its training wall time <= 1/10 of
scvi-tools'; also the evaluation itself, ``get_marginal_ll(n_mc_samples=1000)``, >= 5x faster.
The reported training time is the whole ``train()`` call (early stopping included), so it bounds
the time to reach scvi-tools' value from above.

Datasets: the embedded PBMCs (700 x 765), pbmc3k (the 2,638 Seurat-labelled cells, 2,000
``seurat_v3`` HVGs), cellbench_5cl (the 571 singlets, 2,000 HVGs, plate as batch in both models) and
mouse_brain_10k_chr1 (9,999 non-empty cells x 1,000 genes).

``--variants`` adds sclatent runs with other ``train()`` arguments (JSON: name -> kwargs), the
study behind the defaults. ``--marginal-ll-only EPOCHS`` times the held-out evaluation alone, after
``EPOCHS`` epochs of training in each library (its cost does not depend on how trained the model
is); ``--marginal-ll-repeats N`` times that call N times in each process and reports the median.
Run from the repository root (about 40 min on 2 cores)::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/bench_time_to_quality.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vae import _peak_rss_mb, _rss_mb, _version, run_worker_process, start_worker

DATASETS = ("pbmc68k", "pbmc3k", "cellbench_5cl", "mouse_brain")
TEST_FRACTION = 0.1
N_HVG = 2000
N_MC_SAMPLES = 1000
TIME_TARGET = 10.0  # scvi-tools' training time / sclatent's
LL_SPEED_TARGET = 5.0  # scvi-tools' get_marginal_ll time / sclatent's


# ======================================================================================== data


def load(name: str, data_dir: str | None):
    """The dataset's cells (raw counts in ``layers["counts"]``) and its batch key."""
    import scanpy as sc

    from sclatent import datasets

    batch_key = None
    if name == "pbmc68k":
        adata = datasets.pbmc68k_counts()
    elif name == "pbmc3k":
        adata = datasets.pbmc3k(data_dir=data_dir)
        adata = adata[adata.obs["cell_type"].notna().to_numpy()].copy()
    elif name == "cellbench_5cl":
        adata = datasets.cellbench_5cl(data_dir=data_dir)
        adata = adata[(adata.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()].copy()
        batch_key = "batch"
    elif name == "mouse_brain":
        adata = datasets.mouse_brain_10k_chr1(data_dir=data_dir)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if adata.n_vars > N_HVG:
        adata.X = adata.layers["counts"].copy()
        sc.pp.highly_variable_genes(adata, n_top_genes=N_HVG, flavor="seurat_v3")
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    totals = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    return adata[totals > 0].copy(), batch_key


def prepare(name: str, seed: int, workdir: Path, data_dir: str | None) -> dict:
    """Write the training and held-out cells of one seeded split as h5ad files."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    adata, batch_key = load(name, data_dir)
    counts = sp.csr_matrix(adata.layers["counts"], dtype=np.float32)
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    if batch_key:
        obs[batch_key] = pd.Categorical(adata.obs[batch_key].astype(str))
    clean = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    clean.layers["counts"] = counts.copy()
    order = np.random.default_rng(seed).permutation(clean.n_obs)
    n_test = max(1, round(TEST_FRACTION * clean.n_obs))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    paths = {"train": workdir / f"{name}_train.h5ad", "test": workdir / f"{name}_test.h5ad"}
    clean[train].copy().write_h5ad(paths["train"])
    clean[test].copy().write_h5ad(paths["test"])
    return {
        "paths": {k: str(v) for k, v in paths.items()},
        "batch_key": batch_key,
        "summary": {"cells": int(clean.n_obs), "genes": int(clean.n_vars), "train": int(train.size),
                    "test": int(test.size), "batch_key": batch_key},
    }


# ======================================================================================== worker


class _Snapshots:
    """Keeps the module's parameters after every epoch of ``sclatent.train.fit`` (wrapping its
    ``_epoch``), and the seconds spent copying them, which are not training time."""

    def __init__(self) -> None:
        import sclatent.train as trainer

        self.trainer, self.original = trainer, trainer._epoch
        self.states: list[dict] = []
        self.copy_seconds = 0.0

        def epoch_and_snapshot(module, *args, **kwargs):
            record = self.original(module, *args, **kwargs)
            start = time.perf_counter()
            self.states.append({k: v.detach().clone() for k, v in module.state_dict().items()})
            self.copy_seconds += time.perf_counter() - start
            return record

        trainer._epoch = epoch_and_snapshot

    def close(self) -> None:
        self.trainer._epoch = self.original


def _time_to_reach(model, test, target: float, snapshots: _Snapshots, train_seconds: float, cfg) -> dict:
    """The first epoch whose parameters give a held-out log p(x) >= ``target`` and the training wall
    time up to its end (setup included, snapshot copies excluded). Epochs are screened with 100
    importance samples (an estimate biased low), and the first one within 2 nats of the target and
    those after it are scored with ``n_mc_samples`` until one reaches it."""
    epoch_seconds = np.asarray(model.history["seconds"], dtype=np.float64)
    setup = train_seconds - snapshots.copy_seconds - epoch_seconds.sum()
    final_state = {k: v.clone() for k, v in model.module.state_dict().items()}

    def heldout(epoch: int, n_samples: int) -> float:
        model.module.load_state_dict(snapshots.states[epoch])
        return float(np.mean(model.get_marginal_ll(test, n_mc_samples=n_samples, return_mean=False)))

    reached, screened = None, {}
    try:
        for epoch in range(len(snapshots.states)):
            screened[epoch + 1] = heldout(epoch, 100)
            if screened[epoch + 1] < target - 2.0:
                continue
            if heldout(epoch, cfg["n_mc_samples"]) >= target:
                reached = epoch
                break
    finally:
        model.module.load_state_dict(final_state)
    out = {"target_ll": target, "screened_ll_100_samples": screened, "setup_seconds": setup}
    if reached is not None:
        out["epoch_reached"] = reached + 1
        out["seconds_to_reach"] = float(setup + epoch_seconds[: reached + 1].sum())
    return out


def _train_sclatent(adata, batch_key, cfg):
    from sclatent.model import VAE

    VAE.setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = VAE(adata, seed=cfg["seed"])
    kwargs = {"seed": cfg["seed"], "progress_bar": False, "accelerator": cfg["accelerator"], **cfg["train_kwargs"]}
    snapshots = _Snapshots() if cfg.get("target_ll") is not None else None
    start = time.perf_counter()
    try:
        model.train(**kwargs)
    finally:
        if snapshots is not None:
            snapshots.close()
    seconds = time.perf_counter() - start
    if snapshots is not None:
        model.snapshots = snapshots
        seconds -= snapshots.copy_seconds
    history = model.history
    validation = history.get("validation_elbo", [])
    return model, {
        "train_seconds": seconds,
        "epochs_run": len(history["epoch"]),
        "best_epoch": int(np.nanargmax(validation)) + 1 if len(validation) else None,
        "architecture": {k: model.hyperparameters.get(k) for k in ("n_latent", "n_hidden", "n_layers",
                                                                    "gene_likelihood", "dispersion")},
    }


def _train_scvi(adata, batch_key, cfg):
    import logging

    import scvi
    import torch

    for logger_name in ("lightning", "lightning.pytorch", "lightning_fabric", "scvi"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    scvi.settings.seed = cfg["seed"]
    torch.set_num_threads(cfg["threads"])
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key=batch_key)
    model = scvi.model.SCVI(adata)
    start = time.perf_counter()
    epochs = {} if cfg.get("max_epochs") is None else {"max_epochs": cfg["max_epochs"]}
    model.train(accelerator=cfg["accelerator"], devices=1, enable_progress_bar=False, **epochs)
    seconds = time.perf_counter() - start
    elbo = model.history.get("elbo_train")
    module = model.module
    return model, {
        "train_seconds": seconds,
        "epochs_run": len(elbo) if elbo is not None else None,
        "best_epoch": None,
        "architecture": {"n_latent": module.n_latent, "n_hidden": model.init_params_["non_kwargs"].get("n_hidden"),
                         "n_layers": model.init_params_["non_kwargs"].get("n_layers"),
                         "gene_likelihood": module.gene_likelihood, "dispersion": module.dispersion},
    }


def run_worker(spec_path: str) -> None:
    cfg = start_worker(spec_path)
    import anndata as ad

    train = ad.read_h5ad(cfg["paths"]["train"])
    test = ad.read_h5ad(cfg["paths"]["test"])
    result = {"rss_before_model_mb": _rss_mb()}
    trainer = _train_scvi if cfg["method"] == "scvi" else _train_sclatent
    model, info = trainer(train, cfg["batch_key"], cfg)
    result.update(info)
    # the same call timed ``ll_repeats`` times (default once); the median is reported
    seconds = []
    for _ in range(cfg.get("ll_repeats", 1)):
        start = time.perf_counter()
        per_cell = np.asarray(
            model.get_marginal_ll(test, n_mc_samples=cfg["n_mc_samples"], return_mean=False), dtype=np.float64
        ).ravel()
        seconds.append(time.perf_counter() - start)
    result["marginal_ll_seconds"] = float(np.median(seconds))
    result["marginal_ll_seconds_each"] = seconds
    result["heldout_ll"] = float(per_cell.mean())
    result["heldout_ll_sem"] = float(per_cell.std(ddof=1) / math.sqrt(per_cell.size))
    result["n_test_cells"] = int(per_cell.size)
    if cfg["method"] == "sclatent" and cfg.get("target_ll") is not None:
        snapshots = model.snapshots
        result["trajectory"] = _time_to_reach(model, test, cfg["target_ll"], snapshots, result["train_seconds"], cfg)
    result["peak_rss_mb"] = _peak_rss_mb()
    Path(cfg["out"]).write_text(json.dumps(result))


def run_method(
    method: str, variant: str, train_kwargs: dict, prepared: dict, args, workdir: Path, target_ll: float | None = None
) -> dict:
    out = workdir / f"{method}_{abs(hash(variant))}.json"
    spec = {
        "method": method,
        "paths": prepared["paths"],
        "batch_key": prepared["batch_key"],
        "train_kwargs": train_kwargs,
        "seed": args.seed,
        "threads": args.threads,
        "accelerator": args.accelerator,
        "n_mc_samples": args.n_mc_samples,
        "target_ll": target_ll,
        "max_epochs": args.marginal_ll_only,
        "ll_repeats": args.marginal_ll_repeats,
        "out": str(out),
    }
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_worker_process(__file__, spec_path, args.threads)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-25:])
        print(f"  !! {method} {variant} failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"error": tail}
    return json.loads(out.read_text())


# ======================================================================================== parent


def compare(ours: dict, theirs: dict) -> dict:
    """Ratios and target checks of one sclatent run against scvi-tools' run on the same split."""
    if "error" in ours or "error" in theirs:
        return {}
    time_ratio = theirs["train_seconds"] / ours["train_seconds"]
    reach = (ours.get("trajectory") or {}).get("seconds_to_reach")
    reach_ratio = theirs["train_seconds"] / reach if reach else None
    ll_speed = theirs["marginal_ll_seconds"] / ours["marginal_ll_seconds"]
    ll_gain = ours["heldout_ll"] - theirs["heldout_ll"]
    return {
        "train_time_ratio": time_ratio,
        "time_to_reach_ratio": reach_ratio,
        "heldout_ll_gain": ll_gain,
        "marginal_ll_speed_ratio": ll_speed,
        "time_target_met": bool(reach_ratio is not None and reach_ratio >= TIME_TARGET),
        "whole_call_time_target_met": bool(time_ratio >= TIME_TARGET),
        "ll_target_met": bool(ll_gain >= 0),
        "ll_speed_target_met": bool(ll_speed >= LL_SPEED_TARGET),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--variants", default="{}", help="JSON {name: train() kwargs} of extra sclatent runs")
    p.add_argument("--no-default", action="store_true", help="skip sclatent's default train() run")
    p.add_argument("--no-scvi", action="store_true", help="skip scvi-tools (the ratios are then not printed)")
    p.add_argument(
        "--marginal-ll-only",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="time only get_marginal_ll(n_mc_samples) of both libraries after EPOCHS epochs of training each",
    )
    p.add_argument(
        "--marginal-ll-repeats",
        type=int,
        default=1,
        metavar="N",
        help="time get_marginal_ll N times per run, same call, and report the median (a sub-second call is noisy)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--n-mc-samples", type=int, default=N_MC_SAMPLES)
    p.add_argument("--data-dir", default=os.environ.get("SCLATENT_DATA_DIR"))
    p.add_argument("--out", default="benchmarks/results_time_to_quality.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    runs = {} if args.no_default else {"default": {}}
    runs.update(json.loads(args.variants))
    if args.marginal_ll_only is not None:  # the evaluation's speed alone: no trajectory, fixed epochs
        runs = {"default": {"max_epochs": args.marginal_ll_only, "early_stopping": False}}
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "versions": {k: _version(k) for k in ("torch", "scvi-tools", "sclatent")},
        "datasets": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            prepared = prepare(name, args.seed, Path(tmp), args.data_dir)
            print(f"\n{name}: {prepared['summary']}", flush=True)
            entry = {"summary": prepared["summary"], "runs": {}}
            if not args.no_scvi:
                entry["runs"]["scvi-tools SCVI (defaults)"] = run_method("scvi", "scvi", {}, prepared, args, Path(tmp))
            reference = entry["runs"].get("scvi-tools SCVI (defaults)")
            target = None if reference is None or "error" in reference else reference["heldout_ll"]
            if args.marginal_ll_only is not None:
                target = None
            for variant, kwargs in runs.items():
                label = "sclatent VAE (defaults)" if variant == "default" else f"sclatent VAE {variant}"
                entry["runs"][label] = run_method("sclatent", variant, kwargs, prepared, args, Path(tmp), target)
            print(f"{'run':38s} {'train s':>8s} {'epochs':>6s} {'best':>5s} {'held-out LL':>12s} {'LL s':>6s} "
                  f"{'reach s':>8s} {'at ep.':>6s} {'reach x':>7s} {'call x':>7s} {'LL gain':>8s} {'LL-eval x':>9s}")
            nan = float("nan")
            for label, r in entry["runs"].items():
                if "error" in r:
                    print(f"{label:38s} failed")
                    continue
                if reference is not None and label != "scvi-tools SCVI (defaults)":
                    r["versus_scvi"] = compare(r, reference)
                v, t = r.get("versus_scvi") or {}, r.get("trajectory") or {}
                print(f"{label:38s} {r['train_seconds']:8.1f} {r['epochs_run']!s:>6s} {r['best_epoch']!s:>5s} "
                      f"{r['heldout_ll']:12.2f} {r['marginal_ll_seconds']:6.1f} {t.get('seconds_to_reach', nan):8.1f} "
                      f"{t.get('epoch_reached', '-')!s:>6s} {v.get('time_to_reach_ratio') or nan:7.1f} "
                      f"{v.get('train_time_ratio', nan):7.1f} {v.get('heldout_ll_gain', nan):8.2f} "
                      f"{v.get('marginal_ll_speed_ratio', nan):9.1f}", flush=True)
            report["datasets"][name] = entry
    report["total_seconds"] = time.perf_counter() - start
    default = [
        (name, entry["runs"].get("sclatent VAE (defaults)", {}).get("versus_scvi"))
        for name, entry in report["datasets"].items()
    ]
    if any(v for _, v in default):
        print("\nTargets (sclatent default train() vs scvi-tools default train()):")
        for name, v in default:
            if v:
                reach = v["time_to_reach_ratio"]
                print(f"  {name:14s} time to scvi-tools' LL {reach or float('nan'):.1f}x (>= {TIME_TARGET:g}x: "
                      f"{v['time_target_met']}; whole train() call {v['train_time_ratio']:.1f}x)  "
                      f"LL gain {v['heldout_ll_gain']:+.2f} (>= 0: {v['ll_target_met']})  "
                      f"LL eval {v['marginal_ll_speed_ratio']:.1f}x "
                      f"(>= {LL_SPEED_TARGET:g}x: {v['ll_speed_target_met']})")
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nTotal {report['total_seconds'] / 60:.1f} min; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
