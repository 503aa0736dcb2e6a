"""The one run every ``fit-<family>`` command makes, and the pieces it is built from.

A command is a :class:`CellCommand`: its name, its model class (whose ``hyperparameters_class``
gives the options, :mod:`sclatent.hyperparameters`) and a few family hooks (extra options, what
to do after training, the family's summary lines). :func:`run` then does what every command does:
read the input (or the embedded PBMCs), ``setup_anndata``, build and train the model, write the
embedding, neighbours/UMAP/Leiden, the model folder, figures and ``OUT.h5ad``, and print a summary
with Leiden ARI/NMI beside scanpy's PCA.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed
from ..metrics.baselines import pca_embedding


@dataclass
class Run:
    """One command's run, as the family hooks see it.

    Attributes
    ----------
    args
        The parsed command line.
    adata, labels_key
        The input AnnData (annotated in place) and its labels column (or None).
    model
        The trained model.
    summary
        What the run measured (returned by :func:`run`; the family hooks add to it).
    train_seconds
        Wall time of ``model.train``.
    outputs
        What ``OUT.h5ad`` holds besides the embedding, UMAP and clusters (e.g. ``"layers['sclatent_denoised']"``).
    written
        Further files written, one line each.
    """

    args: argparse.Namespace
    adata: Any
    labels_key: str | None
    model: Any = None
    summary: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)


@dataclass
class CellCommand:
    """A ``fit-<family>`` command: what differs from the shared :func:`run`.

    Attributes
    ----------
    name, help, description
        ``sclatent <name>`` and its ``--help`` texts.
    family
        Suffix of ``obsm["X_sclatent_<family>"]`` and ``obs["leiden_sclatent_<family>"]``.
    model
        The model class; one option per field of its ``hyperparameters_class``.
    max_epochs, max_epochs_help
        Default of ``--max-epochs`` (None: the model's own default) and its help.
    hyperparameter_defaults
        This command's defaults for some hyperparameters (``fit-flow``: ``prior="realnvp"``).
    option_defaults
        This command's defaults for shared options (``fit-contrastive``: ``batch_size=256``).
    add_arguments
        Adds the family's own options (beyond the hyperparameters).
    train_options
        ``model.train`` keyword arguments from the command line (e.g. early stopping).
    after_training
        Adds the family's outputs to the AnnData and the summary before clustering (e.g. imputation).
    after_writing
        Writes further files after ``OUT.h5ad`` (e.g. synthetic cells).
    report
        The family's summary lines (training, held-out metrics), printed after the data line.
    """

    name: str
    help: str
    description: str
    family: str
    model: type
    max_epochs: int | None = None
    max_epochs_help: str = "default: scales with the number of cells"
    hyperparameter_defaults: dict[str, Any] = field(default_factory=dict)
    option_defaults: dict[str, Any] = field(default_factory=dict)
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    train_options: Callable[[argparse.Namespace], dict] = lambda args: {}
    after_training: Callable[[Run], None] | None = None
    after_writing: Callable[[Run], None] | None = None
    report: Callable[[Run], list[str]] = lambda run: []

    def register(self, commands: argparse._SubParsersAction) -> None:
        """Add this command's subparser: shared options, hyperparameters, family options."""
        parser = commands.add_parser(self.name, help=self.help, description=self.description)
        add_common_arguments(parser)
        parser.add_argument("--max-epochs", type=int, default=self.max_epochs, help=self.max_epochs_help)
        self.model.hyperparameters_class.add_arguments(parser, self.hyperparameter_defaults)
        if self.add_arguments is not None:
            self.add_arguments(parser)
        parser.set_defaults(func=lambda args: run(args, self), **self.option_defaults)


def run(args: argparse.Namespace, command: CellCommand) -> dict:
    """Train ``command``'s model on the input and write every output; the summary."""
    start = time.perf_counter()
    adata, labels_key = load_input(args, command.name)
    setup_from_arguments(command.model, adata, labels_key, args)
    # (validated by the model, which may resolve some first: fit-dae --linear implies the Gaussian likelihood)
    hyperparameters = command.model.hyperparameters_class.argument_values(args)
    model = command.model(adata, seed=args.seed, **hyperparameters)
    current = Run(args, adata, labels_key, model)
    current.train_seconds = timed_training(model, args, **command.train_options(args))
    key, leiden_key = f"X_sclatent_{command.family}", f"leiden_sclatent_{command.family}"
    adata.obsm[key] = model.get_latent_representation()
    current.summary = {"cells": adata.n_obs, "genes": adata.n_vars, "epochs": len(model.history["epoch"])}
    current.summary["train_seconds"] = current.train_seconds
    if command.after_training is not None:
        command.after_training(current)
    out, model_dir, umap_png, curves_png = cluster_and_write(adata, model, command.family, labels_key, args)
    if command.after_writing is not None:
        command.after_writing(current)
    current.summary.update(clustering_summary(adata, leiden_key, labels_key, args))
    current.summary["total_seconds"] = time.perf_counter() - start

    print("\nSummary")
    print(f"  data            {adata.n_obs} cells x {adata.n_vars} genes")
    for line in command.report(current):
        print(line)
    print_clustering(current.summary, labels_key)
    outputs = ", ".join([f"obsm['{key}']", *current.outputs, "obsm['X_umap']", f"obs['{leiden_key}']"])
    print(f"  wrote           {out} ({outputs})")
    for line in current.written:
        print(f"                  {line}")
    print(f"                  {model_dir}/ (model), {umap_png}, {curves_png}")
    print(f"  total time      {current.summary['total_seconds']:.1f} s")
    return current.summary


def load_input(args: argparse.Namespace, command: str):
    """The input AnnData (or the embedded default) and its labels key."""
    import scanpy as sc

    from .. import datasets

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
    if distributed.is_main_process():
        print(f"sclatent {command}: {adata.n_obs} cells x {adata.n_vars} genes ({source})")
    return adata, labels_key


def clustering_summary(adata, key: str, labels_key: str | None, args: argparse.Namespace) -> dict:
    """ARI / NMI of the Leiden clusters of ``obs[key]`` vs the labels, beside scanpy PCA's."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from ..metrics import leiden_scores

    if not labels_key:
        return {}
    labels = adata.obs[labels_key].astype(str).to_numpy()
    clusters = adata.obs[key].to_numpy()
    summary = {"ari": adjusted_rand_score(labels, clusters), "nmi": normalized_mutual_info_score(labels, clusters)}
    if not args.no_baseline:
        pca = leiden_scores(pca_embedding(adata, args.layer), labels, seed=args.seed)
        summary["pca_ari"], summary["pca_nmi"] = pca["ari"], pca["nmi"]
    return summary


def print_clustering(summary: dict, labels_key: str | None) -> None:
    if "ari" in summary:
        line = f"  Leiden vs {labels_key!r}: ARI {summary['ari']:.3f}, NMI {summary['nmi']:.3f}"
        if "pca_ari" in summary:
            line += f" (scanpy PCA baseline: ARI {summary['pca_ari']:.3f}, NMI {summary['pca_nmi']:.3f})"
        print(line)


def setup_from_arguments(model_class, adata, labels_key: str | None, args: argparse.Namespace) -> None:
    """``model_class.setup_anndata`` with the command line's layer, batch and labels keys."""
    model_class.setup_anndata(
        adata,
        layer=args.layer,
        batch_key=args.batch_key,
        labels_key=labels_key,
        allow_non_integer=args.allow_non_integer,
    )


def timed_training(model, args: argparse.Namespace, **train_arguments) -> float:
    """``model.train`` with the command line's epochs, batch size, device, progress bar and
    checkpoint folder; seconds."""
    if args.batch_size is not None:
        train_arguments["batch_size"] = args.batch_size
    start = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        accelerator=args.accelerator,
        progress_bar=not args.no_progress,
        checkpoint_dir=getattr(args, "checkpoint_dir", None),
        **train_arguments,
    )
    seconds = time.perf_counter() - start
    if not distributed.is_main_process():
        # under torchrun every rank trains, but only rank 0 evaluates, writes files and prints:
        # the other ranks are done (their parameters equal rank 0's)
        distributed.teardown()
        raise SystemExit(0)
    return seconds


