"""Command line: ``sclatent fit-<family> [INPUT.h5ad] --out OUT.h5ad`` for cells, ``sclatent mnist-<model>
--out DIR`` (and ``toy-flow``) for the image/vector models.

One module per command; each has ``add_command(commands)`` registering its subparser and a
function that runs it and returns a summary dict.
"""

from __future__ import annotations

import argparse
import sys

from .. import distributed
from . import (
    contrastive,
    dae,
    flow,
    gan,
    image_autoencoders,
    image_cyclegan,
    image_flow,
    image_gan,
    image_simclr,
    image_vae,
    masked,
    vae,
)

# the order of ``sclatent --help``
_COMMANDS = [
    vae,
    flow,
    dae,
    masked,
    contrastive,
    gan,
    image_vae,
    image_autoencoders,
    image_flow,
    image_gan,
    image_cyclegan,
    image_simclr,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sclatent", description="Deep latent-variable models for single-cell counts.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.add_command(commands)
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
