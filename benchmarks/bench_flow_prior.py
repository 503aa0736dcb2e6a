"""Does a learned normalizing-flow prior on z improve the VAE's held-out likelihood?

For each dataset and seed, three VAEs (``prior="normal"``, ``"planar"``, ``"realnvp"``) are trained
with the same data, split (the seed's 90/10 cell split), epochs and every other setting; each is
scored by its held-out marginal log-likelihood log p(x) with 1000 importance samples per cell
(proposal q(z|x); the flow models use the flow's log p(z) in the weights), its held-out ELBO and
its training time. Beside them: the model-free NB library x gene-mean baseline on the same split.
Differences flow - normal are paired (same held-out cells): per seed the mean over cells with a
per-cell standard error, and over seeds a paired t-test on the per-seed means.

Datasets: the embedded PBMC (``pbmc68k_counts``, 700 x 765), pbmc3k restricted to 2,000
``seurat_v3`` highly variable genes selected on the raw counts (cells with no counts on them
dropped), and mouse_brain_10k_chr1 (10,000 x 1,000). Run (one thread; ~35 min on a loaded, shared
2-core box)::

    OMP_NUM_THREADS=1 PYTHONPATH=. SCLATENT_DATA_DIR=/work/shared/data \
        python benchmarks/bench_flow_prior.py

``--iaf`` instead compares (prior, posterior) pairs on pbmc68k: normal/normal, realnvp/normal,
normal/iaf and realnvp/iaf (``posterior="iaf"``: the Gaussian sample pushed through 4 IAF layers),
paired by seed and cell against normal/normal, and writes ``results_flow_posterior.json``::

    OMP_NUM_THREADS=1 PYTHONPATH=. SCLATENT_DATA_DIR=/work/shared/data \
        python benchmarks/bench_flow_prior.py --iaf --seeds 0 1 2

Writes ``benchmarks/results_flow_prior.json`` (after every dataset, so a partial run keeps what
it finished) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from _schedule import matched_schedule

PRIORS = ("normal", "planar", "realnvp")
# epochs per dataset: fixed (no early stopping) so the three priors get identical budgets; the
# default (400 for all three) is kept for pbmc68k and cut for the larger two to fit one thread
DATASETS = {
    "pbmc68k": {"epochs": 400, "seeds": (0, 1, 2)},
    "pbmc3k_hvg2000": {"epochs": 100, "seeds": (0, 1, 2)},
    "mouse_brain_10k_chr1": {"epochs": 30, "seeds": (0, 1, 2)},
}
MODEL = dict(n_latent=10, n_flows=8, flow_hidden=64)


def load(name: str):
    import scanpy as sc

    from sclatent import datasets

    if name == "pbmc68k":
        return datasets.pbmc68k_counts()
    if name == "pbmc3k_hvg2000":
        adata = datasets.pbmc3k()
        sc.pp.filter_genes(adata, min_cells=3)
        # seurat_v3 ranks genes by the variance of standardised raw counts: it expects counts
        sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3")
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
        totals = np.asarray(adata.X.sum(axis=1)).ravel()
        return adata[totals > 0].copy()
    if name == "mouse_brain_10k_chr1":
        return datasets.mouse_brain_10k_chr1()
    raise ValueError(name)


def run_one(adata, prior: str, seed: int, epochs: int, n_is: int, posterior: str = "normal") -> dict:
    from sclatent.model import VAE

    extra = {} if posterior == "normal" else dict(posterior=posterior, n_posterior_flows=4, posterior_flow_hidden=64)
    model = VAE(adata, prior=prior, seed=seed, **MODEL, **extra)
    start = time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", progress_bar=False, **matched_schedule(epochs))
    train_s = time.perf_counter() - start
    held = model.validation_indices
    start = time.perf_counter()
    per_cell = model.get_marginal_ll(indices=held, n_mc_samples=n_is, return_mean=False, seed=0)
    is_s = time.perf_counter() - start
    return {
        "prior": prior,
        "posterior": posterior,
        "seed": seed,
        "epochs": epochs,
        "train_seconds": train_s,
        "is_seconds": is_s,
        "heldout_marginal_ll": float(per_cell.mean()),
        "heldout_marginal_ll_per_cell": per_cell.tolist(),
        "heldout_elbo": model.get_elbo(indices=held),
        "heldout_kl": model.get_kl_divergence(indices=held),
        "n_parameters": sum(p.numel() for p in model.module.parameters()),
        "validation_indices": held.tolist(),
        "train_indices_n": len(model.train_indices),
        "_model": model,
    }


def paired(runs: list[dict], prior: str) -> dict:
    """flow - normal held-out LL, paired by seed and cell."""
    from scipy import stats

    per_seed, ses = [], []
    for seed in sorted({r["seed"] for r in runs}):
        a = next(r for r in runs if r["seed"] == seed and r["prior"] == prior)
        b = next(r for r in runs if r["seed"] == seed and r["prior"] == "normal")
        diff = np.asarray(a["heldout_marginal_ll_per_cell"]) - np.asarray(b["heldout_marginal_ll_per_cell"])
        per_seed.append(float(diff.mean()))
        ses.append(float(diff.std(ddof=1) / np.sqrt(diff.size)))
    out = {"diff_per_seed": per_seed, "cell_se_per_seed": ses, "mean_diff": float(np.mean(per_seed))}
    if len(per_seed) > 1:
        out["seed_sd"] = float(np.std(per_seed, ddof=1))
        out["t_test_p"] = float(stats.ttest_1samp(per_seed, 0.0).pvalue)
    else:
        # one seed: the paired per-cell z-score is the only test (it ignores training noise)
        out["cell_z"] = per_seed[0] / ses[0]
    return out


IAF_CONFIGS = (("normal", "normal"), ("realnvp", "normal"), ("normal", "iaf"), ("realnvp", "iaf"))


def main_iaf(args) -> None:
    """Flow posterior (IAF) vs flow prior on pbmc68k, paired against normal/normal."""
    from sclatent.model import VAE

    adata = load("pbmc68k")
    VAE.setup_anndata(adata)
    epochs = int(dict(item.split("=") for item in args.epochs).get("pbmc68k", DATASETS["pbmc68k"]["epochs"]))
    runs = []
    for seed in args.seeds:
        for prior, posterior in IAF_CONFIGS:
            run = run_one(adata, prior, seed, epochs, args.n_is, posterior)
            run.pop("_model")
            run["config"] = f"{prior}/{posterior}"
            runs.append(run)
            print(
                f"seed {seed} {run['config']:16s} LL {run['heldout_marginal_ll']:9.3f} ELBO {run['heldout_elbo']:9.3f} "
                f"train {run['train_seconds']:6.1f} s IS {run['is_seconds']:6.1f} s",
                flush=True,
            )
            out = {"epochs": epochs, "n_is": args.n_is, "seeds": args.seeds, "runs": runs}
            Path(args.out_iaf).write_text(json.dumps(out, indent=1))
    print(f"\npbmc68k, {epochs} epochs, seeds {args.seeds}: held-out LL; diff vs normal/normal paired by seed and cell")
    base = [r for r in runs if r["config"] == "normal/normal"]
    for prior, posterior in IAF_CONFIGS:
        config = f"{prior}/{posterior}"
        rs = [r for r in runs if r["config"] == config]
        diffs, ses = [], []
        for r, b in zip(rs, base):
            d = np.asarray(r["heldout_marginal_ll_per_cell"]) - np.asarray(b["heldout_marginal_ll_per_cell"])
            diffs.append(d.mean())
            ses.append(d.std(ddof=1) / np.sqrt(d.size) if d.any() else 0.0)
        print(
            f"| {config} | {np.mean([r['heldout_marginal_ll'] for r in rs]):.2f} | "
            + ", ".join(f"{d:+.2f} ± {s:.2f}" for d, s in zip(diffs, ses))
            + f" | {np.mean([r['heldout_elbo'] for r in rs]):.2f} | "
            f"{np.mean([r['train_seconds'] for r in rs]) / epochs:.3f} | {rs[0]['n_parameters']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--epochs", nargs="*", default=[], metavar="NAME=N", help="override a dataset's epochs")
    parser.add_argument("--append", action="store_true", help="add to the datasets already in --out")
    parser.add_argument("--n-is", type=int, default=1000, help="importance samples per held-out cell")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results_flow_prior.json")))
    parser.add_argument("--iaf", action="store_true", help="compare IAF posteriors on pbmc68k (see the docstring)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of --iaf")
    parser.add_argument("--out-iaf", default=str(Path(__file__).with_name("results_flow_posterior.json")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.iaf:
        main_iaf(args)
        return

    from sclatent.metrics import nb_baseline_log_likelihood
    from sclatent.model import VAE

    epochs_override = {k: int(v) for k, v in (item.split("=") for item in args.epochs)}
    results = {
        "settings": {"model": MODEL, "n_importance_samples": args.n_is, "train_size": 0.9, "threads": 1},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "note": "timings on a shared 2-core machine with other jobs running: indicative only",
        "datasets": {},
    }
    if args.append and Path(args.out).exists():
        results["datasets"] = json.loads(Path(args.out).read_text())["datasets"]
    for name in args.datasets:
        cfg = DATASETS[name]
        epochs = epochs_override.get(name, cfg["epochs"])
        adata = load(name)
        VAE.setup_anndata(adata)
        runs = []
        baselines = {}
        for seed in cfg["seeds"]:
            for prior in PRIORS:
                run = run_one(adata, prior, seed, epochs, args.n_is)
                model = run.pop("_model")
                if seed not in baselines:
                    baselines[seed] = nb_baseline_log_likelihood(adata.X, model.train_indices, model.validation_indices)
                runs.append(run)
                print(
                    f"{name:22s} seed {seed} {prior:8s} LL {run['heldout_marginal_ll']:9.3f} "
                    f"ELBO {run['heldout_elbo']:9.3f} train {run['train_seconds']:6.1f} s "
                    f"IS {run['is_seconds']:6.1f} s",
                    flush=True,
                )

        def mean_of(key: str, prior: str, runs: list[dict] = runs) -> float:
            return float(np.mean([r[key] for r in runs if r["prior"] == prior]))

        summary = {
            prior: {
                "heldout_marginal_ll_mean": mean_of("heldout_marginal_ll", prior),
                "heldout_elbo_mean": mean_of("heldout_elbo", prior),
                "train_seconds_mean": mean_of("train_seconds", prior),
            }
            for prior in PRIORS
        }
        for prior in PRIORS[1:]:
            summary[prior]["vs_normal"] = paired(runs, prior)
        results["datasets"][name] = {
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
            "epochs": epochs,
            "seeds": list(cfg["seeds"]),
            "nb_baseline_ll": {str(k): v for k, v in baselines.items()},
            "nb_baseline_ll_mean": float(np.mean(list(baselines.values()))),
            "summary": summary,
            "runs": [{k: v for k, v in r.items() if k != "validation_indices"} for r in runs],
        }
        Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    print(
        "\nHeld-out marginal log-likelihood (nats/cell, 1000 importance samples; mean over seeds); "
        "flow - normal paired by seed and cell"
    )
    header = (
        f"{'dataset':22s} {'cells x genes':>13s} {'ep':>4s} {'seeds':>5s} {'NB base':>9s} "
        f"{'normal':>9s} {'planar':>9s} {'realnvp':>9s} {'planar-normal':>22s} {'realnvp-normal':>22s} "
        f"{'s/ep n/p/r':>16s}"
    )
    print(header)
    for name, d in results["datasets"].items():
        s = d["summary"]
        cells = []
        for prior in ("planar", "realnvp"):
            v = s[prior]["vs_normal"]
            if "t_test_p" in v:
                cells.append(f"{v['mean_diff']:+.3f} (sd {v['seed_sd']:.3f}, p {v['t_test_p']:.2f})")
            else:
                cells.append(f"{v['mean_diff']:+.3f} (cell z {v['cell_z']:+.1f})")
        speed = "/".join(f"{s[p]['train_seconds_mean'] / d['epochs']:.2f}" for p in PRIORS)
        print(
            f"{name:22s} {d['n_cells']:>6d} x {d['n_genes']:<5d} {d['epochs']:>4d} {len(d['seeds']):>5d} "
            f"{d['nb_baseline_ll_mean']:9.2f} "
            + " ".join(f"{s[p]['heldout_marginal_ll_mean']:9.2f}" for p in PRIORS)
            + f" {cells[0]:>22s} {cells[1]:>22s} {speed:>16s}"
        )


if __name__ == "__main__":
    main()
