"""The one training loop: epochs, KL warm-up, validation, early stopping, history, progress bar.

It is deliberately a plain ``for epoch / for minibatch`` loop with the optimiser in view: the
loop is simple enough that a framework adds overhead without adding function.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import (
    CheckpointError,
    checkpoint_path,
    is_checkpoint_writer,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    run_fingerprint,
    save_checkpoint,
)
from .data.loader import CellData
from .distributed import DistributedContext, global_step_sizes, rank_minibatches
from .modules._base import LossOutput
from .optim import FlatAdam


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
        The KL weight rises linearly from 0 to 1 over this many epochs (0: no warm-up).
    early_stopping
        Stop when the monitored quantity has not improved by ``min_delta`` for ``patience`` epochs.
    monitor
        What early stopping watches: ``"elbo"`` (maximised) or the name of another per-cell term a
        module reports (``LossOutput.extra``, minimised), on the validation cells when there are
        some, else on the training cells.
    restore_best
        With early stopping, end with the parameters of the best monitored epoch rather than the last.
    """

    max_epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    kl_warmup_epochs: int = 0
    early_stopping: bool = False
    patience: int = 45
    min_delta: float = 0.0
    monitor: str = "elbo"
    restore_best: bool = False

    def kl_weight(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
        if self.kl_warmup_epochs <= 0:
            return 1.0
        progress = epoch + step_in_epoch / max(1, steps_per_epoch)
        return min(1.0, progress / self.kl_warmup_epochs)


def split_cells(cells: np.ndarray, train_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``cells`` into training and validation indices (both sorted)."""
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(cells)
    # at least two training cells: a minibatch of one cannot be batch-normalised
    n_train = len(cells) if train_size == 1.0 else max(2, min(len(cells) - 1, math.ceil(train_size * len(cells))))
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def _accumulate(totals: dict[str, float], out: LossOutput) -> None:
    totals["n"] += out.reconstruction.numel()
    totals["reconstruction"] += float(out.reconstruction.detach().sum())
    totals["kl"] += float(out.kl.detach().sum())
    for name, value in out.extra.items():
        totals[name] = totals.get(name, 0.0) + float(value.detach().sum())


def _means(totals: dict[str, float], prefix: str) -> dict[str, float]:
    n = max(1, totals.pop("n"))
    means = {f"{prefix}_{k}": v / n for k, v in totals.items()}
    means[f"{prefix}_elbo"] = -(means[f"{prefix}_reconstruction"] + means[f"{prefix}_kl"])
    return means


def _new_totals() -> dict[str, float]:
    return {"n": 0, "reconstruction": 0.0, "kl": 0.0}


@torch.no_grad()
def evaluate(
    module: torch.nn.Module,
    data: CellData,
    cells: np.ndarray,
    batch_size: int = 1024,
    distributed: DistributedContext | None = None,
) -> dict[str, float]:
    """Mean ELBO, reconstruction and KL per cell of ``module`` on ``cells`` (eval mode).

    With a multi-process ``distributed`` context each rank evaluates its share of ``cells`` and
    the totals are summed over the ranks: every rank returns the means over all of ``cells``.
    """
    parallel = distributed is not None and distributed.enabled
    was_training = module.training
    module.eval()
    totals = _new_totals()
    for batch in data.iterate(distributed.shard_evenly(cells) if parallel else cells, batch_size):
        _accumulate(totals, module.loss(batch, kl_weight=1.0))
    module.train(was_training)
    if parallel:
        totals = distributed.sum_totals(totals)
    means = _means(totals, "x")
    return {k[2:]: v for k, v in means.items()}


def fit(
    module: torch.nn.Module,
    data: CellData,
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

    ``module.loss(batch, kl_weight=...)`` must return a :class:`LossOutput`. The history holds, per
    epoch, ``train_loss``, ``train_elbo``, ``train_reconstruction``, ``train_kl``, ``kl_weight``,
    ``seconds`` and, with validation cells, ``validation_elbo`` / ``_reconstruction`` / ``_kl``
    (nats per cell). Minibatch order, dropout and sampling follow ``seed``.

    Adversarial modules (those with ``parameter_groups()``, see :func:`_parameter_groups`) are
    trained by the same loop with one :class:`FlatAdam` per group: on each minibatch the groups
    named by ``module.groups_to_step(step)`` each take one step on ``module.loss(batch, group=name)``
    with the other groups frozen. Their history holds ``train_<group>_loss`` per group, the groups'
    ``LossOutput.extra`` terms as ``train_<term>``, ``train_loss`` (the sum of the groups' losses)
    and, with validation cells, the same as ``validation_*``; no ELBO.

    With ``checkpoint_dir``, the state after every epoch (parameters, optimiser moments, random
    generators, history, early-stopping state) replaces ``checkpoint_dir/checkpoint.pt`` atomically
    (:mod:`sclatent.checkpoint`). If that file already holds a checkpoint of this run, training
    continues after its last epoch, ending with the parameters an uninterrupted run would have
    (bit for bit on the same device and thread count), and the returned history covers the whole
    run. "This run" means the same module class and state-dict shapes, plan (``max_epochs`` aside:
    a run can be extended), seed, training and validation cells, and ``checkpoint_identity`` (the
    caller's further fields, e.g. model class, genes, hyperparameters); a checkpoint of another
    run, or an unreadable one, raises :class:`sclatent.checkpoint.CheckpointError`. In a distributed
    run every rank's generator states are gathered and rank 0 writes; resumed with as many ranks,
    each rank gets its own back and the run is bit-identical too (with another number of ranks it
    is a valid continuation, not an identical one).

    With a multi-process ``distributed`` context (:func:`sclatent.distributed.context` under
    torchrun), every rank calls ``fit`` with the same arguments and trains on its part of each
    global minibatch of ``world_size * plan.batch_size`` cells (see :mod:`sclatent.distributed`):
    ``data`` needs ``epoch_order(cells, generator)`` and ``iterate(..., batch_sizes=...)``. Each
    step uses the gradient of the global minibatch's mean loss: a one-objective module trains
    under :class:`torch.nn.parallel.DistributedDataParallel` (its loss scaled by the rank's share
    times ``world_size``, as DDP averages), an adversarial module with one all-reduce of each
    group's flat gradient per group step (DDP cannot follow parameter groups frozen in turn).
    Every rank ends with the same parameters and history; the progress bar shows on rank 0 only.
    """
    parallel = distributed is not None and distributed.enabled
    # dropout and sampling noise differ per rank; the minibatch order (generator) is shared
    torch.manual_seed(distributed.rank_seed(seed) if parallel else seed)
    generator = torch.Generator().manual_seed(seed)
    if parallel:
        distributed.broadcast_module_(module)  # every rank starts from rank 0's initialisation
    groups = _parameter_groups(module)
    if groups is None:
        parameters = [p for p in module.parameters() if p.requires_grad]
        optimizer: FlatAdam | dict[str, FlatAdam] = FlatAdam(
            parameters, lr=plan.lr, weight_decay=plan.weight_decay, eps=plan.eps
        )
    else:
        settings = getattr(module, "optimizer_settings", dict)()
        optimizer = {
            name: FlatAdam(
                params,
                **{"lr": plan.lr, "weight_decay": plan.weight_decay, "eps": plan.eps, **settings.get(name, {})},
            )
            for name, params in groups.items()
        }
    checkpoint = None
    if checkpoint_dir is not None:
        fingerprint = run_fingerprint(
            module,
            plan,
            seed,
            train_cells,
            validation_cells,
            None if groups is None else list(groups),
            checkpoint_identity,
        )
        checkpoint = _Checkpoint(Path(checkpoint_dir), fingerprint)
    try:
        history = _fit(
            module,
            data,
            train_cells,
            validation_cells,
            plan,
            optimizer,
            generator,
            progress_bar,
            description,
            checkpoint=checkpoint,
            distributed=distributed if parallel else None,
        )
    finally:
        for opt in optimizer.values() if isinstance(optimizer, dict) else [optimizer]:
            opt.release()
    module.eval()
    return history


class _Checkpoint:
    """Saving and resuming the state of :func:`_fit` between epochs (format in :mod:`sclatent.checkpoint`)."""

    def __init__(self, directory: Path, fingerprint: dict) -> None:
        self.directory, self.fingerprint = directory, fingerprint

    @staticmethod
    def _optimizers(optimizer: FlatAdam | dict[str, FlatAdam]) -> dict[str, FlatAdam]:
        return optimizer if isinstance(optimizer, dict) else {"adam": optimizer}

    def resume(
        self,
        module: torch.nn.Module,
        optimizer: FlatAdam | dict[str, FlatAdam],
        generator: torch.Generator,
        plan: TrainingPlan,
        distributed: DistributedContext | None = None,
        noise_generator: torch.Generator | None = None,
    ) -> tuple | None:
        """Load the checkpoint into ``module``, ``optimizer`` and the generators; None if there is none.

        In a distributed run each rank gets back its own generator states (and ``noise_generator``'s)
        when the checkpoint was written by as many ranks; otherwise see :func:`restore_rng_state`.

        Returns
        -------
        ``(completed epochs, stopped early, global step, history, best, epochs without improvement,
        best state)``, the loop state :func:`_fit` continues from.
        """
        state = load_checkpoint(self.directory, self.fingerprint)
        if state is None:
            return None
        path = checkpoint_path(self.directory)
        if state["epoch"] > plan.max_epochs:
            raise CheckpointError(
                f"{path} holds {state['epoch']} trained epochs, more than max_epochs={plan.max_epochs}. "
                f"Pass max_epochs >= {state['epoch']}, delete {path}, or pass another checkpoint_dir."
            )
        try:
            module.load_state_dict(state["module"])
            optimizers = self._optimizers(optimizer)
            if set(state["optimizers"]) != set(optimizers):
                raise ValueError(f"optimisers {sorted(state['optimizers'])}, expected {sorted(optimizers)}")
            for name, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
            restore_rng_state(state["rng"], _device_of(module), generator, distributed, noise_generator)
            stopping = state["early_stopping"]
            best_state = stopping["best_state"]
            if best_state is not None:
                best_state = {k: v.to(_device_of(module)) for k, v in best_state.items()}
            return (
                int(state["epoch"]),
                bool(state["stopped"]),
                int(state["global_step"]),
                state["history"],
                float(stopping["best"]),
                int(stopping["epochs_without_improvement"]),
                best_state,
            )
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"{path} matches this run but its state cannot be restored ({error!r}). "
                f"Delete {path} to start from scratch, or pass another checkpoint_dir."
            ) from None

    def save(
        self,
        module: torch.nn.Module,
        optimizer: FlatAdam | dict[str, FlatAdam],
        generator: torch.Generator,
        epoch: int,
        stopped: bool,
        global_step: int,
        history: dict[str, list[float]],
        early_stopping: dict,
        distributed: DistributedContext | None = None,
        noise_generator: torch.Generator | None = None,
    ) -> None:
        """Write everything the epoch after ``epoch`` (completed epochs) depends on.

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
            self._write(module, optimizer, epoch, stopped, global_step, history, early_stopping, rng)
        if distributed is not None:
            distributed.barrier()

    def _write(self, module, optimizer, epoch, stopped, global_step, history, early_stopping, rng) -> None:
        best_state = early_stopping["best_state"]
        save_checkpoint(
            self.directory,
            {
                "fingerprint": self.fingerprint,
                "epoch": epoch,
                "stopped": stopped,
                "global_step": global_step,
                # numbers as Python floats and ints: a NumPy scalar would not pass weights_only
                "history": {k: [_plain_number(v) for v in values] for k, values in history.items()},
                "early_stopping": {
                    "best": float(early_stopping["best"]),
                    "epochs_without_improvement": int(early_stopping["epochs_without_improvement"]),
                    "best_state": None if best_state is None else {k: v.cpu() for k, v in best_state.items()},
                },
                "module": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                "optimizers": {name: opt.state_dict() for name, opt in self._optimizers(optimizer).items()},
                "rng": rng,
            },
        )


def _plain_number(value):
    """A NumPy or 0-d tensor number as the Python number it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic | torch.Tensor) else value


