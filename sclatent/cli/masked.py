"""``sclatent fit-masked``: masked-gene pretraining (and optional fine-tuning on a label column)."""

from __future__ import annotations

import argparse

from ..model import MaskedGeneModel
from ._common import CellCommand, Run


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-early-stopping", action="store_true", help="train all --max-epochs")
    parser.add_argument(
        "--fine-tune-fraction",
        type=float,
        default=None,
        help="after pretraining, fine-tune a classifier on this fraction of --labels-key and write its predictions",
    )


def _evaluate_and_fine_tune(run: Run) -> None:
    # obsm holds the pretrained embedding already (before any fine-tuning, which fits it to the labels)
    model, args, summary = run.model, run.args, run.summary
    summary["n_masked"] = model.n_masked
    held_out = model.validation_indices
    if len(held_out):
        summary["heldout_masked_nll"] = model.get_masked_nll(indices=held_out)
    if args.fine_tune_fraction is None:
        return
    if not run.labels_key:
        raise SystemExit("error: --fine-tune-fraction needs --labels-key (the labels to fine-tune on).")
    model.fine_tune(
        labels_key=run.labels_key,
        fraction_labelled=args.fine_tune_fraction,
        seed=args.seed,
        accelerator=args.accelerator,
        progress_bar=not args.no_progress,
    )
    run.adata.obs["sclatent_masked_prediction"] = model.predict()
    run.outputs.append("obs['sclatent_masked_prediction']")
    summary["fine_tuned_on"] = len(model.labelled_indices)


def _report(run: Run) -> list[str]:
    summary, model = run.summary, run.model
    stopped = " (early stopping on the held-out cells)" if not run.args.no_early_stopping else ""
    encoder = model.hyperparameters["encoder"]
    lines = [f"  pretraining     {summary['epochs']} epochs in {run.train_seconds:.1f} s{stopped}, {encoder} encoder"]
    if "heldout_masked_nll" in summary:
        lines.append(
            f"  held-out NLL    {summary['heldout_masked_nll']:.2f} nats/cell of {model.n_masked} hidden genes "
            f"({len(model.validation_indices)} cells, {model.module.gene_likelihood})"
        )
    if "fine_tuned_on" in summary:
        lines.append(
            f"  fine-tuned      on {summary['fine_tuned_on']} labelled cells of {run.labels_key!r}; predictions in "
            "obs['sclatent_masked_prediction'] (the training labels included: not a held-out score)"
        )
    return lines


FIT_MASKED = CellCommand(
    name="fit-masked",
    help="masked-gene pretraining: write the embedding, UMAP, Leiden clusters, model, figures",
    description="Pretrain sclatent's MaskedGeneModel on INPUT (default: the embedded PBMC counts).",
    family="masked",
    model=MaskedGeneModel,
    max_epochs=200,
    max_epochs_help="upper bound; training stops early by default",
    add_arguments=_add_arguments,
    train_options=lambda args: {"early_stopping": not args.no_early_stopping},
    after_training=_evaluate_and_fine_tune,
    report=_report,
)
