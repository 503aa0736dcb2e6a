"""``sclatent fit-vae``: the count VAE (the main job), with an optional normalizing-flow prior.

``sclatent fit-flow`` (:mod:`sclatent.cli.flow`) runs the same function with a flow prior by
default and writes ``X_sclatent_flow``.
"""

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


def fit_vae(args: argparse.Namespace) -> dict:
    from ..metrics import nb_baseline_log_likelihood
    from ..model import VAE

    start = time.perf_counter()
    family = getattr(args, "family", "vae")
    adata, labels_key = load_input(args, f"fit-{family}")
    setup_from_arguments(VAE, adata, labels_key, args)
    model = VAE(
        adata,
        n_latent=args.n_latent,
        n_hidden=args.n_hidden,
        n_layers=args.n_layers,
        gene_likelihood=args.gene_likelihood,
        prior=args.prior,
        n_flows=args.n_flows,
        seed=args.seed,
    )
    train_seconds = timed_training(model, args, early_stopping=args.early_stopping)
    key, leiden_key = f"X_sclatent_{family}", f"leiden_sclatent_{family}"
    adata.obsm[key] = model.get_latent_representation()
    out, model_dir, umap_png, curves_png = cluster_and_write(adata, model, family, labels_key, args)

    summary = {"cells": adata.n_obs, "genes": adata.n_vars, "epochs": len(model.history["epoch"])}
    summary["prior"] = args.prior
    summary["train_seconds"] = train_seconds
    held_out = model.validation_indices
    if len(held_out):
        summary["heldout_marginal_ll"] = model.get_marginal_ll(indices=held_out, n_mc_samples=args.n_mc_samples)
        counts = adata.X if args.layer is None else adata.layers[args.layer]
        summary["baseline_nb_ll"] = nb_baseline_log_likelihood(counts, model.train_indices, held_out)
    summary.update(clustering_summary(adata, leiden_key, labels_key, args))
    summary["total_seconds"] = time.perf_counter() - start

    print("\nSummary")
    print(f"  data            {summary['cells']} cells x {summary['genes']} genes")
    if args.prior != "normal":
        print(f"  prior of z      {args.prior} flow, {args.n_flows} layers")
    per_epoch = train_seconds / summary["epochs"]
    print(f"  training        {summary['epochs']} epochs in {train_seconds:.1f} s ({per_epoch:.3f} s/epoch)")
    if "heldout_marginal_ll" in summary:
        print(
            f"  held-out LL     {summary['heldout_marginal_ll']:.2f} nats/cell ({len(held_out)} cells, "
            f"{args.n_mc_samples} importance samples); NB library x gene-mean baseline {summary['baseline_nb_ll']:.2f}"
        )
    print_clustering(summary, labels_key)
    print(f"  wrote           {out} (obsm['{key}'], obsm['X_umap'], obs['{leiden_key}'])")
    print(f"                  {model_dir}/ (model), {umap_png}, {curves_png}")
    print(f"  total time      {summary['total_seconds']:.1f} s")
    return summary


def add_vae_arguments(parser: argparse.ArgumentParser, default_prior: str = "normal") -> None:
    """The options of ``fit-vae`` (and ``fit-flow``, which only changes the default prior)."""
    add_common_arguments(parser)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: scales with the number of cells")
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--n-hidden", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=1)
    parser.add_argument("--gene-likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    parser.add_argument("--early-stopping", action="store_true")
    parser.add_argument("--n-mc-samples", type=int, default=200, help="importance samples for the held-out LL")
    parser.add_argument(
        "--prior",
        choices=["normal", "planar", "realnvp"],
        default=default_prior,
        help=f"prior of z: N(0, I) or a learned normalizing flow (default: {default_prior})",
    )
    parser.add_argument("--n-flows", type=int, default=8, help="layers of a flow prior")


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fit-vae",
        help="train the count VAE, write its latent, UMAP, Leiden clusters, model and figures",
        description="Train sclatent's VAE on INPUT (default: the embedded PBMC counts) and cluster its latent.",
    )
    add_vae_arguments(parser)
    parser.set_defaults(func=fit_vae, family="vae")
