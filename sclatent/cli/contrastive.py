"""``sclatent fit-contrastive``: SimCLR cell embeddings."""

from __future__ import annotations

from ..model import ContrastiveModel
from ._common import CellCommand, Run


def _report(run: Run) -> list[str]:
    history, summary = run.model.history, run.summary
    summary["train_nt_xent"] = history["train_nt_xent"][-1]
    if history.get("validation_nt_xent"):
        summary["validation_nt_xent"] = history["validation_nt_xent"][-1]
    line = f"  NT-Xent         {summary['train_nt_xent']:.3f} nats/cell (train)"
    if "validation_nt_xent" in summary:
        line += f", {summary['validation_nt_xent']:.3f} (held-out, fixed views)"
    epochs, batch = summary["epochs"], run.args.batch_size
    return [f"  training        {epochs} epochs in {run.train_seconds:.1f} s (batch {batch})", line]


FIT_CONTRASTIVE = CellCommand(
    name="fit-contrastive",
    help="train the contrastive (SimCLR) embedding, write it, UMAP, Leiden clusters, model, figures",
    description="Train sclatent's ContrastiveModel on INPUT (default: the embedded PBMC counts).",
    family="contrastive",
    model=ContrastiveModel,
    max_epochs=200,
    max_epochs_help="training epochs",
    # NT-Xent's negatives are the minibatch: larger than the others' 128
    option_defaults={"batch_size": 256},
    report=_report,
)
