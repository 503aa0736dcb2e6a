"""Does the query's BatchNorm explain the mixing gap to scvi-tools in the pbmc label transfer?

scvi-tools' ``load_query_data`` freezes a BatchNorm by ``momentum=0`` alone: in query training it
still normalises each minibatch with the query's own statistics. sclatent holds frozen BatchNorms
at the reference's statistics (``BatchNorm1d.hold``). This probe maps the embedded PBMCs onto
``bench_label_transfer.py``'s pbmc3k reference (its sclatent pipeline and settings) both ways and
prints, per seed, accuracy, macro-F1, ECE and the reference/query mixing (kNN batch entropy) with
label ASW. Run from the repository root (about 2 minutes per seed on 2 cores)::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_query_batchnorm.py 0,1,2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_transfer as bench

from sclatent.nn.blocks import BatchNorm1d


class QueryBatchStatsPipeline(bench.SclatentPipeline):
    """The benchmark's sclatent pipeline; with ``batch_stats`` the query's frozen BatchNorms
    normalise with each minibatch's statistics in training (scvi-tools' behaviour), their running
    statistics still the reference's (momentum 0)."""

    batch_stats = False

    def load_query(self, reference_model, query):
        model, prepared = super().load_query(reference_model, query)
        if self.batch_stats:
            for module in model.module.modules():
                if isinstance(module, BatchNorm1d) and module.held:
                    module.hold(False)
                    module.momentum = 0.0
        return model, prepared


def main() -> None:
    seeds, prep, reference, query = bench.pbmc_probe_setup(sys.argv, threads=1)
    for seed in seeds:
        cfg = bench.probe_config(seed, threads=1)
        pipe = QueryBatchStatsPipeline(cfg)
        semi = bench.train_reference(pipe, reference)
        reference_latent = pipe.latent(semi)
        for batch_stats in (False, True):
            pipe = QueryBatchStatsPipeline(cfg)
            pipe.batch_stats = batch_stats
            model, prepared = pipe.map_query(semi, pipe.query_anndata(query, semi, "label"))
            s = bench.score_mapped_query(prep, pipe, model, prepared, reference_latent)
            name = "minibatch statistics (scvi-tools)" if batch_stats else "held statistics (sclatent)"
            print(
                f"seed {seed}  {name:34s} accuracy {s['accuracy']:.3f}  macro-F1 {s['macro_f1']:.3f}  "
                f"ECE {s['ece']:.3f}  batch entropy {s['batch_entropy']:.3f}  label ASW {s['label_asw']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
