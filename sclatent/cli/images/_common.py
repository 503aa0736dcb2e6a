"""What the image commands (``mnist-*``, ``toy-flow``) share: data arguments, loading, the summary file."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_image_arguments(
    parser: argparse.ArgumentParser, default_epochs: int, default_n_train: int | None = None
) -> None:
    """``--dataset``, ``--data-dir``, ``--n-train``, ``--n-test``, ``--max-epochs``, ``--batch-size``,
    ``--seed``, ``--accelerator``, ``--out``."""
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--out", required=True, help="output folder: model, figures (PNG) and summary.json")


def load_images(args: argparse.Namespace, command: str):
    """``(train, test)`` :class:`~sclatent.datasets.ImageSet` s chosen by the arguments, announced."""
    from .. import datasets

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