def _device_of(module: torch.nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), torch.empty(0))
    return tensor.device


def _parameter_groups(module: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]] | None:
    """The named, disjoint parameter groups of an adversarial module; None for a one-objective module.

    A module trained by several players (a GAN's generator and critic) exposes
    ``parameter_groups() -> {name: [parameters]}`` (insertion order is the order of updates within a
    minibatch), ``groups_to_step(step) -> [names]`` (which groups update on the ``step``-th minibatch
    of training, counted from 0 over all epochs) and ``loss(batch, kl_weight=..., group=name)``, the
    objective of that group only. Optionally ``optimizer_settings() -> {name: {FlatAdam kwargs}}``
    overriding the plan's ``lr`` / ``eps`` / ``weight_decay`` / ``betas`` per group.
    """
    method = getattr(module, "parameter_groups", None)
    if not callable(method):
        return None
    groups = {name: [p for p in params if p.requires_grad] for name, params in method().items()}
    seen: set[int] = set()
    for name, params in groups.items():
        if not params:
            raise ValueError(f"parameter group {name!r} has no trainable parameters.")
        ids = {id(p) for p in params}
        if ids & seen:
            raise ValueError(f"parameter group {name!r} shares parameters with another group.")
        seen |= ids
    return groups


def _group_step(
    module: torch.nn.Module,
    batch,
    name: str,
    optimizers: dict[str, FlatAdam],
    groups: dict[str, list[torch.nn.Parameter]],
    kl_weight: float,
    *,
    reduce: Callable[[FlatAdam], None] | None = None,
) -> LossOutput:
    """One update of parameter group ``name`` on its own objective; every other group is frozen.

    Freezing (``requires_grad_(False)``) keeps autograd from computing the other groups' weight
    gradients at all (a generator step still backpropagates *through* the critic to its input, but
    needs no gradient for the critic's weights), and only ``name``'s optimiser steps.
    ``reduce(optimizer)``, if given, combines the ranks' gradients before the step.
    """
    frozen = [p for other, params in groups.items() if other != name for p in params]
    for p in frozen:
        p.requires_grad_(False)
    try:
        out = module.loss(batch, kl_weight=kl_weight, group=name)
        optimizers[name].zero_grad()
        out.loss.backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if reduce is not None:
        reduce(optimizers[name])
    optimizers[name].step()
    return out


