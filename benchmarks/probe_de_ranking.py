"""Where sclatent's weak-effect DE ranking loses (RESULTS.md, differential expression): one VAE on
bench_de's ``weak_balanced`` design, then the AUPRC of ranking the planted genes by change mode's
``proba_de`` (``test_mode`` "three" and "two", with and without batch correction, ``delta`` 0.25
and 0.1), by ``|lfc_mean|``, by ``|lfc_mean| / lfc_std`` and by vanilla mode, with the median
per-draw log2 FC sd. Run::

    PYTHONPATH=. python benchmarks/probe_de_ranking.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.metrics import average_precision_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_de
from _schedule import matched_schedule

from sclatent.model import VAE


def main() -> None:
    torch.set_num_threads(2)
    adata, _, is_de, _ = bench_de.simulate("weak_balanced", 2000, 500, 0)
    VAE.setup_anndata(adata, layer="counts", batch_key="batch")
    model = VAE(adata, seed=0).train(max_epochs=200, progress_bar=False, **matched_schedule(200))
    for options in (
        {"batch_correction": True},
        {"batch_correction": True, "test_mode": "two"},
        {"batch_correction": False},
        {"batch_correction": False, "test_mode": "two"},
        {"batch_correction": True, "delta": 0.1},
        {"batch_correction": True, "delta": 0.1, "test_mode": "two"},
        {"batch_correction": True, "mode": "vanilla"},
    ):
        table = model.differential_expression(
            groupby="group", group1=bench_de.GROUP_A, group2=bench_de.GROUP_B, progress_bar=False, **options
        ).loc[adata.var_names]
        print(
            options,
            f"AUPRC proba_de {average_precision_score(is_de, table['proba_de']):.3f}",
            f"|lfc_mean| {average_precision_score(is_de, table['lfc_mean'].abs()):.3f}",
            f"|lfc|/sd {average_precision_score(is_de, table['lfc_mean'].abs() / table['lfc_std']):.3f}",
            f"median lfc sd {table['lfc_std'].median():.3f}",
        )


if __name__ == "__main__":
    main()
