"""Which classes lose every labelled training cell to the semi-supervised VAE's validation split,
per seed of ``bench_label_transfer.py``'s scarcity task: the split of all cells that
``SemiSupervisedVAE.train`` used before (``split_cells(cells, 0.9, seed)``) beside its split by
class (``groups=labels``: every class keeps ``ceil(0.9 * n)`` of its labelled cells). With result
files of that task, each seed's macro-F1 of sclatent and scvi-tools is printed beside it. Run::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_scarcity_split.py \\
        --seeds 0-19 --results benchmarks/results_label_transfer_cellbench_323f172.json \\
        benchmarks/results_label_transfer_extra_seeds_cellbench_9a73040.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_transfer as bench

from sclatent.train import split_cells


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = (int(x) for x in text.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def _macro_f1(paths: list[Path], dataset: str, tag: str) -> dict[int, dict]:
    scores: dict[int, dict] = {}
    for path in paths:
        block = json.loads(path.read_text())["results"].get("scarcity", {}).get("datasets", {}).get(dataset)
        for entry in (block or {}).get("seeds", []):
            methods = entry["fractions"].get(tag)
            if methods:
                scores[entry["seed"]] = {lib: methods[lib]["macro_f1"] for lib in ("sclatent", "scvi")}
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cellbench_5cl", choices=bench.SCARCITY_DATASETS)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--seeds", default="0-19", help="'0-19' or '0,3,7'")
    parser.add_argument("--results", nargs="*", type=Path, default=[], help="scarcity result JSONs (optional)")
    parser.add_argument("--data-dir", default=bench.DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    tag = f"{args.fraction:g}"
    base = bench.load_scarcity_base(args.dataset, args.data_dir)
    truth = base["adata"].obs["truth"].astype(str).to_numpy()
    cells = np.arange(base["adata"].n_obs)  # every cell has counts (empty ones were dropped)
    scores = _macro_f1(args.results, args.dataset, tag)
    print(f"{args.dataset}, {args.fraction:.0%} labels: classes whose labelled training cells all go to validation")
    print(f"{'seed':>4} {'labelled':>8}  {'split of all cells':<28} {'split by class':<15} macro-F1 sclatent / scvi")
    hit = []
    for seed in _seeds(args.seeds):
        _, _, labelled = bench.scarcity_split(truth, seed, [args.fraction])
        lab = labelled[tag]
        codes = np.full(cells.size, -1)
        codes[lab] = np.unique(truth[lab], return_inverse=True)[1]
        lost = {}
        for name, groups in (("all", None), ("class", codes)):
            train, _ = split_cells(cells, 0.9, seed, groups=groups)
            kept = set(truth[np.intersect1d(lab, train)])
            lost[name] = sorted(set(truth[lab]) - kept)
        f1 = scores.get(seed)
        f1_text = f"{f1['sclatent']:.3f} / {f1['scvi']:.3f}" if f1 else "-"
        lost_all, lost_class = ", ".join(lost["all"]) or "-", ", ".join(lost["class"]) or "-"
        print(f"{seed:>4} {lab.size:>8}  {lost_all:<28} {lost_class:<15} {f1_text}")
        if f1:
            hit.append((bool(lost["all"]), f1["sclatent"], f1["scvi"]))
    for flag, label in ((True, "a class lost"), (False, "no class lost")):
        rows = [(a, b) for lost_any, a, b in hit if lost_any == flag]
        if rows:
            mean = np.mean(rows, axis=0)
            print(f"seeds with {label} (split of all cells): {len(rows)}, mean macro-F1 {mean[0]:.3f} / {mean[1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
