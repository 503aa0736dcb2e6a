"""The native count-likelihood kernel, this tree's against an earlier revision's, on real minibatches.

``sclatent/_native/softmax_nb.c`` is the training step's largest single cost on deeply sequenced
cells (``benchmarks/profile_step.py``). This probe builds the kernel from this tree and from
``--against REV`` (``git show REV:sclatent/_native/softmax_nb.c``) with the flags sclatent uses,
loads both into one process and times one call each (ZINB, gene-wise dispersion, with gradients:
the training step's call), interleaved in rounds so that a shared machine's drift hits both alike.
Minibatches: the first 128 cells of pbmc3k and cellbench_5cl at their 2,000 highest-mean genes,
logits and dispersions drawn from a fixed seed. It also prints the largest difference between the
two builds' outputs. Run from the repository root on an idle machine::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_likelihood_kernel.py --against c58c3ff
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

import sclatent
from sclatent.distributions import native_softmax_nb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _kernel_probe import builds_against, compile_kernel

SOURCE = "sclatent/_native/softmax_nb.c"
N_CELLS, N_GENES = 128, 2000


def build(source: Path, target: Path) -> ctypes.CDLL:
    """The likelihood kernel alone, compiled as sclatent compiles its kernels, with its signature declared."""
    library = compile_kernel(source, target)
    function = library.softmax_nb_log_likelihood
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.restype = None
    function.argtypes = [size, size, pointer, size, pointer, size, pointer, pointer, pointer, size]
    function.argtypes += [pointer] * 10 + [size, ctypes.c_int]
    return library


def minibatch(adata, seed: int = 0) -> dict:
    counts = sp.csr_matrix(adata.layers["counts"] if "counts" in adata.layers else adata.X)
    genes = np.argsort(-np.asarray(counts.mean(0)).ravel(), kind="stable")[:N_GENES]
    x = counts[:N_CELLS][:, genes].astype(np.float32).tocsr()
    x.sort_indices()
    generator = torch.Generator().manual_seed(seed)
    return {
        "heads": torch.randn(N_CELLS, 2 * N_GENES, generator=generator) * 0.5,
        "n_genes": N_GENES,
        "log_library": torch.log(torch.from_numpy(np.asarray(x.sum(1), dtype=np.float32).ravel())),
        "log_theta": torch.randn(1, N_GENES, generator=generator) * 1.5 + 1.0,
        "row_ptr": torch.from_numpy(x.indptr.astype(np.int64)),
        "cols": torch.from_numpy(x.indices.astype(np.int64)),
        "values": torch.from_numpy(x.data),
        "with_gradients": True,
        "_describe": f"{x.nnz / (N_CELLS * N_GENES):.0%} nonzero, {np.mean(x.data > 8):.0%} of them > 8",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision whose kernel is the baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="calls per round and build")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as scratch:
        builds = builds_against(SOURCE, args.against, Path(scratch), build)
        for name, loader in (("pbmc3k", sclatent.datasets.pbmc3k), ("cellbench_5cl", sclatent.datasets.cellbench_5cl)):
            inputs = minibatch(loader())
            describe = inputs.pop("_describe")
            outputs = {build_name: native_softmax_nb(kernel, **inputs) for build_name, kernel in builds.items()}
            first, second = outputs.values()
            difference = max(
                float((a.double() - b.double()).abs().max() / b.abs().max()) for a, b in zip(first, second, strict=True)
            )
            timings = {build_name: [] for build_name in builds}
            for _ in range(args.rounds):
                for build_name, kernel in builds.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        native_softmax_nb(kernel, **inputs)
                    timings[build_name].append((time.perf_counter() - start) / args.calls * 1e3)
            medians = {build_name: statistics.median(values) for build_name, values in timings.items()}
            old, new = medians[args.against], medians["this tree"]
            print(
                f"{name} ({N_CELLS} x {N_GENES}, {describe}): {args.against} {old:.2f} ms, this tree {new:.2f} ms "
                f"per call (medians of {args.rounds} rounds); {old / new:.2f}x; outputs differ by at most "
                f"{difference:.1e} of their largest value"
            )


if __name__ == "__main__":
    main()
