"""What the native-kernel probes share: one kernel source built from this tree and from an earlier
revision, side by side in one process."""

from __future__ import annotations

import ctypes
import subprocess
from collections.abc import Callable
from pathlib import Path


def compile_kernel(source: Path, target: Path) -> ctypes.CDLL:
    """``source`` compiled as sclatent compiles its kernels (its OpenMP flags) into ``target``, loaded;
    the caller declares the signatures."""
    from sclatent import _native

    subprocess.run(["cc", *_native._FLAGS_OPENMP, str(source), "-o", str(target), "-lm"], check=True)
    return ctypes.CDLL(str(target))


def builds_against(
    source: str, against: str, scratch: Path, build: Callable[[Path, Path], ctypes.CDLL]
) -> dict[str, ctypes.CDLL]:
    """``{against: library, "this tree": library}``: ``source`` (a path from the repository root)
    as ``git show against:source`` has it and as this tree has it, each compiled by ``build(source,
    target)`` into ``scratch``."""
    baseline = scratch / "baseline.c"
    shown = subprocess.run(["git", "show", f"{against}:{source}"], check=True, capture_output=True, text=True)
    baseline.write_text(shown.stdout)
    return {
        against: build(baseline, scratch / "baseline.so"),
        "this tree": build(Path(source), scratch / "current.so"),
    }
