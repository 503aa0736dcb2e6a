"""Label transfer, side by side: sclatent (VAE -> SemiSupervisedVAE -> query mapping) against scvi-tools
(SCVI -> SCANVI -> ``load_query_data``), beside model-free baselines.

Three tasks, the same splits, genes and epochs for every method:

1. ``pbmc``: pbmc3k (reference, the Seurat tutorial's 9 ``cell_type`` labels) -> scanpy's 700 embedded
   PBMCs (query, ``bulk_labels``), on the query's 765 genes (all in pbmc3k). The two vocabularies are
   mapped to six shared coarse types (B, CD4 T, CD8 T, NK, CD14 Mono, DC; the table is printed and
   stored in the JSON); only query cells of a shared type are scored, and each method's fine
   reference-label predictions are mapped to the coarse types first (probabilities summed per
   coarse type; reference types with no query counterpart become ``other``, always wrong).
2. ``cellbench``: cellbench_5cl singlets (doublets, ``demuxlet_cls == "DBL"``, are dropped: the
   cell line by SNP is ground truth only for singlets), plates 1 and 2 as reference, plate 3 as
   query; 2,000 HVGs (``seurat_v3``) picked on the reference plates' counts only.
3. ``scarcity``: within pbmc3k (its 2,638 labelled cells, 2,000 ``seurat_v3`` HVGs of all of them)
   and within cellbench_5cl (its 571 singlets, 2,000 HVGs of all of them, plate as batch): per seed
   one stratified 80/20 train/test split; 1 %, 10 % and 100 % of the training cells keep their
   labels (stratified, at least one per class, nested: 1 % within 10 % within 100 %); the
   semi-supervised models train on all cells with only those labels (test cells unlabelled) and
   the test cells are scored. The VAE / SCVI is pretrained once per (dataset, seed) and reused for
   the three fractions (labels do not enter the unsupervised stage).

Pipelines (each in its own fresh process, so that timing and peak RSS, ``VmHWM``, are per method):

* ``sclatent``: ``VAE`` (``setup_anndata(batch_key=...)``, train) -> ``SemiSupervisedVAE.from_vae``
  (train) -> ``SemiSupervisedVAE.prepare_query_anndata`` / ``load_query_data`` (train on the
  query) -> ``predict(soft=True)``.
* ``scvi``: ``SCVI`` -> ``SCANVI.from_scvi_model`` -> ``SCANVI.prepare_query_anndata`` /
  ``load_query_data`` (train, ``weight_decay=0``) -> ``predict(soft=True)``.
* baselines (one process): kNN (k = 15, vote fractions) and logistic regression on the reference's
  PCA (log-normalised, scaled, 50 PCs fitted on the reference; query projected), and logistic
  regression on the scaled log-normalised counts (the CellTypist approach); ``kNN on the VAE
  latent`` (k = 15) on each library's unsupervised latent (tasks 1-2: the query mapped into the VAE
  with ``VAE.load_query_data``, trained as long as the semi-supervised query).
* neighbour vote (tasks 1-2, no extra training): each pipeline's soft predictions averaged over
  every query cell's 15 nearest query cells in its own query latent (itself included), a
  transductive post-processing (CellTypist's majority voting is one) applied alike to both
  libraries; reported beside the pipelines, not counted in the targets or as a baseline.

Reported per method: query accuracy, macro-F1, ECE of the soft predictions (15 bins), for tasks 1-2
the ref+query latent's mixing (kNN batch entropy, 50 neighbours, reference vs query) and label
separation (label ASW on the labelled/shared types), training time per stage and in total, mapping
time, peak RSS. Targets: sclatent's accuracy and macro-F1 >= scvi-tools', its ECE below scvi-tools',
and scvi-tools' total wall time >= 3x sclatent's, on every task. See ``benchmarks/README.md``.

Run from the repository root::

    # smoke run (epochs 3 / 2 / 2, seed 0; about 2 minutes on an idle machine, numbers meaningless)
    SCLATENT_DATA_DIR=/work/shared/data PYTHONPATH=. python benchmarks/bench_label_transfer.py --quick

    # the full run: the defaults spelt out (2 CPU threads per process; about 41 minutes on an
    # idle 2-core machine, see benchmarks/README.md)
    SCLATENT_DATA_DIR=/work/shared/data PYTHONPATH=. python benchmarks/bench_label_transfer.py \\
        --tasks pbmc,cellbench,scarcity --seeds 0,1,2,3,4 --fractions 0.01,0.1,1 \\
        --vae-epochs 200 --ssvae-epochs 20 --query-epochs 200 --threads 2 \\
        --out benchmarks/results_label_transfer.json

Epochs: one setting per stage for both pipelines and every task (VAE/SCVI 200 with KL warm-up over
66; SemiSupervisedVAE/SCANVI 20 and query 200, both without warm-up). scVI's heuristic would give
400 for these < 20k-cell sets; 200 keeps the 5-seed run under an hour on 2 cores. Each library
trains its own default objective (KL weight 2 for sclatent, 1 for scvi-tools); neither scores its
held-out cells every epoch (scvi-tools validates none without early stopping; sclatent scores
them after each stage's last epoch only, ``check_val_every_n_epoch``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_vae import (
    DEFAULT_DATA_DIR,
    REPO_ROOT,
    _cpu_model,
    _fmt,
    _git_state,
    _json_default,
    _limit_threads,
    _peak_rss_mb,
    _resolve_accelerator,
    _rss_mb,
    _version,
)

# Architecture shared by both libraries: scVI's defaults, except that the encoder sees the batch
# (encode_covariates=True, as scvi-tools' scArches tutorial recommends; sclatent's default): only
# then can query training adapt the encoder to a new batch. BatchNorm in both (neither library's
# VAE offers scArches' layer norm in both: sclatent has none), ZINB, per-gene dispersion.
N_HIDDEN, N_LAYERS, N_LATENT, DROPOUT = 128, 1, 10, 0.1
GENE_LIKELIHOOD, DISPERSION = "zinb", "gene"
BATCH_SIZE = 128
LR = 1e-3  # scvi-tools' default (sclatent's train() defaults to 4e-3 since issue 18)
#: Fraction of cells each training stage trains on (both libraries' default: the rest is their own
#: validation split; sclatent fits the temperature of its predictions on the labelled ones).
TRAIN_SIZE = 0.9
CLASSIFICATION_RATIO = 50.0  # both libraries' default
UNLABELLED = "Unknown"
OTHER = "other"
K_NEIGHBOURS = 15
N_PCS = 50
N_HVG = 2000
MIXING_NEIGHBOURS = 50
LR_MAX_ITER = 1000
LR_SCALE_CLIP = 10.0  # scaled log-expression clipped at 10 (scanpy's / CellTypist's max_value)

TASKS = {
    "pbmc": "pbmc3k (reference) -> embedded PBMCs (pbmc68k_reduced, query)",
    "cellbench": "cellbench_5cl singlets: plates 1+2 (reference) -> plate 3 (query)",
    "scarcity": "label scarcity within pbmc3k and within cellbench_5cl (stratified 80/20 per seed)",
}
SCARCITY_DATASETS = ("pbmc3k", "cellbench_5cl")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)
#: One setting per stage for every task and both libraries (see the README for the time budget).
DEFAULT_EPOCHS = {"vae": 200, "ssvae": 20, "query": 200}
QUICK_EPOCHS = {"vae": 3, "ssvae": 2, "query": 2}
SPEED_TARGET = 3.0  # scvi-tools' total wall time / sclatent's

LIBRARIES = ("sclatent", "scvi")
PIPELINE_NAMES = {"sclatent": "sclatent SSVAE", "scvi": "scvi-tools SCANVI"}
BASELINES = {
    "knn_pca": "kNN (k=15) on PCA",
    "logreg_pca": "LogReg on PCA",
    "logreg_counts": "LogReg on log-counts (CellTypist)",
}
KNN_LATENT = {"sclatent": "kNN on sclatent VAE latent", "scvi": "kNN on scvi-tools SCVI latent"}
VOTE = {"sclatent": "sclatent SSVAE + neighbour vote", "scvi": "scvi-tools SCANVI + neighbour vote"}
VOTE_NEIGHBOURS = 15

# Task 1: both vocabularies -> the shared coarse types (None: no counterpart in the other data set).
SHARED_TYPES = ("B", "CD4 T", "CD8 T", "NK", "CD14 Mono", "DC")
PBMC3K_TO_COARSE = {
    "Naive CD4 T": "CD4 T",
    "Memory CD4 T": "CD4 T",
    "CD14+ Mono": "CD14 Mono",
    "B": "B",
    "CD8 T": "CD8 T",
    "FCGR3A+ Mono": None,
    "NK": "NK",
    "DC": "DC",
    "Platelet": None,
}
BULK_LABELS_TO_COARSE = {
    "CD14+ Monocyte": "CD14 Mono",
    "CD19+ B": "B",
    "CD34+": None,
    "CD4+/CD25 T Reg": "CD4 T",
    "CD4+/CD45RA+/CD25- Naive T": "CD4 T",
    "CD4+/CD45RO+ Memory": "CD4 T",
    "CD56+ NK": "NK",
    "CD8+ Cytotoxic T": "CD8 T",
    "CD8+/CD45RA+ Naive Cytotoxic": "CD8 T",
    "Dendritic": "DC",
}


# ======================================================================================== data


def _counts_anndata(counts, obs, var_names):
    """A fresh AnnData holding CSR float32 counts in X and layers["counts"]."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    matrix = sp.csr_matrix(counts, dtype=np.float32)
    adata = ad.AnnData(X=matrix, obs=obs.copy(), var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
    adata.layers["counts"] = matrix.copy()
    return adata


def _hvg(counts, var_names, n_top: int) -> np.ndarray:
    """Indices (in the input order) of ``n_top`` seurat_v3 highly variable genes of these counts."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc
    import scipy.sparse as sp

    scratch = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), var=pd.DataFrame(index=pd.Index(var_names)))
    sc.pp.highly_variable_genes(scratch, flavor="seurat_v3", n_top_genes=min(n_top, scratch.n_vars))
    return np.flatnonzero(scratch.var["highly_variable"].to_numpy())


def _drop_empty(adata):
    totals = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    keep = totals > 0
    return adata[keep].copy(), int((~keep).sum())


def prepare_transfer(task: str, workdir: Path, data_dir: str) -> dict:
    """Reference and query AnnData files (counts, ``batch``, ``label``) and the scoring information."""
    import pandas as pd

    from sclatent import datasets

    if task == "pbmc":
        loaded = datasets.pbmc3k(data_dir=data_dir)
        ref_full = loaded[loaded.obs["cell_type"].notna().to_numpy()]
        query_full = datasets.pbmc68k_counts()
        genes = np.asarray(query_full.var_names, dtype=str)
        missing = np.setdiff1d(genes, np.asarray(ref_full.var_names, dtype=str))
        if missing.size:
            raise RuntimeError(f"{missing.size} query genes are not in pbmc3k: {missing[:10]}")
        ref_counts = ref_full[:, genes].layers["counts"]
        query_counts = query_full.layers["counts"]
        ref_labels = ref_full.obs["cell_type"].astype(str).to_numpy()
        query_truth = query_full.obs["bulk_labels"].astype(str).to_numpy()
        ref_batches = np.full(ref_full.n_obs, "pbmc3k", dtype=object)
        query_batch = "pbmc68k"
        gene_note = f"the query's {genes.size} genes (all present in pbmc3k)"
        extra = {"n_ref_cells_unlabelled_dropped": int(loaded.n_obs - ref_full.n_obs)}
    elif task == "cellbench":
        full = datasets.cellbench_5cl(data_dir=data_dir)
        singlets = full[(full.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()]
        plate = singlets.obs["batch"].astype(str).to_numpy()
        is_ref = np.isin(plate, ["plate1", "plate2"])
        ref_part, query_part = singlets[is_ref], singlets[~is_ref]
        hvg = _hvg(ref_part.layers["counts"], np.asarray(ref_part.var_names, dtype=str), N_HVG)
        genes = np.asarray(ref_part.var_names, dtype=str)[hvg]
        ref_counts = ref_part.layers["counts"][:, hvg]
        query_counts = query_part.layers["counts"][:, hvg]
        ref_labels = ref_part.obs["cell_type"].astype(str).to_numpy()
        query_truth = query_part.obs["cell_type"].astype(str).to_numpy()
        ref_batches = plate[is_ref].astype(object)
        query_batch = "plate3"
        gene_note = f"{genes.size} seurat_v3 HVGs of the reference plates' counts"
        extra = {"n_doublets_dropped": int(full.n_obs - singlets.n_obs)}
    else:
        raise ValueError(task)

    ref_obs = pd.DataFrame(
        {"batch": pd.Categorical(ref_batches), "label": ref_labels},
        index=pd.Index([f"ref_{i}" for i in range(ref_counts.shape[0])]),
    )
    query_obs = pd.DataFrame(
        {"batch": pd.Categorical(np.full(query_counts.shape[0], query_batch)), "truth": query_truth},
        index=pd.Index([f"query_{i}" for i in range(query_counts.shape[0])]),
    )
    ref, n_ref_empty = _drop_empty(_counts_anndata(ref_counts, ref_obs, genes))
    query, n_query_empty = _drop_empty(_counts_anndata(query_counts, query_obs, genes))
    ref_path, query_path = workdir / f"{task}_ref.h5ad", workdir / f"{task}_query.h5ad"
    ref.write_h5ad(ref_path)
    query.write_h5ad(query_path)

    ref_labels = ref.obs["label"].astype(str).to_numpy()
    query_truth = query.obs["truth"].astype(str).to_numpy()
    if task == "pbmc":
        ref_map = dict(PBMC3K_TO_COARSE)
        query_coarse = np.asarray([BULK_LABELS_TO_COARSE.get(t) or OTHER for t in query_truth], dtype=object)
        ref_coarse = np.asarray([ref_map.get(t) or OTHER for t in ref_labels], dtype=object)
        target_classes = list(SHARED_TYPES)
    else:
        ref_map = None
        query_coarse = query_truth.astype(object)
        ref_coarse = ref_labels.astype(object)
        target_classes = sorted(set(ref_labels))
    scored = np.isin(query_coarse, target_classes)
    summary = {
        "reference_cells": int(ref.n_obs),
        "query_cells": int(query.n_obs),
        "genes": int(ref.n_vars),
        "gene_selection": gene_note,
        "reference_batches": sorted({str(b) for b in ref_batches}),
        "query_batch": query_batch,
        "empty_cells_dropped": {"reference": n_ref_empty, "query": n_query_empty},
        "query_cells_scored": int(scored.sum()),
        "reference_label_counts": _counts(ref_labels),
        "query_label_counts": _counts(query_truth),
        **extra,
    }
    return {
        "ref_path": ref_path,
        "query_path": query_path,
        "ref_labels": ref_labels,
        "ref_coarse": ref_coarse,
        "query_coarse": query_coarse,
        "scored": scored,
        "class_map": ref_map,
        "target_classes": target_classes,
        "summary": summary,
    }


def pbmc_transfer_data(data_dir: str = DEFAULT_DATA_DIR) -> tuple[dict, object, object]:
    """``(prep, reference, query)`` of the pbmc transfer task (:func:`prepare_transfer`'s scoring
    information and the two AnnData objects, read into memory), for the probes that rerun a pipeline."""
    import anndata as ad

    with tempfile.TemporaryDirectory() as work:
        prep = prepare_transfer("pbmc", Path(work), data_dir)
        return prep, ad.read_h5ad(prep["ref_path"]), ad.read_h5ad(prep["query_path"])


def train_reference(pipe, reference):
    """The pipeline's semi-supervised reference model on ``reference`` (its VAE, then the
    semi-supervised stage, each on its own copy of the AnnData), for the probes that remap a query."""
    vae = pipe.pretrain(reference.copy(), "batch")
    return pipe.semi_supervised(vae, "label", reference.copy())


def score_mapped_query(prep: dict, pipe, model, prepared, reference_latent=None) -> dict:
    """:func:`score` of a mapped query model's soft predictions on the task's scored cells, plus
    :func:`mixing_scores` of the query's latents against ``reference_latent`` when given."""
    proba, classes = pipe.proba(model, prepared)
    scored = prep["scored"]
    scores = score(proba[scored], classes, prep["query_coarse"][scored], prep["target_classes"], prep["class_map"])
    if reference_latent is not None:
        query_latent = pipe.latent(model, prepared)
        scores.update(
            mixing_scores(
                reference_latent, query_latent, prep["ref_coarse"], prep["query_coarse"], prep["target_classes"]
            )
        )
    return scores


