"""The one training loop: epochs, KL warm-up, validation, early stopping, history, progress bar.

A plain ``for epoch / for minibatch`` loop with the optimiser in view: the loop is simple enough
that a framework adds overhead without adding function. It works on the declared contracts of
:mod:`sclatent.contracts` (a :class:`~sclatent.contracts.Module` and a
:class:`~sclatent.contracts.TrainingData`); what one minibatch's update is (autograd, direct
gradients, adversarial players, distributed over processes) is a step object of
:mod:`sclatent.steps`, chosen once per :func:`fit`. Checkpoints are :mod:`sclatent.checkpoint`'s.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import LoopState, RunCheckpoint, run_fingerprint
from .contracts import AdversarialModule, Batch, LossOutput, Module, TrainingData
from .distributed import DistributedContext, global_step_sizes, rank_minibatches
from .steps import Step, make_optimizers, make_step


@dataclass
class TrainingPlan:
    """Optimisation settings of one ``train`` call.

    Attributes
    ----------
    max_epochs
        Passes over the training cells.
    batch_size
        Cells per minibatch.
    lr, weight_decay, eps
        Adam settings (``eps=0.01`` as in scVI: it damps steps of rarely updated parameters).
    kl_warmup_epochs
        The KL weight rises linearly from 0 to ``max_kl_weight`` over this many epochs (0: no warm-up).
    max_kl_weight
        The KL weight after the warm-up (1: the ELBO; above 1 a beta-VAE objective; scvi-tools'
        ``plan_kwargs={"max_kl_weight": ...}``). Validation and the held-out ELBO always use weight 1.
    early_stopping
        Stop when the monitored quantity has not improved by ``min_delta`` for ``patience`` epochs.
    monitor
        What early stopping watches: ``"elbo"`` (maximised), ``"loss"`` or the name of a per-cell
        term the module reports (``terms`` of :class:`~sclatent.contracts.LossOutput`, minimised), on the
        validation cells when there are some, else on the training cells. ``None``: the module's
        :attr:`~sclatent.contracts.Module.default_monitor`.
    restore_best
        With early stopping, end with the parameters of the best monitored epoch rather than the last.
    check_val_every_n_epoch
        Score the validation cells after every ``n``-th epoch and after the last (1: every epoch).
        Early stopping then looks at the scored epochs only: ``patience`` counts validations.
    """

    max_epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    kl_warmup_epochs: int = 0
    max_kl_weight: float = 1.0
    early_stopping: bool = False
    patience: int = 45
    min_delta: float = 0.0
    monitor: str | None = None
    restore_best: bool = False
    check_val_every_n_epoch: int = 1

    def validates(self, epoch: int) -> bool:
        """Whether the validation cells are scored after ``epoch`` (0-based)."""
        return (epoch + 1) % self.check_val_every_n_epoch == 0 or epoch + 1 == self.max_epochs

    def kl_weight(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
        if self.kl_warmup_epochs <= 0:
            return self.max_kl_weight
        progress = epoch + step_in_epoch / max(1, steps_per_epoch)
        return self.max_kl_weight * min(1.0, progress / self.kl_warmup_epochs)


def split_cells(
    cells: np.ndarray, train_size: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``cells`` into training and validation indices (both sorted).

    Parameters
    ----------
    cells
        ``(n,)`` cell indices.
    train_size
        Fraction kept for training, in (0, 1].
    seed
        Seed of the permutation.
    groups
        Optional ``(n,)`` group of each cell (e.g. its class, -1 for unlabelled cells). Given, each
        group is split on its own and keeps ``ceil(train_size * n_group)`` training cells, so no
        group loses all its cells to validation (a class with one labelled cell trains on it).
    """
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    rng = np.random.default_rng(seed)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != np.shape(cells):
            raise ValueError(f"groups must have one entry per cell: {groups.shape} vs {np.shape(cells)}.")
        train, validation = [], []
        for group in np.unique(groups):
            order = rng.permutation(np.asarray(cells)[groups == group])
            n_train = math.ceil(train_size * order.size)
            train.append(order[:n_train])
            validation.append(order[n_train:])
        return np.sort(np.concatenate(train)), np.sort(np.concatenate(validation))
    order = rng.permutation(cells)
    # at least two training cells: a minibatch of one cannot be batch-normalised
    n_train = len(cells) if train_size == 1.0 else max(2, min(len(cells) - 1, math.ceil(train_size * len(cells))))
    return np.sort(order[:n_train]), np.sort(order[n_train:])


