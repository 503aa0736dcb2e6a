"""The image/vector commands: ``sclatent mnist-<model> --out DIR`` and ``sclatent toy-flow``.

One module per model family; each has ``add_command(commands)`` registering its subparsers.
:data:`COMMANDS` is their order in ``sclatent --help``.
"""

from __future__ import annotations

from . import autoencoders, cyclegan, flow, gan, simclr, vae

COMMANDS = [vae, autoencoders, flow, gan, cyclegan, simclr]

__all__ = ["COMMANDS", "autoencoders", "cyclegan", "flow", "gan", "simclr", "vae"]