def pbmc_probe_setup(argv: list[str], threads: int = 2) -> tuple[list[int], dict, object, object]:
    """What every pbmc probe starts with: its seeds (``argv[1]``, comma-separated; default 0,1,2),
    warnings silenced, ``threads`` torch threads, and :func:`pbmc_transfer_data`'s ``(prep,
    reference, query)``."""
    import torch

    seeds = [int(s) for s in argv[1].split(",")] if len(argv) > 1 else [0, 1, 2]
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    return (seeds, *pbmc_transfer_data())


def probe_config(seed: int, threads: int = 2) -> dict:
    """A probe pipeline's configuration: the benchmark's epochs on the CPU with ``threads`` threads."""
    return {"seed": seed, "accelerator": "cpu", "threads": threads, "epochs": dict(DEFAULT_EPOCHS)}


def print_probe_scores(seed: int, name: str, scores: dict) -> None:
    """One line of a pbmc probe: a seed's :func:`score_mapped_query` for one variant."""
    per_class = {c: round(f, 2) for c, f in scores["per_class_f1"].items()}
    print(
        f"seed {seed}  {name:22s} accuracy {scores['accuracy']:.3f}  macro-F1 {scores['macro_f1']:.3f}  "
        f"ECE {scores['ece']:.3f}  batch entropy {scores['batch_entropy']:.3f}  "
        f"label ASW {scores['label_asw']:.3f}  per-class F1 {per_class}",
        flush=True,
    )


