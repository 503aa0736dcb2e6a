"""Saving and loading model folders: ``model.pt`` (a state dict) beside ``metadata.json``.

Shared by the AnnData models (:mod:`sclatent.model`) and the image/vector models
(:mod:`sclatent.images`). Weights are read back with ``torch.load(weights_only=True)``, so a
tampered file cannot run code; everything else is JSON with a format version.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

SAVE_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
METADATA_FILE = "metadata.json"


def write_model_folder(
    directory: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write ``state`` and ``metadata`` (plus the format version) into ``directory``.

    Each file is written under a temporary name and renamed, so an interrupted save never leaves
    a half-written model. Files follow the user's umask.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True to replace it.")
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format_version": SAVE_FORMAT_VERSION, **metadata}
    state = {k: v.detach().cpu() for k, v in state.items()}
    umask = os.umask(0)
    os.umask(umask)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".tmp") as handle:
        torch.save(state, handle)
    os.chmod(handle.name, 0o666 & ~umask)  # temp files are 0600; saved models follow the umask
    os.replace(handle.name, directory / WEIGHTS_FILE)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(metadata, handle, allow_nan=True)
    os.chmod(handle.name, 0o666 & ~umask)
    os.replace(handle.name, directory / METADATA_FILE)
    return directory


def read_model_folder(directory: str | os.PathLike, class_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, metadata)`` of a folder written by :func:`write_model_folder` for ``class_name``.

    Raises
    ------
    FileNotFoundError
        The folder lacks ``metadata.json`` or ``model.pt``.
    ValueError
        Unknown format version.
    TypeError
        The folder holds another model class.
    """
    directory = Path(directory)
    meta_path, weights_path = directory / METADATA_FILE, directory / WEIGHTS_FILE
    if not meta_path.exists() or not weights_path.exists():
        raise FileNotFoundError(
            f"{directory} does not hold a saved sclatent model ({METADATA_FILE} and {WEIGHTS_FILE})."
        )
    metadata = json.loads(meta_path.read_text())
    if metadata.get("format_version") != SAVE_FORMAT_VERSION:
        raise ValueError(
            f"Saved model format {metadata.get('format_version')!r} is not supported "
            f"(this sclatent reads format {SAVE_FORMAT_VERSION})."
        )
    if metadata.get("model_class") != class_name:
        raise TypeError(
            f"{directory} holds a {metadata.get('model_class')}, not a {class_name}; load it with that class."
        )
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    return state, metadata
