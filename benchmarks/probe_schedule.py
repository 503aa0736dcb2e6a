"""Training schedules of the count VAE on one held-out split: wall time, epochs, best epoch and the
held-out log p(x) of each (issue 18, the probe before ``bench_time_to_quality.py``'s schedule study).

Usage, from the repository root (the JSON maps a label to ``[VAE kwargs, train kwargs]``)::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_schedule.py pbmc3k '{
      "ES p45 warm133": [{}, {"early_stopping": true, "restore_best": true, "patience": 45,
                              "batch_size": 128, "lr": 1e-3, "kl_warmup_epochs": 133, "max_kl_weight": 1}],
      "ES p45 warm20": [{}, {"early_stopping": true, "restore_best": true, "patience": 45,
                             "batch_size": 128, "lr": 1e-3, "kl_warmup_epochs": 20, "max_kl_weight": 1}]}'

Datasets: ``pbmc3k``, ``cellbench_5cl``, ``mouse_brain``, ``pbmc68k`` as in
``bench_time_to_quality.py`` (same split: seed 0, 10 % held out); held-out log p(x) with ``NMC``
importance samples (environment variable, default 200), nats/cell.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_time_to_quality import load


def main() -> None:
    import torch

    from sclatent.model import VAE

    torch.set_num_threads(2)
    name, variants = sys.argv[1], json.loads(sys.argv[2])
    adata, batch_key = load(name, os.environ.get("SCLATENT_DATA_DIR"))
    order = np.random.default_rng(0).permutation(adata.n_obs)
    n_test = max(1, round(0.1 * adata.n_obs))
    test, train = adata[np.sort(order[:n_test])].copy(), adata[np.sort(order[n_test:])].copy()
    print(name, adata.shape, flush=True)
    for label, (model_kwargs, train_kwargs) in variants.items():
        VAE.setup_anndata(train, layer="counts", batch_key=batch_key)
        model = VAE(train, seed=0, **model_kwargs)
        start = time.perf_counter()
        model.train(progress_bar=False, seed=0, **train_kwargs)
        seconds = time.perf_counter() - start
        validation = model.history.get("validation_elbo", [])
        best = int(np.argmax(validation)) + 1 if len(validation) else None
        n_samples = int(os.environ.get("NMC", 200))
        ll = model.get_marginal_ll(test, n_mc_samples=n_samples, return_mean=False).mean()
        print(f"{label:40s} train {seconds:6.1f}s epochs {len(model.history['epoch'])} best {best} "
              f"held-out LL {ll:.2f}", flush=True)


if __name__ == "__main__":
    main()