class EpochTotals:
    """Per-item sums of one pass (the loss and every term), per parameter group for adversarial modules.

    Sums are Python floats (float64) added in minibatch order; a distributed run sums them over
    the ranks (:meth:`DistributedContext.sum_totals`) before taking means, so every rank gets the
    same numbers.
    """

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, float]] = {}
        self.elbo_terms: tuple[str, ...] = ()

    def add(self, group: str | None, out: LossOutput, size: int) -> None:
        entry = self.entries.setdefault(group or "", {"n": 0, "loss": 0.0})
        entry["n"] += size
        entry["loss"] += float(out.loss.detach()) * size
        for name, value in out.terms.items():
            entry[name] = entry.get(name, 0.0) + float(value.detach().sum())
        self.elbo_terms = out.elbo_terms or self.elbo_terms

    def summed(self, distributed: DistributedContext | None) -> EpochTotals:
        if distributed is not None and distributed.enabled:
            self.entries = distributed.sum_totals(self.entries)
        return self

    def means(self, groups: list[str] | None = None, with_total: bool = True) -> dict[str, float]:
        """Means per item: ``loss``, each term and ``elbo`` (one objective); for the ``groups`` of an
        adversarial module ``<group>_loss`` (NaN for a group that did not step), their terms, and with
        ``with_total`` ``loss``, the sum of the groups' mean losses (not a quantity any player minimises)."""
        if groups is None:
            entry = dict(self.entries.get("", {"n": 0, "loss": 0.0}))
            n = max(1, entry.pop("n"))
            means = {name: value / n for name, value in entry.items()}
            if self.elbo_terms:
                total = means[self.elbo_terms[0]]
                for name in self.elbo_terms[1:]:
                    total = total + means[name]
                means["elbo"] = -total
            return means
        means: dict[str, float] = {}
        for name in groups:
            entry = dict(self.entries.get(name, {"n": 0, "loss": math.nan}))
            n, loss = entry.pop("n"), entry.pop("loss")
            means[f"{name}_loss"] = loss / n if n else math.nan
            means.update({term: value / n for term, value in entry.items()})
        if with_total:
            means["loss"] = sum(means[f"{name}_loss"] for name in groups if name in self.entries)
        return means


def _groups(module: Module) -> list[str] | None:
    return list(module.parameter_groups()) if isinstance(module, AdversarialModule) else None


@torch.no_grad()
def evaluate(
    module: Module,
    data: TrainingData,
    cells: np.ndarray,
    batch_size: int = 1024,
    distributed: DistributedContext | None = None,
) -> dict[str, float]:
    """Means per cell of ``module``'s objective on ``cells``, in eval mode (``kl_weight`` 1).

    One objective: ``loss``, every term (``reconstruction``, ``kl``, ...) and, for a model with
    an ELBO, ``elbo``. Adversarial: ``<group>_loss`` and the terms of every group. Terms that need
    gradients (a critic's gradient penalty) are not computed: a module reports what it can when
    ``torch.is_grad_enabled()`` is False. With a multi-process ``distributed`` context each rank
    evaluates its share of ``cells`` and the totals are summed over the ranks.
    """
    parallel = distributed is not None and distributed.enabled
    groups = _groups(module)
    was_training = module.training
    module.eval()
    totals = EpochTotals()
    for batch in data.iterate(distributed.shard_evenly(cells) if parallel else cells, batch_size):
        if groups is None:
            totals.add(None, module.loss(batch, kl_weight=1.0), batch.size)
        for name in groups or []:
            totals.add(name, module.loss(batch, kl_weight=1.0, group=name), batch.size)
    module.train(was_training)
    return totals.summed(distributed).means(groups, with_total=False)


class Minibatches:
    """The training minibatches of every epoch, in a seeded order (``generator``).

    One process: ``data.iterate(cells, batch_size, shuffle=True)``, a final minibatch of one cell
    folded away (BatchNorm). Distributed: the epoch's shared order is cut into global minibatches
    of ``world_size * batch_size`` cells and this rank takes its part of each; per-rank draws inside
    ``iterate`` (neighbour picks) come from ``noise_generator``, not the shared ``generator``.
    """

    def __init__(
        self,
        data: TrainingData,
        cells: np.ndarray,
        batch_size: int,
        generator: torch.Generator,
        distributed: DistributedContext | None = None,
    ) -> None:
        self.data, self.cells, self.batch_size, self.generator = data, cells, batch_size, generator
        self.distributed = distributed if distributed is not None and distributed.enabled else None
        self.noise_generator = None
        n_train = len(cells)
        if self.distributed is not None:
            # the same global minibatches, hence the same number of steps (and collectives), on every rank
            self.step_sizes = global_step_sizes(n_train, batch_size, self.distributed.world_size)
            self.steps_per_epoch = len(self.step_sizes)
            self.noise_generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        else:
            self.drop_last = n_train > batch_size and n_train % batch_size < 2
            self.steps_per_epoch = n_train // batch_size if self.drop_last else math.ceil(n_train / batch_size)

    def epoch(self) -> Iterator[tuple[Batch, float]]:
        """``(minibatch, share)`` pairs; ``share`` is the minibatch's part of its global minibatch (1 alone)."""
        if self.distributed is None:
            yield from (
                (batch, 1.0)
                for batch in self.data.iterate(
                    self.cells, self.batch_size, shuffle=True, generator=self.generator, drop_last=self.drop_last
                )
            )
            return
        order = self.data.epoch_order(self.cells, self.generator)
        own_cells, own_sizes = rank_minibatches(order, self.step_sizes, self.distributed.rank)
        batches = self.data.iterate(own_cells, self.batch_size, generator=self.noise_generator, batch_sizes=own_sizes)
        for step, batch in enumerate(batches):
            # weighting by the rank's share of the global minibatch makes the summed gradient
            # that of the global minibatch's mean loss, whatever the parts' sizes
            yield batch, batch.size / int(self.step_sizes[step].sum())