def print_probe_means(rows: dict[str, list[dict]], seeds) -> None:
    """The closing lines of a pbmc probe: each variant's mean scores over ``seeds``."""
    print(f"means over seeds {list(seeds)}:")
    for name, scores in rows.items():
        means = {key: np.mean([s[key] for s in scores]) for key in ("accuracy", "macro_f1", "ece", "batch_entropy")}
        print(
            f"  {name:22s} accuracy {means['accuracy']:.3f}  macro-F1 {means['macro_f1']:.3f}  "
            f"ECE {means['ece']:.3f}  batch entropy {means['batch_entropy']:.3f}"
        )


def _counts(values) -> dict[str, int]:
    names, counts = np.unique(np.asarray(values, dtype=str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


def load_scarcity_base(name: str, data_dir: str) -> dict:
    """The dataset's cells and genes for the scarcity task (chosen once, the same for every seed)."""
    import pandas as pd

    from sclatent import datasets

    if name == "pbmc3k":
        full = datasets.pbmc3k(data_dir=data_dir)
        cells = full[full.obs["cell_type"].notna().to_numpy()]
        batch_key, batches = None, None
        note = "the 2,638 Seurat-labelled cells"
    elif name == "cellbench_5cl":
        full = datasets.cellbench_5cl(data_dir=data_dir)
        cells = full[(full.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()]
        batch_key, batches = "batch", cells.obs["batch"].astype(str).to_numpy()
        note = "the 571 singlets (doublets dropped), plate as batch"
    else:
        raise ValueError(name)
    var_names = np.asarray(cells.var_names, dtype=str)
    hvg = _hvg(cells.layers["counts"], var_names, N_HVG)
    obs = pd.DataFrame({"truth": cells.obs["cell_type"].astype(str).to_numpy()}, index=pd.Index(cells.obs_names))
    if batch_key:
        obs[batch_key] = pd.Categorical(batches)
    adata, n_empty = _drop_empty(_counts_anndata(cells.layers["counts"][:, hvg], obs, var_names[hvg]))
    return {
        "adata": adata,
        "batch_key": batch_key,
        "summary": {
            "cells": int(adata.n_obs),
            "genes": int(adata.n_vars),
            "selection": f"{note}; {hvg.size} seurat_v3 HVGs of all of them (no labels used)",
            "empty_cells_dropped": n_empty,
            "label_counts": _counts(adata.obs["truth"]),
        },
    }


def _fraction_tag(fraction: float) -> str:
    return f"{fraction:g}"


def scarcity_split(labels: np.ndarray, seed: int, fractions) -> tuple[np.ndarray, np.ndarray, dict]:
    """Stratified 80/20 train/test split and, per fraction, the labelled training cells (nested).

    Per class: ``max(1, round(fraction * n_class_train))`` of its training cells keep their label,
    the first ones of one seeded permutation, so the 1 % cells are among the 10 % cells.
    """
    from sklearn.model_selection import train_test_split

    cells = np.arange(labels.size)
    train, test = train_test_split(cells, test_size=0.2, stratify=labels, random_state=seed)
    rng = np.random.default_rng(seed)
    order = {c: rng.permutation(train[labels[train] == c]) for c in np.unique(labels[train])}
    labelled = {}
    for fraction in fractions:
        chosen = [members[: max(1, round(fraction * members.size))] for members in order.values()]
        labelled[_fraction_tag(fraction)] = np.sort(np.concatenate(chosen))
    return np.sort(train), np.sort(test), labelled


def prepare_scarcity(base: dict, name: str, seed: int, fractions, workdir: Path) -> dict:
    adata = base["adata"].copy()
    truth = adata.obs["truth"].astype(str).to_numpy()
    train, test, labelled = scarcity_split(truth, seed, fractions)
    for tag, cells in labelled.items():
        column = np.full(adata.n_obs, UNLABELLED, dtype=object)
        column[cells] = truth[cells]
        adata.obs[f"labels_{tag}"] = column
    is_test = np.zeros(adata.n_obs, dtype=bool)
    is_test[test] = True
    adata.obs["is_test"] = is_test
    path = workdir / f"scarcity_{name}_seed{seed}.h5ad"
    adata.write_h5ad(path)
    return {
        "path": path,
        "truth": truth,
        "train": train,
        "test": test,
        "labelled": labelled,
        "batch_key": base["batch_key"],
        "summary": {
            "n_train": int(train.size),
            "n_test": int(test.size),
            "n_labelled": {tag: int(cells.size) for tag, cells in labelled.items()},
        },
    }


# ======================================================================================== worker: pipelines


class SclatentPipeline:
    """VAE -> SemiSupervisedVAE -> query mapping with sclatent."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg

    def _train_kwargs(self, epochs: int) -> dict:
        # sclatent's default objective (KL weight 2); the held-out cells scored after the last
        # epoch only, as scvi-tools validates none without early stopping
        return {
            "check_val_every_n_epoch": epochs,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "train_size": TRAIN_SIZE,
            "early_stopping": False,
            "seed": self.cfg["seed"],
            "progress_bar": False,
            "accelerator": self.cfg["accelerator"],
        }

    def pretrain(self, adata, batch_key):
        from sclatent.model import VAE

        VAE.setup_anndata(adata, layer="counts", batch_key=batch_key)
        model = VAE(
            adata,
            n_latent=N_LATENT,
            n_hidden=N_HIDDEN,
            n_layers=N_LAYERS,
            dropout_rate=DROPOUT,
            dispersion=DISPERSION,
            gene_likelihood=GENE_LIKELIHOOD,
            use_observed_library=True,
            encode_covariates=True,
            inject_covariates=True,
            seed=self.cfg["seed"],
        )
        epochs = self.cfg["epochs"]["vae"]
        model.train(max_epochs=epochs, kl_warmup_epochs=epochs // 3, **self._train_kwargs(epochs))
        return model

    def semi_supervised(self, vae, labels_key, adata):
        from sclatent.model import SemiSupervisedVAE

        labels = adata.obs[labels_key].astype(str).to_numpy()
        # a fully labelled reference has no unlabelled marker: SemiSupervisedVAE then wants None
        unlabelled = UNLABELLED if (labels == UNLABELLED).any() else None
        model = SemiSupervisedVAE.from_vae(
            vae,
            labels_key=labels_key,
            unlabeled_category=unlabelled,
            adata=adata,
            classification_ratio=CLASSIFICATION_RATIO,
        )
        epochs = self.cfg["epochs"]["ssvae"]
        model.train(max_epochs=epochs, kl_warmup_epochs=0, **self._train_kwargs(epochs))
        return model

    def query_anndata(self, query, reference_model, labels_key):
        q = query.copy()
        if labels_key is not None:
            q.obs[labels_key] = np.nan  # missing label: unlabelled under any unlabeled_category
        return q

    #: extra ``load_query_data`` options (none in the benchmark; probes set them to map otherwise)
    query_options: dict | None = None

    def load_query(self, reference_model, query):
        """The untrained query model and the aligned query (probes override this to map otherwise)."""
        cls = type(reference_model)
        prepared = cls.prepare_query_anndata(query, reference_model)
        return cls.load_query_data(prepared, reference_model, **(self.query_options or {})), prepared

    def map_query(self, reference_model, query):
        model, prepared = self.load_query(reference_model, query)
        epochs = self.cfg["epochs"]["query"]
        model.train(max_epochs=epochs, kl_warmup_epochs=0, weight_decay=0.0, **self._train_kwargs(epochs))
        return model, prepared

    def proba(self, model, adata=None, indices=None):
        frame = model.predict(adata, indices=indices, soft=True)
        return frame.to_numpy(dtype=np.float64), [str(c) for c in frame.columns]

    def latent(self, model, adata=None, indices=None):
        return np.asarray(model.get_latent_representation(adata, indices=indices), dtype=np.float32)

    def details(self, model) -> dict:
        epochs = [float(x) for x in (model.history or {}).get("seconds", [])]
        out = {"epochs_run": len(epochs), "epoch_seconds": epochs}
        calibration = getattr(model, "calibration", None)
        if calibration is not None:
            out["calibration"] = {k: float(v) for k, v in calibration.items()}
        return out


class ScviPipeline:
    """SCVI -> SCANVI -> ``load_query_data`` with scvi-tools."""

    def __init__(self, cfg: dict) -> None:
        import logging
        import warnings

        import scvi
        import torch

        for name in ("lightning", "lightning.pytorch", "lightning_fabric", "scvi"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="lightning")
        from lightning.pytorch import Callback

        scvi.settings.seed = cfg["seed"]
        torch.set_num_threads(cfg["threads"])  # scvi.settings.seed may reset it
        self.cfg = cfg
        self._timer = None
        accelerator = cfg["accelerator"]

        class EpochTimer(Callback):
            def __init__(self) -> None:
                self.seconds: list[float] = []
                self._start = 0.0

            def on_train_epoch_start(self, trainer, pl_module) -> None:
                self._start = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                _sync(accelerator)
                self.seconds.append(time.perf_counter() - self._start)

        self._timer_class = EpochTimer

    def _trainer_kwargs(self, adata, labels_key=None) -> dict:
        kwargs = {
            "accelerator": self.cfg["accelerator"],
            "devices": 1,
            "batch_size": BATCH_SIZE,
            "train_size": TRAIN_SIZE,
            "enable_progress_bar": False,
        }
        # BatchNorm fails on a 1-cell last minibatch; scvi splits labelled and unlabelled cells
        # separately (SCANVI), so check both parts (sclatent folds a 1-cell remainder away itself)
        if labels_key is None:
            parts = [adata.n_obs]
        else:
            labels = adata.obs[labels_key].astype(str).to_numpy()
            parts = [int((labels != UNLABELLED).sum()), int((labels == UNLABELLED).sum())]
        n_train = [math.ceil(TRAIN_SIZE * n) for n in parts if n]
        if any(n % BATCH_SIZE == 1 for n in [*n_train, sum(n_train)]):
            kwargs["datasplitter_kwargs"] = {"drop_last": True}
        # an epoch timer; SCANVI.train drops its own SubSampleLabels callback when callbacks are
        # given (scvi-tools 1.4.2), so it is passed here as SCANVI would use it (labelled cells present)
        self._timer = self._timer_class()
        callbacks = [self._timer]
        if labels_key is not None and parts[0] > 0:
            from scvi.train._callbacks import SubSampleLabels

            callbacks.insert(0, SubSampleLabels())
        kwargs["callbacks"] = callbacks
        return kwargs

    def pretrain(self, adata, batch_key):
        import scvi

        scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key=batch_key)
        model = scvi.model.SCVI(
            adata,
            n_hidden=N_HIDDEN,
            n_latent=N_LATENT,
            n_layers=N_LAYERS,
            dropout_rate=DROPOUT,
            dispersion=DISPERSION,
            gene_likelihood=GENE_LIKELIHOOD,
            use_observed_lib_size=True,
            encode_covariates=True,
            deeply_inject_covariates=True,
        )
        epochs = self.cfg["epochs"]["vae"]
        model.train(
            max_epochs=epochs,
            early_stopping=False,
            plan_kwargs={"n_epochs_kl_warmup": epochs // 3},
            **self._trainer_kwargs(adata),
        )
        return model

    def semi_supervised(self, vae, labels_key, adata):
        import scvi

        model = scvi.model.SCANVI.from_scvi_model(
            vae, unlabeled_category=UNLABELLED, labels_key=labels_key, adata=adata
        )
        model.train(
            max_epochs=self.cfg["epochs"]["ssvae"],
            plan_kwargs={"n_epochs_kl_warmup": 0, "classification_ratio": CLASSIFICATION_RATIO},
            **self._trainer_kwargs(adata, labels_key),
        )
        return model

    def query_anndata(self, query, reference_model, labels_key):
        q = query.copy()
        if labels_key is not None:
            q.obs[labels_key] = UNLABELLED  # scvi-tools' convention for query cells
        return q

    def map_query(self, reference_model, query):
        cls = type(reference_model)
        prepared = cls.prepare_query_anndata(query, reference_model, inplace=False)
        prepared = query if prepared is None else prepared
        model = cls.load_query_data(prepared, reference_model)
        labels_key = model.adata_manager.registry["setup_args"].get("labels_key")
        plan_kwargs = {"weight_decay": 0.0, "n_epochs_kl_warmup": 0}
        kwargs = self._trainer_kwargs(prepared, labels_key if labels_key in prepared.obs else None)
        model.train(max_epochs=self.cfg["epochs"]["query"], plan_kwargs=plan_kwargs, **kwargs)
        return model, prepared

    def proba(self, model, adata=None, indices=None):
        frame = model.predict(adata, indices=indices, soft=True)
        frame = frame.drop(columns=[c for c in frame.columns if str(c) == UNLABELLED])
        values = frame.to_numpy(dtype=np.float64)
        values /= values.sum(1, keepdims=True).clip(min=1e-300)
        return values, [str(c) for c in frame.columns]

    def latent(self, model, adata=None, indices=None):
        return np.asarray(model.get_latent_representation(adata, indices=indices), dtype=np.float32)

    def details(self, model) -> dict:
        """Epochs of the last training call (its Lightning epoch timer)."""
        epochs = list(self._timer.seconds) if self._timer is not None else []
        return {"epochs_run": len(epochs), "epoch_seconds": epochs}


def _stage(result: dict, name: str, fn):
    """Run ``fn``; store its wall time as ``result["seconds"][name]`` and the process's CPU time (all
    threads) as ``result["cpu_seconds"][name]``; on an error store the traceback and return None."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        value = fn()
    except Exception as error:  # a failed stage is reported, the rest of the worker goes on
        result.setdefault("errors", {})[name] = "".join(traceback.format_exception(error))[-4000:]
        return None
    _sync(result["_accelerator"])
    result.setdefault("seconds", {})[name] = time.perf_counter() - start
    result.setdefault("cpu_seconds", {})[name] = time.process_time() - cpu
    return value


def _sync(accelerator: str) -> None:
    if accelerator == "cuda":
        import torch

        torch.cuda.synchronize()


def _transfer_worker(cfg: dict, pipe, result: dict, out_dir: Path, prefix: str) -> None:
    import anndata as ad

    ref = ad.read_h5ad(cfg["ref"])
    query = ad.read_h5ad(cfg["query"])
    result["rss_before_model_mb"] = _rss_mb()
    vae = _stage(result, "vae_train", lambda: pipe.pretrain(ref, "batch"))
    if vae is None:
        return
    result["vae"] = pipe.details(vae)
    np.save(out_dir / f"{prefix}_vae_ref_latent.npy", pipe.latent(vae))

    # kNN-on-latent baseline: the query mapped into the unsupervised model (same query epochs)
    def vae_mapping():
        model, prepared = pipe.map_query(vae, pipe.query_anndata(query, vae, None))
        result["vae_query"] = pipe.details(model)
        return pipe.latent(model, prepared)

    latent = _stage(result, "vae_query", vae_mapping)
    if latent is not None:
        np.save(out_dir / f"{prefix}_vae_query_latent.npy", latent)

    semi = _stage(result, "ssvae_train", lambda: pipe.semi_supervised(vae, "label", ref))
    if semi is None:
        return
    result["ssvae"] = pipe.details(semi)
    np.save(out_dir / f"{prefix}_ssvae_ref_latent.npy", pipe.latent(semi))
    query_labels = pipe.query_anndata(query, semi, "label")
    mapped = _stage(result, "query_train", lambda: pipe.map_query(semi, query_labels))
    if mapped is None:
        return
    model, prepared = mapped
    result["query"] = pipe.details(model)
    output = _stage(result, "query_predict", lambda: (pipe.proba(model, prepared), pipe.latent(model, prepared)))
    if output is None:
        return
    (proba, classes), latent = output
    np.save(out_dir / f"{prefix}_proba.npy", proba)
    np.save(out_dir / f"{prefix}_ssvae_query_latent.npy", latent)
    result["classes"] = classes


def _scarcity_worker(cfg: dict, pipe, result: dict, out_dir: Path, prefix: str) -> None:
    import anndata as ad

    adata = ad.read_h5ad(cfg["data"])
    test = np.flatnonzero(adata.obs["is_test"].to_numpy())
    result["rss_before_model_mb"] = _rss_mb()
    vae = _stage(result, "vae_train", lambda: pipe.pretrain(adata, cfg["batch_key"]))
    if vae is None:
        return
    result["vae"] = pipe.details(vae)
    np.save(out_dir / f"{prefix}_vae_latent.npy", pipe.latent(vae))
    result["classes"] = {}
    for tag in cfg["fraction_tags"]:
        cells = adata.copy()
        semi = _stage(result, f"ssvae_train_{tag}", lambda c=cells, t=tag: pipe.semi_supervised(vae, f"labels_{t}", c))
        if semi is None:
            continue
        result[f"ssvae_{tag}"] = pipe.details(semi)
        output = _stage(result, f"predict_{tag}", lambda s=semi, c=cells: pipe.proba(s, c, indices=test))
        if output is None:
            continue
        np.save(out_dir / f"{prefix}_proba_{tag}.npy", output[0])
        result["classes"][tag] = output[1]


# ======================================================================================== worker: baselines


def _lognorm(counts):
    """CSR log1p(counts / library * 1e4) (scanpy's normalize_total + log1p)."""
    import scipy.sparse as sp

    csr = sp.csr_matrix(counts, dtype=np.float64)
    library = np.asarray(csr.sum(axis=1)).ravel()
    scaled = sp.diags(1e4 / np.maximum(library, 1.0)) @ csr
    scaled.data = np.log1p(scaled.data)
    return sp.csr_matrix(scaled)


def _scaler(x) -> tuple[np.ndarray, np.ndarray]:
    dense = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    mean, sd = dense.mean(0), dense.std(0)
    return mean, np.where(sd > 0, sd, 1.0)


def _scale(x, mean, sd) -> np.ndarray:
    dense = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return np.minimum((dense - mean) / sd, LR_SCALE_CLIP)


def _fit_pca(fit_cells, seed: int):
    """Scaled log-normalised expression -> PCA, fitted on ``fit_cells``; returns a transform."""
    from sklearn.decomposition import PCA

    mean, sd = _scaler(fit_cells)
    n_comps = min(N_PCS, fit_cells.shape[0] - 1, fit_cells.shape[1] - 1)
    pca = PCA(n_components=n_comps, random_state=seed).fit(_scale(fit_cells, mean, sd))
    return lambda x: pca.transform(_scale(x, mean, sd)).astype(np.float32)


def _knn_proba(train_x, train_y, test_x) -> tuple[np.ndarray, list[str]]:
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(K_NEIGHBOURS, len(train_y))).fit(train_x, train_y)
    return clf.predict_proba(test_x), [str(c) for c in clf.classes_]


def _logreg_proba(train_x, train_y, test_x, seed: int) -> tuple[np.ndarray, list[str]]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0, max_iter=LR_MAX_ITER, random_state=seed).fit(train_x, train_y)
    return clf.predict_proba(test_x), [str(c) for c in clf.classes_]


