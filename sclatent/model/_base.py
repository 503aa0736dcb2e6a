"""What every AnnData-facing model shares: registration, data access, training, save/load.

:class:`BaseModel` adds the AnnData side to :class:`sclatent.base.Model` (seed, hyperparameters,
history, one save/load path, repr): the registry ``setup_anndata`` stored, the cells' tensors
(:mod:`sclatent.data`), the training/validation split, checkpoints and torchrun. A model class
pairs it with a pure-torch module and calls :func:`sclatent.train.fit` through
:meth:`Model._fit`; it owns no training loop.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd

from .. import distributed
from ..base import Model
from ..checkpoint import has_checkpoint, text_digest
from ..contracts import TrainingData
from ..data import CellData, CountSource, Registry, SetupError, count_source, get_registry, setup_anndata
from ..data.ondisk import make_cell_data
from ..data.registry import REGISTRY_KEY, gene_order_for_query
from ..train import TrainingPlan, split_cells
from ._query import MAX_MISSING_FRACTION, QueryFreezing, load_query_model, prepare_query_anndata

#: Adam's L2 weight decay of ``train`` for every model but a frozen query model (which trains with 0).
DEFAULT_WEIGHT_DECAY = 1e-6
#: ``train``'s default schedule (the study behind it: ``benchmarks/bench_time_to_quality.py``):
#: minibatches of DEFAULT_BATCH_SIZE cells, Adam at DEFAULT_LR, the KL weight rising over at most
#: DEFAULT_KL_WARMUP_EPOCHS epochs to DEFAULT_MAX_KL_WEIGHT, early stopping on the held-out cells after
#: DEFAULT_PATIENCE epochs without improvement, the best epoch's parameters restored. The KL weight of 2
#: (``benchmarks/bench_clustering.py``) raised held-out log p(x) and Leiden scores over the plain ELBO.
DEFAULT_BATCH_SIZE = 256
DEFAULT_LR = 4e-3
DEFAULT_KL_WARMUP_EPOCHS = 20
DEFAULT_MAX_KL_WEIGHT = 2.0
DEFAULT_PATIENCE = 20


def default_max_epochs(n_cells: int) -> int:
    """scVI's heuristic: 400 epochs up to 20k cells, fewer for larger data (at least 10)."""
    return int(max(10, min(400, round(20000 / max(1, n_cells) * 400))))


