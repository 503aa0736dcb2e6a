"""What every model class shares, cell or image: seed, hyperparameters, history, save/load, repr.

A model class pairs a pure-torch :class:`~sclatent.contracts.Module` (the maths) with what it is
trained on, and calls :func:`sclatent.train.fit` to train it; it owns no training loop. Two thin
subclasses add the data side: :class:`sclatent.model.BaseModel` (AnnData, a registry) and
:class:`sclatent.images.ArrayModel` (arrays of a fixed item shape). A concrete model declares
``module_class`` and ``hyperparameters_class`` (:mod:`sclatent.hyperparameters`) and implements
``Model._module_kwargs()`` (what the module needs besides the hyperparameters).

Construction and loading are one path: ``Model.__init__`` and ``Model._load`` both set the
data context, then ``Model._init_state`` (validated hyperparameters, history, flags), then
build the module; loading then puts the saved weights in.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ._persistence import read_model_folder, restore_state_dict, write_model_folder
from ._version import __version__
from .contracts import Module, TrainingData
from .data.loader import resolve_device
from .hyperparameters import Hyperparameters, describe_hyperparameters
from .train import TrainingPlan, fit


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch's global random generators seeded, restoring their states afterwards.

    The one way a model method makes its random draws reproducible (posterior samples, importance
    weights, generated items): the draws inside come from torch's global generator (and that of a
    CUDA ``device``) seeded with ``seed``, and the caller's own random stream is untouched. With
    ``seed=None`` nothing is seeded or restored.
    """
    if seed is None:
        yield
        return
    devices = [torch.device(device)] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Model:
    """Root of every model class: seed, hyperparameters, history, ``is_trained``, save/load, repr.

    Attributes
    ----------
    module
        The pure-torch module (:class:`~sclatent.contracts.Module`).
    hyperparameters
        The validated hyperparameters as a plain dict (saved as JSON).
    seed
        Seed of the initial weights and the default seed of ``train``.
    history
        Per-epoch training records (``train_loss``, ``validation_*``, ...), over every ``train`` call.
    is_trained
        Whether ``train`` has run (or a trained model was loaded).
    """

    module_class: ClassVar[type[Module]]
    hyperparameters_class: ClassVar[type[Hyperparameters]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "hyperparameters_class" in cls.__dict__:
            describe_hyperparameters(cls, cls.hyperparameters_class)

    def __init__(self, *, seed: int = 0, **hyperparameters: Any) -> None:
        self._init_state(seed, hyperparameters)
        torch.manual_seed(self.seed)
        self.module = self.module_class(**self._module_kwargs())
        self.module.eval()

    def _init_state(
        self,
        seed: int,
        hyperparameters: dict[str, Any],
        history: dict[str, list[float]] | None = None,
        is_trained: bool = False,
    ) -> None:
        """What construction and loading share, after the data context is set."""
        self.seed = int(seed)
        self.hyperparameters = self.hyperparameters_class.from_dict(hyperparameters).to_dict()
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self.is_trained = bool(is_trained)
        self._check_hyperparameters()

    def _check_hyperparameters(self) -> None:
        """Checks of the hyperparameters against the data (e.g. labels registered); none by default."""

    def _module_kwargs(self) -> dict[str, Any]:  # pragma: no cover - every concrete model implements it
        """The module's constructor arguments: its data-derived sizes and the module hyperparameters."""
        raise NotImplementedError

    @property
    def hparams(self) -> Hyperparameters:
        """The hyperparameters as their typed dataclass."""
        return self.hyperparameters_class.from_dict(self.hyperparameters)

    def _module_hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters the module takes (model-only settings left out)."""
        return self.hparams.to_dict(module_only=True)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ----------------------------------------------------------------- training

    def _fit(
        self,
        data: TrainingData,
        train_cells: np.ndarray,
        validation_cells: np.ndarray,
        plan: TrainingPlan,
        seed: int | None,
        progress_bar: bool,
        history: dict[str, list[float]] | None = None,
        **fit_options: Any,
    ) -> None:
        """Train through :func:`sclatent.train.fit` and extend the history (``history``: the one to extend,
        default ``self.history``; epochs continue from its last)."""
        run = fit(
            self.module,
            data,
            train_cells,
            validation_cells,
            plan,
            seed=self.seed if seed is None else seed,
            progress_bar=progress_bar,
            **fit_options,
        )
        self.history = self.history if history is None else history
        offset = self.history["epoch"][-1] if self.history.get("epoch") else 0
        for key, values in run.items():
            self.history.setdefault(key, []).extend([v + offset for v in values] if key == "epoch" else values)
        self.is_trained = True

    # ----------------------------------------------------------------- persistence

    def _metadata(self) -> dict[str, Any]:
        """What the subclass saves about its data (registry, item shape, split); JSON values."""
        return {}

    def _set_context(self, metadata: dict[str, Any], **context: Any) -> None:  # pragma: no cover - abstract
        """Restore the data side of a saved model (the subclass's part of :meth:`_load`)."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``model.pt`` (the module's state dict) and ``metadata.json`` (settings, history, data description).

        Parameters
        ----------
        directory
            Folder to write (created; must be empty unless ``overwrite``).
        overwrite
            Replace the files of an existing model folder.

        Returns
        -------
        pathlib.Path
            The folder.
        """
        metadata = {
            "sclatent_version": __version__,
            "model_class": type(self).__name__,
            "hyperparameters": self.hyperparameters,
            "seed": self.seed,
            "history": self.history,
            "is_trained": self.is_trained,
            **self._metadata(),
        }
        return write_model_folder(directory, self.module.state_dict(), metadata, overwrite=overwrite)

    @classmethod
    def _load(cls, directory: str | os.PathLike, accelerator: str, **context: Any) -> Model:
        """The one load path: read the folder, restore the data side, the state, the module, the weights."""
        state, metadata = read_model_folder(directory, cls.__name__)
        model = cls.__new__(cls)
        model._set_context(metadata, **context)
        model._init_state(metadata["seed"], metadata["hyperparameters"], metadata["history"], metadata["is_trained"])
        model.module = cls.module_class(**model._module_kwargs())
        restore_state_dict(model.module, state, directory)
        model.module.to(resolve_device(accelerator))
        model.module.eval()
        return model

    # ----------------------------------------------------------------- display

    def _repr_header(self) -> str:
        """The first line's arguments besides the hyperparameters (e.g. the item shape)."""
        return ""

    def _repr_data(self) -> list[str]:
        """Lines describing the data, shown after the first line."""
        return []

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.module.parameters())
        settings = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        arguments = ", ".join(part for part in (self._repr_header(), settings) if part)
        status = "trained" if self.is_trained else "not trained"
        if self.history.get("epoch"):
            status += f" for {self.history['epoch'][-1]} epochs"
            if self.history.get("validation_elbo"):
                status += f", held-out ELBO {self.history['validation_elbo'][-1]:.2f} nats/cell"
        lines = [f"{type(self).__name__}({arguments})", *self._repr_data()]
        lines.append(f"  module: {type(self.module).__name__} with {n_params:,} parameters on {self.device}")
        lines.append(f"  status: {status}")
        return "\n".join(lines)