def _run_baselines(fit_x, lab_x, lab_y, target_x, seed: int, result: dict, key: str, out_dir: Path, prefix: str):
    """The three model-free baselines: PCA fitted on ``fit_x``, classifiers on the labelled cells."""

    def knn_pca():
        transform = _fit_pca(fit_x, seed)
        return _knn_proba(transform(lab_x), lab_y, transform(target_x))

    def logreg_pca():
        transform = _fit_pca(fit_x, seed)
        return _logreg_proba(transform(lab_x), lab_y, transform(target_x), seed)

    def logreg_counts():  # CellTypist: scale with the training cells' gene means / sds, clip at 10
        mean, sd = _scaler(lab_x)
        return _logreg_proba(_scale(lab_x, mean, sd), lab_y, _scale(target_x, mean, sd), seed)

    for name, fn in (("knn_pca", knn_pca), ("logreg_pca", logreg_pca), ("logreg_counts", logreg_counts)):
        output = _stage(result, f"{name}{key}", fn)
        if output is not None:
            np.save(out_dir / f"{prefix}_{name}{key}_proba.npy", output[0])
            result.setdefault("classes", {})[f"{name}{key}"] = output[1]


def _baselines_worker(cfg: dict, result: dict, out_dir: Path, prefix: str) -> None:
    import anndata as ad

    seed = cfg["seed"]
    if cfg["kind"] == "transfer":
        ref = ad.read_h5ad(cfg["ref"])
        query = ad.read_h5ad(cfg["query"])
        result["rss_before_model_mb"] = _rss_mb()
        ref_x = _stage(result, "lognorm_reference", lambda: _lognorm(ref.layers["counts"]))
        query_x = _lognorm(query.layers["counts"])
        labels = ref.obs["label"].astype(str).to_numpy()
        _run_baselines(ref_x, ref_x, labels, query_x, seed, result, "", out_dir, prefix)
        # the PCA embedding of reference + projected query, for the mixing scores
        transform = _fit_pca(ref_x, seed)
        np.save(out_dir / f"{prefix}_pca_ref.npy", transform(ref_x))
        np.save(out_dir / f"{prefix}_pca_query.npy", transform(query_x))
    else:
        adata = ad.read_h5ad(cfg["data"])
        result["rss_before_model_mb"] = _rss_mb()
        x = _stage(result, "lognorm", lambda: _lognorm(adata.layers["counts"]))
        test = np.flatnonzero(adata.obs["is_test"].to_numpy())
        for tag in cfg["fraction_tags"]:
            labels = adata.obs[f"labels_{tag}"].astype(str).to_numpy()
            lab = np.flatnonzero(labels != UNLABELLED)
            # PCA on all cells (the cells the VAE sees; no labels), classifiers on the labelled ones
            _run_baselines(x, x[lab], labels[lab], x[test], seed, result, f"_{tag}", out_dir, prefix)


