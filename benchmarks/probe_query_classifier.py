"""What the classifier may learn from the query: sclatent's pbmc label transfer with the classifier
frozen, with its hidden-layer shifts adapted, and trained whole.

``probe_scvi_query_classifier.py`` shows where scvi-tools' lead on this task comes from: its query
mapping trains the SCANVI classifier's BatchNorm shift and scale on the query's unlabelled
objective. sclatent's classifier has no BatchNorm; ``load_query_data(adapt_classifier=True)`` (the
default) trains its hidden-layer biases instead, a shift per hidden unit, and keeps the
reference's temperature. This probe maps the embedded PBMCs onto ``bench_label_transfer.py``'s
pbmc3k reference (its sclatent pipeline and settings) three ways from one SemiSupervisedVAE:

* ``frozen``: ``adapt_classifier=False``, every classifier parameter the reference's;
* ``shifts adapted``: the default;
* ``classifier trained``: ``freeze_classifier=False``, the whole classifier trains (its
  temperature is then refitted, and with no labelled query cells reset to 1).

It prints, per seed, accuracy, macro-F1 and ECE on the shared types, and the mixing of reference
and query (kNN batch entropy) with label ASW, then the means. Run from the repository root (about
1.5 minutes per seed on 2 cores)::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_query_classifier.py 0,1,2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_transfer as bench

VARIANTS = {
    "frozen": {"adapt_classifier": False},
    "shifts adapted": {},
    "classifier trained": {"freeze_classifier": False},
}


def main() -> None:
    seeds, prep, reference, query = bench.pbmc_probe_setup(sys.argv)
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in seeds:
        cfg = bench.probe_config(seed)
        pipe = bench.SclatentPipeline(cfg)
        semi = bench.train_reference(pipe, reference)
        reference_latent = pipe.latent(semi)
        for name, options in VARIANTS.items():
            pipe = bench.SclatentPipeline(cfg)
            pipe.query_options = options
            model, prepared = pipe.map_query(semi, pipe.query_anndata(query, semi, "label"))
            s = bench.score_mapped_query(prep, pipe, model, prepared, reference_latent)
            rows[name].append(s)
            bench.print_probe_scores(seed, name, s)
    bench.print_probe_means(rows, seeds)


if __name__ == "__main__":
    main()
