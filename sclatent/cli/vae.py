"""``sclatent fit-vae``: the count VAE (the main job), and ``fit-flow``: the same with a flow prior.

``fit-flow`` differs only in its default prior (``realnvp``) and writes ``X_sclatent_flow``.
"""

from __future__ import annotations

import argparse

from ..model import VAE
from ..model._base import DEFAULT_MAX_KL_WEIGHT
from ._common import CellCommand, Run


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-early-stopping", action="store_true", help="train all --max-epochs (default: stop on the held-out ELBO)"
    )
    parser.add_argument(
        "--max-kl-weight",
        type=float,
        default=DEFAULT_MAX_KL_WEIGHT,
        help=f"KL weight after the warm-up (default {DEFAULT_MAX_KL_WEIGHT:g}; 1 trains on the plain ELBO)",
    )
    parser.add_argument("--n-mc-samples", type=int, default=200, help="importance samples for the held-out LL")


def _held_out_likelihood(run: Run) -> None:
    from ..metrics import nb_baseline_log_likelihood

    model, args, summary = run.model, run.args, run.summary
    summary["prior"] = model.hyperparameters["prior"]
    held_out = model.validation_indices
    if len(held_out):
        summary["heldout_marginal_ll"] = model.get_marginal_ll(indices=held_out, n_mc_samples=args.n_mc_samples)
        counts = run.adata.X if args.layer is None else run.adata.layers[args.layer]
        summary["baseline_nb_ll"] = nb_baseline_log_likelihood(counts, model.train_indices, held_out)


def _report(run: Run) -> list[str]:
    summary, settings = run.summary, run.model.hyperparameters
    lines = []
    if settings["prior"] != "normal":
        lines.append(f"  prior of z      {settings['prior']} flow, {settings['n_flows']} layers")
    per_epoch = run.train_seconds / summary["epochs"]
    lines.append(f"  training        {summary['epochs']} epochs in {run.train_seconds:.1f} s ({per_epoch:.3f} s/epoch)")
    if "heldout_marginal_ll" in summary:
        lines.append(
            f"  held-out LL     {summary['heldout_marginal_ll']:.2f} nats/cell ({len(run.model.validation_indices)} "
            f"cells, {run.args.n_mc_samples} importance samples); NB library x gene-mean baseline "
            f"{summary['baseline_nb_ll']:.2f}"
        )
    return lines


def _command(name: str, family: str, prior: str, help: str, description: str) -> CellCommand:
    return CellCommand(
        name=name,
        help=help,
        description=description,
        family=family,
        model=VAE,
        hyperparameter_defaults={"prior": prior},
        add_arguments=_add_arguments,
        train_options=lambda args: {"early_stopping": not args.no_early_stopping, "max_kl_weight": args.max_kl_weight},
        after_training=_held_out_likelihood,
        report=_report,
    )


FIT_VAE = _command(
    "fit-vae",
    "vae",
    "normal",
    "train the count VAE, write its latent, UMAP, Leiden clusters, model and figures",
    "Train sclatent's VAE on INPUT (default: the embedded PBMC counts) and cluster its latent.",
)
FIT_FLOW = _command(
    "fit-flow",
    "flow",
    "realnvp",
    "train the count VAE with a normalizing-flow prior (RealNVP by default), cluster its latent",
    "Train sclatent's VAE with a learned flow prior p(z) on INPUT (default: the embedded PBMC counts) and "
    "cluster its latent.",
)
