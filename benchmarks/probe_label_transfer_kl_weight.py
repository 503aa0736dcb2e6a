"""The KL weight (and a linear classifier) in sclatent's label-transfer pipeline, over seeds: the
scarcity task on pbmc3k (1 % and 10 % of the training labels) and the pbmc3k -> embedded PBMCs
transfer, scored as ``bench_label_transfer.py`` scores them (sclatent only; the scvi-tools rows
are in ``results_label_transfer.json``). Each variant is a JSON entry: ``kl`` (``max_kl_weight`` of
every stage), ``ssvae`` (``SemiSupervisedVAE.from_vae`` settings). The held-out cells are scored
every epoch, as before ``check_val_every_n_epoch`` existed. Run from the repository root::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_label_transfer_kl_weight.py \\
        '{"w1": {"kl": 1.0}, "w2": {"kl": 2.0}, "w2_lin": {"kl": 2.0, "ssvae": {"classifier_n_layers": 0}}}' \\
        pbmc3k,pbmc 0,1,2,3,4 benchmarks/results_label_transfer_kl_weight.json

(about 25 minutes on 2 cores).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_transfer as bench

FRACTIONS = (0.01, 0.1)
TERMS = ("accuracy", "macro_f1", "ece")


class VariantPipeline(bench.SclatentPipeline):
    """The benchmark's sclatent pipeline with one variant's KL weight and classifier settings."""

    def __init__(self, cfg: dict, variant: dict) -> None:
        super().__init__(cfg)
        self.variant = variant

    def _train_kwargs(self, epochs: int) -> dict:
        kwargs = super()._train_kwargs(epochs)
        kwargs.update(max_kl_weight=self.variant.get("kl", 1.0), check_val_every_n_epoch=1)
        return kwargs

    def semi_supervised(self, vae, labels_key, adata):
        from sclatent.model import SemiSupervisedVAE

        labels = adata.obs[labels_key].astype(str).to_numpy()
        unlabelled = bench.UNLABELLED if (labels == bench.UNLABELLED).any() else None
        settings = {"classification_ratio": bench.CLASSIFICATION_RATIO, **self.variant.get("ssvae", {})}
        model = SemiSupervisedVAE.from_vae(
            vae, labels_key=labels_key, unlabeled_category=unlabelled, adata=adata, **settings
        )
        epochs = self.cfg["epochs"]["ssvae"]
        model.train(max_epochs=epochs, kl_warmup_epochs=0, **self._train_kwargs(epochs))
        return model


def transfer_scores(pipe, vae, prep) -> dict:
    reference, query = ad.read_h5ad(prep["ref_path"]), ad.read_h5ad(prep["query_path"])
    semi = pipe.semi_supervised(vae, "label", reference)
    model, prepared = pipe.map_query(semi, pipe.query_anndata(query, semi, "label"))
    proba, classes = pipe.proba(model, prepared)
    scored = prep["scored"]
    s = bench.score(proba[scored], classes, prep["query_coarse"][scored], prep["target_classes"], prep["class_map"])
    return {"all": {k: s[k] for k in TERMS}}


def scarcity_scores(pipe, vae, prep) -> dict:
    adata = ad.read_h5ad(prep["path"])
    targets = sorted(set(prep["truth"]))
    out = {}
    for fraction in FRACTIONS:
        tag = bench._fraction_tag(fraction)
        semi = pipe.semi_supervised(vae, f"labels_{tag}", adata.copy())
        proba, classes = pipe.proba(semi, adata, indices=prep["test"])
        s = bench.score(proba, classes, prep["truth"][prep["test"]], targets)
        out[tag] = {**{k: s[k] for k in TERMS}, "temperature": semi.temperature}
    return out


def main() -> None:
    variants, tasks = json.loads(sys.argv[1]), sys.argv[2].split(",")
    seeds = [int(s) for s in sys.argv[3].split(",")]
    out_path = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    results: dict = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for task in tasks:
            transfer = task in bench.TASKS and task != "scarcity"
            if transfer:
                (work / task).mkdir()
                prep = bench.prepare_transfer(task, work / task, bench.DEFAULT_DATA_DIR)
            else:
                base = bench.load_scarcity_base(task, bench.DEFAULT_DATA_DIR)
            for seed in seeds:
                if not transfer:
                    prep = bench.prepare_scarcity(base, task, seed, FRACTIONS, work)
                vaes: dict = {}  # one VAE per KL weight and seed, shared by the variants
                for name, variant in variants.items():
                    cfg = {"seed": seed, "accelerator": "cpu", "epochs": dict(bench.DEFAULT_EPOCHS)}
                    pipe = VariantPipeline(cfg, variant)
                    start = time.perf_counter()
                    weight = variant.get("kl", 1.0)
                    if weight not in vaes:
                        adata = ad.read_h5ad(prep["ref_path"] if transfer else prep["path"])
                        vaes[weight] = pipe.pretrain(adata, "batch" if transfer else prep["batch_key"])
                    scores = (transfer_scores if transfer else scarcity_scores)(pipe, vaes[weight], prep)
                    results.setdefault(task, {}).setdefault(name, {})[seed] = scores
                    shown = {t: {k: round(v, 3) for k, v in r.items()} for t, r in scores.items()}
                    print(task, seed, name, shown, f"{time.perf_counter() - start:.0f}s", flush=True)
    print("\nmeans over seeds")
    for task, by_name in results.items():
        for name, by_seed in by_name.items():
            for tag in next(iter(by_seed.values())):
                m = {k: np.mean([by_seed[s][tag][k] for s in by_seed]) for k in TERMS}
                scores = f"accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  ECE {m['ece']:.3f}"
                print(f"{task:8s} {tag:5s} {name:8s} {scores}")
    if out_path is not None:
        out_path.write_text(json.dumps({"variants": variants, "seeds": seeds, "results": results}, indent=1))


if __name__ == "__main__":
    main()
