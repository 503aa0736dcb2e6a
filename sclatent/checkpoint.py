"""Training checkpoints that survive a crash: one file per run, replaced atomically each epoch.

``train(..., checkpoint_dir=DIR)`` (CLI ``--checkpoint-dir``) keeps ``DIR/checkpoint.pt`` up to date
with everything the next epoch depends on (parameters, optimiser moments, random number
generators, history, early-stopping state); running the same call again continues from the
last completed epoch and ends with the same parameters, bit for bit, as a run never interrupted.

The file is a dict of tensors and plain Python values (dict, list, tuple, str, int, float, bool,
None) read with ``torch.load(weights_only=True)``: a tampered or foreign file cannot run code. It
carries a marker, a format version and a *fingerprint* of the run (module class, parameter names
and shapes, training plan, seed, training and validation cells, model and genes); a checkpoint
whose fingerprint differs belongs to another run and is refused rather than silently resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT_VERSION = 1
# the value of the "format" key: tells an sclatent checkpoint from any other torch file
CHECKPOINT_MARKER = "sclatent_checkpoint"
# temporary files of an unfinished write: ``.checkpoint.pt.<random>.tmp`` beside the checkpoint
_TEMP_PREFIX = f".{CHECKPOINT_FILE}."
_TEMP_SUFFIX = ".tmp"
# what every checkpoint holds besides marker, version and fingerprint (checked on load)
_REQUIRED_KEYS = ("epoch", "stopped", "global_step", "history", "early_stopping", "module", "optimizers", "rng")

Fingerprint = dict[str, str | int | float | bool | None]


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, not sclatent's, another version or another run."""


def checkpoint_path(directory: str | os.PathLike) -> Path:
    """Where the checkpoint of ``directory`` lives (it may not exist yet)."""
    return Path(directory) / CHECKPOINT_FILE


def has_checkpoint(directory: str | os.PathLike | None) -> bool:
    """Whether ``directory`` holds a checkpoint file (not whether it is valid)."""
    return directory is not None and checkpoint_path(directory).is_file()


def is_checkpoint_writer() -> bool:
    """False on every rank but 0 of an initialised ``torch.distributed`` job: one writer per run."""
    distributed = torch.distributed
    return not (distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0)


