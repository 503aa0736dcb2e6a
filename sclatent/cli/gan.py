"""``sclatent fit-gan``: the cell-type-conditioned GAN; writes synthetic cells and a realism summary."""

from __future__ import annotations

import argparse
import time

import numpy as np

from ._common import (
    add_common_arguments,
    cluster_and_write,
    clustering_summary,
    load_input,
    print_clustering,
    setup_from_arguments,
    timed_training,
)


def fit_gan(args: argparse.Namespace) -> dict:
    from ..metrics import realism_metrics, split_halves
    from ..model import CellGAN

    start = time.perf_counter()
    adata, labels_key = load_input(args, "fit-gan")
    setup_from_arguments(CellGAN, adata, labels_key, args)  # a --batch-key is refused: not modelled
    model = CellGAN(adata, n_noise=args.n_noise, n_critic=args.n_critic, seed=args.seed)
    train_seconds = timed_training(model, args, lr=args.lr)
    key = "X_sclatent_gan"
    adata.obsm[key] = model.get_latent_representation()
    out, model_dir, umap_png, curves_png = cluster_and_write(adata, model, "gan", labels_key, args)
    fake = model.sample(args.n_synthetic, seed=args.seed)
    synthetic_path = out.with_name(f"{out.stem}_synthetic.h5ad")
    fake.write_h5ad(synthetic_path)

    summary = {"cells": adata.n_obs, "genes": adata.n_vars, "epochs": len(model.history["epoch"])}
    summary["train_seconds"] = train_seconds
    # realism: synthetic vs one half of the real cells, beside the other half vs that half
    counts = adata.X if args.layer is None else adata.layers[args.layer]
    labels = adata.obs[labels_key].astype(str).to_numpy() if labels_key else np.zeros(adata.n_obs, dtype=str)
    first, second = split_halves(labels, seed=args.seed)
    fake_labels = fake.obs[labels_key].astype(str).to_numpy() if labels_key else None
    summary["realism_synthetic"] = realism_metrics(
        counts[second], fake.X, labels[second] if labels_key else None, fake_labels, seed=args.seed
    )
    summary["realism_real_halves"] = realism_metrics(
        counts[second],
        counts[first],
        labels[second] if labels_key else None,
        labels[first] if labels_key else None,
        seed=args.seed,
    )
    summary.update(clustering_summary(adata, "leiden_sclatent_gan", labels_key, args))
    summary["total_seconds"] = time.perf_counter() - start
    syn, ref = summary["realism_synthetic"], summary["realism_real_halves"]
    print("\nSummary")
    print(f"  data            {summary['cells']} cells x {summary['genes']} genes")
    print(f"  training        {summary['epochs']} epochs in {train_seconds:.1f} s")
    # the GAN saw every cell here: benchmarks/bench_gan.py makes the held-out comparison
    print("  realism         synthetic vs real half | other real half vs the same half (GAN trained on all cells)")
    print(f"    classifier AUROC     {syn['c2st_auroc']:.3f} | {ref['c2st_auroc']:.3f}   (0.5: indistinguishable)")
    print(f"    MMD^2 (PCA, RBF)     {syn['mmd']:.4f} | {ref['mmd']:.4f}")
    for stat in ("mean", "variance", "zero_fraction"):
        print(f"    gene {stat:<15} r {syn[f'corr_{stat}']:.3f} | {ref[f'corr_{stat}']:.3f}")
    if "marker_overlap" in syn:
        print(f"    top-20 markers found {syn['marker_overlap']:.2f} | {ref['marker_overlap']:.2f}")
    print_clustering(summary, labels_key)
    print(f"  wrote           {out} (obsm['{key}']: critic features, obsm['X_umap'], obs['leiden_sclatent_gan'])")
    print(f"                  {synthetic_path} ({fake.n_obs} synthetic cells, obs['synthetic'])")
    print(f"                  {model_dir}/ (model), {umap_png}, {curves_png}")
    print(f"  total time      {summary['total_seconds']:.1f} s")
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fit-gan",
        help="train the conditional GAN, write synthetic cells, critic features, UMAP, model, figures",
        description="Train sclatent's CellGAN (conditional WGAN-GP on counts) on INPUT (default: embedded PBMCs).",
    )
    add_common_arguments(parser)
    parser.add_argument("--n-noise", type=int, default=64)
    parser.add_argument("--n-critic", type=int, default=5, help="critic updates per generator update")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-epochs", type=int, default=None, help="default: ~600 generator updates")
    parser.add_argument("--n-synthetic", type=int, default=1000, help="synthetic cells to write")
    parser.set_defaults(func=fit_gan)
