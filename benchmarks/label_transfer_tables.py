"""The markdown tables of ``RESULTS.md``'s label-transfer section, from one ``bench_label_transfer.py``
result file: per transfer task the methods' mean ± sd, per scarcity dataset the same per label
fraction, and the targets table. Run::

    PYTHONPATH=. python benchmarks/label_transfer_tables.py benchmarks/results_label_transfer.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_label_transfer as bench

TRANSFER_COLUMNS = (
    ("accuracy", "accuracy", 3),
    ("macro-F1", "macro_f1", 3),
    ("ECE", "ece", 3),
    ("mixing (batch entropy)", "batch_entropy", 3),
    ("label ASW", "label_asw", 3),
    ("train s", "train_seconds", 1),
    ("map s", "mapping_seconds", 1),
    ("total s", "total_seconds", 1),
    ("peak RSS MB", "peak_rss_mb", 0),
)
SCARCITY_COLUMNS = (
    ("accuracy", "accuracy", 3),
    ("macro-F1", "macro_f1", 3),
    ("ECE", "ece", 3),
    ("train s", "train_seconds", 1),
    ("total s", "total_seconds", 1),
)
ROW_ORDER = ("sclatent", "scvi", "vote_sclatent", "vote_scvi", "knn_latent_sclatent", "knn_latent_scvi")


def _cell(entry: dict | None, digits: int) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    if entry.get("n", 0) > 1 and entry.get("sd") is not None:
        return f"{entry['mean']:.{digits}f} ± {entry['sd']:.{digits}f}"
    return f"{entry['mean']:.{digits}f}"


def _table(mean_sd: dict, columns, prefix: tuple[str, ...] = ()) -> list[str]:
    rows = [name for name in (*ROW_ORDER, *bench.BASELINES) if name in mean_sd]
    return [
        "| "
        + " | ".join((*prefix, bench.ROW_NAMES[name], *(_cell(mean_sd[name].get(key), d) for _, key, d in columns)))
        + " |"
        for name in rows
    ]


def _header(columns, lead: tuple[str, ...]) -> list[str]:
    names = (*lead, *(title for title, _, _ in columns))
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def _verdict(entry: dict, key: str) -> str:
    word = "holds" if entry["holds"] else "misses"
    if key == "speed":
        return f"{word}: {entry['ratio']:.2f}x"
    return f"{word}: {entry['sclatent']:.3f} vs {entry['scvi']:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    results = data["results"]
    for task in ("pbmc", "cellbench"):
        if task in results:
            print(f"\n{task}:\n")
            print(
                "\n".join(_header(TRANSFER_COLUMNS, ("method",)) + _table(results[task]["mean_sd"], TRANSFER_COLUMNS))
            )
    for dataset, block in results.get("scarcity", {}).get("datasets", {}).items():
        print(f"\nscarcity / {dataset}:\n")
        lines = _header(SCARCITY_COLUMNS, ("labels", "method"))
        for tag, mean_sd in block["mean_sd"].items():
            lines += _table(mean_sd, SCARCITY_COLUMNS, (f"{float(tag):.0%}".replace("%", " %"),))
        print("\n".join(lines))
    print("\ntargets:\n")
    print("| task | accuracy | macro-F1 | ECE | speed (scvi / sclatent total) |\n|---|---|---|---|---|")
    for task, entry in data["targets"].items():
        cells = [_verdict(entry[key], key) for key in ("accuracy", "macro_f1", "ece", "speed")]
        print(f"| {task} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