class EarlyStopping:
    """Stop when the monitored quantity has not improved for ``patience`` epochs; keep the best state.

    With held-out cells only the epochs that score them (:meth:`TrainingPlan.validates`) count."""

    def __init__(self, plan: TrainingPlan, monitor: str, loop: LoopState, held_out: bool = False) -> None:
        self.plan, self.monitor, self.loop, self.held_out = plan, monitor, loop, held_out

    def update(self, record: dict[str, float], module: Module, epoch: int) -> bool:
        """Take the record of ``epoch`` (0-based); True when training should stop."""
        if not self.plan.early_stopping or (self.held_out and not self.plan.validates(epoch)):
            return False
        loop, value = self.loop, monitored(record, self.monitor)
        if value < loop.best - self.plan.min_delta:
            loop.best, loop.epochs_without_improvement = value, 0
            if self.plan.restore_best:
                loop.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            return False
        loop.epochs_without_improvement += 1
        return loop.epochs_without_improvement >= self.plan.patience


def monitored(record: Mapping[str, float], monitor: str) -> float:
    """The early-stopping quantity of one epoch's record, as a loss (lower is better)."""
    if monitor == "elbo":
        if "train_elbo" not in record:
            raise KeyError(
                "early stopping monitors 'elbo', but this module's objective has no ELBO; pass monitor='loss'."
            )
        return -record.get("validation_elbo", record["train_elbo"])
    key = f"validation_{monitor}" if f"validation_{monitor}" in record else f"train_{monitor}"
    if key not in record:
        known = sorted({k.split("_", 1)[1] for k in record if k.startswith("train_")})
        raise KeyError(f"early stopping monitors {monitor!r}, which the module does not report (it reports {known}).")
    return record[key]


def fit(
    module: Module,
    data: TrainingData,
    train_cells: np.ndarray,
    validation_cells: np.ndarray,
    plan: TrainingPlan,
    seed: int = 0,
    progress_bar: bool = True,
    description: str = "Training",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_identity: Mapping[str, str | int | float | bool | None] | None = None,
    distributed: DistributedContext | None = None,
) -> dict[str, list[float]]:
    """Train ``module`` in place with Adam on ``data`` and return the per-epoch history.

    The history holds per epoch ``epoch``, ``train_loss``, ``train_<term>`` for every term the
    module reports (for a model with an ELBO also ``train_elbo`` and ``kl_weight``; for an
    adversarial one ``train_<group>_loss`` per player), ``seconds`` and, with validation cells,
    ``validation_*`` (means per cell). Minibatch order, dropout and sampling follow ``seed``; the
    update of each minibatch is the step kind :func:`sclatent.steps.make_step` picks once.

    With ``checkpoint_dir`` the state after every epoch replaces ``checkpoint_dir/checkpoint.pt``
    atomically (:class:`sclatent.checkpoint.RunCheckpoint`); if it holds a checkpoint of this run
    (same module shapes, plan except ``max_epochs``, seed, cells and ``checkpoint_identity``),
    training continues after its last epoch and ends bit for bit as an uninterrupted run would,
    the history covering the whole run; a checkpoint of another run raises
    :class:`sclatent.checkpoint.CheckpointError`.

    With a multi-process ``distributed`` context (torchrun, :func:`sclatent.distributed.context`)
    every rank calls ``fit`` with the same arguments, trains on its part of each global minibatch of
    ``world_size * plan.batch_size`` cells (:class:`Minibatches`) with the gradient of the global
    minibatch's mean loss (:class:`sclatent.steps.DistributedStep`), and ends with the same
    parameters and history; the progress bar shows on rank 0 only.
    """
    parallel = distributed is not None and distributed.enabled
    # dropout and sampling noise differ per rank; the minibatch order (generator) is shared
    torch.manual_seed(distributed.rank_seed(seed) if parallel else seed)
    generator = torch.Generator().manual_seed(seed)
    if parallel:
        distributed.broadcast_module_(module)  # every rank starts from rank 0's initialisation
    distributed = distributed if parallel else None
    optimizers = make_optimizers(module, plan.lr, plan.weight_decay, plan.eps)
    checkpoint = None
    if checkpoint_dir is not None:
        groups = _groups(module)
        identity = (module, plan, seed, train_cells, validation_cells, groups, checkpoint_identity)
        checkpoint = RunCheckpoint(checkpoint_dir, run_fingerprint(*identity))
    try:
        step = make_step(module, optimizers, distributed)
        minibatches = Minibatches(data, train_cells, plan.batch_size, generator, distributed)
        loop = LoopState()
        if checkpoint is not None:
            noise = minibatches.noise_generator
            loop = checkpoint.resume(module, optimizers, generator, plan.max_epochs, distributed, noise) or loop
        progress = tqdm(
            range(loop.epoch, loop.epoch if loop.stopped else plan.max_epochs),
            desc=description,
            disable=not progress_bar or (distributed is not None and not distributed.is_main),
            unit="epoch",
            initial=loop.epoch,
            total=plan.max_epochs,
        )
        stopping = EarlyStopping(plan, plan.monitor or module.default_monitor, loop, len(validation_cells) > 0)
        module.train()
        for epoch in progress:
            scored = validation_cells if plan.validates(epoch) else validation_cells[:0]
            record = _epoch(module, data, step, minibatches, scored, plan, epoch, loop, distributed)
            progress.set_postfix(_postfix(record, _groups(module), stopping.monitor))
            loop.epoch, loop.stopped = epoch + 1, stopping.update(record, module, epoch)
            if checkpoint is not None:
                checkpoint.save(module, optimizers, generator, loop, distributed, minibatches.noise_generator)
            if loop.stopped:
                break
    finally:
        for optimizer in optimizers.values():
            optimizer.release()
    if loop.best_state is not None:
        module.load_state_dict(loop.best_state)
    module.eval()
    return loop.history


