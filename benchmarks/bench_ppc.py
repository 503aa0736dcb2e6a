"""Which count likelihood fits which data: posterior predictive checks of the VAE with ZINB, NB and
Poisson likelihoods on the real datasets (``sclatent.metrics.posterior_predictive_check``).

Per dataset and likelihood: the VAE (defaults, ``--epochs`` epochs) on all cells, then 20 posterior
predictive draws per cell; reported: the coverage of the central 50 % and 90 % predictive
intervals (randomised PIT; 0.5 and 0.9 when the model fits), the correlation of observed and
predicted per-gene coefficients of variation (log) and the mean absolute error of the per-gene
zero fraction.

Beside scvi-tools (``--scvi``): SCVI with the same likelihood and epochs on the same cells, and two
checks on both models. Ours (the randomised PIT coverage above, through a thin adapter to scvi-tools'
``posterior_predictive_sample``) and ``scvi.criticism.PosteriorPredictiveCheck``: its per-gene CV
and zero fraction (summarised as ours are) and its ``calibration_error`` (sum over seven central
intervals of (observed coverage - width)^2, lower is better; its intervals are quantiles of the
integer draws, so ties count as inside and a discrete model over-covers, which the randomised PIT
corrects). Run from the repository root::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/bench_ppc.py --scvi
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _schedule import matched_schedule

LIKELIHOODS = ("zinb", "nb", "poisson")


class ScviCountModel:
    """scvi-tools' SCVI seen through the two attributes ``posterior_predictive_check`` reads."""

    def __init__(self, model, layer: str):
        from types import SimpleNamespace

        self.model, self.adata = model, model.adata
        self.registry = SimpleNamespace(layer=layer)

    def posterior_predictive_sample(self, adata, indices, n_samples: int, seed: int):
        import scvi

        scvi.settings.seed = seed
        draws = self.model.posterior_predictive_sample(adata, indices=indices, n_samples=n_samples)
        return np.asarray(draws.todense())


class SclatentForCriticism:
    """sclatent's VAE seen as scvi-tools' ``PosteriorPredictiveCheck`` expects (dense draws)."""

    def __init__(self, model):
        self.model, self.adata = model, model.adata

    def posterior_predictive_sample(self, adata, n_samples: int, batch_size: int, indices=None):
        return self.model.posterior_predictive_sample(adata, indices=indices, n_samples=n_samples, seed=0)


def scvi_criticism(model, adata, n_samples: int) -> dict:
    """scvi-tools' ``PosteriorPredictiveCheck`` on one model: its calibration error, and its per-gene
    CV and zero fraction summarised as ``posterior_predictive_check`` summarises them."""
    import scipy.sparse as sp
    from scvi.criticism import PosteriorPredictiveCheck

    # scvi-tools 1.4.2's check fails on a sparse counts layer (np.all over a sparse comparison), so
    # it gets a dense copy; the models draw from their own AnnData
    adata = adata.copy()
    if sp.issparse(adata.layers["counts"]):
        adata.layers["counts"] = adata.layers["counts"].toarray()
    check = PosteriorPredictiveCheck(adata, {"model1": model}, count_layer_key="counts", n_samples=n_samples)
    check.coefficient_of_variation("cells")
    check.zero_fraction()
    check.calibration_error()
    cv = check.metrics["cv_gene"]
    zeros = check.metrics["zero_fraction"]
    expressed = (cv["Raw"] > 0) & (cv["model1"] > 0)
    return {
        "criticism_calibration_error": float(check.metrics["calibration"].loc["features", "model1"]),
        "criticism_cv_log_correlation": float(
            np.corrcoef(np.log(cv["Raw"][expressed]), np.log(cv["model1"][expressed]))[0, 1]
        ),
        "criticism_zero_fraction_mean_absolute_error": float(np.abs(zeros["Raw"] - zeros["model1"]).mean()),
    }


