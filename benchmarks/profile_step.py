"""Where one training step of sclatent's VAE spends its time (torch profiler, CPU).

Run from the repository root on an idle machine::

    PYTHONPATH=. python benchmarks/profile_step.py [--threads 2] [--steps 40]

Trains on mouse_brain_10k_chr1 (from $SCLATENT_DATA_DIR) with scVI's architecture, batch 128, and
prints milliseconds per step: the whole step, the profiler's self time of the matmuls and of the
optimiser, and the fused likelihood's forward + backward timed on its own.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import sclatent
import sclatent._native
from sclatent.data import CellData, setup_anndata
from sclatent.modules import VAEModule
from sclatent.optim import FlatAdam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    adata = sclatent.datasets.mouse_brain_10k_chr1()
    data = CellData(adata, setup_anndata(adata))
    torch.manual_seed(0)
    module = VAEModule(adata.n_vars, encode_covariates=False).train()
    optimizer = FlatAdam(list(module.parameters()), lr=1e-3, eps=0.01, weight_decay=1e-6)  # the trainer's
    batches = list(data.iterate(data.nonempty_cells, 128, shuffle=True, drop_last=True))

    def step(batch) -> None:
        out = module.loss(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    for batch in batches[:20]:
        step(batch)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    per_step = (time.perf_counter() - start) / len(batches) * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[: args.steps]:
            step(batch)
    groups = {"matmuls": 0.0, "optimiser": 0.0, "other": 0.0}
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / args.steps
        if event.key in ("aten::mm", "aten::addmm"):
            groups["matmuls"] += ms
        elif "Adam" in event.key or "fused_adam" in event.key:
            groups["optimiser"] += ms
        else:
            groups["other"] += ms
    # the likelihood's own kernels are counted under their aten names; time it in isolation too
    batch = batches[0]
    heads = module._decode(module.inference(batch)["z"].detach(), batch)
    logits = heads["logits"].detach().requires_grad_()
    zi = heads["zi_logits"].detach().requires_grad_()
    log_theta = module.log_theta.detach().requires_grad_()
    log_library = torch.log(batch.library).unsqueeze(-1)
    args_ = (
        "zinb",
        logits,
        log_library,
        log_theta,
        zi,
        batch.nz_row,
        batch.nz_col,
        batch.nz_val,
        batch.nz_log_factorial,
        batch.nz_row_ptr,
    )
    for _ in range(10):
        sclatent.distributions.softmax_count_log_likelihood(*args_).sum().backward()
    start = time.perf_counter()
    for _ in range(100):
        sclatent.distributions.softmax_count_log_likelihood(*args_).sum().backward()
    likelihood_ms = (time.perf_counter() - start) / 100 * 1e3
    print(f"threads {args.threads}, {len(batches)} steps of 128 cells x {adata.n_vars} genes")
    print(f"  whole step (wall)                 {per_step:6.2f} ms")
    print(f"  matmuls (profiler self time)      {groups['matmuls']:6.2f} ms")
    print(f"  optimiser (profiler self time)    {groups['optimiser']:6.2f} ms")
    print(f"  fused likelihood fwd+bwd (alone)  {likelihood_ms:6.2f} ms")
    print(f"  {sclatent._native.native_status()}")


if __name__ == "__main__":
    main()