def _epoch(
    module: Module,
    data: TrainingData,
    step: Step,
    minibatches: Minibatches,
    validation_cells: np.ndarray,
    plan: TrainingPlan,
    epoch: int,
    loop: LoopState,
    distributed: DistributedContext | None,
) -> dict[str, float]:
    """One pass over the training minibatches, then the validation cells; the epoch's record,
    appended to ``loop.history``."""
    start = time.perf_counter()
    totals = EpochTotals()
    kl_weight = 1.0
    for index, (batch, share) in enumerate(minibatches.epoch()):
        kl_weight = plan.kl_weight(epoch, index, minibatches.steps_per_epoch)
        if distributed is None:
            outputs = step(batch, kl_weight, loop.global_step)
        else:
            outputs = step(batch, kl_weight, loop.global_step, share)
        for group, out in outputs:
            totals.add(group, out, batch.size)
        loop.global_step += 1
    if distributed is not None:
        distributed.average_running_statistics_(module)  # BatchNorm's, once per epoch
    means = totals.summed(distributed).means(_groups(module))
    record: dict[str, float] = {"epoch": epoch + 1, "train_loss": means.pop("loss")}
    if totals.elbo_terms:
        record["kl_weight"] = kl_weight
    record.update({f"train_{k}": v for k, v in means.items()})
    if len(validation_cells):
        validation = evaluate(module, data, validation_cells, distributed=distributed)
        record.update({f"validation_{k}": v for k, v in validation.items()})
    record["seconds"] = time.perf_counter() - start
    # every list one entry per epoch: NaN where an epoch did not score the held-out cells
    n_before = len(loop.history.get("epoch", []))
    for key, value in record.items():
        loop.history.setdefault(key, [math.nan] * n_before).append(value)
    for values in loop.history.values():
        if len(values) == n_before:
            values.append(math.nan)
    _check_finite(record, epoch)
    return record


def _check_finite(record: dict[str, float], epoch: int) -> None:
    if not math.isfinite(record["train_loss"]):
        raise FloatingPointError(
            f"Training diverged at epoch {epoch + 1} (loss {record['train_loss']}). "
            "Lower the learning rate or check the input for extreme counts."
        )


def _postfix(record: dict[str, float], groups: list[str] | None, monitor: str) -> dict[str, str]:
    """What the progress bar shows after an epoch: the ELBO, each player's loss, or the loss."""
    if groups is not None:
        return {name: f"{record[f'train_{name}_loss']:.3g}" for name in groups}
    shown = "elbo" if "train_elbo" in record else "loss"
    postfix = {shown: f"{record[f'train_{shown}']:.4g}"}
    validation = f"validation_{'elbo' if shown == 'elbo' else monitor}"
    if validation in record:
        postfix["val"] = f"{record[validation]:.4g}"
    return postfix
