"""Command line: ``sclatent fit-<family> [INPUT.h5ad] --out OUT.h5ad`` for cells, ``sclatent mnist-<model>
--out DIR`` (and ``toy-flow``) for the image/vector models.

The cell commands are :class:`~sclatent.cli._common.CellCommand` s, one module per family
(``vae``: ``fit-vae`` and ``fit-flow``, ``dae``, ``masked``, ``contrastive``, ``gan``) declaring only
what differs from the shared run of :mod:`sclatent.cli._common`; their model options come from
the family's hyperparameter dataclass. ``sclatent map-query`` (:mod:`sclatent.cli.query`) maps new
cells onto a trained reference. The image commands live in the image wing
(:mod:`sclatent.cli.images`).
"""

from __future__ import annotations

import argparse
import sys

from .. import distributed
from . import images, query
from .contrastive import FIT_CONTRASTIVE
from .dae import FIT_DAE
from .gan import FIT_GAN
from .masked import FIT_MASKED
from .vae import FIT_FLOW, FIT_VAE

# the order of ``sclatent --help``
CELL_COMMANDS = [FIT_VAE, FIT_FLOW, FIT_DAE, FIT_MASKED, FIT_CONTRASTIVE, FIT_GAN]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sclatent", description="Deep latent-variable models for single-cell counts.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in CELL_COMMANDS:
        command.register(commands)
    query.add_command(commands)  # map-query: new cells onto a trained reference
    # the image wing (sclatent.cli.images): mnist-vae, mnist-ae/mae, mnist-flow/toy-flow, mnist-gan,
    # mnist-cyclegan, mnist-simclr
    for module in images.COMMANDS:
        module.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        from ..data import SetupError

        if isinstance(err, SetupError | FileNotFoundError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    finally:
        # a command run by torchrun joined the process group in model.train; leave it cleanly
        distributed.teardown()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
