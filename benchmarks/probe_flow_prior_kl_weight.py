"""Which KL weight should a flow-prior VAE train with by default? (issue 18: ``max_kl_weight``.)

On the embedded PBMCs (700 cells x 765 genes), ``VAE(prior=..., n_latent=...)`` trained with
``train(max_kl_weight=w)`` and every other ``train()`` default, for each prior (normal, planar,
RealNVP; 8 flow layers), latent size (2, 10), weight (1, 2) and seed (0, 1, 2); held-out log p(x) of
the model's 10 % validation cells (200 importance samples, nats/cell) and the epochs run. Prints
the mean over seeds and the per-seed paired difference weight 2 - weight 1. Run from the
repository root (about 5 min on 2 cores)::

    PYTHONPATH=. python benchmarks/probe_flow_prior_kl_weight.py
"""

from __future__ import annotations

import json
import sys

import numpy as np

PRIORS = ("normal", "planar", "realnvp")
LATENTS = (2, 10)
WEIGHTS = (1.0, 2.0)
SEEDS = (0, 1, 2)


def main() -> None:
    import torch

    import sclatent

    torch.set_num_threads(2)
    adata = sclatent.datasets.pbmc68k_counts()
    sclatent.model.VAE.setup_anndata(adata)
    results = {}
    for n_latent in LATENTS:
        for prior in PRIORS:
            flows = {} if prior == "normal" else {"n_flows": 8}
            for weight in WEIGHTS:
                rows = []
                for seed in SEEDS:
                    model = sclatent.model.VAE(adata, n_latent=n_latent, prior=prior, seed=seed, **flows)
                    model.train(max_kl_weight=weight, progress_bar=False, accelerator="cpu")
                    ll = model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=200)
                    rows.append({"seed": seed, "held_out_log_likelihood": ll, "epochs": model.history["epoch"][-1]})
                results[f"{prior}, n_latent {n_latent}, weight {weight:g}"] = rows
                lls = [r["held_out_log_likelihood"] for r in rows]
                print(f"{prior:8s} n_latent {n_latent:2d} weight {weight:g}: held-out log p(x) {np.mean(lls):8.2f} "
                      f"(seeds {', '.join(f'{v:.1f}' for v in lls)}; epochs {[r['epochs'] for r in rows]})", flush=True)
            one, two = (results[f"{prior}, n_latent {n_latent}, weight {w:g}"] for w in WEIGHTS)
            diffs = [b["held_out_log_likelihood"] - a["held_out_log_likelihood"] for a, b in zip(one, two)]
            print(f"{prior:8s} n_latent {n_latent:2d}: weight 2 - weight 1 per seed {[round(d, 1) for d in diffs]}",
                  flush=True)
    out = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results_flow_prior_kl_weight.json"
    with open(out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