def run_worker(spec_path: str) -> None:
    """One pipeline (or the baselines) on one task, in this fresh process; writes a JSON result."""
    cfg = json.loads(Path(spec_path).read_text())
    _limit_threads(cfg["threads"])
    import anndata  # noqa: F401  (imported before the RSS baseline, like the model packages)

    method = cfg["method"]
    result: dict = {"method": method, "_accelerator": cfg["accelerator"]}
    out_dir, prefix = Path(cfg["out_dir"]), cfg["prefix"]
    if method == "baselines":
        import scanpy  # noqa: F401
        import sklearn  # noqa: F401

        _baselines_worker(cfg, result, out_dir, prefix)
    else:
        import torch

        torch.set_num_threads(cfg["threads"])
        if method == "scvi":
            import scvi  # noqa: F401

            pipe = ScviPipeline(cfg)
        else:
            import sclatent.model  # noqa: F401

            pipe = SclatentPipeline(cfg)
        result["torch_threads"] = torch.get_num_threads()
        if cfg["kind"] == "transfer":
            _transfer_worker(cfg, pipe, result, out_dir, prefix)
        else:
            _scarcity_worker(cfg, pipe, result, out_dir, prefix)
    result.pop("_accelerator")
    result["peak_rss_mb"] = _peak_rss_mb()
    (out_dir / f"{prefix}_result.json").write_text(json.dumps(result, default=_json_default))


# ======================================================================================== parent: workers


def run_method(method: str, cfg: dict, args, workdir: Path, prefix: str) -> dict:
    """Run one worker process and return its result (``error`` set when the process failed)."""
    spec = {
        **cfg,
        "method": method,
        "out_dir": str(workdir),
        "prefix": prefix,
        "threads": args.threads,
        "accelerator": args.accelerator_resolved,
        "epochs": args.epochs,
    }
    spec_path = workdir / f"{prefix}_spec.json"
    spec_path.write_text(json.dumps(spec, default=_json_default))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    out = workdir / f"{prefix}_result.json"
    if args.verbose and proc.stderr.strip():
        print(proc.stderr, flush=True)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-30:])
        print(f"  !! {method} worker failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}", "stderr_tail": tail, "process_seconds": wall}
    result = json.loads(out.read_text())
    result["process_seconds"] = wall
    for stage, text in result.get("errors", {}).items():
        print(f"  !! {method}: stage {stage} failed:\n{_indent(text)}", flush=True)
    return result


def _indent(text: str, last: int = 20) -> str:
    return "\n".join("     " + line for line in text.strip().splitlines()[-last:])


def _load(path: Path):
    return np.load(path) if path.exists() else None


# ======================================================================================== parent: scores


def score(proba, classes, truth, target_classes, class_map=None) -> dict:
    """Accuracy, macro-F1 (over ``target_classes``) and ECE of soft predictions.

    ``proba`` is over ``classes`` (the method's reference labels). With ``class_map`` (reference
    label -> target class or None), the hard prediction is the top reference label mapped to its
    target class (``other`` when it has none: always wrong), and the soft prediction for the ECE
    sums each target class's reference labels (``other`` one more column).
    """
    from sklearn.metrics import f1_score

    from sclatent.metrics.calibration import expected_calibration_error

    proba = np.asarray(proba, dtype=np.float64)
    classes = [str(c) for c in classes]
    mapped = [(class_map.get(c) if class_map is not None else c) or OTHER for c in classes]
    columns = [*target_classes, OTHER]
    aggregated = np.zeros((proba.shape[0], len(columns)))
    for j, target in enumerate(mapped):
        aggregated[:, columns.index(target) if target in columns else -1] += proba[:, j]
    aggregated /= aggregated.sum(1, keepdims=True).clip(min=1e-300)
    predicted = np.asarray(mapped, dtype=object)[proba.argmax(1)]
    truth = np.asarray(truth, dtype=object)
    truth_index = np.asarray([columns.index(t) for t in truth])
    per_class = f1_score(truth, predicted, labels=list(target_classes), average=None, zero_division=0)
    top = np.asarray(classes, dtype=object)[proba.argmax(1)]
    confusion = {
        str(t): _counts(top[truth == t]) for t in target_classes if np.any(truth == t)
    }  # true class -> the method's own (reference) labels predicted for it
    return {
        "accuracy": float(np.mean(predicted == truth)),
        "macro_f1": float(f1_score(truth, predicted, labels=list(target_classes), average="macro", zero_division=0)),
        "ece": expected_calibration_error(aggregated, truth_index),
        "per_class_f1": {c: float(f) for c, f in zip(target_classes, per_class)},
        "predicted_other_fraction": float(np.mean(predicted == OTHER)),
        "confusion": confusion,
        "n_scored": int(truth.size),
    }


def mixing_scores(ref_emb, query_emb, ref_labels, query_labels, target_classes) -> dict:
    """kNN batch entropy (reference vs query) and label ASW on the cells of the target classes."""
    from sclatent.metrics import batch_entropy, label_asw

    emb = np.concatenate([ref_emb, query_emb]).astype(np.float64)
    side = np.asarray(["reference"] * len(ref_emb) + ["query"] * len(query_emb))
    labels = np.concatenate([ref_labels, query_labels]).astype(str)
    keep = np.isin(labels, target_classes)
    return {
        "batch_entropy": batch_entropy(emb, side, n_neighbors=MIXING_NEIGHBOURS),
        "label_asw": label_asw(emb[keep], labels[keep]),
    }


def neighbour_vote(proba: np.ndarray, latent: np.ndarray, k: int = VOTE_NEIGHBOURS) -> np.ndarray:
    """Each row of ``proba`` ``(n, classes)`` averaged over the ``k`` nearest rows of ``latent``
    ``(n, d)`` (itself included; Euclidean): the rows still sum to 1."""
    from sklearn.neighbors import NearestNeighbors

    neighbours = NearestNeighbors(n_neighbors=min(k, len(latent))).fit(latent)
    return proba[neighbours.kneighbors(latent, return_distance=False)].mean(axis=1)