def _fit(
    module: torch.nn.Module,
    data: CellData,
    train_cells: np.ndarray,
    validation_cells: np.ndarray,
    plan: TrainingPlan,
    optimizer: FlatAdam | dict[str, FlatAdam],
    generator: torch.Generator,
    progress_bar: bool,
    description: str,
    checkpoint: _Checkpoint | None = None,
    distributed: DistributedContext | None = None,
) -> dict[str, list[float]]:
    adversarial = isinstance(optimizer, dict)
    groups = _parameter_groups(module) if adversarial else None
    global_step = 0
    n_train = len(train_cells)
    if distributed is not None:
        if not hasattr(data, "epoch_order"):
            raise TypeError(
                f"{type(data).__name__} cannot be split across processes: it lacks epoch_order(cells, generator) "
                "and iterate(..., batch_sizes=...). Train it in one process (without torchrun)."
            )
        # the same global minibatches, hence the same number of steps (and collectives), on every rank
        step_sizes = global_step_sizes(n_train, plan.batch_size, distributed.world_size)
        steps_per_epoch = len(step_sizes)
        # per-rank draws inside iterate (neighbour picks) must not advance the shared generator
        noise_generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        # one-objective modules: DDP, made after the FlatAdam so it fills the optimiser's gradient views;
        # adversarial ones all-reduce each group's flat gradient, as DDP cannot follow groups frozen in turn
        data_parallel = None if adversarial else distributed.data_parallel(module)
    else:
        noise_generator = None
        # a final minibatch of one cell would break BatchNorm; fold such a remainder away
        drop_last = n_train > plan.batch_size and n_train % plan.batch_size < 2
        steps_per_epoch = n_train // plan.batch_size if drop_last else math.ceil(n_train / plan.batch_size)
    # (not when a hook waits on the backward pass, which the direct path does not run)
    direct_gradients = (
        not adversarial
        and distributed is None
        and hasattr(module, "loss_and_gradients")
        and not any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in module.parameters())
    )
    history: dict[str, list[float]] = {}
    best, epochs_without_improvement = math.inf, 0
    best_state: dict[str, torch.Tensor] | None = None
    first_epoch, stopped = 0, False
    resumed = (
        None
        if checkpoint is None
        else checkpoint.resume(module, optimizer, generator, plan, distributed, noise_generator)
    )
    if resumed is not None:
        # continue after the last saved epoch (parameters, optimisers and random generators are restored)
        first_epoch, stopped, global_step, history, best, epochs_without_improvement, best_state = resumed
    epochs = tqdm(
        range(first_epoch, first_epoch if stopped else plan.max_epochs),
        desc=description,
        disable=not progress_bar or (distributed is not None and not distributed.is_main),
        unit="epoch",
        initial=first_epoch,
        total=plan.max_epochs,
    )
    module.train()
    for epoch in epochs:
        start = time.perf_counter()
        totals = _new_totals()
        group_totals: dict[str, dict[str, float]] = {}
        loss_sum = 0.0
        reduce = None
        if distributed is not None:
            own_cells, own_sizes = rank_minibatches(
                data.epoch_order(train_cells, generator), step_sizes, distributed.rank
            )
            minibatches = data.iterate(own_cells, plan.batch_size, generator=noise_generator, batch_sizes=own_sizes)
        else:
            minibatches = data.iterate(
                train_cells, plan.batch_size, shuffle=True, generator=generator, drop_last=drop_last
            )
        for step, batch in enumerate(minibatches):
            kl_weight = plan.kl_weight(epoch, step, steps_per_epoch)
            if distributed is not None:
                # weighting by the rank's share of the global minibatch makes the summed gradient
                # that of the global minibatch's mean loss, whatever the parts' sizes
                share = batch.size / int(step_sizes[step].sum())
                if adversarial:  # (one-objective modules reduce in DDP's backward, below)

                    def reduce(opt: FlatAdam, share: float = share) -> None:
                        distributed.sum_gradients_(opt, share)

            if adversarial:
                # (reduce passed only when there is one: the one-process call is the one it always was)
                reducing = {} if reduce is None else {"reduce": reduce}
                for name in module.groups_to_step(global_step):
                    out = _group_step(module, batch, name, optimizer, groups, kl_weight, **reducing)
                    _accumulate_group(group_totals, name, out, batch.size)
                global_step += 1
                continue
            if distributed is not None:
                out = data_parallel(batch, kl_weight)
                optimizer.zero_grad()
                # DDP averages the ranks' gradients: scaled by share * world_size, the average is
                # the share-weighted sum, the gradient of the global minibatch's mean loss
                (out.loss * (share * distributed.world_size)).backward()
            else:
                # a module that can write its gradients without autograd does (VAE: fused pass)
                out = module.loss_and_gradients(batch, kl_weight=kl_weight) if direct_gradients else None
                if out is None:
                    out = module.loss(batch, kl_weight=kl_weight)
                    optimizer.zero_grad()
                    out.loss.backward()
            optimizer.step()
            loss_sum += float(out.loss.detach()) * batch.size
            _accumulate(totals, out)
        if distributed is not None:
            distributed.average_running_statistics_(module)  # BatchNorm's, once per epoch
            summed = distributed.sum_totals({"train": totals, "groups": group_totals, "loss_sum": loss_sum})
            totals, group_totals, loss_sum = summed["train"], summed["groups"], summed["loss_sum"]
        if adversarial:
            record = {"epoch": epoch + 1, **_group_means(group_totals, groups)}
            # one number for the divergence check and early stopping's default: the sum of the groups'
            # mean losses (each player's own objective; not a quantity any player minimises)
            # (groups that did not step this epoch, NaN in the record, are left out of the sum)
            record["train_loss"] = sum(record[f"train_{name}_loss"] for name in groups if name in group_totals)
            if len(validation_cells):
                record.update(_evaluate_groups(module, data, validation_cells, groups, distributed=distributed))
        else:
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, totals["n"]), "kl_weight": kl_weight}
            record.update(_means(totals, "train"))
            if len(validation_cells):
                validation = evaluate(module, data, validation_cells, distributed=distributed)
                record.update({f"validation_{k}": v for k, v in validation.items()})
        record["seconds"] = time.perf_counter() - start
        for key, value in record.items():
            history.setdefault(key, []).append(value)
        if not math.isfinite(record["train_loss"]):
            raise FloatingPointError(
                f"Training diverged at epoch {epoch + 1} (loss {record['train_loss']}). "
                "Lower the learning rate or check the input for extreme counts."
            )

        if adversarial:
            epochs.set_postfix({name: f"{record[f'train_{name}_loss']:.3g}" for name in groups})
        else:
            # modules without a KL term (autoencoders, flows, contrastive) report a loss, not an ELBO
            shown, sign = ("elbo", 1.0) if record["train_kl"] != 0.0 else ("loss", -1.0)
            postfix = {shown: f"{sign * record['train_elbo']:.4g}"}
            if "validation_elbo" in record:
                postfix["val"] = f"{sign * record['validation_elbo']:.4g}"
            epochs.set_postfix(postfix)
        stop = False
        if plan.early_stopping:
            monitored = _monitored(record, plan.monitor)
            if monitored < best - plan.min_delta:
                best, epochs_without_improvement = monitored, 0
                if plan.restore_best:
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                epochs_without_improvement += 1
                stop = epochs_without_improvement >= plan.patience
        if checkpoint is not None:
            stopping = {
                "best": best,
                "epochs_without_improvement": epochs_without_improvement,
                "best_state": best_state,
            }
            checkpoint.save(
                module,
                optimizer,
                generator,
                epoch + 1,
                stop,
                global_step,
                history,
                stopping,
                distributed,
                noise_generator,
            )
        if stop:
            break
    if best_state is not None:
        module.load_state_dict(best_state)
    return history


