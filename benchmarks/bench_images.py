"""Issue 5's image/vector workloads on MNIST, each beside a literature reference and a baseline.

Runs the sections ``bench_image_<name>.py`` in this folder one after another (each in a fresh
process, so one section's threads or memory never touch the next) and collects their rows:

* ``vae``: Bernoulli VAE test NLL (IWAE bound, nats) vs per-pixel Bernoulli and Burda et al. 2016;
* ``autoencoders``: PCA-as-AE principal angles, AE variants' reconstruction error, masked-AE probe;
* ``flows``: Glow-style flow bits/dim vs a per-pixel histogram and Glow / RealNVP; planar fits to U1..U4;
* ``gan``: classifier Frechet distance, confidence, class coverage vs real images and a Gaussian;
* ``cyclegan``: cycle error and translation accuracy vs the identity map and the true transform;
* ``simclr``: linear-probe accuracy vs PCA, raw pixels and the VAE latent.

Every section trains within a fixed CPU budget (its epochs and subset sizes are in each row's
``settings``); the budgets are set for a 2-core CPU so the whole run takes about half an hour.
Numbers far from the literature are expected at that budget; each row states the gap.

Run from the repository root on an idle machine::

    PYTHONPATH=. SCLATENT_DATA_DIR=../shared/data python benchmarks/bench_images.py
    PYTHONPATH=. SCLATENT_DATA_DIR=../shared/data python benchmarks/bench_images.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ("vae", "autoencoders", "flows", "gan", "cyclegan", "simclr")


def run_section(name: str, quick: bool, seed: int, threads: int) -> tuple[list[dict], float]:
    """Rows of ``bench_image_<name>.run`` computed in a child process, and its wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        code = (
            "import json, sys, torch\n"
            f"torch.set_num_threads({threads})\n"
            f"sys.path.insert(0, {str(HERE)!r})\n"
            f"from bench_image_{name} import run\n"
            f"rows = run(quick={quick}, seed={seed})\n"
            f"open({str(out)!r}, 'w').write(json.dumps(rows, default=float))\n"
        )
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        return json.loads(out.read_text()), time.perf_counter() - start


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: list[dict]) -> str:
    """Markdown table: family, metric, value, beside (baselines), reference, gap, train time."""
    lines = [
        "| family | metric | sclatent | measured beside it | literature | gap | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        beside = "; ".join(f"{k} {_fmt(v)}" for k, v in (row.get("beside") or {}).items())
        reference = row.get("reference")
        gap = "-"
        if isinstance(reference, int | float) and isinstance(row.get("value"), int | float):
            diff = row["value"] - reference
            worse = diff > 0 if row.get("lower_is_better", True) else diff < 0
            gap = f"{diff:+.3g} ({'worse' if worse else 'better'})"
        literature = row.get("reference_text") or _fmt(reference)
        if row.get("reference_source"):
            literature += f" [{row['reference_source']}]"
        unit = f" ({row['unit']})" if row.get("unit") else ""
        lines.append(
            f"| {row['family']} | {row['metric']}{unit} | {_fmt(row['value'])} | {beside or '-'} | {literature} | "
            f"{gap} | {_fmt(row.get('train_seconds'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--quick", action="store_true", help="small subsets and few epochs: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="JSON results (default benchmarks/results_images[_quick].json)")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    import torch
    from bench_vae import _cpu_model

    results = {
        "command": "python benchmarks/bench_images.py " + " ".join(sys.argv[1:]),
        "machine": f"{_cpu_model()}, {args.threads} threads, torch {torch.__version__}",
        "sections": {},
    }
    rows: list[dict] = []
    for name in args.sections:
        print(f"=== {name}", flush=True)
        section_rows, seconds = run_section(name, args.quick, args.seed, args.threads)
        results["sections"][name] = {"rows": section_rows, "wall_seconds": seconds}
        rows.extend(section_rows)
        print(table(section_rows), flush=True)
        print(f"({name}: {seconds:.0f} s wall)", flush=True)
    results["table"] = table(rows)
    output = Path(args.output or HERE / f"results_images{'_quick' if args.quick else ''}.json")
    output.write_text(json.dumps(results, indent=2, default=float))
    print()
    print(results["table"])
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
