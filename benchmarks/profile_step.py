"""Where one training step of sclatent's VAE spends its time, and what each fast path saves (CPU).

Run from the repository root on an idle machine::

    PYTHONPATH=. python benchmarks/profile_step.py [--threads 2] [--rounds 15]

Trains on mouse_brain_10k_chr1 (from $SCLATENT_DATA_DIR) with scVI's architecture, batch 128, and
prints milliseconds per step (loss, gradients, Adam) for three ways of taking it:

* ``autograd``: ``module.loss(batch).loss.backward()``, the autograd reference;
* ``fused node``: ``fused_elbo.fused_loss(...)``: the fused pass as one autograd node
  (:mod:`sclatent.modules.fused_elbo`), then ``backward()``;
* ``direct``: ``module.loss_and_gradients(batch)``, the trainer's path: the fused pass writing the
  gradients itself, no autograd at all.

The three run interleaved in blocks of 6 steps over ``--rounds`` rounds (the speed of a shared
virtual machine drifts by tens of percent over minutes; interleaving keeps the comparison fair),
and the medians are printed. Then the torch profiler's self times of the direct path, grouped.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import sclatent
import sclatent._native
from sclatent.data import CellData, setup_anndata
from sclatent.modules import VAEModule, fused_elbo
from sclatent.optim import FlatAdam

PATHS = ("autograd", "fused node", "direct")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    adata = sclatent.datasets.mouse_brain_10k_chr1()
    data = CellData(adata, setup_anndata(adata))
    batches = list(data.iterate(data.nonempty_cells, 128, shuffle=True, drop_last=True))

    def make():
        torch.manual_seed(0)
        module = VAEModule(adata.n_vars, encode_covariates=False).train()
        # the trainer's optimiser and settings
        return module, FlatAdam(list(module.parameters()), lr=1e-3, eps=0.01, weight_decay=1e-6)

    models = {path: make() for path in PATHS}

    def steps(path: str, minibatches) -> float:
        """Milliseconds per step of ``path`` over ``minibatches``."""
        module, optimizer = models[path]
        start = time.perf_counter()
        for batch in minibatches:
            if path == "direct":
                out = module.loss_and_gradients(batch)
            else:
                if path == "autograd":
                    out = module.loss(batch)
                else:
                    out = fused_elbo.fused_loss(fused_elbo.fused_spec(module, batch), batch, 1.0)
                optimizer.zero_grad()
                out.loss.backward()
            optimizer.step()
            float(out.loss)
        return (time.perf_counter() - start) / len(minibatches) * 1e3

    for path in PATHS:
        steps(path, batches[:20])
    timings = {path: [] for path in PATHS}
    for round_ in range(args.rounds):
        block = [batches[(6 * round_ + i) % len(batches)] for i in range(6)]
        for path in PATHS if round_ % 2 else PATHS[::-1]:
            timings[path].append(steps(path, block))
    medians = {path: statistics.median(values) for path, values in timings.items()}

    n_profiled = 40
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps("direct", batches[:n_profiled])
    groups = {"matmuls (mm, addmm, mv)": 0.0, "Adam": 0.0, "other torch ops": 0.0}
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / n_profiled
        if event.key in ("aten::mm", "aten::addmm", "aten::mv"):
            groups["matmuls (mm, addmm, mv)"] += ms
        elif "adam" in event.key.lower():
            groups["Adam"] += ms
        elif event.key.startswith("aten::"):
            groups["other torch ops"] += ms

    print(f"threads {args.threads}, steps of 128 cells x {adata.n_vars} genes, median of {args.rounds} blocks")
    for path in PATHS:
        print(f"  {path:<12} {medians[path]:6.2f} ms/step   ({medians['autograd'] / medians[path]:.2f}x autograd)")
    print("direct path, torch profiler self time per step:")
    for name, ms in groups.items():
        print(f"  {name:<26} {ms:6.2f} ms")
    rest = medians["direct"] - sum(groups.values())
    print(f"  {'the rest':<26} {rest:6.2f} ms  (native kernels, the output layer's products, Python)")
    print(f"  {sclatent._native.native_status()}")


if __name__ == "__main__":
    main()
