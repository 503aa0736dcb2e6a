"""Saving and loading model folders: ``model.pt`` (a state dict) beside ``metadata.json``.

Shared by the AnnData models (:mod:`sclatent.model`) and the image/vector models
(:mod:`sclatent.images`) through :class:`sclatent.base.Model`. Weights are read back with
``torch.load(weights_only=True)``, so a tampered file cannot run code; everything else is JSON
with a format version. ``metadata.json`` records the SHA-256 of ``model.pt``: torch's zip
format does not check its tensor data, so bytes damaged inside a tensor would otherwise load
silently as wrong weights. Every failure to read a folder back is a :class:`ModelLoadError`
naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

SAVE_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
METADATA_FILE = "metadata.json"
# what every metadata.json holds besides the format version and the class
_REQUIRED_METADATA = ("hyperparameters", "seed", "history", "is_trained")


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
    metadata["weights_sha256"] = _sha256(Path(handle.name))
    os.chmod(handle.name, 0o666 & ~umask)  # temp files are 0600; saved models follow the umask
    os.replace(handle.name, directory / WEIGHTS_FILE)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(metadata, handle, allow_nan=True)
    os.chmod(handle.name, 0o666 & ~umask)
    os.replace(handle.name, directory / METADATA_FILE)
    return directory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelLoadError(ValueError):
    """A saved model folder that cannot be read back; the message names the file and the fix."""


def _damaged(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load {path}: {reason}. The model folder is damaged or incomplete (an interrupted copy, a "
        "truncated download, a file edited by hand); save the model again, or restore the folder from a copy."
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def read_model_folder(directory: str | os.PathLike, class_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, metadata)`` of a folder written by :func:`write_model_folder` for ``class_name``.

    Raises
    ------
    FileNotFoundError
        The folder lacks ``metadata.json`` or ``model.pt``.
    ModelLoadError
        ``metadata.json`` is not valid JSON or lacks fields, or ``model.pt`` is truncated, corrupted
        or holds more than tensors (nothing but tensors is ever unpickled: ``weights_only=True``).
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
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(meta_path, f"it is not valid JSON ({_first_line(error)})") from None
    if not isinstance(metadata, dict):
        raise _damaged(meta_path, "it does not hold a JSON object")
    if metadata.get("format_version") != SAVE_FORMAT_VERSION:
        raise ValueError(
            f"Saved model format {metadata.get('format_version')!r} is not supported "
            f"(this sclatent reads format {SAVE_FORMAT_VERSION})."
        )
    if metadata.get("model_class") != class_name:
        raise TypeError(
            f"{directory} holds a {metadata.get('model_class')}, not a {class_name}; load it with that class."
        )
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise _damaged(meta_path, f"it lacks {', '.join(missing)}")
    expected = metadata.get("weights_sha256")  # (absent from folders saved before it was recorded)
    if expected is not None and _sha256(weights_path) != expected:
        raise _damaged(weights_path, f"its bytes differ from the checksum {METADATA_FILE} records for them")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, zeroed bytes, pickled objects: the same thing to the user
        raise _damaged(weights_path, f"its weights cannot be read ({_first_line(error)})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise _damaged(weights_path, "it does not hold a state dict of tensors")
    return state, metadata


def restore_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """Load ``state`` into ``module``, or a :class:`ModelLoadError` naming the file when they do not fit."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        path = Path(directory) / WEIGHTS_FILE
        raise ModelLoadError(
            f"The weights in {path} do not fit the {type(module).__name__} described by {METADATA_FILE} "
            f"({_first_line(error)}). The two files come from different models or one was replaced: save "
            "the model again."
        ) from None