def save_checkpoint(directory: str | os.PathLike, state: Mapping[str, Any]) -> Path | None:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically; the previous checkpoint survives any crash.

    The state is written to a temporary file in the same directory, flushed and ``fsync``-ed, then
    renamed over the checkpoint (``os.replace``, atomic on POSIX and Windows), and the directory is
    synced so the rename itself is durable. A reader therefore sees the old checkpoint or the new
    one, never a mix; a crash mid-write leaves at most a stray ``.checkpoint.pt.*.tmp`` file, which
    :func:`load_checkpoint` ignores and removes.

    In a ``torch.distributed`` job only rank 0 writes (the others return None at once); the
    trainer gathers every rank's generator states into ``state["rng"]["ranks"]`` beforehand.

    Parameters
    ----------
    directory
        Folder of the checkpoint; created if missing.
    state
        Tensors and plain Python values only (see the module docstring); the marker and format
        version are added here. Tensors are stored on the CPU.

    Returns
    -------
    pathlib.Path or None
        The checkpoint's path, or None on a rank that does not write.
    """
    if not is_checkpoint_writer():
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {**state, "format": CHECKPOINT_MARKER, "format_version": CHECKPOINT_FORMAT_VERSION}
    target = directory / CHECKPOINT_FILE
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600 files; follow the umask like saved models
        os.replace(temporary, target)
    except BaseException:
        # a failed write (full disk, interrupt) must not leave its partial file behind
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(directory)
    return target


def _sync_directory(directory: Path) -> None:
    """``fsync`` the directory so a completed rename survives a power loss (POSIX; no-op elsewhere)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its rename is durable enough
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete the partial files of writes that a crash interrupted (one writer per directory)."""
    for stray in directory.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stray.unlink()


def load_checkpoint(directory: str | os.PathLike, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in ``directory`` if it belongs to the run ``fingerprint`` describes; None if there is none.

    Parameters
    ----------
    directory
        Folder given to :func:`save_checkpoint` (it need not exist).
    fingerprint
        What identifies the run (see :func:`run_fingerprint`); every field must equal the stored one.

    Returns
    -------
    dict or None
        The stored state (tensors on the CPU), or None when ``directory/checkpoint.pt`` does not exist.

    Raises
    ------
    CheckpointError
        The file is truncated or not a torch file; holds objects other than tensors and plain
        values (refused by ``weights_only``: nothing is unpickled); lacks the sclatent marker;
        has an unsupported format version; lacks part of the state; or belongs to another run
        (the message lists the fields that differ).
    """
    directory = Path(directory)
    path = directory / CHECKPOINT_FILE
    if directory.is_dir() and is_checkpoint_writer():
        _remove_stale_temporaries(directory)
    if not path.is_file():
        return None
    fix = f"Delete {path} to start training from scratch, or pass another checkpoint_dir."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to read means the same thing to the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"Cannot read the checkpoint {path}: it is truncated, corrupted or not a checkpoint of sclatent "
            f"(only tensors and plain Python values are read, nothing else is unpickled; the reader said: "
            f"{reason[:300]}). {fix}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_MARKER:
        raise CheckpointError(
            f"{path} is a torch file but not a checkpoint of sclatent (no {CHECKPOINT_MARKER!r} marker). {fix}"
        )
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('format_version')!r}; this sclatent reads "
            f"version {CHECKPOINT_FORMAT_VERSION}. {fix}"
        )
    missing = [key for key in ("fingerprint", *_REQUIRED_KEYS) if key not in state]
    if missing or not isinstance(state.get("fingerprint"), dict):
        raise CheckpointError(f"{path} is incomplete (missing {', '.join(missing) or 'a valid fingerprint'}). {fix}")
    differences = _fingerprint_differences(state["fingerprint"], fingerprint)
    if differences:
        raise CheckpointError(
            f"{path} belongs to another training run, so it cannot be resumed here. It differs in: "
            f"{'; '.join(differences)}. {fix}"
        )
    return state


def _fingerprint_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"field: checkpoint X, this run Y"`` for every field that differs (or exists on one side only)."""
    differences = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            differences.append(f"{key}: checkpoint {_short(old)}, this run {_short(new)}")
    return differences


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- fingerprint


def _digest(parts: Iterable[bytes]) -> str:
    """First 16 hex digits of the SHA-256 of ``parts``: enough to tell runs apart, short in messages."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part)
        hasher.update(b"\0")
    return hasher.hexdigest()[:16]


def cells_digest(cells: np.ndarray) -> str:
    """Digest of a set of cell indices ``(n,)`` (order matters: they are the trainer's order)."""
    return _digest([np.ascontiguousarray(np.asarray(cells, dtype=np.int64)).tobytes()])


