"""Does the conditional GAN make realistic cells, and do they help a classifier on rare types?

Run (one thread; a few CPU minutes per seed)::

    OMP_NUM_THREADS=1 PYTHONPATH=. SCLATENT_DATA_DIR=../shared/data python benchmarks/bench_gan.py

Protocol (fixed seeds; everything printed beside the same figure for real data and a simple
generator):

- Data: pbmc68k (``bulk_labels``, 700 cells x 765 genes) and pbmc3k (its 2,638 labelled cells,
  2,000 ``seurat_v3`` highly variable genes chosen on the counts of all of them).
- Each dataset is split once into two halves stratified by cell type (seed 0): A (training) and B
  (held out). The GAN is trained on A only, for each of ``SEEDS``.
- Realism, all against held-out half B: (i) the other real half A (the floor a perfect generator
  reaches at this sample size), (ii) the GAN's cells, with B's type composition, (iii) a model-free
  generator: ``Poisson(l * mean profile of the type in A)`` with libraries resampled from A's cells
  of the type (right per-type means, no within-type structure). Metrics: classifier two-sample
  AUROC, MMD^2, per-gene mean/variance/zero-fraction correlations, top-20 marker overlap
  (``sclatent.metrics.realism``).
- Utility (pbmc3k): a logistic regression (on the 50-d PCA of log-normalised counts, PCA fitted on
  the real training cells) trained on A predicts the types of B. Recall of the rare types ``DC``
  (16 held-out cells) and ``Platelet`` (7) with: A alone; A with class-balanced weights; A with the
  rare types' real cells duplicated up to ``N_AUGMENT``; A plus ``N_AUGMENT`` synthetic cells of
  each rare type from the GAN; the same from the model-free generator.

Writes ``benchmarks/results_gan.json``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

torch.set_num_threads(1)

import sclatent  # noqa: E402
from sclatent.metrics import realism_metrics, split_halves  # noqa: E402
from sclatent.metrics.realism import log_normalise  # noqa: E402
from sclatent.model import CellGAN  # noqa: E402

SEEDS = [0, 1, 2]
RARE = ["DC", "Platelet"]
N_AUGMENT = 200
# training length in generator updates (each after n_critic=5 critic minibatches of 128 cells)
GENERATOR_STEPS = 600
LR = 1e-3
HERE = Path(__file__).resolve().parent


def pbmc3k_hvg() -> tuple[ad.AnnData, str]:
    import scanpy as sc

    adata = sclatent.datasets.pbmc3k()
    adata = adata[adata.obs["labelled"].astype(bool)].copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=2000, flavor="seurat_v3")
    adata = adata[:, adata.var["highly_variable"]].copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).astype("category")
    return adata, "cell_type"


def pbmc68k() -> tuple[ad.AnnData, str]:
    adata = sclatent.datasets.pbmc68k_counts()
    adata.obs["bulk_labels"] = adata.obs["bulk_labels"].astype(str).astype("category")
    return adata, "bulk_labels"


def type_mean_poisson(counts, labels, composition: dict[str, int], seed: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """The model-free generator: ``Poisson(l * type mean profile)``, libraries resampled per type."""
    rng = np.random.default_rng(seed)
    x = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    library = x.sum(1)
    rows, out_labels = [], []
    for t, n in composition.items():
        members = labels == t
        profile = x[members].sum(0) / x[members].sum()
        libs = rng.choice(library[members], size=n, replace=True)
        rows.append(rng.poisson(libs[:, None] * profile[None, :]))
        out_labels += [t] * n
    return sp.csr_matrix(np.vstack(rows).astype(np.float32)), np.asarray(out_labels)


def train_gan(train: ad.AnnData, labels_key: str, seed: int) -> tuple[CellGAN, float]:
    CellGAN.setup_anndata(train, labels_key=labels_key)
    model = CellGAN(train, seed=seed)
    steps_per_epoch = max(1, train.n_obs // 128)
    epochs = int(np.ceil(GENERATOR_STEPS * model.module.n_critic / steps_per_epoch))
    start = time.perf_counter()
    model.train(max_epochs=epochs, lr=LR, accelerator="cpu", progress_bar=False)
    return model, time.perf_counter() - start


def gan_cells(model: CellGAN, composition: dict[str, int], seed: int) -> tuple[sp.csr_matrix, np.ndarray]:
    parts = [model.sample(n, cell_type=t, seed=seed + 1000 * i) for i, (t, n) in enumerate(composition.items())]
    labels = np.concatenate([np.full(p.n_obs, t) for p, t in zip(parts, composition)])
    return sp.vstack([p.X for p in parts], format="csr"), labels


def recall_of_rare(train_x, train_y, test_x, test_y, class_weight=None) -> dict[str, float]:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score, recall_score

    pca = PCA(n_components=50, random_state=0).fit(log_normalise(train_x["real"]))
    features = pca.transform(log_normalise(train_x["all"]))
    classifier = LogisticRegression(max_iter=3000, C=1.0, class_weight=class_weight).fit(features, train_y)
    predicted = classifier.predict(pca.transform(log_normalise(test_x)))
    out = {t: float(recall_score(test_y == t, predicted == t)) for t in RARE}
    out["macro_f1"] = float(f1_score(test_y, predicted, average="macro"))
    out["accuracy"] = float((predicted == test_y).mean())
    return out


def mean_sd(values: list[float]) -> list[float]:
    return [float(np.mean(values)), float(np.std(values))]


def run_dataset(name: str, adata: ad.AnnData, labels_key: str, utility: bool, on_seed=None) -> dict:
    """Realism (and utility) over ``SEEDS``; ``on_seed(result)`` is called with the summary of the
    seeds done so far after each one (``result["seeds_done"]``), so an interrupted run keeps them."""
    labels = adata.obs[labels_key].astype(str).to_numpy()
    first, second = split_halves(labels, seed=0)
    x = sp.csr_matrix(adata.X)
    xa, xb, ya, yb = x[first], x[second], labels[first], labels[second]
    composition = {t: int((yb == t).sum()) for t in np.unique(yb)}
    result: dict = {
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "train_cells": len(first),
        "heldout_cells": len(second),
    }
    print(
        f"\n== {name}: {adata.n_obs} cells x {adata.n_vars} genes; train half {len(first)}, held-out half {len(second)}"
    )
    result["real_half"] = realism_metrics(xb, xa, yb, ya)
    per_seed: dict[str, list] = {"gan": [], "type_mean_poisson": [], "train_seconds": []}
    utility_rows: dict[str, list] = {}
    for seed in SEEDS:
        train = adata[first].copy()
        model, seconds = train_gan(train, labels_key, seed)
        per_seed["train_seconds"].append(seconds)
        fake_x, fake_y = gan_cells(model, composition, seed)
        per_seed["gan"].append(realism_metrics(xb, fake_x, yb, fake_y, seed=seed))
        base_x, base_y = type_mean_poisson(xa, ya, composition, seed)
        per_seed["type_mean_poisson"].append(realism_metrics(xb, base_x, yb, base_y, seed=seed))
        print(
            f"  seed {seed}: GAN trained {len(model.history['epoch'])} epochs in {seconds:.0f} s; "
            f"AUROC GAN {per_seed['gan'][-1]['c2st_auroc']:.3f}, "
            f"type-mean Poisson {per_seed['type_mean_poisson'][-1]['c2st_auroc']:.3f}, "
            f"real half {result['real_half']['c2st_auroc']:.3f}"
        )
        if utility:
            rare = {t: N_AUGMENT for t in RARE}
            variants = {"real only": (None, None, None), "class-balanced weights": (None, None, "balanced")}
            rng = np.random.default_rng(seed)
            dup = np.concatenate([rng.choice(np.flatnonzero(ya == t), N_AUGMENT, replace=True) for t in RARE])
            variants["duplicate rare real cells"] = (xa[dup], ya[dup], None)
            variants["+ GAN cells"] = (*gan_cells(model, rare, seed + 7), None)
            variants["+ type-mean Poisson cells"] = (*type_mean_poisson(xa, ya, rare, seed + 7), None)
            for variant, (extra_x, extra_y, weight) in variants.items():
                all_x = xa if extra_x is None else sp.vstack([xa, extra_x], format="csr")
                all_y = ya if extra_y is None else np.r_[ya, extra_y]
                scores = recall_of_rare({"real": xa, "all": all_x}, all_y, xb, yb, class_weight=weight)
                utility_rows.setdefault(variant, []).append(scores)
        result["seeds_done"] = SEEDS[: len(per_seed["gan"])]
        result["gan_train_seconds"] = per_seed["train_seconds"]
        for generator in ("gan", "type_mean_poisson"):
            keys = per_seed[generator][0].keys()
            result[generator] = {k: mean_sd([r[k] for r in per_seed[generator]]) for k in keys}
        if utility:
            result["utility"] = {
                variant: {k: mean_sd([r[k] for r in rows]) for k in rows[0]} for variant, rows in utility_rows.items()
            }
            result["utility_heldout_rare_cells"] = {t: int((yb == t).sum()) for t in RARE}
            result["utility_train_rare_cells"] = {t: int((ya == t).sum()) for t in RARE}
        if on_seed is not None:
            on_seed(result)
    return result


def print_tables(results: dict) -> str:
    lines = []
    metrics = [
        ("c2st_auroc", "classifier AUROC (0.5 best)"),
        ("mmd", "MMD^2 (PCA, RBF)"),
        ("corr_mean", "gene mean r"),
        ("corr_variance", "gene variance r"),
        ("corr_zero_fraction", "gene zero-fraction r"),
        ("marker_overlap", "top-20 marker overlap"),
    ]
    for name, res in results["datasets"].items():
        lines.append(f"\n{name} ({res['cells']} cells x {res['genes']} genes): realism against the held-out half")
        lines.append(f"| metric | real half | GAN (mean +- sd, {len(res['seeds_done'])} seeds) | type-mean Poisson |")
        lines.append("|---|---|---|---|")
        for key, label in metrics:
            g, p = res["gan"][key], res["type_mean_poisson"][key]
            lines.append(
                f"| {label} | {res['real_half'][key]:.3f} | {g[0]:.3f} +- {g[1]:.3f} | {p[0]:.3f} +- {p[1]:.3f} |"
            )
        seconds = res["gan_train_seconds"]
        lines.append(f"GAN training: {np.mean(seconds):.0f} s per seed (one thread, shared loaded machine)")
        if "utility" in res:
            held = res["utility_heldout_rare_cells"]
            lines.append(
                f"\n{name}: rare-type recall on the held-out half ({held['DC']} DC, {held['Platelet']} Platelet cells; "
                f"train half has {res['utility_train_rare_cells']}), logistic regression on PCA, mean +- sd over seeds"
            )
            lines.append("| training set | DC recall | Platelet recall | macro F1 | accuracy |")
            lines.append("|---|---|---|---|---|")
            for variant, scores in res["utility"].items():
                cells = " | ".join(
                    f"{scores[k][0]:.3f} +- {scores[k][1]:.3f}" for k in ("DC", "Platelet", "macro_f1", "accuracy")
                )
                lines.append(f"| {variant} | {cells} |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str]) -> None:
    """``bench_gan.py [pbmc68k] [pbmc3k] [--out PATH]``, or ``--merge A.json B.json ...`` to combine
    runs made in parallel (one dataset each) into ``results_gan.json``."""
    out = HERE / "results_gan.json"
    if "--out" in argv:
        at = argv.index("--out")
        out = Path(argv[at + 1])
        argv = argv[:at] + argv[at + 2 :]
    if argv and argv[0] == "--merge":
        parts = [json.loads(Path(p).read_text()) for p in argv[1:]]
        results = parts[0]
        for part in parts[1:]:
            results["datasets"].update(part["datasets"])
            results["total_seconds"] += part["total_seconds"]
            results["command"] += " ; " + part["command"]
        results["table"] = print_tables(results)
        out.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {out}")
        return
    start = time.perf_counter()
    results: dict = {
        "protocol": __doc__.split("Protocol")[1].strip(),
        "seeds": SEEDS,
        "generator_steps": GENERATOR_STEPS,
        "lr": LR,
        "n_augment": N_AUGMENT,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread (shared)",
        "command": "python benchmarks/bench_gan.py " + " ".join(sys.argv[1:]),
        "datasets": {},
    }
    only = argv or ["pbmc3k", "pbmc68k"]

    def save(name: str):
        def write(result: dict) -> None:
            results["datasets"][name] = result
            results["total_seconds"] = time.perf_counter() - start
            out.write_text(json.dumps(results, indent=1))

        return write

    for name in only:
        if name == "pbmc68k":
            run_dataset("pbmc68k", *pbmc68k(), utility=False, on_seed=save("pbmc68k"))
        elif name == "pbmc3k":
            try:
                run_dataset("pbmc3k", *pbmc3k_hvg(), utility=True, on_seed=save("pbmc3k"))
            except sclatent.datasets.DatasetUnavailableError as err:
                print(f"pbmc3k skipped: {err}")
    results["total_seconds"] = time.perf_counter() - start
    results["table"] = print_tables(results)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out} in {results['total_seconds']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
