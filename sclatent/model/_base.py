"""What every AnnData-facing model shares: registration, data access, save/load, repr.

A model class pairs a registry (what the AnnData looks like) with a pure-torch module (the maths)
and calls :func:`sclatent.train.fit` to train it. It owns no training loop itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch

from .. import __version__, distributed
from .._persistence import read_model_folder, write_model_folder
from ..checkpoint import has_checkpoint, text_digest
from ..data import CellData, Registry, SetupError, get_registry, resolve_device, setup_anndata
from ..data.ondisk import make_cell_data
from ..train import TrainingPlan, fit, split_cells


def default_max_epochs(n_cells: int) -> int:
    """scVI's heuristic: 400 epochs up to 20k cells, fewer for larger data (at least 10)."""
    return int(max(10, min(400, round(20000 / max(1, n_cells) * 400))))


class BaseModel:
    """Base of the AnnData-facing models.

    Subclasses set ``module_class`` and ``name`` and implement :meth:`_module_kwargs` mapping the
    registry and the user's hyperparameters to the module's constructor arguments.
    """

    module_class: type[torch.nn.Module]
    name: str = "model"

    def __init__(self, adata: ad.AnnData, seed: int = 0, **hyperparameters: Any) -> None:
        self.registry: Registry = get_registry(adata)
        self.adata = adata
        self.hyperparameters = dict(hyperparameters)
        self.seed = seed
        torch.manual_seed(seed)
        self.module = self.module_class(**self._module_kwargs(adata))
        self.module.eval()
        self.history: dict[str, list[float]] = {}
        self.is_trained = False
        self.train_indices = np.zeros(0, dtype=np.int64)
        self.validation_indices = np.zeros(0, dtype=np.int64)
        self._data_cache: tuple[torch.device, CellData] | None = None
        self._adata_validated = True  # setup_anndata has just checked it

    # ----------------------------------------------------------------- construction

    @classmethod
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        allow_non_integer: bool = False,
    ) -> Registry:
        """Validate ``adata`` and register where the counts and covariates are.

        See :func:`sclatent.data.setup_anndata`; the only change made to ``adata`` is the
        registry stored (as JSON) in ``adata.uns["_sclatent_registry"]``.
        """
        return setup_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            allow_non_integer=allow_non_integer,
        )

    def _module_kwargs(self, adata: ad.AnnData | None) -> dict[str, Any]:  # pragma: no cover - abstract
        """Constructor arguments of the module; ``adata`` is None when loading saved weights."""
        raise NotImplementedError

    # ----------------------------------------------------------------- data access

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def var_names(self) -> list[str]:
        """Genes the model was trained on, in order."""
        return list(self.registry.var_names)

    def _data(self, adata: ad.AnnData | None = None, on_device: bool | None = None) -> CellData:
        """Tensors of ``adata`` (default: the training AnnData), validated against the registry."""
        if adata is None:
            if self.adata is None:
                raise SetupError("This model was loaded without an AnnData; pass adata=... to this method.")
            adata = self.adata
        if adata is self.adata:
            # the training data were validated by setup_anndata; cache their tensors per device
            if self._data_cache is None or self._data_cache[0] != self.device or on_device is not None:
                # in memory, or streamed from disk when a backed matrix is too big (logged)
                validate = not self._adata_validated
                data = make_cell_data(adata, self.registry, self.device, on_device, validate=validate)
                self._data_cache, self._adata_validated = (self.device, data), True
            return self._data_cache[1]
        if not isinstance(adata, ad.AnnData):
            raise SetupError(f"Expected an AnnData, got {type(adata).__name__}.")
        return make_cell_data(adata, self.registry, self.device, validate=True)

    @staticmethod
    def _indices(data: CellData, indices) -> np.ndarray:
        if indices is None:
            return np.arange(data.n_cells)
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= data.n_cells):
            raise IndexError(f"indices must lie in [0, {data.n_cells}).")
        return indices.astype(np.int64)

    def _training_data(self, data: CellData, seed: int) -> CellData:
        """What the trainer iterates over: ``data`` itself unless a subclass wraps it.

        Called by :meth:`train` after the split (``self.train_indices`` is set), e.g. to attach
        per-minibatch inputs such as kNN neighbours (:class:`sclatent.data.neighbours.NeighbourData`).
        The wrapper needs only ``CellData.iterate``.
        """
        return data

    def _batches(self, adata: ad.AnnData | None, indices, batch_size: int):
        """Eval-mode minibatches over ``indices`` of ``adata`` (all cells by default), in order."""
        data = self._data(adata)
        self.module.eval()
        return data.iterate(self._indices(data, indices), batch_size)

    # ----------------------------------------------------------------- training

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        accelerator: str = "auto",
        train_size: float = 0.9,
        early_stopping: bool = False,
        patience: int = 45,
        kl_warmup_epochs: int | None = None,
        monitor: str = "elbo",
        restore_best: bool = False,
        seed: int | None = None,
        progress_bar: bool = True,
        data_on_device: bool | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> BaseModel:
        """Fit the model on the registered AnnData.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default ``min(400, 20000 / n_cells * 400)``.
        batch_size
            Cells per minibatch (per process under torchrun: see below).
        lr, weight_decay
            Adam settings.
        accelerator
            ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``. Under torchrun each process
            takes ``cuda:LOCAL_RANK`` (``"auto"`` with CUDA, or ``"cuda"``) or the CPU.
        train_size
            Fraction of (non-empty) cells used for training; the rest is held out, monitored each
            epoch, and available as ``validation_indices`` for held-out likelihoods.
        early_stopping, patience
            Stop when the held-out ELBO (or ``monitor``) has not improved for ``patience`` epochs.
        monitor, restore_best
            What early stopping watches (``"elbo"`` or a loss term the model reports), and whether
            to end with the best epoch's parameters.
        kl_warmup_epochs
            Epochs over which the KL weight rises to 1; default ``min(400, max_epochs // 3)``.
        seed
            Seed for the split, minibatch order and sampling; default the model's seed.
        progress_bar
            Show a tqdm bar.
        data_on_device
            Keep the count matrix on the device (default: when it fits).
        checkpoint_dir
            Folder of a crash-safe checkpoint, replaced after every epoch (:mod:`sclatent.checkpoint`).
            If it holds a checkpoint of the same run (same model class, genes, hyperparameters,
            training settings except ``max_epochs``, seed and split), training resumes after its
            last epoch and ends with the parameters of an uninterrupted run (bit for bit in one
            process, and under torchrun with the same number of processes; only rank 0 writes);
            ``model.history`` then holds the whole run. A checkpoint of another run, or an
            unreadable one, raises :class:`sclatent.checkpoint.CheckpointError` (a ``ValueError``).

        Returns
        -------
        The model (trained in place), with the per-epoch history in ``model.history``.

        Notes
        -----
        Started by ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` > 1 in the environment), every
        process runs the same ``train`` call and they train one model together (data parallel, see
        :mod:`sclatent.distributed`): gloo on CPU, nccl with one GPU per process. Each optimiser
        step is taken on a global minibatch of ``N * batch_size`` cells, each process computing the
        gradient of its ``batch_size`` cells, so the *effective batch size is N x batch_size* and an
        epoch has N times fewer steps; ``lr`` is used as given (not scaled with N): to reproduce a
        one-process run with ``batch_size=B``, pass ``batch_size=B // N``. The gradients are
        combined by :class:`torch.nn.parallel.DistributedDataParallel` for one-objective models
        (reduced in buckets during the backward pass) and by one all-reduce per group step for
        adversarial ones (their parameter groups are frozen in turn, which DDP does not fit).
        BatchNorm normalises with each process's own cells (its running statistics are averaged
        over the processes once per epoch). Every process ends with the same parameters and
        history; only rank 0 should write files.
        """
        # under torchrun: join the process group, one device per process (else one process, as given)
        launch = distributed.context(accelerator)
        self.module.to(launch.device)
        data = self._data(on_device=data_on_device)
        # a backed matrix is loaded or streamed (logged at INFO); the progress bar says which
        storage = getattr(data, "storage_note", None)
        seed = self.seed if seed is None else seed
        cells = data.nonempty_cells
        if len(cells) < 3:
            raise SetupError(
                f"Need at least three cells with counts to train (found {len(cells)}): BatchNorm needs two "
                "cells per minibatch."
            )
        self.train_indices, self.validation_indices = split_cells(cells, train_size, seed)
        data = self._training_data(data, seed)
        max_epochs = default_max_epochs(data.n_cells) if max_epochs is None else int(max_epochs)
        if max_epochs < 1:
            raise ValueError("max_epochs must be >= 1.")
        if kl_warmup_epochs is None:
            kl_warmup_epochs = min(400, max_epochs // 3)
        plan = TrainingPlan(
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            kl_warmup_epochs=kl_warmup_epochs,
            early_stopping=early_stopping,
            patience=patience,
            monitor=monitor,
            restore_best=restore_best,
        )
        base_history = self.history if checkpoint_dir is None else self._history_before_run(checkpoint_dir)
        history = fit(
            self.module,
            data,
            self.train_indices,
            self.validation_indices,
            plan,
            seed=seed,
            progress_bar=progress_bar,
            description=f"Training {type(self).__name__}" + (f" ({storage})" if storage else ""),
            distributed=launch,
            checkpoint_dir=checkpoint_dir,
            checkpoint_identity=self._checkpoint_identity(),
        )
        self.history = base_history
        for key, values in history.items():
            if key == "epoch" and self.history.get("epoch"):
                offset = self.history["epoch"][-1]
                values = [v + offset for v in values]
            self.history.setdefault(key, []).extend(values)
        self.is_trained = True
        return self

    def _checkpoint_identity(self) -> dict[str, str]:
        """Fields beyond the module's shapes that a resumed checkpoint must share with this model."""
        return {
            "model_class": type(self).__name__,
            "genes": f"{self.registry.n_genes} genes, digest {text_digest(self.var_names)}",
            "hyperparameters": json.dumps(self.hyperparameters, sort_keys=True, default=str),
        }

    def _history_before_run(self, checkpoint_dir: str | os.PathLike) -> dict[str, list[float]]:
        """The history that :func:`fit`'s history of a checkpointed run (the whole run) extends.

        Usually ``self.history``. When this same object already trained part of the run in
        ``checkpoint_dir`` (an earlier ``train`` call that stopped, e.g. with fewer ``max_epochs``),
        the history as it was before that call: the resumed run reports those epochs again. (A
        new process resuming a crashed run starts from an empty history and gets the whole run.)
        """
        runs = self.__dict__.setdefault("_checkpoint_runs", {})
        key = os.path.abspath(checkpoint_dir)
        if key not in runs or not has_checkpoint(checkpoint_dir):
            runs[key] = {k: list(v) for k, v in self.history.items()}
        return {k: list(v) for k, v in runs[key].items()}

    # ----------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``model.pt`` (state dict) and ``metadata.json`` (registry, settings, history).

        The AnnData itself is not saved; pass it to :meth:`load`.
        """
        metadata = {
            "sclatent_version": __version__,
            "model_class": type(self).__name__,
            "hyperparameters": self.hyperparameters,
            "seed": self.seed,
            "registry": json.loads(self.registry.to_json()),
            "history": self.history,
            "is_trained": self.is_trained,
            "train_indices": self.train_indices.tolist(),
            "validation_indices": self.validation_indices.tolist(),
        }
        return write_model_folder(directory, self.module.state_dict(), metadata, overwrite=overwrite)

    @classmethod
    def load(cls, directory: str | os.PathLike, adata: ad.AnnData | None = None, accelerator: str = "cpu") -> BaseModel:
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        directory
            The folder written by :meth:`save`.
        adata
            AnnData to attach; its genes (and batch categories) must match the saved registry. If it
            was not set up, the saved registry is applied to it. Without it, methods need an
            ``adata`` argument.
        accelerator
            Device to load onto.
        """
        state, metadata = read_model_folder(directory, cls.__name__)
        registry = Registry.from_json(json.dumps(metadata["registry"]))
        if adata is not None:
            _attach_registry(adata, registry)
        model = cls.__new__(cls)
        model.registry = registry
        model.adata = adata
        model.hyperparameters = metadata["hyperparameters"]
        model.seed = metadata["seed"]
        model.module = cls.module_class(**model._module_kwargs(adata))
        model.module.load_state_dict(state)
        model.module.to(resolve_device(accelerator))
        model.module.eval()
        model.history = {k: list(v) for k, v in metadata["history"].items()}
        model.is_trained = metadata["is_trained"]
        model.train_indices = np.asarray(metadata["train_indices"], dtype=np.int64)
        model.validation_indices = np.asarray(metadata["validation_indices"], dtype=np.int64)
        model._data_cache = None
        model._adata_validated = False
        return model

    def __repr__(self) -> str:
        n_params = sum(p.numel() for p in self.module.parameters())
        settings = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        status = "trained" if self.is_trained else "not trained"
        if self.history.get("epoch"):
            status += f" for {self.history['epoch'][-1]} epochs"
            if self.history.get("validation_elbo"):
                status += f", held-out ELBO {self.history['validation_elbo'][-1]:.2f} nats/cell"
        return (
            f"{type(self).__name__}({settings})\n"
            f"  data: {self.registry.summary()}\n"
            f"  module: {type(self.module).__name__} with {n_params:,} parameters on {self.device}\n"
            f"  status: {status}"
        )


def _attach_registry(adata: ad.AnnData, registry: Registry) -> None:
    """Check a loaded model's AnnData against the saved registry."""
    from ..data.registry import REGISTRY_KEY, gene_order_for_query

    gene_order_for_query(adata, registry)  # raises on missing genes
    if REGISTRY_KEY not in adata.uns:
        adata.uns[REGISTRY_KEY] = registry.to_json()
