"""Paired per-seed comparison of sclatent and scvi-tools over one or more ``bench_label_transfer.py``
result files: are the gaps of a 5-seed run systematic, or within seed-to-seed noise?

Every file contributes its seeds (a seed found in two files is taken from the later one). For
each task (and scarcity dataset / label fraction) it prints, per metric, the mean of both
libraries and the paired difference sclatent - scvi-tools: its mean, its standard deviation, a
95 % t-interval, the seeds where sclatent is better / tied / worse (B/T/W), and the two-sided
p-value of an exact sign-flip (permutation) test of a zero mean difference (``--per-seed``: every
seed's values too). ECE is lower-better, accuracy and macro-F1 higher-better; the difference is
printed as measured either way. Run (files oldest first)::

    PYTHONPATH=. python benchmarks/label_transfer_seeds.py benchmarks/results_label_transfer.json \\
        benchmarks/results_label_transfer_extra_seeds_cellbench.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

METRICS = ("accuracy", "macro_f1", "ece")
#: +1 where higher is better, -1 where lower is
DIRECTION = {"accuracy": 1.0, "macro_f1": 1.0, "ece": -1.0}
LIBRARIES = ("sclatent", "scvi")


def _rows_of(results: dict) -> dict[tuple, dict[int, dict]]:
    """``{(task, dataset, fraction): {seed: {library: scores}}}`` of one result file."""
    rows: dict[tuple, dict[int, dict]] = {}
    for task, block in results.items():
        if task == "scarcity":
            for dataset, entry in block["datasets"].items():
                for seed_entry in entry["seeds"]:
                    for fraction, methods in seed_entry["fractions"].items():
                        key = ("scarcity", dataset, fraction)
                        rows.setdefault(key, {})[seed_entry["seed"]] = methods
        elif isinstance(block, dict) and "per_seed" in block:
            for seed_entry in block["per_seed"]:
                rows.setdefault((task, "", ""), {})[seed_entry["seed"]] = seed_entry["methods"]
    return rows


def pooled_rows(paths: list[Path]) -> dict[tuple, dict[int, dict]]:
    """The seeds of every file, per task. A seed found in an earlier file too is taken from the
    later one (pass the files oldest first); the script says so, with the largest score change."""
    pooled: dict[tuple, dict[int, dict]] = {}
    for path in paths:
        for key, seeds in _rows_of(json.loads(path.read_text())["results"]).items():
            target = pooled.setdefault(key, {})
            for seed, methods in seeds.items():
                if seed in target:
                    change = max(
                        abs(target[seed][lib][metric] - methods[lib][metric])
                        for lib, metric in itertools.product(LIBRARIES, METRICS)
                    )
                    print(f"{key[0]} {key[1]} {key[2]} seed {seed}: from {path.name} (largest change {change:.2g})")
                target[seed] = methods
    return pooled


def sign_flip_p(differences: np.ndarray) -> float:
    """Two-sided exact sign-flip test of a zero mean: the share of the ``2^n`` sign patterns
    whose mean is at least as far from zero as the observed one (Monte Carlo above 20 seeds)."""
    n = differences.size
    observed = abs(differences.mean())
    if n <= 20:
        signs = np.array(list(itertools.product((-1.0, 1.0), repeat=n)))
    else:
        signs = np.random.default_rng(0).choice((-1.0, 1.0), size=(200_000, n))
    means = np.abs(signs @ differences) / n
    return float(np.mean(means >= observed - 1e-12))


def paired_summary(ours: np.ndarray, theirs: np.ndarray, direction: float = 1.0) -> dict:
    """Mean, sd and 95 % t-interval of ``ours - theirs``, the seeds where ours is better / tied /
    worse (``direction`` -1 for a lower-better metric) and the sign-flip p-value."""
    diff = ours - theirs
    better = direction * diff
    n = diff.size
    sd = float(diff.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "n": n,
        "mean_ours": float(ours.mean()),
        "mean_theirs": float(theirs.mean()),
        "mean_diff": float(diff.mean()),
        "sd_diff": sd,
        "ci95": (float(diff.mean()) - half, float(diff.mean()) + half),
        "better": int((better > 1e-12).sum()),
        "ties": int((np.abs(diff) <= 1e-12).sum()),
        "worse": int((better < -1e-12).sum()),
        "p_sign_flip": sign_flip_p(diff) if n > 1 else float("nan"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="bench_label_transfer.py JSON files")
    parser.add_argument("--per-seed", action="store_true", help="print every seed's scores too")
    args = parser.parse_args(argv)
    pooled = pooled_rows(args.results)
    for (task, dataset, fraction), seeds in sorted(pooled.items()):
        order = sorted(seeds)
        label = task if task != "scarcity" else f"scarcity / {dataset} / {float(fraction):.0%} labels"
        print(f"\n== {label}: {len(order)} seeds ({', '.join(map(str, order))})")
        print(
            f"  {'metric':<9} {'sclatent':>9} {'scvi':>9} {'diff':>8} {'sd':>7} "
            f"{'95% CI of diff':>18} {'B/T/W':>8} {'p':>6}"
        )
        for metric in METRICS:
            ours = np.array([seeds[s]["sclatent"][metric] for s in order], dtype=float)
            theirs = np.array([seeds[s]["scvi"][metric] for s in order], dtype=float)
            s = paired_summary(ours, theirs, DIRECTION[metric])
            ci = f"[{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}]"
            print(
                f"  {metric:<9} {s['mean_ours']:9.3f} {s['mean_theirs']:9.3f} {s['mean_diff']:+8.3f} "
                f"{s['sd_diff']:7.3f} {ci:>18} {s['better']:>2}/{s['ties']}/{s['worse']:<2} {s['p_sign_flip']:6.3f}"
            )
            if args.per_seed:
                cells = "  ".join(f"{seed}:{a:.3f}/{b:.3f}" for seed, a, b in zip(order, ours, theirs, strict=True))
                print(f"    per seed (sclatent/scvi): {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
