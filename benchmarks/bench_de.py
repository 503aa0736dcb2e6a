"""Differential expression against simulated ground truth: sclatent (VAE + ``differential_expression``)
vs scvi-tools (SCVI + ``differential_expression``), both ``mode="change"``, ``batch_correction=True``,
the default ``test_mode="three"``, the same epochs, beside scanpy's Wilcoxon and t-test on
log-normalised counts; every design over five seeds (data and models), mean +- sd.

Designs (``sclatent.datasets.synthetic``, 3 cell types, 2 batches with a per-gene batch shift):

* ``balanced``: both groups spread evenly over the batches (batch effect sd 0.5);
* ``confounded``: group A (``type_0``) 75 % in batch 0, group B (``type_1``) 25 % in batch 0, by
  subsampling cells (batch effect sd 1.0): a batch shift that Wilcoxon cannot tell from biology.

Ground truth per gene: the log2 fold change of the true normalised expression (the simulator's
``true_mean`` over the cell's library) between A and B, within each batch, averaged over batches
(the batch shift cancels within a batch). "DE" genes: ``|true log2 FC| >= 0.5``; a call on a gene
with ``|true log2 FC| < 0.25`` is a false discovery.

Reported per method: AUPRC of ranking the DE genes (``proba_de``; scanpy: the test statistic's
absolute value), Pearson correlation of estimated and true log2 FC, the observed false discovery
proportion of the genes called at the 5 % target (``is_de_fdr_0.05``; scanpy: BH-adjusted p <
0.05), the number called, and wall time (training + DE).

With ``--real``: pbmc3k (2,000 HVGs, 9 Seurat types), every type vs the rest with each method: the
rank of the Seurat tutorial's markers in their type's list (up-regulated genes first) and the time;
cellbench_5cl singlets (2,000 HVGs), each cell line vs the rest on plate 1 and on plate 2
separately: overlap of the two plates' top-100 genes and the rank correlation of their log2 fold
changes. Run from the repository root::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/bench_de.py --real --out benchmarks/results_de.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _schedule import matched_schedule

DESIGNS = {
    "balanced": {"batch_effect": 0.5, "confound": None},
    "confounded": {"batch_effect": 1.0, "confound": 0.75},
    # the types share one latent position and differ only by planted weak effects (|log2 FC| 0.3-1.3
    # on 10 % of the genes per type); DE = planted in A or B, null = planted in neither
    "weak_balanced": {"batch_effect": 0.5, "confound": None, "de_fraction": 0.1, "cluster_separation": 0.0},
    "weak_confounded": {"batch_effect": 1.0, "confound": 0.75, "de_fraction": 0.1, "cluster_separation": 0.0},
}
GROUP_A, GROUP_B = "type_0", "type_1"
DE_THRESHOLD, NULL_THRESHOLD, DELTA = 0.5, 0.25, 0.25


def simulate(design: str, n_cells: int, n_genes: int, seed: int):
    """The design's AnnData (counts, ``group``, ``batch``) and the true log2 FC of A vs B per gene."""
    from sclatent.datasets import synthetic

    settings = DESIGNS[design]
    planted = {k: settings[k] for k in ("de_fraction", "cluster_separation") if k in settings}
    adata = synthetic(
        n_cells=int(n_cells * 1.6),
        n_genes=n_genes,
        n_clusters=3,
        n_batches=2,
        batch_effect=settings["batch_effect"],
        seed=seed,
        **planted,
    )
    groups = adata.obs["cell_type"].astype(str).to_numpy()
    batches = adata.obs["batch"].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    keep = []
    for group in np.unique(groups):
        cells = np.flatnonzero(groups == group)
        share = settings["confound"]
        if share is None or group not in (GROUP_A, GROUP_B):
            keep.append(rng.permutation(cells)[: n_cells // 3])
            continue
        share = share if group == GROUP_A else 1 - share
        in_0, in_1 = (
            rng.permutation(cells[batches[cells] == "batch_0"]),
            rng.permutation(cells[batches[cells] == "batch_1"]),
        )
        total = min(n_cells // 3, int(min(len(in_0) / share, len(in_1) / (1 - share))))
        first = round(share * total)
        keep += [in_0[:first], in_1[: total - first]]
    adata = adata[np.sort(np.concatenate(keep))].copy()
    adata.obs["group"] = adata.obs["cell_type"].astype(str)
    truth = adata.layers["true_mean"] / adata.layers["true_mean"].sum(1, keepdims=True)
    groups, batches = adata.obs["group"].to_numpy(), adata.obs["batch"].astype(str).to_numpy()
    per_batch = [
        np.log2(truth[(groups == GROUP_A) & (batches == b)].mean(0))
        - np.log2(truth[(groups == GROUP_B) & (batches == b)].mean(0))
        for b in np.unique(batches)
    ]
    true_lfc = np.mean(per_batch, axis=0)
    if "de_fraction" in settings:
        effect = adata.varm["de_log2_fold_change"]
        is_de = (effect[:, 0] != 0) | (effect[:, 1] != 0)
        return adata, true_lfc, is_de, ~is_de
    return adata, true_lfc, np.abs(true_lfc) >= DE_THRESHOLD, np.abs(true_lfc) < NULL_THRESHOLD


def scores(true_lfc, is_de, null, estimate, ranking, called) -> dict:
    from sklearn.metrics import average_precision_score

    n_called = int(called.sum())
    return {
        "auprc": float(average_precision_score(is_de, ranking)),
        "lfc_correlation": float(np.corrcoef(estimate, true_lfc)[0, 1]),
        "fdp": float((called & null).sum() / n_called) if n_called else 0.0,
        "n_called": n_called,
        "n_true_de": int(is_de.sum()),
    }


def model_row(result, adata, start: float, trained: float, end: float) -> tuple[dict, float]:
    """A generative model's DE table (sclatent's or scvi-tools', the same columns) as a benchmark
    row: estimate, ranking, calls and the seconds, genes in ``adata``'s order."""
    result = result.loc[adata.var_names]
    return {
        "lfc": result["lfc_mean"].to_numpy(),
        "rank": result["proba_de"].to_numpy(),
        "called": result["is_de_fdr_0.05"].to_numpy(),
        "train_s": trained - start,
        "de_s": end - trained,
    }, end - start


def run_sclatent(adata, epochs: int, seed: int) -> tuple[dict, float]:
    from sclatent.model import VAE

    start = time.perf_counter()
    VAE.setup_anndata(adata, layer="counts", batch_key="batch")
    model = VAE(adata, seed=seed).train(max_epochs=epochs, progress_bar=False, **matched_schedule(epochs))
    trained = time.perf_counter()
    result = model.differential_expression(
        groupby="group",
        group1=GROUP_A,
        group2=GROUP_B,
        mode="change",
        delta=DELTA,
        batch_correction=True,
        progress_bar=False,
    )
    return model_row(result, adata, start, trained, time.perf_counter())


def run_scvi(adata, epochs: int, seed: int) -> tuple[dict, float]:
    import logging
    import warnings

    import scvi

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    scvi.settings.seed = seed
    adata = adata.copy()
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = scvi.model.SCVI(adata)
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    trained = time.perf_counter()
    result = model.differential_expression(
        groupby="group", group1=GROUP_A, group2=GROUP_B, mode="change", delta=DELTA, batch_correction=True, silent=True
    )
    return model_row(result, adata, start, trained, time.perf_counter())


def run_scanpy(adata, method: str) -> tuple[dict, float]:
    import scanpy as sc

    adata = adata.copy()
    start = time.perf_counter()
    adata.X = adata.layers["counts"].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.tl.rank_genes_groups(adata, "group", groups=[GROUP_A], reference=GROUP_B, method=method)
    table = sc.get.rank_genes_groups_df(adata, GROUP_A).set_index("names").loc[adata.var_names]
    end = time.perf_counter()
    return {
        "lfc": table["logfoldchanges"].to_numpy(),
        "rank": np.abs(table["scores"].to_numpy()),
        "called": (table["pvals_adj"] < 0.05).to_numpy(),
        "train_s": 0.0,
        "de_s": end - start,
    }, end - start


def summarise(runs: list[dict]) -> dict:
    """Mean over seeds of every score, the sd of AUPRC and FDP, the worst FDP, and the runs."""
    keys = [k for k in runs[0] if k != "n_true_de"]
    out = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    out.update(
        auprc_sd=float(np.std([r["auprc"] for r in runs])),
        fdp_sd=float(np.std([r["fdp"] for r in runs])),
        fdp_max=float(np.max([r["fdp"] for r in runs])),
        per_seed=runs,
    )
    return out


# Seurat's pbmc3k tutorial markers: (cell type, gene)
PBMC3K_MARKERS = [
    ("B", "MS4A1"),
    ("CD14+ Mono", "CD14"),
    ("CD14+ Mono", "LYZ"),
    ("NK", "GNLY"),
    ("NK", "NKG7"),
    ("DC", "FCER1A"),
    ("DC", "CST3"),
    ("Platelet", "PPBP"),
    ("FCGR3A+ Mono", "FCGR3A"),
    ("CD8 T", "CD8A"),
]


def _hvg_subset(adata, n_top: int = 2000):
    import scanpy as sc

    adata = adata.copy()
    adata.X = adata.layers["counts"].copy()
    sc.pp.highly_variable_genes(adata, n_top_genes=n_top, flavor="seurat_v3")
    return adata[:, adata.var["highly_variable"]].copy()


def one_vs_rest(method: str, adata, groupby: str, epochs: int, seed: int):
    """``{group: DataFrame(lfc, rank score) indexed by gene, sorted best first}`` and the seconds
    (training, all-groups-vs-rest DE)."""
    import scanpy as sc

    groups = sorted(adata.obs[groupby].astype(str).unique())
    adata = adata.copy()
    adata.obs[groupby] = adata.obs[groupby].astype(str).astype("category")
    if method.startswith("scanpy"):
        start = time.perf_counter()
        adata.X = adata.layers["counts"].copy()
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.tl.rank_genes_groups(adata, groupby, method="wilcoxon")
        tables = {
            g: sc.get.rank_genes_groups_df(adata, g)
            .set_index("names")
            .rename(columns={"logfoldchanges": "lfc", "scores": "score"})
            for g in groups
        }
        return tables, 0.0, time.perf_counter() - start
    start = time.perf_counter()
    if method == "sclatent":
        from sclatent.model import VAE

        VAE.setup_anndata(adata, layer="counts")
        model = VAE(adata, seed=seed).train(max_epochs=epochs, progress_bar=False, **matched_schedule(epochs))
        trained = time.perf_counter()
        result = model.differential_expression(groupby=groupby, mode="change", progress_bar=False)
    else:
        import scvi

        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(adata, layer="counts")
        model = scvi.model.SCVI(adata)
        model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
        trained = time.perf_counter()
        result = model.differential_expression(groupby=groupby, mode="change", silent=True)
    end = time.perf_counter()
    column = "group1"
    tables = {}
    for g in groups:
        table = result[result[column].astype(str) == g].rename(columns={"lfc_mean": "lfc"})
        table["score"] = table["proba_de"] * np.sign(table["lfc"])  # up-regulated first, as markers
        tables[g] = table.sort_values("score", ascending=False)
    return tables, trained - start, end - trained


def marker_ranks(tables: dict) -> dict:
    """Rank (1 = first) of each Seurat marker in its type's one-vs-rest list (up-regulated first)."""
    out = {}
    for cell_type, gene in PBMC3K_MARKERS:
        table = tables.get(cell_type)
        if table is None or gene not in table.index:
            out[f"{cell_type}:{gene}"] = None
            continue
        out[f"{cell_type}:{gene}"] = int(np.flatnonzero(table.index == gene)[0]) + 1
    return out


def real_data(args) -> dict:
    """pbmc3k marker ranks and all-groups-vs-rest time; cellbench reproducibility across plates."""
    from scipy.stats import spearmanr

    from sclatent import datasets

    report: dict = {"pbmc3k": {}, "cellbench": {}}
    pbmc = datasets.pbmc3k()
    pbmc = _hvg_subset(pbmc[pbmc.obs["cell_type"].notna().to_numpy()])
    print(f"\n=== pbmc3k: {pbmc.n_obs} cells x {pbmc.n_vars} HVGs, 9 types, every type vs the rest", flush=True)
    for method in ("sclatent", "scvi-tools", "scanpy wilcoxon"):
        tables, train_s, de_s = one_vs_rest(method, pbmc, "cell_type", args.epochs, args.seed)
        ranks = marker_ranks(tables)
        report["pbmc3k"][method] = {"train_seconds": train_s, "de_seconds": de_s, "marker_ranks": ranks}
        shown = "  ".join(f"{k.split(':')[1]} {v}" for k, v in ranks.items())
        print(f"  {method:16s} train {train_s:.1f} s, DE {de_s:.1f} s | marker ranks: {shown}", flush=True)
    full = datasets.cellbench_5cl()
    singlets = full[(full.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()]
    singlets = _hvg_subset(singlets)
    plates = singlets.obs["batch"].astype(str).to_numpy()
    print(
        f"\n=== cellbench_5cl singlets, {singlets.n_vars} HVGs: each line vs the rest on plate1 and plate2", flush=True
    )
    for method in ("sclatent", "scvi-tools", "scanpy wilcoxon"):
        per_plate, seconds = {}, 0.0
        for plate in ("plate1", "plate2"):
            tables, train_s, de_s = one_vs_rest(method, singlets[plates == plate], "cell_type", args.epochs, args.seed)
            per_plate[plate], seconds = tables, seconds + train_s + de_s
        overlaps, correlations = [], []
        for line in sorted(per_plate["plate1"]):
            a, b = per_plate["plate1"][line], per_plate["plate2"][line]
            overlaps.append(len(set(a.index[:100]) & set(b.index[:100])) / 100)
            genes = a.index.intersection(b.index)
            correlations.append(float(spearmanr(a.loc[genes, "lfc"], b.loc[genes, "lfc"]).statistic))
        report["cellbench"][method] = {
            "top100_overlap": float(np.mean(overlaps)),
            "lfc_rank_correlation": float(np.mean(correlations)),
            "seconds": seconds,
        }
        print(
            f"  {method:16s} top-100 overlap {np.mean(overlaps):.3f}  log2 FC rank correlation "
            f"{np.mean(correlations):.3f}  ({seconds:.1f} s both plates)",
            flush=True,
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--n-cells", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the real-data runs")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the simulated designs (data and models)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real", action="store_true", help="also the real-data checks (pbmc3k, cellbench_5cl)")
    parser.add_argument("--out", default="benchmarks/results_de.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    report = {"settings": vars(args), "designs": {}}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for design in [d for d in args.designs.split(",") if d]:
        per_seed: dict[str, list[dict]] = {}
        for seed in seeds:
            adata, true_lfc, is_de, null = simulate(design, args.n_cells, args.n_genes, seed)
            a = adata.obs["group"] == GROUP_A
            share = float((adata.obs["batch"][a].astype(str) == "batch_0").mean())
            print(
                f"\n=== {design}, seed {seed}: {adata.n_obs} cells x {adata.n_vars} genes; {GROUP_A} {share:.0%} in "
                f"batch_0; {int(is_de.sum())} DE genes, {int(null.sum())} null",
                flush=True,
            )
            runs = {
                "sclatent": (run_sclatent, (adata.copy(), args.epochs, seed)),
                "scvi-tools": (run_scvi, (adata, args.epochs, seed)),
                "scanpy wilcoxon": (run_scanpy, (adata, "wilcoxon")),
                "scanpy t-test": (run_scanpy, (adata, "t-test")),
            }
            for name, (run, arguments) in runs.items():
                out, seconds = run(*arguments)
                r = {
                    **scores(true_lfc, is_de, null, out["lfc"], out["rank"], out["called"]),
                    "seconds": seconds,
                    "train_seconds": out["train_s"],
                    "de_seconds": out["de_s"],
                }
                per_seed.setdefault(name, []).append(r)
                print(
                    f"  {name:16s} AUPRC {r['auprc']:.3f}  lfc r {r['lfc_correlation']:.3f}  FDP {r['fdp']:.3f} "
                    f"({r['n_called']} called)  time {seconds:.1f} s (DE {r['de_seconds']:.1f} s)",
                    flush=True,
                )
        report["designs"][design] = {name: summarise(runs_) for name, runs_ in per_seed.items()}
        print(f"\n--- {design}: mean +- sd over seeds {seeds}", flush=True)
        scvi_seconds = report["designs"][design]["scvi-tools"]["seconds"]
        for name, r in report["designs"][design].items():
            print(
                f"  {name:16s} AUPRC {r['auprc']:.3f} +- {r['auprc_sd']:.3f}  lfc r {r['lfc_correlation']:.3f}  "
                f"FDP {r['fdp']:.3f} (max {r['fdp_max']:.3f})  time {r['seconds']:.1f} s "
                f"({scvi_seconds / max(r['seconds'], 1e-9):.1f}x less than scvi-tools)",
                flush=True,
            )
    if args.real:
        report["real"] = real_data(args)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
