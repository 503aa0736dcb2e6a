"""What every image/vector model shares: input checks, training through the one trainer, save/load.

A model class pairs its hyperparameters with a pure-torch module (the maths, in
:mod:`sclatent.images.modules`) and calls :func:`sclatent.train.fit` to train it, exactly like the
AnnData models; only the data side differs (:class:`sclatent.images.data.ArrayData` instead of a
registered AnnData).

Inputs are float arrays ``(N, *input_shape)``: images ``(N, H, W)`` or ``(N, C, H, W)``,
vectors ``(N, D)``. An :class:`sclatent.datasets.ImageSet` is accepted wherever images are, and
is read as its intensities in ``[0, 1]`` (and its labels).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from ..base import Model
from ..data.loader import resolve_device
from ..datasets import ImageSet
from ..train import TrainingPlan
from .data import ArrayBatch, ArrayData


class ArrayModel(Model):
    """Base of the image/vector models: :class:`sclatent.base.Model` plus an item shape.

    A subclass sets ``module_class`` and ``hyperparameters_class``; the module is built from
    ``input_shape`` and the module hyperparameters (override ``_module_kwargs()`` for more).
    :attr:`input_range` (default ``(0, 1)``) is what ``_check_inputs()`` enforces (``None``:
    any finite value) and :attr:`needs_labels` whether ``train`` needs labels; a subclass whose
    answer depends on its hyperparameters overrides them as properties.

    Parameters
    ----------
    input_shape
        Shape of one item, e.g. ``(28, 28)``, ``(1, 28, 28)`` or ``(2,)``.
    seed
        Seeds the initial weights and, by default, training.
    **hyperparameters
        The family's hyperparameters (validated, stored, saved and shown by ``repr``).
    """

    #: The range every input value must lie in (checked on input); None: any finite value.
    input_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)
    #: Does ``train`` need labels (classifiers, class-conditional generators)?
    needs_labels: ClassVar[bool] = False

    def __init__(self, input_shape: tuple[int, ...], *, seed: int = 0, **hyperparameters: Any) -> None:
        self.input_shape = tuple(int(s) for s in input_shape)
        super().__init__(seed=seed, **hyperparameters)

    def _module_kwargs(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape, **self._module_hyperparameters()}

    def _metadata(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape)}

    def _set_context(self, metadata: dict[str, Any]) -> None:
        self.input_shape = tuple(int(s) for s in metadata["input_shape"])

    @classmethod
    def load(cls, directory: str | os.PathLike, accelerator: str = "cpu") -> ArrayModel:
        """Load a model written by :meth:`save` (weights read with ``weights_only=True``).

        Raises
        ------
        sclatent.ModelLoadError
            A damaged folder (unreadable ``metadata.json``, truncated or corrupted ``model.pt``).
        """
        return cls._load(directory, accelerator)

    def _repr_header(self) -> str:
        return f"input_shape={self.input_shape}"

    # ----------------------------------------------------------------- inputs

    def _check_inputs(self, x, y=None, require_labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``(x as float32 (N, *input_shape), y as int64 (N,) or None)``, or a clear error.

        Accepts an :class:`ImageSet` (its ``unit()`` intensities and labels), numpy arrays and
        tensors. Items shaped ``(H, W)`` are given a channel axis when the model expects
        ``(1, H, W)``, and flattened when it expects vectors of ``H * W``.
        """
        if isinstance(x, ImageSet):
            x, y = x.unit(), x.labels if y is None else y
        x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
        if x.ndim < 2:
            raise ValueError(
                f"expected an array of items (N, {', '.join(map(str, self.input_shape))}), got shape {x.shape}."
            )
        if x.shape[1:] != self.input_shape:
            if int(np.prod(x.shape[1:])) == int(np.prod(self.input_shape)):
                x = x.reshape(len(x), *self.input_shape)
            else:
                raise ValueError(
                    f"items have shape {x.shape[1:]}, but this model was built for {self.input_shape}; "
                    f"build a model with input_shape={x.shape[1:]} or reshape the data."
                )
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise ValueError("the inputs contain NaN or infinite values; remove or impute them first.")
        if self.input_range is not None:
            low, high = self.input_range
            if x.size and (x.min() < low or x.max() > high):
                raise ValueError(
                    f"{type(self).__name__} expects intensities in [{low}, {high}], got values in "
                    f"[{x.min():.3g}, {x.max():.3g}]; rescale (e.g. images / 255 for 8-bit images)."
                )
        if y is not None:
            y = np.asarray(y)
            if y.shape != (len(x),):
                raise ValueError(f"labels must have shape ({len(x)},), got {y.shape}.")
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"labels must be integer classes, got dtype {y.dtype}.")
            y = y.astype(np.int64)
        elif require_labels:
            raise ValueError(f"{type(self).__name__} needs labels: pass y=... (or an ImageSet).")
        return x, y

    # ----------------------------------------------------------------- training

    def train(
        self,
        x,
        y=None,
        max_epochs: int = 10,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        validation: tuple | ImageSet | np.ndarray | None = None,
        accelerator: str = "auto",
        early_stopping: bool = False,
        patience: int = 10,
        monitor: str | None = None,
        restore_best: bool = False,
        kl_warmup_epochs: int = 0,
        seed: int | None = None,
        progress_bar: bool = True,
    ) -> ArrayModel:
        """Fit the model with Adam through :func:`sclatent.train.fit`.

        Parameters
        ----------
        x, y
            Training items ``(N, *input_shape)`` (or an :class:`ImageSet`) and optional labels ``(N,)``.
        max_epochs, batch_size, lr, weight_decay
            Optimisation settings (Adam with ``eps=1e-8``).
        validation
            Held-out items (an array, an ``(x, y)`` tuple or an :class:`ImageSet`), evaluated each
            epoch into ``history["validation_*"]``.
        accelerator
            ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``.
        early_stopping, patience, monitor, restore_best
            As in :class:`sclatent.train.TrainingPlan`.
        kl_warmup_epochs
            KL warm-up of variational models (0: none).
        seed
            Minibatch order and sampling; default the model's seed.
        progress_bar
            Show a tqdm bar.

        Returns
        -------
        ArrayModel
            The model, trained in place; per-epoch history in ``model.history``.
        """
        x, y = self._check_inputs(x, y, require_labels=self.needs_labels)
        n_train = len(x)
        if n_train < 2:
            raise ValueError("need at least two training items.")
        if validation is not None:
            vx, vy = validation if isinstance(validation, tuple) else (validation, None)
            vx, vy = self._check_inputs(vx, vy, require_labels=self.needs_labels)
            x = np.concatenate([x, vx])
            y = None if y is None or vy is None else np.concatenate([y, vy])
        if int(max_epochs) < 1:
            raise ValueError("max_epochs must be >= 1.")
        device = resolve_device(accelerator)
        self.module.to(device)
        data = ArrayData(x, y, device)
        plan = TrainingPlan(
            max_epochs=int(max_epochs),
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            eps=1e-8,
            kl_warmup_epochs=kl_warmup_epochs,
            early_stopping=early_stopping,
            patience=patience,
            monitor=monitor,
            restore_best=restore_best,
        )
        self._before_training(data, np.arange(n_train))
        self._fit(
            data,
            np.arange(n_train),
            np.arange(n_train, len(x)),
            plan,
            seed=seed,
            progress_bar=progress_bar,
            description=f"Training {type(self).__name__}",
        )
        return self

    def _before_training(self, data: ArrayData, train_indices: np.ndarray) -> None:
        """Hook for data-dependent initialisation (e.g. actnorm, input means); default: nothing."""

    # ----------------------------------------------------------------- inference

    @torch.no_grad()
    def _map(self, function: Callable[[ArrayBatch], torch.Tensor], x, batch_size: int = 1024) -> np.ndarray:
        """``function`` applied to eval-mode minibatches of ``x``, results concatenated on the host."""
        x, _ = self._check_inputs(x)
        self.module.eval()
        data = ArrayData(x, None, self.device)
        outputs = [function(batch).detach().cpu() for batch in data.iterate(np.arange(len(x)), batch_size)]
        return torch.cat(outputs).numpy() if outputs else np.zeros((0,), dtype=np.float32)
