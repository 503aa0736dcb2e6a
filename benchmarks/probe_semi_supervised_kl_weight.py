"""The KL weight of the semi-supervised stages alone: sclatent's pbmc label transfer with the
SemiSupervisedVAE and its query mapping trained at KL weight 2 (sclatent's default) or 1, from one
VAE pretrained at the default weight.

scvi-tools' SCANVI objective leaves the z1 terms of M2 (``log q(z1 | x) - log p(z1 | z2, y)``)
unweighted and scales the z2 and class KLs by its KL weight, 1 after warm-up; sclatent's scales the
whole M2 KL by its KL weight, 2 by default since issue 18 (chosen for clustering). At weight 1 the
two objectives coincide after warm-up. This probe uses ``bench_label_transfer.py``'s pipeline,
settings and scoring; the VAE of each seed is trained once and shared by both variants. It prints,
per seed and variant, accuracy, macro-F1, ECE and per-class F1 on the shared types and the
reference/query mixing, then the means. Run from the repository root (about 1.5 minutes per seed
on 2 cores)::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_semi_supervised_kl_weight.py 0,1,2,3,4
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_transfer as bench

VARIANTS = {"KL weight 2 (default)": 2.0, "KL weight 1": 1.0}


class StageWeightPipeline(bench.SclatentPipeline):
    """The benchmark's sclatent pipeline with ``semi_supervised_kl_weight`` as the KL weight of the
    semi-supervised stage and of the query mapping (the VAE stage keeps the default)."""

    semi_supervised_kl_weight: float | None = None

    def _train_kwargs(self, epochs: int) -> dict:
        kwargs = super()._train_kwargs(epochs)
        if self.semi_supervised_kl_weight is not None:
            kwargs["max_kl_weight"] = self.semi_supervised_kl_weight
        return kwargs


def main() -> None:
    seeds, prep, reference, query = bench.pbmc_probe_setup(sys.argv)
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in seeds:
        cfg = bench.probe_config(seed)
        vae = StageWeightPipeline(cfg).pretrain(reference.copy(), "batch")
        for name, weight in VARIANTS.items():
            pipe = StageWeightPipeline(cfg)
            pipe.semi_supervised_kl_weight = weight
            semi = pipe.semi_supervised(vae, "label", reference.copy())
            model, prepared = pipe.map_query(semi, pipe.query_anndata(query, semi, "label"))
            s = bench.score_mapped_query(prep, pipe, model, prepared, pipe.latent(semi))
            rows[name].append(s)
            bench.print_probe_scores(seed, name, s)
    bench.print_probe_means(rows, seeds)


if __name__ == "__main__":
    main()
