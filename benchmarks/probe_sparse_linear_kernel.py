"""The native sparse first layer, this tree's against an earlier revision's, on real minibatches.

``sclatent/_native/sparse_linear.c`` is every count encoder's first layer: ``x @ W + b`` for a
sparse count minibatch ``x`` (log1p counts in the VAE) and the weight gradient ``x^T @ g``. This
probe builds the file from this tree and from ``--against REV`` (``git show REV:...``) with the
flags sclatent uses, loads both into one process and times each function on a minibatch of two
of ``bench_label_transfer.py``'s training sets, as it selects their genes (the first 128 cells of
pbmc3k's labelled cells and of cellbench_5cl's plates 1-2 singlets, each at its 2,000 seurat_v3
HVGs; the hidden width 128), interleaved in rounds so that a
shared machine's drift hits both alike. It also prints the largest difference between the two
builds' outputs. Run from the repository root on an idle machine::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_sparse_linear_kernel.py --against e599b34
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

from sclatent import datasets

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_transfer as bench
from _kernel_probe import builds_against, compile_kernel

SOURCE = "sclatent/_native/sparse_linear.c"
N_CELLS, N_HIDDEN = 128, 128


def build(source: Path, target: Path) -> ctypes.CDLL:
    """The sparse layer alone, compiled as sclatent compiles its kernels, with its signatures declared."""
    library = compile_kernel(source, target)
    size, pointer = ctypes.c_int64, ctypes.c_void_p
    library.sparse_linear_forward.argtypes = [size, size] + [pointer] * 6 + [ctypes.c_int]
    library.sparse_linear_backward_weight.argtypes = [size, size, size] + [pointer] * 5 + [ctypes.c_int]
    for function in (library.sparse_linear_forward, library.sparse_linear_backward_weight):
        function.restype = None
    return library


def reference_minibatches() -> dict[str, sp.csr_matrix]:
    """The first 128 cells of each reference set at its 2,000 HVGs, log1p counts, as the benchmark selects them."""
    pbmc = datasets.pbmc3k()
    pbmc = pbmc[pbmc.obs["cell_type"].notna().to_numpy()]
    cellbench = datasets.cellbench_5cl()
    singlets = cellbench[(cellbench.obs["demuxlet_cls"].astype(str) == "SNG").to_numpy()]
    plates = singlets[np.isin(singlets.obs["batch"].astype(str), ["plate1", "plate2"])]
    out = {}
    for name, adata in (("pbmc3k", pbmc), ("cellbench_5cl plates 1-2", plates)):
        counts = sp.csr_matrix(adata.layers["counts"])
        genes = bench._hvg(counts, np.asarray(adata.var_names, dtype=str), bench.N_HVG)
        x = counts[:N_CELLS][:, genes].astype(np.float32).tocsr()
        x.sort_indices()
        x.data = np.log1p(x.data)
        out[name] = x
    return out


def time_case(name: str, x: sp.csr_matrix, builds: dict, args, generator: torch.Generator) -> None:
    """Check that the builds agree on ``x`` and print each function's median time per build."""
    n_genes = x.shape[1]
    sparse = [torch.from_numpy(x.indptr.astype(np.int64)), torch.from_numpy(x.indices.astype(np.int64))]
    sparse.append(torch.from_numpy(x.data))
    weight = torch.randn(n_genes, N_HIDDEN, generator=generator) * 0.05
    bias = torch.randn(N_HIDDEN, generator=generator)
    upstream = torch.randn(N_CELLS, N_HIDDEN, generator=generator)
    outputs = {b: (torch.empty(N_CELLS, N_HIDDEN), torch.empty(n_genes, N_HIDDEN)) for b in builds}
    pointers = [t.data_ptr() for t in sparse]

    def forward(library, out):
        library.sparse_linear_forward(
            N_CELLS, N_HIDDEN, *pointers, weight.data_ptr(), bias.data_ptr(), out.data_ptr(), args.threads
        )

    def backward(library, out):
        library.sparse_linear_backward_weight(
            N_CELLS, n_genes, N_HIDDEN, *pointers, upstream.data_ptr(), out.data_ptr(), args.threads
        )

    for build_name, library in builds.items():
        forward(library, outputs[build_name][0])
        backward(library, outputs[build_name][1])
    first, second = outputs.values()
    difference = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(first, second, strict=True))
    for label, function, slot in (("forward", forward, 0), ("weight gradient", backward, 1)):
        timings = {build_name: [] for build_name in builds}
        for _ in range(args.rounds):
            for build_name, library in builds.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    function(library, outputs[build_name][slot])
                timings[build_name].append((time.perf_counter() - start) / args.calls * 1e3)
        old, new = (statistics.median(timings[b]) for b in builds)
        print(
            f"{name} ({N_CELLS} x {n_genes}, {x.nnz / (N_CELLS * n_genes):.0%} nonzero), {label}: "
            f"{args.against} {old:.3f} ms, this tree {new:.3f} ms per call (medians of {args.rounds} "
            f"rounds, {args.threads} threads); {old / new:.2f}x",
            flush=True,
        )
    print(f"  outputs differ by at most {difference:.1e} of their largest value")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision whose kernel is the baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=30, help="calls per round and build")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as scratch:
        builds = builds_against(SOURCE, args.against, Path(scratch), build)
        generator = torch.Generator().manual_seed(0)
        for name, x in reference_minibatches().items():
            time_case(name, x, builds, args, generator)


if __name__ == "__main__":
    main()
