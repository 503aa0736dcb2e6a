"""What the ``fit-*`` commands share: input loading, output paths, the clustering summary, arguments."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import distributed
from ..metrics.baselines import pca_embedding


def load_input(args: argparse.Namespace, command: str):
    """The input AnnData (or the embedded default), its labels key and a description."""
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
    start = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
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
    parser.add_argument("--batch-size", type=int, default=128)
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
