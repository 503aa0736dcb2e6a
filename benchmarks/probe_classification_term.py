"""The semi-supervised VAE's training step with scANVI's classification term by hand or through autograd (CPU).

Run from the repository root on an idle machine::

    SCLATENT_DATA_DIR=../shared/data PYTHONPATH=. python benchmarks/probe_classification_term.py \\
        [--task cellbench] [--rounds 12] [--steps 25]

The classification term (the classifier's cross-entropy on a minibatch of labelled cells: an
encoder pass of its own) is computed by hand in :mod:`sclatent.modules.fused_ssvae`, with the
count VAE's ``encoder_forward``/``encoder_backward``. This probe times the whole direct-gradient
step both ways in one process, on the label-transfer benchmark's reference of one task (its
``SemiSupervisedVAE.from_vae`` model, 128-cell minibatches with a 128-cell labelled minibatch each),
interleaved over ``rounds`` (a shared VM's speed drifts over minutes): ``by hand`` is the tree's
pass; ``autograd`` swaps in the previous implementation, the module's ``classification_loss``
through autograd, its gradient added by ``backward()``. Prints the median milliseconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("cellbench", "pbmc"), default="cellbench")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=25, help="steps per path per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(BENCHMARKS))
    warnings.simplefilter("ignore")
    import anndata as ad
    import bench_label_transfer as blt
    import numpy as np
    import torch

    from sclatent.data import CellData
    from sclatent.data.labelled import LabelledData
    from sclatent.modules import fused_ssvae

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        prep = blt.prepare_transfer(args.task, Path(work), args.data_dir or blt.DEFAULT_DATA_DIR)
        reference = ad.read_h5ad(prep["ref_path"])
    cfg = blt.probe_config(0, args.threads)
    cfg["epochs"] = {"vae": 2, "ssvae": 1, "query": 1}  # the weights' values do not matter here
    pipe = blt.SclatentPipeline(cfg)
    model = pipe.semi_supervised(pipe.pretrain(reference.copy(), "batch"), "label", reference.copy())
    module = model.module.train()
    cells = CellData(model.adata, model.registry)
    data = LabelledData(cells, np.flatnonzero(cells.label_index.numpy() >= 0))
    generator = torch.Generator().manual_seed(0)
    minibatches = data.iterate(np.arange(cells.n_cells), 128, shuffle=True, generator=generator)
    batches = [batch for batch in minibatches if batch.size == 128][:2]

    by_hand = (fused_ssvae._classification_term, fused_ssvae._add_classification_gradients)

    def term_by_autograd(module, m1, m2, batch):
        with torch.enable_grad():
            return fused_ssvae._ClassificationTerm(*module.classification_loss(batch), None)

    def add_by_autograd(m1, m2, term):
        cross_entropy = term.cross_entropy
        if cross_entropy.requires_grad:
            with torch.enable_grad():
                (module.classification_ratio * cross_entropy).backward()

    paths = {"autograd": (term_by_autograd, add_by_autograd), "by hand": by_hand}
    milliseconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, (term, add) in paths.items():
            fused_ssvae._classification_term, fused_ssvae._add_classification_gradients = term, add
            start = time.perf_counter()
            for _ in range(args.steps):
                for batch in batches:
                    fused_ssvae.loss_and_gradients(module, *fused_ssvae.specs(module, batch), batch, 1.0)
            milliseconds[name].append((time.perf_counter() - start) / (args.steps * len(batches)) * 1e3)
    fused_ssvae._classification_term, fused_ssvae._add_classification_gradients = by_hand
    medians = {name: statistics.median(values) for name, values in milliseconds.items()}
    print(f"{args.task}: {cells.n_cells} reference cells, {cells.n_genes} genes, {module.n_labels} classes")
    steps = args.steps * len(batches)
    for name, value in medians.items():
        print(f"  {name:9s} {value:6.2f} ms per step (median of {args.rounds} rounds of {steps} steps)")
    print(f"  by hand is {medians['autograd'] / medians['by hand']:.2f}x")


if __name__ == "__main__":
    main()