def _knn_on_latent(ref_latent, ref_labels, target_latent):
    start = time.perf_counter()
    proba, classes = _knn_proba(ref_latent, ref_labels, target_latent)
    return proba, classes, time.perf_counter() - start


def bench_transfer(task: str, args, root: Path) -> dict:
    workdir = root / task
    workdir.mkdir()
    t0 = time.perf_counter()
    prep = prepare_transfer(task, workdir, args.data_dir)
    s = prep["summary"]
    print(
        f"\n=== {task}: {TASKS[task]}\n    reference {s['reference_cells']} cells {s['reference_batches']}, query "
        f"{s['query_cells']} cells ({s['query_cells_scored']} scored), {s['genes']} genes: {s['gene_selection']}; "
        f"empty cells dropped {s['empty_cells_dropped']}",
        flush=True,
    )
    results: dict = {"summary": s, "target_classes": prep["target_classes"]}
    if task == "pbmc":
        results["label_mapping"] = print_label_mapping()
    per_seed = []
    for seed in args.seeds:
        seed_dir = workdir / f"seed{seed}"
        seed_dir.mkdir()
        workers, methods = _transfer_seed(task, prep, seed, args, seed_dir)
        per_seed.append({"seed": seed, "workers": workers, "methods": methods})
        print_transfer_table(task, {"methods": methods}, args, seed)
    # the first seed's run in full (as before), every seed's method rows, and their mean +- sd
    results["workers"], results["methods"] = per_seed[0]["workers"], per_seed[0]["methods"]
    results["per_seed"] = [{"seed": r["seed"], "methods": r["methods"]} for r in per_seed]
    results["mean_sd"] = _aggregate([{"fractions": {"all": r["methods"]}} for r in per_seed], ["all"])["all"]
    if len(per_seed) > 1:
        print_transfer_means(task, results["mean_sd"], args)
    results["bench_seconds"] = time.perf_counter() - t0
    return results


def _transfer_seed(task: str, prep: dict, seed: int, args, workdir: Path) -> tuple[dict, dict]:
    """One seed of a transfer task: every pipeline's worker, and the scored rows per method."""
    cfg = {"kind": "transfer", "ref": str(prep["ref_path"]), "query": str(prep["query_path"]), "seed": seed}
    workers = {}
    for method in (*LIBRARIES, "baselines"):
        print(f"  seed {seed}: running {method} ...", flush=True)
        workers[method] = run_method(method, cfg, args, workdir, f"{task}_{method}")

    scored, truth = prep["scored"], prep["query_coarse"][prep["scored"]]
    targets, class_map = prep["target_classes"], prep["class_map"]

    def scores_of(proba, classes):
        return score(proba[scored], classes, truth, targets, class_map)

    methods: dict = {}
    for lib in LIBRARIES:
        w = workers[lib]
        sec = w.get("seconds", {})
        row = _timing_row(sec, ("vae_train", "ssvae_train"), ("query_train", "query_predict"), w.get("peak_rss_mb"))
        proba = _load(workdir / f"{task}_{lib}_proba.npy")
        if proba is not None:
            row.update(scores_of(proba, w["classes"]))
        ref_lat, query_lat = (_load(workdir / f"{task}_{lib}_ssvae_{side}_latent.npy") for side in ("ref", "query"))
        if ref_lat is not None and query_lat is not None:
            row.update(mixing_scores(ref_lat, query_lat, prep["ref_coarse"], prep["query_coarse"], targets))
        methods[lib] = row
        if proba is not None and query_lat is not None:
            start = time.perf_counter()
            voted = neighbour_vote(proba, query_lat)
            vote_seconds = time.perf_counter() - start
            vote_row = {**row, "vote_seconds": vote_seconds, **scores_of(voted, w["classes"])}
            for key in ("mapping_seconds", "total_seconds"):
                vote_row[key] = _plus(row.get(key), vote_seconds)
            methods[f"vote_{lib}"] = vote_row
        # kNN on the library's unsupervised latent (query mapped into the VAE)
        ref_lat, query_lat = (_load(workdir / f"{task}_{lib}_vae_{side}_latent.npy") for side in ("ref", "query"))
        if ref_lat is not None and query_lat is not None:
            proba, classes, knn_s = _knn_on_latent(ref_lat, prep["ref_labels"], query_lat)
            row = _timing_row(sec, ("vae_train",), ("vae_query",), None)
            row["mapping_seconds"] = (row["mapping_seconds"] or 0.0) + knn_s
            row["total_seconds"] = (row["total_seconds"] or 0.0) + knn_s
            row["knn_seconds"] = knn_s
            row.update(scores_of(proba, classes))
            row.update(mixing_scores(ref_lat, query_lat, prep["ref_coarse"], prep["query_coarse"], targets))
            methods[f"knn_latent_{lib}"] = row
    w = workers["baselines"]
    for name in BASELINES:
        proba = _load(workdir / f"{task}_baselines_{name}_proba.npy")
        seconds = _plus(w.get("seconds", {}).get(name), w.get("seconds", {}).get("lognorm_reference"))
        row = {
            "total_seconds": seconds,
            "peak_rss_mb": w.get("peak_rss_mb"),
            "note": "log-normalisation + fit + predict, one process",
        }
        if proba is not None:
            row.update(scores_of(proba, w["classes"][name]))
        methods[name] = row
    ref_pca, query_pca = (_load(workdir / f"{task}_baselines_pca_{side}.npy") for side in ("ref", "query"))
    if ref_pca is not None:
        mix = mixing_scores(ref_pca, query_pca, prep["ref_coarse"], prep["query_coarse"], targets)
        for name in ("knn_pca", "logreg_pca"):
            methods[name].update(mix)
    return workers, methods


def _plus(a, b):
    return None if a is None or b is None else a + b


def _timing_row(seconds: dict, train_stages, mapping_stages, peak) -> dict:
    def total(stages):
        values = [seconds.get(s) for s in stages]
        return None if any(v is None for v in values) else float(sum(values))

    train, mapping = total(train_stages), total(mapping_stages)
    return {
        "stage_seconds": {s: seconds.get(s) for s in (*train_stages, *mapping_stages)},
        "train_seconds": train,
        "mapping_seconds": mapping,
        "total_seconds": None if train is None or mapping is None else train + mapping,
        "peak_rss_mb": peak,
    }


def bench_scarcity(args, root: Path) -> dict:
    workdir = root / "scarcity"
    workdir.mkdir()
    t0 = time.perf_counter()
    tags = [_fraction_tag(f) for f in args.fractions]
    results: dict = {"datasets": {}}
    for name in args.scarcity_datasets:
        base = load_scarcity_base(name, args.data_dir)
        print(f"\n=== scarcity / {name}: {base['summary']['cells']} cells, {base['summary']['selection']}", flush=True)
        per_seed = []
        for seed in args.seeds:
            prep = prepare_scarcity(base, name, seed, args.fractions, workdir)
            print(f"  seed {seed}: {prep['summary']}", flush=True)
            cfg = {
                "kind": "scarcity",
                "data": str(prep["path"]),
                "batch_key": prep["batch_key"],
                "fraction_tags": tags,
                "seed": seed,
            }
            workers = {}
            for method in (*LIBRARIES, "baselines"):
                print(f"    running {method} ...", flush=True)
                workers[method] = run_method(method, cfg, args, workdir, f"scarcity_{name}_s{seed}_{method}")
            per_seed.append({"seed": seed, "split": prep["summary"], **score_scarcity(prep, workers, tags, workdir)})
            per_seed[-1]["workers"] = workers
        results["datasets"][name] = {
            "summary": base["summary"],
            "seeds": per_seed,
            "mean_sd": _aggregate(per_seed, tags),
        }
    results["bench_seconds"] = time.perf_counter() - t0
    print_scarcity_tables(results, tags, args)
    return results


def score_scarcity(prep: dict, workers: dict, tags, workdir: Path) -> dict:
    truth, test = prep["truth"], prep["test"]
    targets = sorted(set(truth))
    name_seed = prep["path"].stem.replace("scarcity_", "").replace("_seed", "_s")
    out: dict = {tag: {} for tag in tags}
    for lib in LIBRARIES:
        w = workers[lib]
        sec = w.get("seconds", {})
        latent = _load(workdir / f"scarcity_{name_seed}_{lib}_vae_latent.npy")
        for tag in tags:
            row = _timing_row(sec, ("vae_train", f"ssvae_train_{tag}"), (f"predict_{tag}",), w.get("peak_rss_mb"))
            proba = _load(workdir / f"scarcity_{name_seed}_{lib}_proba_{tag}.npy")
            if proba is not None:
                row.update(score(proba, w["classes"][tag], truth[test], targets))
            out[tag][lib] = row
            if latent is not None:
                lab = prep["labelled"][tag]
                proba, classes, knn_s = _knn_on_latent(latent[lab], truth[lab], latent[test])
                knn_row = _timing_row(sec, ("vae_train",), (), None)
                knn_row["mapping_seconds"] = knn_s
                knn_row["total_seconds"] = (knn_row["train_seconds"] or 0.0) + knn_s
                knn_row.update(score(proba, classes, truth[test], targets))
                out[tag][f"knn_latent_{lib}"] = knn_row
    w = workers["baselines"]
    for tag in tags:
        for name in BASELINES:
            proba = _load(workdir / f"scarcity_{name_seed}_baselines_{name}_{tag}_proba.npy")
            seconds = _plus(w.get("seconds", {}).get(f"{name}_{tag}"), w.get("seconds", {}).get("lognorm"))
            row = {"total_seconds": seconds, "peak_rss_mb": w.get("peak_rss_mb")}
            if proba is not None:
                row.update(score(proba, w["classes"][f"{name}_{tag}"], truth[test], targets))
            out[tag][name] = row
    return {"fractions": out}