def cluster_and_write(adata, model, family: str, labels_key: str | None, args: argparse.Namespace):
    """Neighbors, UMAP and Leiden on ``obsm["X_sclatent_<family>"]`` (set by the caller), then the
    outputs: the model folder, the UMAP and training-curve PNGs and ``OUT.h5ad``.

    Returns
    -------
    tuple of pathlib.Path
        ``(out, model_dir, umap_png, curves_png)`` paths; the clusters are in
        ``obs["leiden_sclatent_<family>"]``.
    """
    from ..metrics import neighbors_umap_leiden
    from ..plotting import plot_embedding, plot_training_history

    leiden_key = f"leiden_sclatent_{family}"
    neighbors_umap_leiden(adata, f"X_sclatent_{family}", key_added=leiden_key, seed=args.seed)
    out, model_dir, umap_png, curves_png = output_paths(args)
    model.save(model_dir, overwrite=True)
    plot_embedding(adata, [leiden_key] + ([labels_key] if labels_key else []), umap_png)
    plot_training_history(model.history, curves_png)
    adata.write_h5ad(out)
    return out, model_dir, umap_png, curves_png


def output_paths(args: argparse.Namespace) -> tuple[Path, Path, Path, Path]:
    """OUT.h5ad, the model folder, the UMAP and training-curve PNG paths."""
    out = Path(args.out)
    stem = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else Path(f"{stem}_model")
    return out, model_dir, Path(f"{stem}_umap.png"), Path(f"{stem}_training.png")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", help="h5ad with raw counts (default: embedded pbmc68k_reduced counts)")
    parser.add_argument("--out", required=True, help="output h5ad path")
    parser.add_argument("--layer", default=None, help="layer holding counts (default: X)")
    parser.add_argument("--batch-key", default=None)
    parser.add_argument(
        "--allow-non-integer", action="store_true", help="accept fractional counts (e.g. ambient-RNA corrected)"
    )
    parser.add_argument("--labels-key", default=None, help="obs column with labels, for ARI/NMI")
    parser.add_argument("--batch-size", type=int, default=None, help="cells per minibatch (default: the model's)")
    parser.add_argument("--accelerator", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=None, help="model folder (default: OUT stem + '_model')")
    parser.add_argument("--no-baseline", action="store_true", help="skip the scanpy PCA clustering baseline")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save a checkpoint here after every epoch; rerunning the same command resumes from it",
    )


def heldout_line(label: str, text: str) -> str:
    """A summary line with the label padded like the others."""
    return f"  {label:<15} {text}"