def load(name: str):
    import scanpy as sc

    from sclatent import datasets

    if name == "pbmc68k_embedded":
        adata = datasets.pbmc68k_counts()
    elif name == "pbmc3k":
        adata = datasets.pbmc3k()
        adata = adata[adata.obs["cell_type"].notna().to_numpy()].copy()
    else:
        adata = datasets.cellbench_5cl()
        adata = adata[(adata.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()].copy()
    if adata.n_vars > 2000:
        adata.X = adata.layers["counts"].copy()
        sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3")
        adata = adata[:, adata.var["highly_variable"]].copy()
    return adata


def scvi_row(adata, likelihood: str, args) -> dict:
    """scvi-tools' SCVI with ``likelihood``, trained as ours is, checked with our check; the model
    rides along under ``_model`` for scvi.criticism."""
    import logging
    import warnings

    import scvi

    from sclatent.metrics import posterior_predictive_check

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    scvi.settings.seed = 0
    data = adata.copy()
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(data, layer="counts")
    model = scvi.model.SCVI(data, gene_likelihood=likelihood)
    model.train(max_epochs=args.epochs, accelerator="cpu", enable_progress_bar=False)
    check = posterior_predictive_check(ScviCountModel(model, "counts"), n_samples=args.n_samples)
    return {
        **check.summary["value"].to_dict(),
        # its own random validation split differs from ours, so no like-for-like held-out figure here
        # (bench_vae.py compares held-out likelihoods on one split)
        "held_out_log_likelihood": float("nan"),
        "seconds": time.perf_counter() - start,
        "_model": model,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="pbmc68k_embedded,pbmc3k,cellbench_5cl")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--n-samples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scvi", action="store_true", help="also scvi-tools' SCVI and scvi.criticism")
    parser.add_argument("--out", default="benchmarks/results_ppc.json")
    args = parser.parse_args()
    import torch

    from sclatent.metrics import posterior_predictive_check
    from sclatent.model import VAE

    torch.set_num_threads(args.threads)
    report: dict = {"settings": vars(args), "datasets": {}}
    for name in args.datasets.split(","):
        adata = load(name)
        print(f"\n=== {name}: {adata.n_obs} cells x {adata.n_vars} genes", flush=True)
        rows = {}
        for likelihood in LIKELIHOODS:
            start = time.perf_counter()
            data = adata.copy()
            VAE.setup_anndata(data, layer="counts")
            model = VAE(data, gene_likelihood=likelihood, seed=0)
            model.train(max_epochs=args.epochs, progress_bar=False, **matched_schedule(args.epochs))
            check = posterior_predictive_check(model, n_samples=args.n_samples)
            summary = check.summary["value"].to_dict()
            held_out = model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=100)
            rows[likelihood] = {**summary, "held_out_log_likelihood": held_out, "seconds": time.perf_counter() - start}
            contenders = {"sclatent": (rows[likelihood], SclatentForCriticism(model))}
            if args.scvi:
                rows[likelihood] = {"sclatent": rows[likelihood], "scvi-tools": scvi_row(data, likelihood, args)}
                contenders = {
                    "sclatent": (rows[likelihood]["sclatent"], SclatentForCriticism(model)),
                    "scvi-tools": (rows[likelihood]["scvi-tools"], rows[likelihood]["scvi-tools"].pop("_model")),
                }
            for contender, (row, wrapped) in contenders.items():
                if args.scvi:
                    row.update(scvi_criticism(wrapped, data, args.n_samples))
                extra = (
                    f"  | scvi.criticism: calibration error {row['criticism_calibration_error']:.4f}, CV log r "
                    f"{row['criticism_cv_log_correlation']:.3f}"
                    if args.scvi
                    else ""
                )
                print(
                    f"  {likelihood:8s} {contender:10s} coverage 50 % {row['coverage_50']:.3f}  90 % "
                    f"{row['coverage_90']:.3f}  CV log r {row['cv_log_correlation']:.3f}  zero-fraction MAE "
                    f"{row['zero_fraction_mean_absolute_error']:.4f}  held-out log p(x) "
                    f"{row['held_out_log_likelihood']:.1f}{extra}",
                    flush=True,
                )
        report["datasets"][name] = rows
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