AGGREGATED = (
    "accuracy",
    "macro_f1",
    "ece",
    "batch_entropy",
    "label_asw",
    "train_seconds",
    "mapping_seconds",
    "total_seconds",
    "peak_rss_mb",
)


def _aggregate(per_seed: list[dict], tags) -> dict:
    """Mean and sd (ddof 1; 0 for one seed) over seeds, per fraction, method and metric."""
    out: dict = {}
    for tag in tags:
        out[tag] = {}
        methods = {m for s in per_seed for m in s["fractions"][tag]}
        for method in sorted(methods):
            out[tag][method] = {}
            for key in AGGREGATED:
                values = [s["fractions"][tag].get(method, {}).get(key) for s in per_seed]
                values = [v for v in values if isinstance(v, (int, float))]
                if values:
                    out[tag][method][key] = {
                        "mean": float(np.mean(values)),
                        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                        "n": len(values),
                    }
    return out


# ======================================================================================== parent: report


ROW_NAMES = {
    "sclatent": PIPELINE_NAMES["sclatent"],
    "scvi": PIPELINE_NAMES["scvi"],
    "knn_latent_sclatent": KNN_LATENT["sclatent"],
    "knn_latent_scvi": KNN_LATENT["scvi"],
    **BASELINES,
    "vote_sclatent": VOTE["sclatent"],
    "vote_scvi": VOTE["scvi"],
}


def print_label_mapping() -> dict:
    print("    label mapping (reference pbmc3k cell_type / query bulk_labels -> shared coarse type; '-': not scored)")
    table = {"shared_types": list(SHARED_TYPES), "reference": {}, "query": {}}
    for coarse in (*SHARED_TYPES, None):
        ref = [k for k, v in PBMC3K_TO_COARSE.items() if v == coarse]
        query = [k for k, v in BULK_LABELS_TO_COARSE.items() if v == coarse]
        name, ref_text, query_text = coarse or "- (no counterpart)", ", ".join(ref) or "-", ", ".join(query)
        print(f"      {name:<20} reference: {ref_text:<28} query: {query_text}")
    table["reference"] = dict(PBMC3K_TO_COARSE)
    table["query"] = dict(BULK_LABELS_TO_COARSE)
    return table


def _print_table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def print_transfer_table(task: str, results: dict, args, seed: int) -> None:
    header = (
        "method",
        "accuracy",
        "macro-F1",
        "ECE",
        "mix entropy",
        "label ASW",
        "train s",
        "map s",
        "total s",
        "peak RSS MB",
    )
    rows = []
    for key, label in ROW_NAMES.items():
        r = results["methods"].get(key)
        if r is None:
            continue
        rows.append(
            (
                label,
                _fmt(r.get("accuracy"), ".3f"),
                _fmt(r.get("macro_f1"), ".3f"),
                _fmt(r.get("ece"), ".3f"),
                _fmt(r.get("batch_entropy"), ".3f"),
                _fmt(r.get("label_asw"), ".3f"),
                _fmt(r.get("train_seconds"), ".1f"),
                _fmt(r.get("mapping_seconds"), ".1f"),
                _fmt(r.get("total_seconds"), ".1f"),
                _fmt(r.get("peak_rss_mb"), ".0f"),
            )
        )
    e = args.epochs
    print(
        f"\n{task}, seed {seed}: {TASKS[task]} (epochs: VAE {e['vae']}, semi-supervised {e['ssvae']}, "
        f"query {e['query']})"
    )
    _print_table(header, rows)
    a, b = results["methods"].get("sclatent", {}), results["methods"].get("scvi", {})
    for key, label in (("train_seconds", "training"), ("mapping_seconds", "mapping"), ("total_seconds", "total")):
        if a.get(key) and b.get(key):
            print(f"  scvi-tools / sclatent {label} wall time: {b[key] / a[key]:.2f}x", end="")
    print()
    print(
        "  kNN-on-latent rows: train = the VAE stage, map = the query mapped into the VAE + kNN; baseline rows: one "
        "process (peak RSS shared); mixing/ASW of a baseline: its PCA embedding (reference PCA, query projected)"
    )
    print("  per-class F1 (shared/target types):")
    for key in ("sclatent", "scvi", "logreg_counts"):
        per_class = results["methods"].get(key, {}).get("per_class_f1")
        if per_class:
            print(f"    {ROW_NAMES[key]:<36} " + "  ".join(f"{c} {v:.2f}" for c, v in per_class.items()))


def _mean_sd(entry: dict | None, spec: str) -> str:
    if not entry:
        return "-"
    return f"{format(entry['mean'], spec)} +- {format(entry['sd'], spec)}"


def print_transfer_means(task: str, table: dict, args) -> None:
    header = ("method", "accuracy", "macro-F1", "ECE", "mix entropy", "label ASW", "train s", "map s", "total s")
    rows = []
    for key, label in ROW_NAMES.items():
        r = table.get(key)
        if r is None:
            continue
        rows.append(
            (
                label,
                _mean_sd(r.get("accuracy"), ".3f"),
                _mean_sd(r.get("macro_f1"), ".3f"),
                _mean_sd(r.get("ece"), ".3f"),
                _mean_sd(r.get("batch_entropy"), ".3f"),
                _mean_sd(r.get("label_asw"), ".3f"),
                _mean_sd(r.get("train_seconds"), ".1f"),
                _mean_sd(r.get("mapping_seconds"), ".1f"),
                _mean_sd(r.get("total_seconds"), ".1f"),
            )
        )
    print(f"\n{task}: mean +- sd over seeds {args.seeds}")
    _print_table(header, rows)


def print_scarcity_tables(results: dict, tags, args) -> None:
    e = args.epochs
    header = ("method", "labels", "accuracy", "macro-F1", "ECE", "train s", "total s", "peak RSS MB")
    for name, data in results["datasets"].items():
        print(
            f"\nscarcity / {name}: mean +- sd over seeds {args.seeds} (epochs: VAE {e['vae']}, semi-supervised "
            f"{e['ssvae']}); test cells of stratified 80/20 splits"
        )
        rows = []
        for tag in tags:
            table = data["mean_sd"][tag]
            for key, label in ROW_NAMES.items():
                r = table.get(key)
                if r is None:
                    continue
                rows.append(
                    (
                        label,
                        f"{float(tag) * 100:g} %",
                        _mean_sd(r.get("accuracy"), ".3f"),
                        _mean_sd(r.get("macro_f1"), ".3f"),
                        _mean_sd(r.get("ece"), ".3f"),
                        _fmt((r.get("train_seconds") or {}).get("mean"), ".1f"),
                        _fmt((r.get("total_seconds") or {}).get("mean"), ".1f"),
                        _fmt((r.get("peak_rss_mb") or {}).get("mean"), ".0f"),
                    )
                )
        _print_table(header, rows)
        print(
            "  train s / total s of the pipelines: the (shared) VAE pretraining + that fraction's semi-supervised "
            "training (+ prediction); kNN-on-latent: the VAE pretraining + kNN"
        )


def _verdict(holds) -> str:
    return {True: "HOLDS", False: "FAILS", None: "n/a"}[holds]


def _target_block(label: str, a: dict, b: dict, baselines: dict) -> dict:
    """The four targets (sclatent ``a`` vs scvi-tools ``b``) and the baselines that beat sclatent."""

    def value(r, key):
        v = r.get(key)
        return v["mean"] if isinstance(v, dict) else v

    out: dict = {}
    checks = (
        ("accuracy", "sclatent accuracy >= scvi-tools'", lambda x, y: x >= y),
        ("macro_f1", "sclatent macro-F1 >= scvi-tools'", lambda x, y: x >= y),
        ("ece", "sclatent ECE < scvi-tools'", lambda x, y: x < y),
    )
    for key, text, ok in checks:
        x, y = value(a, key), value(b, key)
        out[key] = {
            "target": text,
            "sclatent": x,
            "scvi": y,
            "holds": None if x is None or y is None else bool(ok(x, y)),
        }
    x, y = value(a, "total_seconds"), value(b, "total_seconds")
    ratio = y / x if x and y else None
    out["speed"] = {
        "target": f"scvi-tools total wall time / sclatent's >= {SPEED_TARGET:g}x",
        "sclatent_seconds": x,
        "scvi_seconds": y,
        "ratio": ratio,
        "holds": None if ratio is None else bool(ratio >= SPEED_TARGET),
    }
    # the best baseline per metric, and whether it beats sclatent (and scvi-tools)
    best: dict = {}
    for key, sign in (("accuracy", 1), ("macro_f1", 1), ("ece", -1)):
        scored = [(sign * value(r, key), name) for name, r in baselines.items() if value(r, key) is not None]
        if not scored:
            continue
        _, name = max(scored)
        y, x, z = value(baselines[name], key), value(a, key), value(b, key)
        best[key] = {
            "baseline": name,
            "value": y,
            "beats_sclatent": None if x is None else bool(sign * (y - x) > 0),
            "beats_scvi": None if z is None else bool(sign * (y - z) > 0),
        }
    out["best_baseline"] = best
    print(f"  {label}")
    for key in ("accuracy", "macro_f1", "ece"):
        t = out[key]
        line = f"    {_verdict(t['holds']):5s}  {t['target']}: {_fmt(t['sclatent'], '.3f')} vs {_fmt(t['scvi'], '.3f')}"
        if key in best:
            w = best[key]
            beats = [who for who, flag in (("sclatent", w["beats_sclatent"]), ("scvi-tools", w["beats_scvi"])) if flag]
            verdict = f"beats {' and '.join(beats)}" if beats else "does not beat sclatent or scvi-tools"
            line += f" | best baseline {ROW_NAMES.get(w['baseline'], w['baseline'])} {w['value']:.3f}: {verdict}"
        print(line)
    t = out["speed"]
    print(
        f"    {_verdict(t['holds']):5s}  {t['target']}: {_fmt(t['scvi_seconds'], '.1f')} s / "
        f"{_fmt(t['sclatent_seconds'], '.1f')} s = {_fmt(ratio, '.2f')}x"
    )
    return out


