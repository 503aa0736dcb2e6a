"""``sclatent map-query REFERENCE_MODEL_DIR QUERY.h5ad --out OUT.h5ad``: map new cells onto a trained reference.

The reference is a model folder written by ``model.save`` or a ``fit-vae`` run: a ``VAE`` or a
``SemiSupervisedVAE``. The query is aligned to the reference's genes
(:meth:`~sclatent.model.BaseModel.prepare_query_anndata`), its new batches get their own rows and
only those train (:meth:`~sclatent.model.BaseModel.load_query_data`, scArches' surgery), and the
outputs are written: ``OUT.h5ad`` (the query with its latent, and for a semi-supervised reference
the predicted label and its probability in ``obs``), the query model folder, and a UMAP of
reference and query cells in one space coloured by dataset and label (``OUT_umap.png``; with
``--reference-data``, else the query alone).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .._persistence import METADATA_FILE
from ..data import SetupError
from ._common import output_paths, timed_training

#: The model classes a reference may be, by the ``model_class`` its metadata records.
MAPPABLE = ("VAE", "SemiSupervisedVAE")


def _reference_class(directory: Path):
    from .. import model

    meta = directory / METADATA_FILE
    if not meta.exists():
        raise FileNotFoundError(f"{directory} does not hold a saved sclatent model ({METADATA_FILE} is missing).")
    name = json.loads(meta.read_text()).get("model_class")
    if name not in MAPPABLE:
        raise SetupError(
            f"{directory} holds a {name}; map-query maps onto a VAE or a SemiSupervisedVAE reference. Train one "
            "(sclatent fit-vae, or SemiSupervisedVAE.from_vae in Python) and save it."
        )
    return getattr(model, name)


def _read(path: str, what: str):
    import anndata as ad

    if not Path(path).exists():
        raise SystemExit(f"error: {what} file {path} does not exist.")
    return ad.read_h5ad(path)


def map_query(args: argparse.Namespace) -> dict:
    """Align, map and train the query; write its outputs; the summary."""
    start = time.perf_counter()
    reference_dir = Path(args.reference)
    model_class = _reference_class(reference_dir)
    reference = model_class.load(reference_dir)
    query = _read(args.query, "query")
    kind = model_class.__name__
    print(f"sclatent map-query: {query.n_obs} query cells x {query.n_vars} genes onto a {kind} reference")
    prepared = model_class.prepare_query_anndata(query, reference)
    model = model_class.load_query_data(prepared, reference, accelerator=args.accelerator)
    train_seconds = timed_training(model, args)
    key = f"X_sclatent_{model.name}"
    prepared.obsm[key] = model.get_latent_representation()
    summary = {"query_cells": prepared.n_obs, "genes": prepared.n_vars, "train_seconds": train_seconds}
    known = set(reference.registry.batch_categories)
    summary["new_batches"] = [c for c in model.registry.batch_categories if c not in known]
    if model_class.__name__ == "SemiSupervisedVAE":
        proba = model.predict(soft=True)
        prepared.obs["sclatent_prediction"] = proba.idxmax(axis=1).astype("category")
        prepared.obs["sclatent_prediction_probability"] = proba.max(axis=1).to_numpy()
        summary["predicted"] = prepared.obs["sclatent_prediction"].value_counts().to_dict()
    out, model_dir, umap_png, _ = output_paths(args)
    model.save(model_dir, overwrite=True)
    summary.update(_umap(prepared, model, args, key, umap_png))
    prepared.write_h5ad(out)
    summary["total_seconds"] = time.perf_counter() - start

    print("\nSummary")
    print(f"  query           {prepared.n_obs} cells x {prepared.n_vars} reference genes")
    print(f"  new batches     {', '.join(map(str, summary['new_batches']))} (their rows trained; the reference frozen)")
    print(f"  training        {len(model.history['epoch'])} epochs in {train_seconds:.1f} s")
    if "predicted" in summary:
        counts = ", ".join(f"{label} {n}" for label, n in summary["predicted"].items())
        mean_probability = float(prepared.obs["sclatent_prediction_probability"].mean())
        print(
            f"  predicted       {counts} (mean probability {mean_probability:.2f}, temperature {model.temperature:.2f})"
        )
    if "mixing" in summary:
        print(f"  reference/query kNN entropy {summary['mixing']:.3f} in the shared latent (1: fully mixed)")
    written = [key] + (["sclatent_prediction", "sclatent_prediction_probability"] if "predicted" in summary else [])
    print(f"  wrote           {out} ({', '.join(written)}, obsm['X_umap'])")
    print(f"                  {model_dir}/ (query model), {umap_png}")
    print(f"  total time      {summary['total_seconds']:.1f} s")
    return summary


def _umap(prepared, model, args: argparse.Namespace, key: str, path: Path) -> dict:
    """UMAP of the query (and the reference cells, with ``--reference-data``) in the shared latent."""
    import anndata as ad

    from ..metrics import batch_entropy, neighbors_umap_leiden
    from ..plotting import plot_embedding

    query_labels = prepared.obs["sclatent_prediction"].astype(str) if "sclatent_prediction" in prepared.obs else None
    labels_key = model.registry.labels_key
    if args.reference_data is None:
        joint = ad.AnnData(obs={"dataset": np.repeat("query", prepared.n_obs)}, obsm={key: prepared.obsm[key]})
        joint.obs_names = prepared.obs_names
        if query_labels is not None:
            joint.obs["label"] = query_labels.to_numpy()
        extra = {}
    else:
        reference_cells = _read(args.reference_data, "reference data")
        aligned = type(model).prepare_query_anndata(reference_cells, model)
        latent = model.get_latent_representation(aligned)
        datasets = np.concatenate([np.repeat("reference", aligned.n_obs), np.repeat("query", prepared.n_obs)])
        joint = ad.AnnData(obs={"dataset": datasets}, obsm={key: np.concatenate([latent, prepared.obsm[key]])})
        joint.obs_names = [f"reference:{n}" for n in aligned.obs_names] + [f"query:{n}" for n in prepared.obs_names]
        if labels_key and labels_key in aligned.obs:
            reference_labels = aligned.obs[labels_key].astype(str).to_numpy()
            query_part = query_labels.to_numpy() if query_labels is not None else np.repeat("query", prepared.n_obs)
            joint.obs["label"] = np.concatenate([reference_labels, query_part])
        extra = {"mixing": batch_entropy(joint.obsm[key], joint.obs["dataset"].to_numpy())}
    neighbors_umap_leiden(joint, key, key_added="leiden", seed=args.seed)
    prepared.obsm["X_umap"] = joint.obsm["X_umap"][-prepared.n_obs :]
    plot_embedding(joint, ["dataset"] + (["label"] if "label" in joint.obs else []), path)
    return extra


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "map-query",
        help="map a query AnnData onto a trained reference model (scArches): latent, labels, UMAP",
        description=(
            "Map the cells of QUERY.h5ad onto the VAE or SemiSupervisedVAE saved in REFERENCE_MODEL_DIR: align the "
            "genes, train only the query's new batch rows, write the latent (and predicted labels) and a UMAP."
        ),
    )
    parser.add_argument("reference", help="folder of the trained reference model (model.save / fit-vae)")
    parser.add_argument("query", help="h5ad of the query cells (raw counts where the reference reads them)")
    parser.add_argument("--out", required=True, help="output h5ad path")
    parser.add_argument("--reference-data", default=None, help="the reference's h5ad, to plot reference and query")
    parser.add_argument("--max-epochs", type=int, default=100, help="epochs of query training (default 100)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--accelerator", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=None, help="query model folder (default: OUT stem + '_model')")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=map_query, checkpoint_dir=None)


__all__ = ["MAPPABLE", "add_command", "map_query"]
