"""Does scvi-tools' query mapping adapt SCANVI's classifier to the query, and does that explain its
lead over sclatent in the pbmc label transfer?

In scvi-tools 1.4, ``load_query_data(freeze=True)`` (``_set_params_online_update``) decides what
trains by parameter name: every parameter under ``classifier.classifier.0`` (the classifier's hidden
layer) keeps ``requires_grad``, and only its linear weights are then held by gradient hooks. The
classifier's BatchNorm shift and scale therefore train on the query's unlabelled objective (the
printout below shows them moving; its running statistics do not). Its predictions on the query then
come from a classifier re-normalised towards the query, which sclatent's BatchNorm-free classifier,
frozen in query mapping, could not do before ``load_query_data(adapt_classifier=True)``.

This probe runs ``bench_label_transfer.py``'s scvi-tools pipeline on the pbmc task (pbmc3k ->
embedded PBMCs, same settings) and maps the query twice from one SCANVI reference: as scvi-tools
does, and with the classifier held (BatchNorm momentum 0, every classifier parameter frozen). It
prints, per seed, accuracy and macro-F1 both ways and how far the classifier moved in the default
mapping. Run from the repository root (about 2.5 minutes per seed on 2 cores)::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_scvi_query_classifier.py 0,1
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_transfer as bench


class HeldClassifierPipeline(bench.ScviPipeline):
    """The benchmark's scvi-tools pipeline; with ``hold_classifier`` the query model's classifier
    is frozen outright before query training (BatchNorm momentum 0, no parameter trains)."""

    hold_classifier = False

    def map_query(self, reference_model, query):
        cls = type(reference_model)
        prepared = cls.prepare_query_anndata(query, reference_model, inplace=False)
        prepared = query if prepared is None else prepared
        model = cls.load_query_data(prepared, reference_model)
        classifier = model.module.classifier
        before = {name: value.detach().clone() for name, value in classifier.state_dict().items()}
        if self.hold_classifier:
            for module in classifier.modules():
                if isinstance(module, torch.nn.BatchNorm1d):
                    module.momentum = 0.0
            classifier.requires_grad_(False)
        labels_key = model.adata_manager.registry["setup_args"].get("labels_key")
        plan_kwargs = {"weight_decay": 0.0, "n_epochs_kl_warmup": 0}
        kwargs = self._trainer_kwargs(prepared, labels_key if labels_key in prepared.obs else None)
        model.train(max_epochs=self.cfg["epochs"]["query"], plan_kwargs=plan_kwargs, **kwargs)
        after = classifier.state_dict()
        self.moved = {
            name: float((after[name].float() - value.float()).abs().max())
            for name, value in before.items()
            if value.is_floating_point()
        }
        return model, prepared


def main() -> None:
    seeds, prep, reference, query = bench.pbmc_probe_setup(sys.argv)
    for seed in seeds:
        cfg = bench.probe_config(seed)
        pipe = HeldClassifierPipeline(cfg)
        semi = bench.train_reference(pipe, reference)
        for hold in (False, True):
            pipe = HeldClassifierPipeline(cfg)
            pipe.hold_classifier = hold
            model, prepared = pipe.map_query(semi, pipe.query_anndata(query, semi, "label"))
            s = bench.score_mapped_query(prep, pipe, model, prepared)
            moved = {name: round(value, 4) for name, value in pipe.moved.items() if value > 0}
            name = "classifier held" if hold else "scvi-tools default"
            print(
                f"seed {seed}  {name:20s} accuracy {s['accuracy']:.3f}  macro-F1 {s['macro_f1']:.3f}  "
                f"per-class F1 { ({c: round(f, 2) for c, f in s['per_class_f1'].items()}) }\n"
                f"    classifier entries that moved in query training (max |change|): {moved or 'none'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