def _accumulate_group(totals: dict[str, dict[str, float]], name: str, out: LossOutput, batch_size: int) -> None:
    """Add one step of group ``name``: its loss (weighted by the minibatch size) and its extra terms."""
    entry = totals.setdefault(name, {"n": 0, "loss": 0.0})
    entry["n"] += batch_size
    entry["loss"] += float(out.loss.detach()) * batch_size
    for key, value in out.extra.items():
        entry[key] = entry.get(key, 0.0) + float(value.detach().sum())


def _group_means(totals: dict[str, dict[str, float]], groups: dict[str, list]) -> dict[str, float]:
    """``train_<group>_loss`` per group and ``train_<term>`` per extra term, means per cell of the epoch.

    A group that did not step this epoch (e.g. a generator updated every ``n_critic`` minibatches
    on a one-minibatch epoch) reports NaN rather than a made-up number.
    """
    means: dict[str, float] = {}
    for name in groups:
        entry = dict(totals.get(name, {"n": 0, "loss": math.nan}))
        n, loss = entry.pop("n"), entry.pop("loss")
        means[f"train_{name}_loss"] = loss / n if n else math.nan
        for key, value in entry.items():
            means[f"train_{key}"] = value / n
    return means


@torch.no_grad()
def _evaluate_groups(
    module: torch.nn.Module,
    data: CellData,
    cells: np.ndarray,
    groups: dict[str, list],
    batch_size: int = 1024,
    distributed: DistributedContext | None = None,
) -> dict[str, float]:
    """``validation_<group>_loss`` and ``validation_<term>`` of every group on held-out cells (eval mode).

    Gradient-based terms (a critic's gradient penalty) are not computed under ``no_grad``; a module
    reports what it can without gradients when ``torch.is_grad_enabled()`` is False. With a
    multi-process ``distributed`` context the cells are sharded and the totals summed over the ranks.
    """
    parallel = distributed is not None and distributed.enabled
    was_training = module.training
    module.eval()
    totals: dict[str, dict[str, float]] = {}
    for batch in data.iterate(distributed.shard_evenly(cells) if parallel else cells, batch_size):
        for name in groups:
            _accumulate_group(totals, name, module.loss(batch, kl_weight=1.0, group=name), batch.size)
    module.train(was_training)
    if parallel:
        totals = distributed.sum_totals(totals)
    return {f"validation_{k[6:]}": v for k, v in _group_means(totals, groups).items()}


def _monitored(record: dict[str, float], monitor: str) -> float:
    """The early-stopping quantity of one epoch's record, as a loss (lower is better)."""
    if monitor == "elbo":
        return -record.get("validation_elbo", record["train_elbo"])
    key = f"validation_{monitor}" if f"validation_{monitor}" in record else f"train_{monitor}"
    if key not in record:
        raise KeyError(f"early stopping monitors {monitor!r}, which the module does not report.")
    return record[key]
