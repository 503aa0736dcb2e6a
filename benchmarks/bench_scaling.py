"""Issue 8's scaling benchmark: out-of-core training, in-memory training, 1 vs 2 processes.

1. Writes (once; reused when present) a synthetic h5ad of 1,000,000 cells x 2,000 genes, ZINB counts,
   ~7 % nonzero, chunk by chunk (:func:`sclatent.datasets.synthetic_h5ad`), and a 100k-cell slice.
2. Trains the VAE (scVI's architecture: 128 hidden, 1 layer, 10 latent, ZINB, batch 128) for one
   epoch on all training cells, each configuration in a fresh process so its peak RSS is its own:

   * ``out-of-core 1M``: the backed 1M file, minibatches streamed from disk;
   * ``out-of-core 100k``: the same on the slice file (same data size as the in-memory row);
   * ``in-memory 100k``: the slice loaded into memory (the core's default path);
   * ``scvi-tools 100k``: scvi-tools' SCVI on the same in-memory slice (it has no out-of-core path);
   * ``torchrun 1 / 2 processes``: the in-memory slice under ``torchrun --nproc_per_node=N`` with
     ``2 / N`` threads per process (the machine's two cores either way), DDP over gloo.

   Then streams the latent of every cell of the 1M file (inference out of core).
3. Prints a table (cells/s, seconds, peak RSS, ratios) and writes ``benchmarks/results_scaling.json``.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_scaling.py   # ~10 min on 2 cores (+ ~15-20 min to write the 1M file once)
    PYTHONPATH=. python benchmarks/bench_scaling.py --quick         # 100k / 20k cells: a smoke run

Peak RSS is ``VmHWM`` of the worker process (imports of torch/scanpy included: ~0.5 GB).
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
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_vae import _cpu_model, _git_state, _peak_rss_mb, _version  # noqa: E402

ARCHITECTURE = {"n_hidden": 128, "n_layers": 1, "n_latent": 10, "gene_likelihood": "zinb"}
BATCH_SIZE = 128
RSS_TARGET_MB = 2048


# ======================================================================================== data


def ensure_files(workdir: Path, n_cells: int, n_genes: int, slice_cells: int) -> tuple[Path, Path, float]:
    """The big file and the slice file (written if missing) and the seconds spent writing them."""
    import anndata as ad

    from sclatent.datasets import synthetic_h5ad

    workdir.mkdir(parents=True, exist_ok=True)
    big = workdir / f"synthetic_{n_cells}x{n_genes}.h5ad"
    small = workdir / f"synthetic_{n_cells}x{n_genes}_first{slice_cells}.h5ad"
    start = time.perf_counter()
    if not big.exists():
        synthetic_h5ad(big.with_suffix(".tmp"), n_cells=n_cells, n_genes=n_genes, seed=0)
        big.with_suffix(".tmp").rename(big)
    if not small.exists():
        backed = ad.read_h5ad(big, backed="r")
        backed[:slice_cells].to_memory().write_h5ad(small)
        backed.file.close()
    return big, small, time.perf_counter() - start


# ======================================================================================== workers


def worker(spec: dict) -> dict:
    """One configuration, run in this (fresh) process; returns its measurements."""
    import anndata as ad
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["method"] == "scvi":
        return _scvi_worker(spec)
    from sclatent import distributed
    from sclatent.data import ondisk_settings
    from sclatent.model import VAE

    if spec.get("stream"):
        ondisk_settings.in_memory_max_bytes = 0  # force streaming (the automatic choice would load 100k cells)
    start = time.perf_counter()
    adata = ad.read_h5ad(spec["path"], backed="r" if spec["backed"] else None)
    VAE.setup_anndata(adata)
    setup_seconds = time.perf_counter() - start
    model = VAE(adata, seed=0, **ARCHITECTURE)
    start = time.perf_counter()
    model.train(
        max_epochs=1,
        batch_size=BATCH_SIZE,
        train_size=1.0,
        early_stopping=False,
        accelerator="cpu",
        progress_bar=spec.get("progress", False),
    )
    train_seconds = time.perf_counter() - start
    context = distributed.context()
    result = {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "epoch_seconds": model.history["seconds"][0],
        "train_elbo": model.history["train_elbo"][0],
        "data_path": type(model._data()).__name__,
        "world_size": context.world_size,
    }
    result["cells_per_second"] = len(model.train_indices) / result["epoch_seconds"]
    if spec.get("latent"):
        start = time.perf_counter()
        latent = model.get_latent_representation(batch_size=4096)
        result["latent_seconds"] = time.perf_counter() - start
        result["latent_cells_per_second"] = latent.shape[0] / result["latent_seconds"]
    result["peak_rss_mb"] = _peak_rss_mb()
    if context.enabled:
        # every rank's peak RSS: the job's memory is their sum
        peaks = torch.tensor([result["peak_rss_mb"]], dtype=torch.float64)
        gathered = [torch.zeros_like(peaks) for _ in range(context.world_size)]
        torch.distributed.all_gather(gathered, peaks)
        result["peak_rss_mb_per_rank"] = [float(p) for p in gathered]
        if not context.is_main:
            return {}
    return result


def _scvi_worker(spec: dict) -> dict:
    import anndata as ad
    import scvi

    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    adata = ad.read_h5ad(spec["path"])
    start = time.perf_counter()
    scvi.model.SCVI.setup_anndata(adata)
    setup_seconds = time.perf_counter() - start
    model = scvi.model.SCVI(adata, n_hidden=128, n_layers=1, n_latent=10, gene_likelihood="zinb")
    start = time.perf_counter()
    model.train(
        max_epochs=1,
        batch_size=BATCH_SIZE,
        train_size=1.0,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_checkpointing=False,
        logger=False,
    )
    seconds = time.perf_counter() - start
    return {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "setup_seconds": setup_seconds,
        "train_seconds": seconds,
        "epoch_seconds": seconds,  # Lightning's fit of one epoch, its setup included
        "cells_per_second": adata.n_obs / seconds,
        "data_path": "scvi-tools AnnDataLoader (in memory)",
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_worker(spec: dict, nproc: int = 0, timeout: float = 3600) -> dict:
    """``worker(spec)`` in a fresh process (under torchrun when ``nproc`` > 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {**spec, "out": str(out)}
        threads = str(spec["threads"])
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONPATH=str(REPO_ROOT))
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        if nproc:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            command += [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, timeout=timeout)
        result = json.loads(out.read_text())
        result["wall_seconds"] = time.perf_counter() - start
        return result


