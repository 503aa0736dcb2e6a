"""``sclatent fit-contrastive``: SimCLR cell embeddings."""

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


def fit_contrastive(args: argparse.Namespace) -> dict:
    from ..model import ContrastiveModel

    start = time.perf_counter()
    adata, labels_key = load_input(args, "fit-contrastive")
    setup_from_arguments(ContrastiveModel, adata, labels_key, args)
    model = ContrastiveModel(
        adata,
        n_latent=args.n_latent,
        n_hidden=args.n_hidden,
        n_layers=args.n_layers,
        temperature=args.temperature,
        thinning_keep=args.thinning_keep,
        mask_rate=args.mask_rate,
        noise_std=args.noise_std,
        mix_max_weight=args.mix_max_weight,
        n_neighbors=args.n_neighbors,
        seed=args.seed,
    )
    train_seconds = timed_training(model, args)
    key = "X_sclatent_contrastive"
    adata.obsm[key] = model.get_latent_representation()
    out, model_dir, umap_png, curves_png = cluster_and_write(adata, model, "contrastive", labels_key, args)

    summary = {"cells": adata.n_obs, "genes": adata.n_vars, "epochs": len(model.history["epoch"])}
    summary["train_seconds"] = train_seconds
    summary["train_nt_xent"] = model.history["train_nt_xent"][-1]
    if model.history.get("validation_nt_xent"):
        summary["validation_nt_xent"] = model.history["validation_nt_xent"][-1]
    summary.update(clustering_summary(adata, "leiden_sclatent_contrastive", labels_key, args))
    summary["total_seconds"] = time.perf_counter() - start
    print("\nSummary")
    print(f"  data            {summary['cells']} cells x {summary['genes']} genes")
    print(f"  training        {summary['epochs']} epochs in {train_seconds:.1f} s (batch {args.batch_size})")
    line = f"  NT-Xent         {summary['train_nt_xent']:.3f} nats/cell (train)"
    if "validation_nt_xent" in summary:
        line += f", {summary['validation_nt_xent']:.3f} (held-out, fixed views)"
    print(line)
    print_clustering(summary, labels_key)
    print(f"  wrote           {out} (obsm['{key}'], obsm['X_umap'], obs['leiden_sclatent_contrastive'])")
    print(f"                  {model_dir}/ (model), {umap_png}, {curves_png}")
    print(f"  total time      {summary['total_seconds']:.1f} s")
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fit-contrastive",
        help="train the contrastive (SimCLR) embedding, write it, UMAP, Leiden clusters, model, figures",
        description="Train sclatent's ContrastiveModel on INPUT (default: the embedded PBMC counts).",
    )
    add_common_arguments(parser)
    parser.set_defaults(batch_size=256)  # NT-Xent's negatives are the minibatch: larger than the others' 128
    parser.add_argument("--n-latent", type=int, default=32)
    parser.add_argument("--n-hidden", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--thinning-keep", type=float, default=0.5, help="fraction of molecules a view keeps")
    parser.add_argument("--mask-rate", type=float, default=0.2, help="probability of zeroing each gene")
    parser.add_argument("--noise-std", type=float, default=0.2, help="Gaussian noise std on log1p expression")
    parser.add_argument("--mix-max-weight", type=float, default=0.5, help="largest kNN-neighbour mixing weight")
    parser.add_argument("--n-neighbors", type=int, default=15, help="k of the kNN table for neighbour mixing")
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.set_defaults(func=fit_contrastive)
