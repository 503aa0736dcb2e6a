"""``sclatent fit-flow``: the count VAE with a learned normalizing-flow prior on z.

The same run as ``fit-vae`` (:func:`sclatent.cli.vae.fit_vae`) with ``--prior realnvp`` by
default; the latent goes to ``obsm["X_sclatent_flow"]`` and the clusters to
``obs["leiden_sclatent_flow"]``.
"""

from __future__ import annotations

import argparse

from .vae import add_vae_arguments, fit_vae


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fit-flow",
        help="train the count VAE with a normalizing-flow prior (RealNVP by default), cluster its latent",
        description=(
            "Train sclatent's VAE with a learned flow prior p(z) on INPUT (default: the embedded PBMC "
            "counts) and cluster its latent."
        ),
    )
    add_vae_arguments(parser, default_prior="realnvp")
    parser.set_defaults(func=fit_vae, family="flow")
