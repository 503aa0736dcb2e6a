"""``sclatent fit-masked``: masked-gene pretraining (and optional fine-tuning on a label column)."""

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


def fit_masked(args: argparse.Namespace) -> dict:
    from ..model import MaskedGeneModel

    start = time.perf_counter()
    adata, labels_key = load_input(args, "fit-masked")
    setup_from_arguments(MaskedGeneModel, adata, labels_key, args)
    model = MaskedGeneModel(
        adata,
        encoder=args.encoder,
        n_latent=args.n_latent,
        gene_likelihood=args.gene_likelihood,
        mask_rate=args.mask_rate,
        seed=args.seed,
    )
    train_seconds = timed_training(model, args, early_stopping=not args.no_early_stopping)
    key = "X_sclatent_masked"
    # the pretrained embedding (before any fine-tuning, which would fit it to the labels)
    adata.obsm[key] = model.get_latent_representation()
    summary = {"cells": adata.n_obs, "genes": adata.n_vars, "epochs": len(model.history["epoch"])}
    summary["train_seconds"] = train_seconds
    summary["n_masked"] = model.n_masked
    held_out = model.validation_indices
    if len(held_out):
        summary["heldout_masked_nll"] = model.get_masked_nll(indices=held_out)
    if args.fine_tune_fraction is not None:
        if not labels_key:
            raise SystemExit("error: --fine-tune-fraction needs --labels-key (the labels to fine-tune on).")
        model.fine_tune(
            labels_key=labels_key,
            fraction_labelled=args.fine_tune_fraction,
            seed=args.seed,
            accelerator=args.accelerator,
            progress_bar=not args.no_progress,
        )
        adata.obs["sclatent_masked_prediction"] = model.predict()
        summary["fine_tuned_on"] = len(model.labelled_indices)
    out, model_dir, umap_png, curves_png = cluster_and_write(adata, model, "masked", labels_key, args)

    summary.update(clustering_summary(adata, "leiden_sclatent_masked", labels_key, args))
    summary["total_seconds"] = time.perf_counter() - start
    print("\nSummary")
    print(f"  data            {summary['cells']} cells x {summary['genes']} genes")
    stopped = " (early stopping on the held-out cells)" if not args.no_early_stopping else ""
    print(f"  pretraining     {summary['epochs']} epochs in {train_seconds:.1f} s{stopped}, {args.encoder} encoder")
    if "heldout_masked_nll" in summary:
        print(
            f"  held-out NLL    {summary['heldout_masked_nll']:.2f} nats/cell of {model.n_masked} hidden genes "
            f"({len(held_out)} cells, {model.module.gene_likelihood})"
        )
    if "fine_tuned_on" in summary:
        print(
            f"  fine-tuned      on {summary['fine_tuned_on']} labelled cells of {labels_key!r}; predictions in "
            "obs['sclatent_masked_prediction'] (the training labels included: not a held-out score)"
        )
    print_clustering(summary, labels_key)
    print(f"  wrote           {out} (obsm['{key}'], obsm['X_umap'], obs['leiden_sclatent_masked'])")
    print(f"                  {model_dir}/ (model), {umap_png}, {curves_png}")
    print(f"  total time      {summary['total_seconds']:.1f} s")
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fit-masked",
        help="masked-gene pretraining: write the embedding, UMAP, Leiden clusters, model, figures",
        description="Pretrain sclatent's MaskedGeneModel on INPUT (default: the embedded PBMC counts).",
    )
    add_common_arguments(parser)
    parser.add_argument("--encoder", choices=["mlp", "transformer"], default="mlp")
    parser.add_argument("--n-latent", type=int, default=32)
    parser.add_argument("--gene-likelihood", choices=["nb", "zinb", "poisson"], default="nb")
    parser.add_argument("--mask-rate", type=float, default=0.15, help="fraction of each cell's genes hidden")
    parser.add_argument("--max-epochs", type=int, default=200, help="upper bound; training stops early by default")
    parser.add_argument("--no-early-stopping", action="store_true", help="train all --max-epochs")
    parser.add_argument(
        "--fine-tune-fraction",
        type=float,
        default=None,
        help="after pretraining, fine-tune a classifier on this fraction of --labels-key and write its predictions",
    )
    parser.set_defaults(func=fit_masked)
