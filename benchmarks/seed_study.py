"""Seed study of ``bench_vae.py``: are sclatent's and scvi-tools' quality differences bigger than
the spread between seeds?

One ``bench_vae.py`` run per seed (the seed sets the split, the corruption and both models'
initialisation), then, per dataset, paired differences sclatent - scvi-tools over the seeds:
imputation median L1 (lower is better), held-out log p(x) (higher is better) and the speed ratio,
with their mean, standard error and a paired t statistic.

Run from the repository root (each seed is a full ``bench_vae.py`` run of the chosen datasets)::

    PYTHONPATH=. python benchmarks/seed_study.py --seeds 0 1 2 3 4 --datasets pbmc68k,synthetic

Runs already in ``--json-dir`` (``seed<N>.json``) are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def run_seed(seed: int, datasets: str, path: Path) -> dict:
    if not path.exists():
        command = [sys.executable, str(HERE / "bench_vae.py"), "--datasets", datasets, "--seed", str(seed)]
        command += ["--no-leiden", "--out", str(path)]
        subprocess.run(command, check=True)
    return json.loads(path.read_text())


def paired(values_a: list[float], values_b: list[float]) -> str:
    """``mean +- s.e. (t)`` of the differences a - b."""
    diff = np.asarray(values_a) - np.asarray(values_b)
    if diff.size < 2:
        return f"{diff.mean():+.4f} (one seed)"
    sem = diff.std(ddof=1) / math.sqrt(diff.size)
    t = diff.mean() / sem if sem > 0 else math.inf
    return f"{diff.mean():+.4f} +- {sem:.4f} (t = {t:+.2f}, {diff.size} seeds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--datasets", default="pbmc68k,synthetic")
    parser.add_argument("--json-dir", type=Path, default=HERE / "seed_study")
    args = parser.parse_args()
    args.json_dir.mkdir(parents=True, exist_ok=True)
    runs = {seed: run_seed(seed, args.datasets, args.json_dir / f"seed{seed}.json") for seed in args.seeds}
    summary = {}
    for dataset in args.datasets.split(","):
        rows = {"sclatent_l1": [], "scvi_l1": [], "sclatent_ll": [], "scvi_ll": [], "speed": [], "baseline_l1": []}
        for seed in args.seeds:
            result = runs[seed]["results"][dataset]
            rows["sclatent_l1"].append(result["sclatent"]["imputation"]["median_l1"])
            rows["scvi_l1"].append(result["scvi"]["imputation"]["median_l1"])
            rows["sclatent_ll"].append(result["sclatent"]["heldout"]["heldout_marginal_ll"])
            rows["scvi_ll"].append(result["scvi"]["heldout"]["heldout_marginal_ll"])
            rows["baseline_l1"].append(result["baseline_imputation_median_l1"])
            rows["speed"].append(
                result["scvi"]["heldout"]["seconds_per_epoch"] / result["sclatent"]["heldout"]["seconds_per_epoch"]
            )
        summary[dataset] = rows
        print(f"\n{dataset}: seeds {args.seeds}")
        print("  seed  L1 sclatent  L1 scvi  L1 lib x gene mean  log p(x) sclatent  log p(x) scvi  speed ratio")
        for i, seed in enumerate(args.seeds):
            l1 = f"{rows['sclatent_l1'][i]:11.4f}  {rows['scvi_l1'][i]:7.4f}  {rows['baseline_l1'][i]:18.4f}"
            ll = f"{rows['sclatent_ll'][i]:17.2f}  {rows['scvi_ll'][i]:13.2f}"
            print(f"  {seed:>4}  {l1}  {ll}  {rows['speed'][i]:10.2f}x")
        print(f"  imputation L1, sclatent - scvi (lower is better): {paired(rows['sclatent_l1'], rows['scvi_l1'])}")
        print(f"  held-out log p(x), sclatent - scvi (nats/cell):   {paired(rows['sclatent_ll'], rows['scvi_ll'])}")
        speed = rows["speed"]
        print(f"  speed ratio: mean {np.mean(speed):.2f}x, range {min(speed):.2f}-{max(speed):.2f}x")
    (args.json_dir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
