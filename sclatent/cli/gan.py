"""``sclatent fit-gan``: the cell-type-conditioned GAN; writes synthetic cells and a realism summary."""

from __future__ import annotations

import argparse

import numpy as np

from ..model import CellGAN
from ._common import CellCommand, Run, output_paths


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-synthetic", type=int, default=1000, help="synthetic cells to write")


def _synthetic_cells(run: Run) -> None:
    """Write synthetic cells; realism vs one half of the real cells, beside the other half vs that half."""
    from ..metrics import realism_metrics, split_halves

    args, adata, labels_key = run.args, run.adata, run.labels_key
    fake = run.model.sample(args.n_synthetic, seed=args.seed)
    out = output_paths(args)[0]
    path = out.with_name(f"{out.stem}_synthetic.h5ad")
    fake.write_h5ad(path)
    run.written.append(f"{path} ({fake.n_obs} synthetic cells, obs['synthetic'])")
    counts = adata.X if args.layer is None else adata.layers[args.layer]
    labels = adata.obs[labels_key].astype(str).to_numpy() if labels_key else np.zeros(adata.n_obs, dtype=str)
    first, second = split_halves(labels, seed=args.seed)
    fake_labels = fake.obs[labels_key].astype(str).to_numpy() if labels_key else None
    reference = labels[second] if labels_key else None
    run.summary["realism_synthetic"] = realism_metrics(counts[second], fake.X, reference, fake_labels, seed=args.seed)
    run.summary["realism_real_halves"] = realism_metrics(
        counts[second], counts[first], reference, labels[first] if labels_key else None, seed=args.seed
    )


def _report(run: Run) -> list[str]:
    syn, ref = run.summary["realism_synthetic"], run.summary["realism_real_halves"]
    lines = [
        f"  training        {run.summary['epochs']} epochs in {run.train_seconds:.1f} s",
        # the GAN saw every cell here: benchmarks/bench_gan.py makes the held-out comparison
        "  realism         synthetic vs real half | other real half vs the same half (GAN trained on all cells)",
        f"    classifier AUROC     {syn['c2st_auroc']:.3f} | {ref['c2st_auroc']:.3f}   (0.5: indistinguishable)",
        f"    MMD^2 (PCA, RBF)     {syn['mmd']:.4f} | {ref['mmd']:.4f}",
    ]
    for stat in ("mean", "variance", "zero_fraction"):
        lines.append(f"    gene {stat:<15} r {syn[f'corr_{stat}']:.3f} | {ref[f'corr_{stat}']:.3f}")
    if "marker_overlap" in syn:
        lines.append(f"    top-20 markers found {syn['marker_overlap']:.2f} | {ref['marker_overlap']:.2f}")
    return lines


FIT_GAN = CellCommand(
    name="fit-gan",
    help="train the conditional GAN, write synthetic cells, critic features, UMAP, model, figures",
    description="Train sclatent's CellGAN (conditional WGAN-GP on counts) on INPUT (default: embedded PBMCs).",
    family="gan",
    model=CellGAN,
    max_epochs_help="default: ~600 generator updates",
    add_arguments=_add_arguments,
    train_options=lambda args: {"lr": args.lr},
    after_writing=_synthetic_cells,
    report=_report,
)
