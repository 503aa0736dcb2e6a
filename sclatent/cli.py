"""Command line: ``sclatent fit-vae|fit-dae [INPUT.h5ad] --out OUT.h5ad``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def _pca_embedding(adata, layer: str | None, n_comps: int = 50) -> np.ndarray:
    """Scanpy's standard PCA (normalize_total, log1p, PCA) on a copy: the clustering baseline."""
    import anndata as ad
    import scanpy as sc

    counts = adata.X if layer is None else adata.layers[layer]
    scratch = ad.AnnData(counts.copy())
    sc.pp.normalize_total(scratch, target_sum=1e4)
    sc.pp.log1p(scratch)
    n_comps = min(n_comps, min(scratch.shape) - 1)
    sc.pp.pca(scratch, n_comps=n_comps, random_state=0)
    return scratch.obsm["X_pca"]


def _load_input(args: argparse.Namespace, command: str):
    """The input AnnData (or the embedded default), its labels key and a description."""
    import scanpy as sc

    from . import datasets

    if args.input is None:
        adata = datasets.pbmc68k_counts()
        labels_key = args.labels_key or "bulk_labels"
        source = "embedded default: scanpy pbmc68k_reduced, counts recovered from .raw"
    else:
        path = Path(args.input)
        if not path.exists():
            raise SystemExit(f"error: input file {path} does not exist.")
        adata = sc.read_h5ad(path)
        labels_key = args.labels_key
        source = str(path)
    print(f"sclatent {command}: {adata.n_obs} cells x {adata.n_vars} genes ({source})")
    return adata, labels_key


