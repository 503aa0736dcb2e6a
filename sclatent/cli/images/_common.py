"""What the image commands (``mnist-*``, ``toy-flow``) share: data arguments, model options read from
the family's hyperparameters, loading, training, the summary file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: In :func:`add_model_arguments`: offer the option with the dataclass's own default.
MODEL_DEFAULT: Any = object()


def add_image_arguments(
    parser: argparse.ArgumentParser,
    default_epochs: int,
    default_n_train: int | None = None,
    default_lr: float = 1e-3,
    lr_help: str | None = None,
) -> None:
    """``--dataset``, ``--data-dir``, ``--n-train``, ``--n-test``, ``--max-epochs``, ``--batch-size``,
    ``--lr``, ``--seed``, ``--accelerator``, ``--out``."""
    parser.add_argument(
        "--dataset",
        choices=["mnist", "digits"],
        default="mnist",
        help="MNIST from the data directory (default) or scikit-learn's bundled 8x8 digits (no files needed)",
    )
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: $SCLATENT_DATA_DIR)")
    parser.add_argument(
        "--n-train", type=int, default=default_n_train, help="train on a seeded random subset of this many images"
    )
    parser.add_argument("--n-test", type=int, default=None, help="evaluate on a seeded subset of this many test images")
    parser.add_argument("--max-epochs", type=int, default=default_epochs, help="passes over the training images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=default_lr, help=lr_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--out", required=True, help="output folder: model, figures (PNG) and summary.json")


def add_model_arguments(
    parser: argparse.ArgumentParser,
    model_class: type,
    defaults: Mapping[str, Any],
    helps: Mapping[str, str] | None = None,
) -> None:
    """The options of the hyperparameters this command offers, read from ``model_class.hyperparameters_class``.

    ``defaults`` names the offered fields, in their ``--help`` order, each with this command's
    default (:data:`MODEL_DEFAULT`: the dataclass's); the other fields get no option and keep their
    defaults. Each option is the one :meth:`~sclatent.hyperparameters.Hyperparameters.add_arguments`
    makes (``--n-latent``, type, choices, help), except that a boolean field defaulting to False is
    a plain switch (``--spectral-norm``), as the image commands have always spelled it. ``helps``
    replaces a field's help where the command says more (e.g. what a value adds to its figures).
    """
    hyperparameters = model_class.hyperparameters_class
    fields = {item.name: item for item in dataclasses.fields(hyperparameters)}
    unknown = sorted(set(defaults) - set(fields))
    if unknown:
        raise ValueError(f"{hyperparameters.family} has no hyperparameter(s) {unknown}.")
    hints = typing.get_type_hints(hyperparameters)
    helps = dict(helps or {})
    for name, default in defaults.items():
        default = fields[name].default if default is MODEL_DEFAULT else default
        text = helps.get(name, fields[name].metadata.get("help"))
        if hints[name] is bool and default is False:
            parser.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)
            continue
        # one option at a time, in the command's order: every other field left out (named with None)
        only = {other: None for other in fields if other != name}
        if default is not None:
            only[name] = default
        elif fields[name].default is not None:
            raise ValueError(f"{name}: add_arguments cannot offer a default of None over {fields[name].default!r}.")
        hyperparameters.add_arguments(parser, only)
        if name in helps:
            parser._actions[-1].help = text  # the option add_arguments just added


def build_model(model_class: type, input_shape: tuple[int, ...], args: argparse.Namespace, **fixed: Any):
    """``model_class(input_shape, seed=args.seed, ...)`` with the hyperparameters of the command line
    (:meth:`~sclatent.hyperparameters.Hyperparameters.from_arguments`; defaults for those without an
    option) and ``fixed`` ones (from the data, e.g. ``levels``) on top."""
    hyperparameters = model_class.hyperparameters_class.from_arguments(args).to_dict()
    return model_class(input_shape, seed=args.seed, **{**hyperparameters, **fixed})


def timed_training(model, args: argparse.Namespace, *data, **options: Any) -> float:
    """``model.train(*data, ...)`` with the command line's epochs, batch size, learning rate,
    accelerator and seed (and ``options``); the seconds it took."""
    with Timer() as timer:
        model.train(
            *data,
            max_epochs=args.max_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            accelerator=args.accelerator,
            seed=args.seed,
            **options,
        )
    return timer.seconds


def load_images(args: argparse.Namespace, command: str):
    """``(train, test)`` :class:`~sclatent.datasets.ImageSet` s chosen by the arguments, announced."""
    from ... import datasets

    if args.dataset == "digits":
        train, test = datasets.digits("train", seed=0), datasets.digits("test", seed=0)
    else:
        train, test = datasets.mnist("train", args.data_dir), datasets.mnist("test", args.data_dir)
    if args.n_train is not None:
        train = train.subset(args.n_train, seed=args.seed)
    if args.n_test is not None:
        test = test.subset(args.n_test, seed=args.seed)
    h, w = train.shape
    print(f"sclatent {command}: {len(train)} training / {len(test)} test images of {h}x{w} ({train.name}, {test.name})")
    return train, test


def flat(x):
    """``(N, ...)`` items as ``(N, D)`` rows (what PCA and a linear probe read)."""
    return x.reshape(len(x), -1)


def output_folder(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_summary(out: Path, summary: dict) -> Path:
    """Write ``summary.json`` into ``out`` and print one ``key: value`` line per entry."""
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=float))
    for key, value in summary.items():
        print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"  wrote {path}")
    return path


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