def run_fingerprint(
    module: torch.nn.Module,
    plan: Any,
    seed: int,
    train_cells: np.ndarray,
    validation_cells: np.ndarray,
    parameter_groups: Iterable[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Fingerprint:
    """What must be equal for a checkpoint to continue a run: plain values, compared field by field.

    ``plan.max_epochs`` is left out on purpose: a finished run can be resumed with more epochs
    to train on (the KL warm-up and early stopping have their own fields).

    Parameters
    ----------
    module
        The module being trained: its class, the names, shapes and dtypes of its state dict
        (parameters and buffers) and which parameters are trainable.
    plan
        The :class:`sclatent.train.TrainingPlan` (a dataclass); one field ``plan.<name>`` each.
    seed
        The trainer's seed.
    train_cells, validation_cells
        ``(n_train,)`` and ``(n_validation,)`` cell indices.
    parameter_groups
        Names of an adversarial module's parameter groups (one optimiser each), or None.
    extra
        Further fields from the caller (e.g. the model class, a digest of the genes and the
        hyperparameters); values must be plain (str, int, float, bool, None).
    """
    state = module.state_dict()
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    fingerprint: Fingerprint = {
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "state_dict": _digest(f"{k}:{tuple(v.shape)}:{v.dtype}".encode() for k, v in state.items()),
        "state_dict_entries": len(state),
        "trainable_parameters": _digest(name.encode() for name in trainable),
        "parameter_groups": None if parameter_groups is None else ",".join(parameter_groups),
        "seed": int(seed),
        "train_cells": f"{len(train_cells)} cells, digest {cells_digest(train_cells)}",
        "validation_cells": f"{len(validation_cells)} cells, digest {cells_digest(validation_cells)}",
    }
    for key, value in asdict(plan).items():
        if key != "max_epochs":
            fingerprint[f"plan.{key}"] = value
    for key, value in (extra or {}).items():
        if not isinstance(value, str | int | float | bool | type(None)):
            raise TypeError(
                f"fingerprint field {key!r} must be a str, int, float, bool or None, got {type(value).__name__}."
            )
        fingerprint[key] = value
    return fingerprint


def text_digest(value: Any) -> str:
    """Digest of a JSON-able value (e.g. a gene list or a hyperparameter dict), key order ignored."""
    return _digest([json.dumps(value, sort_keys=True, default=str).encode()])


# --------------------------------------------------------------------------- random number generators


def rng_state(device: torch.device | None, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
    """The states of torch's CPU generator, the minibatch ``generator`` and (on CUDA) ``device``'s generator.

    Training draws dropout masks, latent samples and augmentations from torch's global generators
    and the minibatch order from ``generator``. NumPy's global generator is not stored: nothing in
    the training loop draws from it (split and kNN use their own seeded ``default_rng``).
    """
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    return {"torch": torch.get_rng_state(), "generator": generator.get_state(), "cuda": cuda}


def restore_rng_state(
    state: Mapping[str, Any],
    device: torch.device | None,
    generator: torch.Generator,
    distributed=None,
    noise_generator: torch.Generator | None = None,
) -> None:
    """Put back the generator states of :func:`rng_state`.

    The minibatch ``generator`` (shared by all ranks of a ``torch.distributed`` job) is restored
    everywhere. torch's global generators (dropout, sampling noise) differ per rank: a checkpoint
    written by a distributed run holds every rank's (``state["ranks"]``), and when this run has as
    many ranks, each rank gets its own back, and ``noise_generator`` (per-rank draws inside the
    data, e.g. neighbour picks) too, so the resumed run is bit-identical to an uninterrupted one.
    Resumed with another number of ranks, only rank 0 takes the stored (rank 0) state: giving it to
    every rank would make all ranks draw the same noise; the others keep the noise seeded at the
    start of the call, a valid continuation but not an identical one.
    """
    generator.set_state(state["generator"])
    ranks = state.get("ranks")
    if distributed is not None and ranks is not None and len(ranks) == distributed.world_size:
        own = ranks[distributed.rank]
        torch.set_rng_state(own["torch"])
        if own.get("cuda") is not None and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"], device)
        if noise_generator is not None and own.get("noise") is not None:
            noise_generator.set_state(own["noise"])
        return
    if not is_checkpoint_writer():
        return
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


__all__ = [
    "CHECKPOINT_FILE",
    "CHECKPOINT_FORMAT_VERSION",
    "CheckpointError",
    "LoopState",
    "RunCheckpoint",
    "checkpoint_path",
    "has_checkpoint",
    "is_checkpoint_writer",
    "load_checkpoint",
    "run_fingerprint",
    "save_checkpoint",
]


# --------------------------------------------------------------------------- one run's checkpoint


@dataclass
class LoopState:
    """Where the epoch loop of :func:`sclatent.train.fit` stands after a completed epoch.

    Attributes
    ----------
    epoch
        Completed epochs.
    stopped
        Whether early stopping ended the run at ``epoch``.
    global_step
        Minibatches trained on so far, over all epochs (an adversarial module's step schedule).
    history
        The per-epoch records so far.
    best, epochs_without_improvement, best_state
        Early stopping's state (best monitored value as a loss, epochs since, parameters then).
    """

    epoch: int = 0
    stopped: bool = False
    global_step: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    best: float = math.inf
    epochs_without_improvement: int = 0
    best_state: dict[str, torch.Tensor] | None = None


class RunCheckpoint:
    """Saving and resuming one training run between epochs, in ``directory/checkpoint.pt``.

    Parameters
    ----------
    directory
        The run's checkpoint folder.
    fingerprint
        :func:`run_fingerprint` of the run: a file with another fingerprint is refused.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: Fingerprint) -> None:
        self.directory, self.fingerprint = Path(directory), fingerprint

    def resume(
        self,
        module: torch.nn.Module,
        optimizers: Mapping[str, Any],
        generator: torch.Generator,
        max_epochs: int,
        distributed=None,
        noise_generator: torch.Generator | None = None,
    ) -> LoopState | None:
        """Load the checkpoint into ``module``, ``optimizers`` and the generators; None if there is none.

        In a distributed run each rank gets back its own generator states (and ``noise_generator``'s)
        when the checkpoint was written by as many ranks; otherwise see ``restore_rng_state``.
        """
        state = load_checkpoint(self.directory, self.fingerprint)
        if state is None:
            return None
        path = checkpoint_path(self.directory)
        if state["epoch"] > max_epochs:
            raise CheckpointError(
                f"{path} holds {state['epoch']} trained epochs, more than max_epochs={max_epochs}. "
                f"Pass max_epochs >= {state['epoch']}, delete {path}, or pass another checkpoint_dir."
            )
        try:
            device = _device_of(module)
            module.load_state_dict(state["module"])
            if set(state["optimizers"]) != set(optimizers):
                raise ValueError(f"optimisers {sorted(state['optimizers'])}, expected {sorted(optimizers)}")
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(state["optimizers"][name])
            restore_rng_state(state["rng"], device, generator, distributed, noise_generator)
            stopping = state["early_stopping"]
            best_state = stopping["best_state"]
            return LoopState(
                epoch=int(state["epoch"]),
                stopped=bool(state["stopped"]),
                global_step=int(state["global_step"]),
                history=state["history"],
                best=float(stopping["best"]),
                epochs_without_improvement=int(stopping["epochs_without_improvement"]),
                best_state=None if best_state is None else {k: v.to(device) for k, v in best_state.items()},
            )
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"{path} matches this run but its state cannot be restored ({error!r}). "
                f"Delete {path} to start from scratch, or pass another checkpoint_dir."
            ) from None

    def save(
        self,
        module: torch.nn.Module,
        optimizers: Mapping[str, Any],
        generator: torch.Generator,
        loop: LoopState,
        distributed=None,
        noise_generator: torch.Generator | None = None,
    ) -> None:
        """Write everything the epoch after ``loop.epoch`` depends on.

        In a distributed run every rank must call this: the ranks' own generator states are
        gathered, rank 0 writes, and all wait until the file is in place (so a following ``fit`` on
        any rank reads this epoch's checkpoint).
        """
        rng = rng_state(_device_of(module), generator)
        if distributed is not None:
            own = {
                "torch": rng["torch"],
                "cuda": rng["cuda"],
                "noise": None if noise_generator is None else noise_generator.get_state(),
            }
            rng["ranks"] = distributed.gather_objects(own)
        if is_checkpoint_writer():
            best_state = loop.best_state
            save_checkpoint(
                self.directory,
                {
                    "fingerprint": self.fingerprint,
                    "epoch": loop.epoch,
                    "stopped": loop.stopped,
                    "global_step": loop.global_step,
                    # numbers as Python floats and ints: a NumPy scalar would not pass weights_only
                    "history": {k: [_plain_number(v) for v in values] for k, values in loop.history.items()},
                    "early_stopping": {
                        "best": float(loop.best),
                        "epochs_without_improvement": int(loop.epochs_without_improvement),
                        "best_state": None if best_state is None else {k: v.cpu() for k, v in best_state.items()},
                    },
                    "module": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                    "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                    "rng": rng,
                },
            )
        if distributed is not None:
            distributed.barrier()


def _plain_number(value):
    """A NumPy or 0-d tensor number as the Python number it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic | torch.Tensor) else value


def _device_of(module: torch.nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), torch.empty(0))
    return tensor.device
