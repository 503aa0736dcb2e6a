"""``sclatent fit-dae``: the denoising autoencoder; also writes the denoised counts."""

from __future__ import annotations

import argparse

from ..model import DenoisingAE
from ._common import CellCommand, Run


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-early-stopping", action="store_true", help="train all --max-epochs on all cells")


def _impute(run: Run) -> None:
    run.model.impute(layer_out="sclatent_denoised")
    run.outputs.append("layers['sclatent_denoised']")
    held_out = run.model.validation_indices
    if len(held_out):
        run.summary["heldout_reconstruction"] = run.model.get_reconstruction_error(indices=held_out)


def _report(run: Run) -> list[str]:
    summary = run.summary
    stopped = " (early stopping on the held-out cells)" if not run.args.no_early_stopping else ""
    lines = [f"  training        {summary['epochs']} epochs in {run.train_seconds:.1f} s{stopped}"]
    if "heldout_reconstruction" in summary:
        lines.append(
            f"  held-out NLL    {summary['heldout_reconstruction']:.2f} nats/cell ({len(run.model.validation_indices)} "
            f"cells; {run.model.module.gene_likelihood}, clean input)"
        )
    return lines


FIT_DAE = CellCommand(
    name="fit-dae",
    help="train the denoising autoencoder, write its code, denoised counts, UMAP, Leiden clusters, model, figures",
    description="Train sclatent's DenoisingAE (DCA-style) on INPUT (default: the embedded PBMC counts).",
    family="dae",
    model=DenoisingAE,
    max_epochs=300,
    max_epochs_help="upper bound; training stops early by default",
    add_arguments=_add_arguments,
    train_options=lambda args: {"early_stopping": not args.no_early_stopping},
    after_training=_impute,
    report=_report,
)