def check_targets(results: dict) -> dict:
    print("\nTargets (sclatent vs scvi-tools; timings only count on an idle machine)")
    targets: dict = {}
    for task in ("pbmc", "cellbench"):
        if task in results:
            several = len(results[task]["per_seed"]) > 1
            m = results[task]["mean_sd"] if several else results[task]["methods"]
            others = {k: v for k, v in m.items() if k not in LIBRARIES and not k.startswith("vote_")}
            label = f"{task} (means over seeds)" if several else task
            targets[task] = _target_block(label, m.get("sclatent", {}), m.get("scvi", {}), others)
    if "scarcity" in results:
        for name, data in results["scarcity"]["datasets"].items():
            for tag, table in data["mean_sd"].items():
                others = {k: v for k, v in table.items() if k not in LIBRARIES}
                label = f"scarcity/{name} {float(tag) * 100:g} % labels (means over seeds)"
                targets[f"scarcity_{name}_{tag}"] = _target_block(
                    label, table.get("sclatent", {}), table.get("scvi", {}), others
                )
    return targets


# ======================================================================================== main


def environment(args) -> dict:
    import datetime as dt
    import platform

    import torch

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "accelerator": args.accelerator_resolved,
        "torch": torch.__version__,
        "scvi-tools": _version("scvi-tools"),
        "lightning": _version("lightning"),
        "scanpy": _version("scanpy"),
        "anndata": _version("anndata"),
        "scikit-learn": _version("scikit-learn"),
        "numpy": np.__version__,
        "sclatent": getattr(__import__("sclatent"), "__version__", None),
        "git": _git_state(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _list(text: str, kind):
    return [kind(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of %(default)s")
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (default 0,1,2,3,4; --quick: 0) of the models (every task) and scarcity splits",
    )
    p.add_argument(
        "--fractions",
        default=",".join(f"{f:g}" for f in DEFAULT_FRACTIONS),
        help="fractions of the training labels kept in the scarcity task (default %(default)s)",
    )
    p.add_argument("--scarcity-datasets", default=",".join(SCARCITY_DATASETS), help="default %(default)s")
    p.add_argument("--vae-epochs", type=int, default=None, help=f"VAE / SCVI epochs (default {DEFAULT_EPOCHS['vae']})")
    p.add_argument(
        "--ssvae-epochs",
        type=int,
        default=None,
        help=f"SemiSupervisedVAE / SCANVI epochs after the VAE (default {DEFAULT_EPOCHS['ssvae']})",
    )
    p.add_argument(
        "--query-epochs",
        type=int,
        default=None,
        help=f"query-mapping epochs, both models (default {DEFAULT_EPOCHS['query']})",
    )
    p.add_argument("--threads", type=int, default=2, help="torch / BLAS threads per worker process (default 2)")
    p.add_argument("--accelerator", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--data-dir", default=os.environ.get("SCLATENT_DATA_DIR") or DEFAULT_DATA_DIR)
    p.add_argument("--quick", action="store_true", help="smoke run: epochs 3 / 2 / 2, seed 0")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results_label_transfer[_quick].json)")
    p.add_argument("--verbose", action="store_true", help="show the worker processes' stderr")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    args.seeds = _list(args.seeds, int) if args.seeds else ([0] if args.quick else list(DEFAULT_SEEDS))
    args.fractions = _list(args.fractions, float)
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error("fractions must lie in (0, 1]")
    args.scarcity_datasets = [d.strip() for d in args.scarcity_datasets.split(",") if d.strip()]
    if set(args.scarcity_datasets) - set(SCARCITY_DATASETS):
        p.error(f"scarcity datasets: choose from {SCARCITY_DATASETS}")
    defaults = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    given = {"vae": args.vae_epochs, "ssvae": args.ssvae_epochs, "query": args.query_epochs}
    args.epochs = {k: (v if v is not None else defaults[k]) for k, v in given.items()}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0
    _limit_threads(args.threads)
    args.accelerator_resolved = _resolve_accelerator(args.accelerator)
    os.environ.setdefault("SCLATENT_DATA_DIR", args.data_dir)
    out = (
        Path(args.out)
        if args.out
        else REPO_ROOT
        / "benchmarks"
        / ("results_label_transfer_quick.json" if args.quick else "results_label_transfer.json")
    )
    env = environment(args)
    e = args.epochs
    print(
        f"sclatent {env['sclatent']} vs scvi-tools {env['scvi-tools']} | torch {env['torch']} | {env['cpu_model']} | "
        f"{args.threads} thread(s) | {args.accelerator_resolved}\n"
        f"epochs (both pipelines): VAE/SCVI {e['vae']} (KL warm-up {e['vae'] // 3}), SemiSupervisedVAE/SCANVI "
        f"{e['ssvae']}, query {e['query']} (no KL warm-up after pretraining; query weight decay 0) | tasks "
        f"{args.tasks} | seeds {args.seeds} | label fractions {args.fractions}",
        flush=True,
    )
    load = env["load_average_at_start"]
    if load and load[0] > 0.5:
        print(f"warning: load average {load[0]:.1f} on {os.cpu_count()} core(s): timings are not representative")
    start = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="sclatent_label_transfer_") as tmp:
        for task in args.tasks:
            if task == "scarcity":
                results[task] = bench_scarcity(args, Path(tmp))
            else:
                results[task] = bench_transfer(task, args, Path(tmp))
    targets = check_targets(results)
    total = time.perf_counter() - start
    settings = {
        "n_hidden": N_HIDDEN,
        "n_layers": N_LAYERS,
        "n_latent": N_LATENT,
        "dropout_rate": DROPOUT,
        "gene_likelihood": GENE_LIKELIHOOD,
        "dispersion": DISPERSION,
        "library": "observed",
        "encode_covariates": True,
        "inject_covariates_all_layers": True,
        "batch_norm": "encoder and decoder (both libraries' default)",
        "classification_ratio": CLASSIFICATION_RATIO,
        "batch_size": BATCH_SIZE,
        "train_size_every_stage": TRAIN_SIZE,
        "epochs": args.epochs,
        "kl_warmup_epochs": {"vae": args.epochs["vae"] // 3, "ssvae": 0, "query": 0},
        "max_kl_weight": {"sclatent": 2.0, "scvi": 1.0, "note": "each library's default"},
        "validation": "scvi-tools: none (no early stopping); sclatent: after each stage's last epoch "
        "(check_val_every_n_epoch=epochs), its temperature fitted on the labelled held-out cells",
        "query_weight_decay": 0.0,
        "query_classifier": "each library's default load_query_data: sclatent's classifier frozen but for its "
        "hidden-layer biases (adapt_classifier=True), temperature kept; scvi-tools' frozen but for its "
        "BatchNorm's shift and scale (benchmarks/probe_scvi_query_classifier.py)",
        "optimizer": "Adam lr 1e-3, eps 0.01, weight decay 1e-6 (query: 0): both libraries' defaults",
        "seeds": args.seeds,
        "fractions": args.fractions,
        "scarcity_datasets": args.scarcity_datasets,
        "k_neighbours": K_NEIGHBOURS,
        "n_pcs": N_PCS,
        "n_hvg": N_HVG,
        "mixing_neighbours": MIXING_NEIGHBOURS,
        "ece_bins": 15,
        "logistic_regression": f"sklearn LogisticRegression(C=1, lbfgs, max_iter={LR_MAX_ITER}), multinomial",
        "quick": args.quick,
    }
    report = {"environment": env, "settings": settings, "results": results, "targets": targets, "total_seconds": total}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json_default))
    print(f"\nTotal {total / 60:.1f} min; wrote {out}")
    failed = _any_error(results)
    return 1 if failed else 0


def _any_error(results) -> bool:
    if isinstance(results, dict):
        if "error" in results or results.get("errors"):
            return True
        return any(_any_error(v) for v in results.values())
    if isinstance(results, list):
        return any(_any_error(v) for v in results)
    return False


if __name__ == "__main__":
    sys.exit(main())
