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
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = FlatAdam(parameters, lr=plan.lr, weight_decay=plan.weight_decay, eps=plan.eps)
    try:
        history = _fit(
            module, data, train_cells, validation_cells, plan, optimizer, generator, progress_bar, description
        )
    finally:
        optimizer.release()
    module.eval()
    return history


def _fit(
    module: torch.nn.Module,
    data: CellData,
    train_cells: np.ndarray,
    validation_cells: np.ndarray,
    plan: TrainingPlan,
    optimizer: FlatAdam,
    generator: torch.Generator,
    progress_bar: bool,
    description: str,
) -> dict[str, list[float]]:
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
        loss_sum = 0.0
        for step, batch in enumerate(
            data.iterate(train_cells, plan.batch_size, shuffle=True, generator=generator, drop_last=drop_last)
        ):
            kl_weight = plan.kl_weight(epoch, step, steps_per_epoch)
            out = module.loss(batch, kl_weight=kl_weight)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            loss_sum += float(out.loss.detach()) * batch.size
            _accumulate(totals, out)
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

        epochs.set_postfix(
            {
                "elbo": f"{record['train_elbo']:.1f}",
                **({"val": f"{record['validation_elbo']:.1f}"} if "validation_elbo" in record else {}),
            }
        )
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


def _monitored(record: dict[str, float], monitor: str) -> float:
    """The early-stopping quantity of one epoch's record, as a loss (lower is better)."""
    if monitor == "elbo":
        return -record.get("validation_elbo", record["train_elbo"])
    key = f"validation_{monitor}" if f"validation_{monitor}" in record else f"train_{monitor}"
    if key not in record:
        raise KeyError(f"early stopping monitors {monitor!r}, which the module does not report.")
    return record[key]