def _clustering_summary(adata, key: str, labels_key: str | None, args: argparse.Namespace) -> dict:
    """ARI / NMI of the Leiden clusters of ``obs[key]`` vs the labels, beside scanpy PCA's."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from .metrics import leiden_scores

    if not labels_key:
        return {}
    labels = adata.obs[labels_key].astype(str).to_numpy()
    clusters = adata.obs[key].to_numpy()
    summary = {"ari": adjusted_rand_score(labels, clusters), "nmi": normalized_mutual_info_score(labels, clusters)}
    if not args.no_baseline:
        pca = leiden_scores(_pca_embedding(adata, args.layer), labels, seed=args.seed)
        summary["pca_ari"], summary["pca_nmi"] = pca["ari"], pca["nmi"]
    return summary


def _print_clustering(summary: dict, labels_key: str | None) -> None:
    if "ari" in summary:
        line = f"  Leiden vs {labels_key!r}: ARI {summary['ari']:.3f}, NMI {summary['nmi']:.3f}"
        if "pca_ari" in summary:
            line += f" (scanpy PCA baseline: ARI {summary['pca_ari']:.3f}, NMI {summary['pca_nmi']:.3f})"
        print(line)


def _outputs(args: argparse.Namespace) -> tuple[Path, Path, Path, Path]:
    """OUT.h5ad, the model folder, the UMAP and training-curve PNG paths."""
    out = Path(args.out)
    stem = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else Path(f"{stem}_model")
    return out, model_dir, Path(f"{stem}_umap.png"), Path(f"{stem}_training.png")


def fit_dae(args: argparse.Namespace) -> dict:
    from .metrics import neighbors_umap_leiden
    from .model import DenoisingAE
    from .plotting import plot_embedding, plot_training_history

    start = time.perf_counter()
    adata, labels_key = _load_input(args, "fit-dae")
    DenoisingAE.setup_anndata(
        adata,
        layer=args.layer,
        batch_key=args.batch_key,
        labels_key=labels_key,
        allow_non_integer=args.allow_non_integer,
    )
    model = DenoisingAE(
        adata,
        n_latent=args.n_latent,
        n_hidden=args.n_hidden,
        n_layers=args.n_layers,
        gene_likelihood=args.gene_likelihood,
        noise=args.noise,
        noise_rate=args.noise_rate,
        seed=args.seed,
    )
    train_start = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        early_stopping=not args.no_early_stopping,
        progress_bar=not args.no_progress,
    )
    train_seconds = time.perf_counter() - train_start
    key = "X_sclatent_dae"
    adata.obsm[key] = model.get_latent_representation()
    model.impute(layer_out="sclatent_denoised")
    neighbors_umap_leiden(adata, key, key_added="leiden_sclatent_dae", seed=args.seed)
    out, model_dir, umap_png, curves_png = _outputs(args)
    model.save(model_dir, overwrite=True)
    plot_embedding(adata, ["leiden_sclatent_dae"] + ([labels_key] if labels_key else []), umap_png)
    plot_training_history(model.history, curves_png)
    adata.write_h5ad(out)

    summary = {"cells": adata.n_obs, "genes": adata.n_vars, "epochs": len(model.history["epoch"])}
    summary["train_seconds"] = train_seconds
    held_out = model.validation_indices
    if len(held_out):
        summary["heldout_reconstruction"] = model.get_reconstruction_error(indices=held_out)
    summary.update(_clustering_summary(adata, "leiden_sclatent_dae", labels_key, args))
    summary["total_seconds"] = time.perf_counter() - start
    print("\nSummary")
    print(f"  data            {summary['cells']} cells x {summary['genes']} genes")
    stopped = " (early stopping on the held-out cells)" if not args.no_early_stopping else ""
    print(f"  training        {summary['epochs']} epochs in {train_seconds:.1f} s{stopped}")
    if "heldout_reconstruction" in summary:
        print(
            f"  held-out NLL    {summary['heldout_reconstruction']:.2f} nats/cell ({len(held_out)} cells; "
            f"{model.module.gene_likelihood}, clean input)"
        )
    _print_clustering(summary, labels_key)
    print(
        f"  wrote           {out} (obsm['{key}'], layers['sclatent_denoised'], obsm['X_umap'], "
        "obs['leiden_sclatent_dae'])"
    )
    print(f"                  {model_dir}/ (model), {umap_png}, {curves_png}")
    print(f"  total time      {summary['total_seconds']:.1f} s")
    return summary


def fit_vae(args: argparse.Namespace) -> dict:
    from .metrics import nb_baseline_log_likelihood, neighbors_umap_leiden
    from .model import VAE
    from .plotting import plot_embedding, plot_training_history

    start = time.perf_counter()
    adata, labels_key = _load_input(args, "fit-vae")
    VAE.setup_anndata(
        adata,
        layer=args.layer,
        batch_key=args.batch_key,
        labels_key=labels_key,
        allow_non_integer=args.allow_non_integer,
    )
    model = VAE(
        adata,
        n_latent=args.n_latent,
        n_hidden=args.n_hidden,
        n_layers=args.n_layers,
        gene_likelihood=args.gene_likelihood,
        seed=args.seed,
    )
    train_start = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        early_stopping=args.early_stopping,
        progress_bar=not args.no_progress,
    )
    train_seconds = time.perf_counter() - train_start
    key = "X_sclatent_vae"
    adata.obsm[key] = model.get_latent_representation()
    neighbors_umap_leiden(adata, key, key_added="leiden_sclatent_vae", seed=args.seed)

    out, model_dir, umap_png, curves_png = _outputs(args)
    model.save(model_dir, overwrite=True)
    colors = ["leiden_sclatent_vae"] + ([labels_key] if labels_key else [])
    plot_embedding(adata, colors, umap_png)
    plot_training_history(model.history, curves_png)
    adata.write_h5ad(out)

    summary = {"cells": adata.n_obs, "genes": adata.n_vars, "epochs": len(model.history["epoch"])}
    summary["train_seconds"] = train_seconds
    held_out = model.validation_indices
    if len(held_out):
        summary["heldout_marginal_ll"] = model.get_marginal_ll(indices=held_out, n_mc_samples=args.n_mc_samples)
        counts = adata.X if args.layer is None else adata.layers[args.layer]
        summary["baseline_nb_ll"] = nb_baseline_log_likelihood(counts, model.train_indices, held_out)
    summary.update(_clustering_summary(adata, "leiden_sclatent_vae", labels_key, args))
    summary["total_seconds"] = time.perf_counter() - start

    print("\nSummary")
    print(f"  data            {summary['cells']} cells x {summary['genes']} genes")
    per_epoch = train_seconds / summary["epochs"]
    print(f"  training        {summary['epochs']} epochs in {train_seconds:.1f} s ({per_epoch:.3f} s/epoch)")
    if "heldout_marginal_ll" in summary:
        print(
            f"  held-out LL     {summary['heldout_marginal_ll']:.2f} nats/cell ({len(held_out)} cells, "
            f"{args.n_mc_samples} importance samples); NB library x gene-mean baseline {summary['baseline_nb_ll']:.2f}"
        )
    _print_clustering(summary, labels_key)
    print(f"  wrote           {out} (obsm['{key}'], obsm['X_umap'], obs['leiden_sclatent_vae'])")
    print(f"                  {model_dir}/ (model), {umap_png}, {curves_png}")
    print(f"  total time      {summary['total_seconds']:.1f} s")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sclatent", description="Deep latent-variable models for single-cell counts.")
    commands = parser.add_subparsers(dest="command", required=True)
    vae = commands.add_parser(
        "fit-vae",
        help="train the count VAE, write its latent, UMAP, Leiden clusters, model and figures",
        description="Train sclatent's VAE on INPUT (default: the embedded PBMC counts) and cluster its latent.",
    )
    _common_arguments(vae)
    vae.add_argument("--max-epochs", type=int, default=None, help="default: scales with the number of cells")
    vae.add_argument("--n-latent", type=int, default=10)
    vae.add_argument("--n-hidden", type=int, default=128)
    vae.add_argument("--n-layers", type=int, default=1)
    vae.add_argument("--gene-likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    vae.add_argument("--early-stopping", action="store_true")
    vae.add_argument("--n-mc-samples", type=int, default=200, help="importance samples for the held-out LL")
    vae.set_defaults(func=fit_vae)

    dae = commands.add_parser(
        "fit-dae",
        help="train the denoising autoencoder, write its code, denoised counts, UMAP, Leiden clusters, model, figures",
        description="Train sclatent's DenoisingAE (DCA-style) on INPUT (default: the embedded PBMC counts).",
    )
    _common_arguments(dae)
    dae.add_argument("--n-latent", type=int, default=32)
    dae.add_argument("--n-hidden", type=int, default=64)
    dae.add_argument("--n-layers", type=int, default=1)
    dae.add_argument("--gene-likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    dae.add_argument("--noise", choices=["gaussian", "salt", "masking", "none"], default="masking")
    dae.add_argument("--noise-rate", type=float, default=0.1, help="std (gaussian) or probability (salt, masking)")
    dae.add_argument("--max-epochs", type=int, default=300, help="upper bound; training stops early by default")
    dae.add_argument("--no-early-stopping", action="store_true", help="train all --max-epochs on all cells")
    dae.set_defaults(func=fit_dae)
    return parser


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", help="h5ad with raw counts (default: embedded pbmc68k_reduced counts)")
    parser.add_argument("--out", required=True, help="output h5ad path")
    parser.add_argument("--layer", default=None, help="layer holding counts (default: X)")
    parser.add_argument("--batch-key", default=None)
    parser.add_argument(
        "--allow-non-integer", action="store_true", help="accept fractional counts (e.g. ambient-RNA corrected)"
    )
    parser.add_argument("--labels-key", default=None, help="obs column with labels, for ARI/NMI")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=None, help="model folder (default: OUT stem + '_model')")
    parser.add_argument("--no-baseline", action="store_true", help="skip the scanpy PCA clustering baseline")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        from .data import SetupError

        if isinstance(err, SetupError | FileNotFoundError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