class BaseModel(Model):
    """Base of the AnnData-facing models.

    A subclass sets ``module_class``, ``hyperparameters_class`` and ``name`` (the suffix of
    ``obsm["X_sclatent_<name>"]``) and implements ``_module_kwargs()``, the module's
    constructor arguments from the registry (``self.adata`` is None when loading saved weights).

    Attributes
    ----------
    adata
        The AnnData the model was set up with (None for a model loaded without one).
    registry
        What ``setup_anndata`` recorded about it (:class:`sclatent.data.Registry`).
    train_indices, validation_indices
        The cells of the last ``train`` call's split (validation: for held-out likelihoods).
    """

    name: ClassVar[str] = "model"
    #: The training-time freezing of a query model made by :meth:`load_query_data` with ``freeze=True``
    #: (what trains; :class:`~sclatent.model.QueryFreezing`); None for every other model, a saved
    #: query model loaded again included (it trains every parameter, like any model of its class).
    query_freezing: QueryFreezing | None = None

    def __init__(self, adata: ad.AnnData, *, seed: int = 0, **hyperparameters: Any) -> None:
        self._attach(adata, get_registry(adata), validated=True)  # setup_anndata has just checked it
        self.train_indices = np.zeros(0, dtype=np.int64)
        self.validation_indices = np.zeros(0, dtype=np.int64)
        super().__init__(seed=seed, **hyperparameters)

    def _attach(self, adata: ad.AnnData | None, registry: Registry, validated: bool) -> None:
        self.registry: Registry = registry
        self.adata = adata
        self._data_cache: tuple = None
        self._adata_validated = validated
        self._source: CountSource | None = None

    def _count_source(self) -> CountSource:
        """Where the model's AnnData keeps its counts, located once (:func:`sclatent.data.count_source`)."""
        if self._source is None:
            self._source = count_source(self.adata, self.registry)
        return self._source

    # ----------------------------------------------------------------- construction

    #: Validate an AnnData and register where its counts and covariates are: :func:`sclatent.data.setup_anndata`
    #: (the only change made to the AnnData is the registry stored as JSON in ``adata.uns``).
    setup_anndata = staticmethod(setup_anndata)

    # ----------------------------------------------------------------- data access

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
                source = self._count_source()
                data = make_cell_data(adata, self.registry, self.device, on_device, validate=validate, source=source)
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

    def _split_cells(
        self, data: CellData, cells: np.ndarray, train_size: float, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation cells of :meth:`train` (:func:`sclatent.train.split_cells`); a
        subclass may split per group of cells (the semi-supervised VAE: per class)."""
        return split_cells(cells, train_size, seed)

    def _training_data(self, data: CellData, seed: int) -> TrainingData:
        """What the trainer iterates over: ``data`` itself unless a subclass wraps it.

        Called by :meth:`train` after the split (``self.train_indices`` is set), e.g. to attach
        per-minibatch inputs such as kNN neighbours (:func:`sclatent.data.neighbours.neighbour_data`).
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
        batch_size: int = DEFAULT_BATCH_SIZE,
        lr: float = DEFAULT_LR,
        weight_decay: float | None = None,
        accelerator: str = "auto",
        train_size: float = 0.9,
        early_stopping: bool = True,
        patience: int = DEFAULT_PATIENCE,
        kl_warmup_epochs: int | None = None,
        max_kl_weight: float = DEFAULT_MAX_KL_WEIGHT,
        monitor: str | None = None,
        restore_best: bool | None = None,
        check_val_every_n_epoch: int | None = None,
        seed: int | None = None,
        progress_bar: bool = True,
        data_on_device: bool | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> BaseModel:
        """Fit the model on the registered AnnData.

        With no arguments: at most ``min(400, 20000 / n_cells * 400)`` epochs (scVI's rule), 10 % of
        the cells held out, and training stops once the model's monitored quantity on them (the
        ELBO for the VAEs) has not improved for 20 epochs, ending with the best epoch's parameters;
        minibatches of 256 cells, Adam at learning rate 4e-3, the KL weight rising over the first
        20 epochs to 2 (a beta-VAE objective: see ``max_kl_weight``). Measured against scvi-tools'
        defaults (400 epochs, no early stopping) in ``benchmarks/RESULTS.md``: scvi-tools' held-out
        log p(x) reached many times sooner, a better one at the end, where the 400-epoch run
        overfits. ``early_stopping=False`` trains all ``max_epochs``.

        Parameters
        ----------
        max_epochs
            Most passes over the training cells; default ``min(400, 20000 / n_cells * 400)``.
        batch_size
            Cells per minibatch (per process under torchrun: see below).
        lr, weight_decay
            Adam settings; ``weight_decay`` (L2) defaults to 1e-6, and to 0 for a query model made by
            :meth:`load_query_data` with ``freeze=True``, which refuses any other value (the decay
            would move its frozen reference entries; scvi-tools also advises 0 for query training).
        accelerator
            ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``. Under torchrun each process
            takes ``cuda:LOCAL_RANK`` (``"auto"`` with CUDA, or ``"cuda"``) or the CPU.
        train_size
            Fraction of (non-empty) cells used for training; the rest is held out, monitored each
            epoch, and available as ``validation_indices`` for held-out likelihoods. With early
            stopping they also pick the epoch kept, so a likelihood on them is slightly optimistic:
            for an unbiased one, score cells the model never saw (as ``bench_time_to_quality.py`` does).
        early_stopping, patience
            Stop when ``monitor`` has not improved on the held-out cells (on the training cells with
            ``train_size=1``) for ``patience`` epochs.
        monitor, restore_best
            What early stopping watches (``"elbo"``, ``"loss"`` or a term the model reports; default
            the model's own: the ELBO for the VAE), and whether to end with the best epoch's
            parameters (default: with early stopping).
        check_val_every_n_epoch
            Score the held-out cells after every ``n``-th epoch and after the last; default (None)
            every epoch, which early stopping and the history's ``validation_*`` curves use.
            Each scoring is one forward pass over them; unscored epochs hold NaN in the history's
            ``validation_*``. With ``early_stopping=True`` the patience counts validations.
            scvi-tools' name; there None skips validation unless early stopping is on.
        kl_warmup_epochs
            Epochs over which the KL weight rises to ``max_kl_weight``; default ``min(20, max_epochs // 3)``.
        max_kl_weight
            The KL weight after the warm-up. 1 trains on the ELBO (scvi-tools' default); the
            default 2 (a beta-VAE objective) pulls the posteriors harder towards the prior, which
            on the four datasets of ``benchmarks/bench_clustering.py`` raised the held-out log p(x)
            (by 4-7 nats/cell) and the Leiden ARI/NMI over weight 1 (``benchmarks/RESULTS.md``).
            scvi-tools' name: ``plan_kwargs={"max_kl_weight": ...}``. Early stopping, ``get_elbo``
            and ``get_marginal_ll`` still score the model by the ELBO and log p(x) themselves.
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
        BaseModel
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
        combined by :class:`torch.nn.parallel.DistributedDataParallel` for models trained through
        autograd (reduced in buckets during the backward pass), and by one all-reduce of the flat
        gradient per update for the VAE's direct-gradient pass and for adversarial models (their
        parameter groups are frozen in turn, which DDP does not fit): :mod:`sclatent.steps`.
        BatchNorm normalises with each process's own cells (its running statistics are averaged
        over the processes once per epoch). Every process ends with the same parameters and
        history; only rank 0 should write files.
        """
        # checked before anything moves (device, split, process group)
        if not (math.isfinite(max_kl_weight) and max_kl_weight > 0):
            raise ValueError(
                f"max_kl_weight must be a finite number > 0 (got {max_kl_weight!r}); 1 trains on the ELBO."
            )
        check_val_every_n_epoch = 1 if check_val_every_n_epoch is None else int(check_val_every_n_epoch)
        if check_val_every_n_epoch < 1:
            raise ValueError(
                f"check_val_every_n_epoch must be >= 1 (got {check_val_every_n_epoch}); pass max_epochs to score "
                "the held-out cells after the last epoch only."
            )
        if self.query_freezing is not None:  # 0, or refused: L2 decay would move the frozen entries
            weight_decay = self.query_freezing.weight_decay(weight_decay)
        elif weight_decay is None:
            weight_decay = DEFAULT_WEIGHT_DECAY
        # under torchrun: join the process group, one device per process (else one process, as given)
        launch = distributed.context(accelerator)
        self.module.to(launch.device)
        data = self._data(on_device=data_on_device)
        # a backed matrix is loaded or streamed (logged at INFO); the progress bar says which
        storage = data.storage_note
        seed = self.seed if seed is None else seed
        cells = data.nonempty_cells
        if len(cells) < 3:
            raise SetupError(
                f"Need at least three cells with counts to train (found {len(cells)}): BatchNorm needs two "
                "cells per minibatch."
            )
        self.train_indices, self.validation_indices = self._split_cells(data, cells, train_size, seed)
        data = self._training_data(data, seed)
        max_epochs = default_max_epochs(data.n_cells) if max_epochs is None else int(max_epochs)
        if max_epochs < 1:
            raise ValueError("max_epochs must be >= 1.")
        if kl_warmup_epochs is None:
            kl_warmup_epochs = min(DEFAULT_KL_WARMUP_EPOCHS, max_epochs // 3)
        if restore_best is None:
            restore_best = early_stopping
        plan = TrainingPlan(
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            kl_warmup_epochs=kl_warmup_epochs,
            max_kl_weight=float(max_kl_weight),
            early_stopping=early_stopping,
            patience=patience,
            monitor=monitor,
            restore_best=restore_best,
            check_val_every_n_epoch=check_val_every_n_epoch,
        )
        self._fit(
            data,
            self.train_indices,
            self.validation_indices,
            plan,
            seed=seed,
            progress_bar=progress_bar,
            history=None if checkpoint_dir is None else self._history_before_run(checkpoint_dir),
            description=f"Training {type(self).__name__}" + (f" ({storage})" if storage else ""),
            distributed=launch,
            checkpoint_dir=checkpoint_dir,
            checkpoint_identity=self._checkpoint_identity(),
        )
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

    def _metadata(self) -> dict[str, Any]:
        return {
            "registry": json.loads(self.registry.to_json()),
            "train_indices": self.train_indices.tolist(),
            "validation_indices": self.validation_indices.tolist(),
        }

    def _set_context(self, metadata: dict[str, Any], adata: ad.AnnData | None = None) -> None:
        registry = Registry.from_json(json.dumps(metadata["registry"]))
        if adata is not None:
            _attach_registry(adata, registry)
        self._attach(adata, registry, validated=False)
        self.train_indices = np.asarray(metadata["train_indices"], dtype=np.int64)
        self.validation_indices = np.asarray(metadata["validation_indices"], dtype=np.int64)

    @classmethod
    def load(cls, directory: str | os.PathLike, adata: ad.AnnData | None = None, accelerator: str = "cpu") -> BaseModel:
        """Load a model saved with :meth:`save` (weights read with ``weights_only=True``).

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

        Raises
        ------
        sclatent.ModelLoadError
            A damaged folder (unreadable ``metadata.json``, truncated or corrupted ``model.pt``).
        """
        return cls._load(directory, accelerator, adata=adata)

    # ----------------------------------------------------------------- query mapping (scArches)

    @classmethod
    def prepare_query_anndata(
        cls,
        adata: ad.AnnData,
        reference_model: BaseModel | str | os.PathLike,
        return_reference_var_names: bool = False,
        max_missing_fraction: float = MAX_MISSING_FRACTION,
    ) -> ad.AnnData | pd.Index:
        """A copy of the query ``adata`` with the reference model's genes, in its order.

        Genes the reference does not have are dropped; reference genes the query lacks are
        filled with zeros, with a warning that counts them; more than ``max_missing_fraction``
        of them missing is refused. ``X`` and every layer are aligned (sparse stays sparse);
        ``obs``, ``obsm``, ``obsp``, ``uns`` are copied, ``var`` reindexed, ``varm``, ``varp`` and
        ``raw`` dropped. The caller's AnnData is never changed (scvi-tools' ``inplace=True`` is
        not offered for that reason).

        Parameters
        ----------
        adata
            The query: cells x genes counts, any gene order.
        reference_model
            The trained reference model, or the folder it was saved in.
        return_reference_var_names
            Return only the reference's genes (a ``pandas.Index``), to prepare the query by hand.
        max_missing_fraction
            Largest fraction of the reference's genes the query may lack (default 0.2: scvi-tools
            warns below 80 % of the reference's genes; more missing usually means another gene
            naming or panel, and zero-filled genes read as "not expressed" misplace the cells).

        Returns
        -------
        anndata.AnnData or pandas.Index
            The prepared ``(n_query_cells, n_reference_genes)`` AnnData, ready for
            :meth:`load_query_data`; or the reference's genes.

        Raises
        ------
        SetupError
            Repeated gene names, or too many genes missing (the message names the numbers and the fix).
        """
        if isinstance(reference_model, str | os.PathLike):
            reference_model = cls.load(reference_model)
        if not isinstance(reference_model, BaseModel):
            kind = type(reference_model).__name__
            raise TypeError(f"reference_model must be a sclatent model or its folder, got {kind}.")
        if return_reference_var_names:
            return pd.Index(reference_model.var_names)
        return prepare_query_anndata(adata, reference_model.registry, max_missing_fraction)

    @classmethod
    def load_query_data(
        cls,
        adata: ad.AnnData,
        reference_model: BaseModel | str | os.PathLike,
        freeze: bool = True,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = True,
        freeze_classifier: bool = True,
        adapt_classifier: bool = True,
        accelerator: str = "cpu",
    ) -> BaseModel:
        """A model of the query mapped onto a trained reference (scArches' architecture surgery).

        The query's batches the reference does not know become new batch categories: the batch
        embeddings of encoder and decoder get a new row each (and ``log_theta`` for
        ``dispersion="gene-batch"``; a latent library prior from the query's own cells), the rest
        is a copy of the reference's weights. ``train()`` then fits the new rows on the query;
        by default nothing else moves, so the reference cells keep their latent positions and the
        query cells land in the same space (``model.get_latent_representation(reference_adata)``
        equals the reference model's). The reference model is never changed.

        Parameters
        ----------
        adata
            The query, with the reference's ``batch_key`` column (its values other than the
            reference's batches are the new batches; at least one must be new), covariate columns,
            and for a semi-supervised model labels among the reference's or unlabelled (column
            absent, ``unlabeled_category`` or NaN). If its genes are not the reference's in order,
            the model works on :meth:`prepare_query_anndata`'s copy (``model.adata``); otherwise
            on ``adata`` itself, whose ``uns`` gets the query registry (as ``setup_anndata`` does).
        reference_model
            The trained reference model of this class, or the folder it was saved in. It must
            have been set up with a ``batch_key``: a reference without one has no batch input to
            adapt, so it is refused (embed the query with the reference model as it is).
        freeze
            Train only the new batches' entries (True, scArches), or every parameter (False:
            plain fine-tuning from the reference's weights; the options below are then ignored).
        freeze_dropout
            Switch dropout off in query training.
        freeze_expression, freeze_decoder_first_layer
            Keep the encoders' (decoder's) first layer frozen (their batch rows still train). False
            trains the whole layer, as scvi-tools allows; the reference cells' latents then move.
        freeze_batchnorm_encoder, freeze_batchnorm_decoder
            Keep the encoders' (decoder's) BatchNorm frozen: affine parameters and running
            statistics (``momentum=0``). False trains both. (scvi-tools' default for the decoder
            is False; ours keeps every reference output unchanged by default.)
        freeze_classifier
            Keep a semi-supervised model's classifier (and its fitted temperature) frozen; no
            effect on other models.
        adapt_classifier
            With a frozen classifier, still train its hidden-layer biases (one shift per hidden
            unit; no effect on a linear classifier or other models) on the query's unlabelled
            objective, which moves the classifier towards the class posterior of the model's own
            generative part (M2) on the query's latents: unsupervised adaptation to the query,
            the counterpart of the classifier BatchNorm shift and scale that scvi-tools' query
            mapping trains. The reference's temperature is kept. Measured on the pbmc3k ->
            embedded-PBMC transfer (``benchmarks/probe_query_classifier.py``, 3 seeds): accuracy
            0.596 -> 0.619, macro-F1 0.632 -> 0.650, ECE 0.255 -> 0.252. ``False`` keeps every
            classifier parameter as the reference's.
        accelerator
            Device of the query model (``train`` moves it to its own).

        Returns
        -------
        BaseModel
            An untrained model of this class on the query (``model.adata``) whose registry lists
            the reference's batches then the new ones; ``model.query_freezing`` records what trains.

        Raises
        ------
        SetupError
            A model class that cannot grow batch rows, a reference without ``batch_key``, a query
            without its column or without a new batch, too many missing genes, or data the
            reference's registry refuses (e.g. a label the reference does not know).

        Notes
        -----
        Freezing, as scArches: a gradient mask keeps only the new entries' gradients of each grown
        parameter (declared on the module, applied by every step kind, so the count VAE's fused
        pass still trains the query), every other frozen parameter has ``requires_grad=False``, and
        frozen BatchNorm layers keep their running statistics (``momentum=0``). A frozen query model trains with
        ``weight_decay=0`` and refuses other values: L2 decay would move its frozen entries. The
        freezing is training-time state (``model.query_freezing``), not saved: ``Model.load(dir,
        query_adata)`` gives the query model back (same latents), which then trains like any model.
        scvi-tools differs in also training the library encoder and the decoder's BatchNorm by
        default, and lets the covariate weights of old categories take gradients.

        Examples
        --------
        >>> query = sclatent.model.VAE.prepare_query_anndata(query_adata, reference)
        >>> model = sclatent.model.VAE.load_query_data(query, reference)
        >>> model.train(max_epochs=200)
        >>> query.obsm["X_sclatent_vae"] = model.get_latent_representation()
        """
        if isinstance(reference_model, str | os.PathLike):
            reference_model = cls.load(reference_model)
        return load_query_model(
            cls,
            adata,
            reference_model,
            freeze=freeze,
            accelerator=accelerator,
            freeze_dropout=freeze_dropout,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
            freeze_classifier=freeze_classifier,
            adapt_classifier=adapt_classifier,
        )

    def _repr_data(self) -> list[str]:
        return [f"  data: {self.registry.summary()}"]


def _attach_registry(adata: ad.AnnData, registry: Registry) -> None:
    """Check a loaded model's AnnData against the saved registry."""
    gene_order_for_query(adata, registry)  # raises on missing genes
    if REGISTRY_KEY not in adata.uns:
        adata.uns[REGISTRY_KEY] = registry.to_json()
