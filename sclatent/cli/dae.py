"""``sclatent fit-dae``: the denoising autoencoder."""

from __future__ import annotations

import argparse
import time

from ._common import (
    add_common_arguments,
    cluster_and_write,
    clustering_summary,
    load_input,
    print_clustering,
    setup_from_arguments,
    timed_training,
)


def fit_dae(args: argparse.Namespace) -> dict:
    from ..model import DenoisingAE

    start = time.perf_counter()
    adata, labels_key = load_input(args, "fit-dae")
    setup_from_arguments(DenoisingAE, adata, labels_key, args)
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
    train_seconds = timed_training(model, args, early_stopping=not args.no_early_stopping)
    key = "X_sclatent_dae"
    adata.obsm[key] = model.get_latent_representation()
    model.impute(layer_out="sclatent_denoised")
    out, model_dir, umap_png, curves_png = cluster_and_write(adata, model, "dae", labels_key, args)

    summary = {"cells": adata.n_obs, "genes": adata.n_vars, "epochs": len(model.history["epoch"])}
    summary["train_seconds"] = train_seconds
    held_out = model.validation_indices
    if len(held_out):
        summary["heldout_reconstruction"] = model.get_reconstruction_error(indices=held_out)
    summary.update(clustering_summary(adata, "leiden_sclatent_dae", labels_key, args))
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
    print_clustering(summary, labels_key)
    print(
        f"  wrote           {out} (obsm['{key}'], layers['sclatent_denoised'], obsm['X_umap'], "
        "obs['leiden_sclatent_dae'])"
    )
    print(f"                  {model_dir}/ (model), {umap_png}, {curves_png}")
    print(f"  total time      {summary['total_seconds']:.1f} s")
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fit-dae",
        help="train the denoising autoencoder, write its code, denoised counts, UMAP, Leiden clusters, model, figures",
        description="Train sclatent's DenoisingAE (DCA-style) on INPUT (default: the embedded PBMC counts).",
    )
    add_common_arguments(parser)
    parser.add_argument("--n-latent", type=int, default=32)
    parser.add_argument("--n-hidden", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=1)
    parser.add_argument("--gene-likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    parser.add_argument("--noise", choices=["gaussian", "salt", "masking", "none"], default="masking")
    parser.add_argument("--noise-rate", type=float, default=0.1, help="std (gaussian) or probability (salt, masking)")
    parser.add_argument("--max-epochs", type=int, default=300, help="upper bound; training stops early by default")
    parser.add_argument("--no-early-stopping", action="store_true", help="train all --max-epochs on all cells")
    parser.set_defaults(func=fit_dae)
