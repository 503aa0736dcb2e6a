"""The one training loop: epochs, KL warm-up, validation, early stopping, history, progress bar.

It is deliberately a plain ``for epoch / for minibatch`` loop with the optimiser in view: the
loop is simple enough that a framework adds overhead without adding function.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.loader import CellData
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
def evaluate(module: torch.nn.Module, data: CellData, cells: np.ndarray, batch_size: int = 1024) -> dict[str, float]:
    """Mean ELBO, reconstruction and KL per cell of ``module`` on ``cells`` (eval mode)."""
    was_training = module.training
    module.eval()
    totals = _new_totals()
    for batch in data.iterate(cells, batch_size):
        _accumulate(totals, module.loss(batch, kl_weight=1.0))
    module.train(was_training)
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
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
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
    try:
        history = _fit(
            module, data, train_cells, validation_cells, plan, optimizer, generator, progress_bar, description
        )
    finally:
        for opt in optimizer.values() if isinstance(optimizer, dict) else [optimizer]:
            opt.release()
    module.eval()
    return history


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
) -> LossOutput:
    """One update of parameter group ``name`` on its own objective; every other group is frozen.

    Freezing (``requires_grad_(False)``) keeps autograd from computing the other groups' weight
    gradients at all (a generator step still backpropagates *through* the critic to its input, but
    needs no gradient for the critic's weights), and only ``name``'s optimiser steps.
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
) -> dict[str, list[float]]:
    adversarial = isinstance(optimizer, dict)
    groups = _parameter_groups(module) if adversarial else None
    global_step = 0
    n_train = len(train_cells)
    # a final minibatch of one cell would break BatchNorm; fold such a remainder away
    drop_last = n_train > plan.batch_size and n_train % plan.batch_size < 2
    steps_per_epoch = n_train // plan.batch_size if drop_last else math.ceil(n_train / plan.batch_size)
    history: dict[str, list[float]] = {}
    best, epochs_without_improvement = math.inf, 0
    best_state: dict[str, torch.Tensor] | None = None
    epochs = tqdm(range(plan.max_epochs), desc=description, disable=not progress_bar, unit="epoch")
    module.train()
    for epoch in epochs:
        start = time.perf_counter()
        totals = _new_totals()
        group_totals: dict[str, dict[str, float]] = {}
        loss_sum = 0.0
        for step, batch in enumerate(
            data.iterate(train_cells, plan.batch_size, shuffle=True, generator=generator, drop_last=drop_last)
        ):
            kl_weight = plan.kl_weight(epoch, step, steps_per_epoch)
            if adversarial:
                for name in module.groups_to_step(global_step):
                    out = _group_step(module, batch, name, optimizer, groups, kl_weight)
                    _accumulate_group(group_totals, name, out, batch.size)
                global_step += 1
                continue
            out = module.loss(batch, kl_weight=kl_weight)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            loss_sum += float(out.loss.detach()) * batch.size
            _accumulate(totals, out)
        if adversarial:
            record = {"epoch": epoch + 1, **_group_means(group_totals, groups)}
            # one number for the divergence check and early stopping's default: the sum of the groups'
            # mean losses (each player's own objective; not a quantity any player minimises)
            # (groups that did not step this epoch, NaN in the record, are left out of the sum)
            record["train_loss"] = sum(record[f"train_{name}_loss"] for name in groups if name in group_totals)
            if len(validation_cells):
                record.update(_evaluate_groups(module, data, validation_cells, groups))
        else:
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, totals["n"]), "kl_weight": kl_weight}
            record.update(_means(totals, "train"))
            if len(validation_cells):
                record.update({f"validation_{k}": v for k, v in evaluate(module, data, validation_cells).items()})
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
        if plan.early_stopping:
            monitored = _monitored(record, plan.monitor)
            if monitored < best - plan.min_delta:
                best, epochs_without_improvement = monitored, 0
                if plan.restore_best:
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            else:
                epochs_without_improvement += 1
                if epochs_without_improvement >= plan.patience:
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
    module: torch.nn.Module, data: CellData, cells: np.ndarray, groups: dict[str, list], batch_size: int = 1024
) -> dict[str, float]:
    """``validation_<group>_loss`` and ``validation_<term>`` of every group on held-out cells (eval mode).

    Gradient-based terms (a critic's gradient penalty) are not computed under ``no_grad``; a module
    reports what it can without gradients when ``torch.is_grad_enabled()`` is False.
    """
    was_training = module.training
    module.eval()
    totals: dict[str, dict[str, float]] = {}
    for batch in data.iterate(cells, batch_size):
        for name in groups:
            _accumulate_group(totals, name, module.loss(batch, kl_weight=1.0, group=name), batch.size)
    module.train(was_training)
    return {f"validation_{k[6:]}": v for k, v in _group_means(totals, groups).items()}


def _monitored(record: dict[str, float], monitor: str) -> float:
    """The early-stopping quantity of one epoch's record, as a loss (lower is better)."""
    if monitor == "elbo":
        return -record.get("validation_elbo", record["train_elbo"])
    key = f"validation_{monitor}" if f"validation_{monitor}" in record else f"train_{monitor}"
    if key not in record:
        raise KeyError(f"early stopping monitors {monitor!r}, which the module does not report.")
    return record[key]
