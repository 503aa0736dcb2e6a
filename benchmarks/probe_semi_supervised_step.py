"""The semi-supervised stages of the label-transfer pipeline, timed on this tree and on an earlier revision (CPU).

Run from the repository root on an idle machine::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_semi_supervised_step.py \\
        --against REV [--task cellbench] [--rounds 3]

Each round runs one worker process per tree (this one, and ``git archive REV`` unpacked in a
scratch folder), in turn: the speed of a shared virtual machine drifts by tens of percent over
minutes, so the two trees are interleaved. A worker imports sclatent from its own tree and runs the
label-transfer benchmark's sclatent pipeline with its settings (seed 0) on one task, timing:

* ``vae``: the reference VAE (for reference: its code did not change);
* ``semi-supervised``: ``SemiSupervisedVAE.from_vae`` and its training on the reference;
* ``query``: the mapped query's training (``load_query_data``, reference weights frozen);
* in this tree, the query stage once more with the module's ``supports_direct_gradients``
  answering False (the M2 terms through autograd), isolating what the hand-written pass
  (:mod:`sclatent.modules.fused_ssvae`) saves from the other changes.

Prints each stage's median seconds per tree and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
STAGES = ("vae", "semi-supervised", "query")


def worker(tree: str, task: str, threads: int, data_dir: str, also_autograd: bool) -> None:
    """One tree's timings, printed as a JSON line."""
    # sclatent from ``tree``, not from the editable install's import hook
    sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
    sys.path[:0] = [tree, str(BENCHMARKS)]
    warnings.simplefilter("ignore")
    import anndata as ad
    import bench_label_transfer as blt
    import torch

    import sclatent

    assert Path(sclatent.__file__).resolve().is_relative_to(Path(tree).resolve()), sclatent.__file__
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as work:
        prep = blt.prepare_transfer(task, Path(work), data_dir)
        reference, query = ad.read_h5ad(prep["ref_path"]), ad.read_h5ad(prep["query_path"])
    pipe = blt.SclatentPipeline(blt.probe_config(0, threads))
    seconds = {}
    start = time.perf_counter()
    vae = pipe.pretrain(reference.copy(), "batch")
    seconds["vae"] = time.perf_counter() - start
    start = time.perf_counter()
    semi = pipe.semi_supervised(vae, "label", reference.copy())
    seconds["semi-supervised"] = time.perf_counter() - start
    unlabelled_query = pipe.query_anndata(query, semi, "label")
    start = time.perf_counter()
    pipe.map_query(semi, unlabelled_query)
    seconds["query"] = time.perf_counter() - start
    if also_autograd:
        from sclatent.modules import SemiSupervisedVAEModule

        SemiSupervisedVAEModule.supports_direct_gradients = lambda self: False
        start = time.perf_counter()
        pipe.map_query(semi, unlabelled_query)
        seconds["query, M2 by autograd"] = time.perf_counter() - start
    sizes = {"reference": reference.n_obs, "query": query.n_obs, "genes": reference.n_vars}
    print(json.dumps({"seconds": seconds, "sizes": sizes, "epochs": pipe.cfg["epochs"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision to compare with")
    parser.add_argument("--task", choices=("cellbench", "pbmc"), default="cellbench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(BENCHMARKS))
    import bench_label_transfer as blt

    data_dir = args.data_dir or blt.DEFAULT_DATA_DIR
    if args.worker:
        worker(args.worker, args.task, args.threads, data_dir, also_autograd=args.worker == str(BENCHMARKS.parent))
        return
    with tempfile.TemporaryDirectory() as scratch:
        archive = subprocess.run(["git", "archive", args.against], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", scratch], input=archive, check=True)
        trees = {args.against: scratch, "this tree": str(BENCHMARKS.parent)}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                command = [sys.executable, __file__, "--worker", tree, "--task", args.task]
                command += ["--threads", str(args.threads), "--data-dir", data_dir, "--against", args.against]
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    last = runs["this tree"][-1]
    print(f"{args.task}: {last['sizes']}, epochs {last['epochs']}, median of {args.rounds} interleaved rounds")
    medians = {
        name: {stage: statistics.median(run["seconds"][stage] for run in done) for stage in done[0]["seconds"]}
        for name, done in runs.items()
    }
    before, now = medians[args.against], medians["this tree"]
    for stage in STAGES:
        ratio = before[stage] / now[stage]
        print(f"{stage:16s} {args.against}: {before[stage]:6.2f} s   this tree: {now[stage]:6.2f} s   {ratio:.2f}x")
    autograd = now["query, M2 by autograd"]
    print(
        f"query with M2 through autograd (this tree): {autograd:.2f} s; "
        f"the direct pass is {autograd / now['query']:.2f}x that"
    )


if __name__ == "__main__":
    main()