# ======================================================================================== report


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def print_table(rows: dict[str, dict]) -> None:
    reference = rows.get("memory_slice", {}).get("cells_per_second")
    print(
        "\n| configuration | cells | data path | epoch s | cells/s | vs in-memory | peak RSS (MB) | CSR on disk (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        ratio = f"{r['cells_per_second'] / reference:.2f}x" if reference else "-"
        if "peak_rss_mb_per_rank" in r:
            rss_text = " + ".join(f"{v:.0f}" for v in r["peak_rss_mb_per_rank"])
        else:
            rss_text = f"{r['peak_rss_mb']:.0f}"
        print(
            f"| {r['label']} | {r['n_cells']:,} | {r['data_path']} | {r['epoch_seconds']:.1f} | "
            f"{r['cells_per_second']:,.0f} | {ratio} | {rss_text} | {r['matrix_mb']:,.0f} |"
        )
    big = rows.get("ondisk_big")
    if big:
        verdict = "met" if big["peak_rss_mb"] < RSS_TARGET_MB else "MISSED"
        print(
            f"\n{big['label']}: peak RSS {big['peak_rss_mb']:.0f} MB vs target {RSS_TARGET_MB} MB ({verdict}); "
            f"the CSR matrix is {big['matrix_mb']:,.0f} MB on disk"
        )
        if "latent_cells_per_second" in big:
            print(f"streamed latent of all {big['n_cells']:,} cells: {big['latent_cells_per_second']:,.0f} cells/s")
    one, two = rows.get("ddp1"), rows.get("ddp2")
    if one and two:
        print(f"2 processes vs 1 (same cores): {two['cells_per_second'] / one['cells_per_second']:.2f}x cells/s")
    scvi = rows.get("scvi_slice")
    if scvi and reference:
        print(f"in-memory sclatent vs scvi-tools: {reference / scvi['cells_per_second']:.2f}x cells/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "sclatent_scaling"))
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--slice-cells", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="100k-cell file, 20k-cell slice")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="configurations to skip: ondisk_big ondisk_slice memory_slice scvi_slice ddp1 ddp2",
    )
    parser.add_argument("--output", default=str(HERE / "results_scaling.json"))
    parser.add_argument(
        "--update", action="store_true", help="keep the rows of an existing --output that this run skips (re-run a few)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        result = worker(spec)
        if result:
            Path(spec["out"]).write_text(json.dumps(result))
        return
    if args.quick:
        args.n_cells, args.slice_cells = 100_000, 20_000
        if args.output == str(HERE / "results_scaling.json"):
            args.output = str(HERE / "results_scaling_quick.json")

    big, small, write_seconds = ensure_files(Path(args.workdir), args.n_cells, args.n_genes, args.slice_cells)
    import h5py

    with h5py.File(big, "r") as file:
        nnz = int(file["X/indptr"][-1])
    matrix_mb = (nnz * 8 + (args.n_cells + 1) * 8) / 2**20
    print(
        f"{big}: {args.n_cells:,} x {args.n_genes:,}, {nnz:,} nonzeros ({nnz / args.n_cells / args.n_genes:.1%}), "
        f"CSR {matrix_mb:,.0f} MB on disk (written/checked in {write_seconds:.0f} s)"
    )

    big_label, small_label = _count(args.n_cells), _count(args.slice_cells)
    configurations = {
        "ondisk_big": (
            f"out-of-core {big_label}",
            {"path": str(big), "backed": True, "stream": True, "latent": True},
            0,
        ),
        "ondisk_slice": (
            f"out-of-core {small_label}",
            {"path": str(small), "backed": True, "stream": True},
            0,
        ),
        "memory_slice": (f"in-memory {small_label}", {"path": str(small), "backed": False}, 0),
        "scvi_slice": (
            f"scvi-tools {small_label} (in memory)",
            {"path": str(small), "backed": False, "method": "scvi"},
            0,
        ),
        "ddp1": (f"torchrun 1 process, {small_label}", {"path": str(small), "backed": False}, 1),
        "ddp2": (
            f"torchrun 2 processes, {small_label}",
            {"path": str(small), "backed": False, "threads": max(1, args.threads // 2)},
            2,
        ),
    }
    rows: dict[str, dict] = {}
    if args.update and Path(args.output).exists():
        previous = json.loads(Path(args.output).read_text())
        rows = {key: row for key, row in previous["rows"].items() if key in args.skip}
    for key, (label, spec, nproc) in configurations.items():
        if key in args.skip or (spec.get("method") == "scvi" and not _version("scvi-tools")):
            continue
        spec = {"method": "sclatent", "threads": args.threads, **spec}
        print(f"=== {label}", flush=True)
        rows[key] = {"label": label, **run_worker(spec, nproc=nproc)}
        rows[key]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        print(json.dumps(rows[key]), flush=True)
    rows = {key: rows[key] for key in configurations if key in rows}
    for row in rows.values():
        row["matrix_mb"] = matrix_mb * row["n_cells"] / args.n_cells
    print_table(rows)
    result = {
        "machine": {
            "cpu": _cpu_model(),
            "threads": args.threads,
            "torch": _version("torch"),
            "scvi-tools": _version("scvi-tools"),
            **_git_state(),
        },
        "file": {
            "path": str(big),
            "n_cells": args.n_cells,
            "n_genes": args.n_genes,
            "nnz": nnz,
            "matrix_mb": matrix_mb,
        },
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
