"""Multi-process data-parallel training under ``torchrun`` (torch.distributed).

``torchrun --nproc_per_node=N ...`` starts N copies of the same program with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`context`
reads them, joins the process group (gloo on CPU, nccl on CUDA, one GPU per process:
``cuda:LOCAL_RANK``) and returns a :class:`DistributedContext`; without a launch it returns a
one-process context and touches nothing. :func:`sclatent.train.fit` takes the context and then:

* starts every rank from rank 0's parameters and buffers (one broadcast);
* cuts each epoch's shared random order of the training cells into *global* minibatches of
  ``world_size * batch_size`` cells, each split into ``world_size`` near-equal parts, part ``r``
  for rank ``r`` (:func:`global_step_sizes`, :func:`rank_minibatches`): every cell is seen once per
  epoch across the ranks, and every rank takes the same number of optimiser steps;
* makes every rank step with the gradient of the *global* minibatch's mean loss, so that the
  parameters stay identical: each rank's part is weighted by its share of the global minibatch
  (its cells / all ranks' cells) and the weighted gradients are summed over the ranks.

  How depends on the step kind (:class:`sclatent.steps.DistributedStep` wraps it):

  - Modules trained through autograd (autoencoders, the masked and contrastive models, VAEs
    outside the fused pass's configuration) are wrapped in
    :class:`torch.nn.parallel.DistributedDataParallel` (:meth:`DistributedContext.data_parallel`,
    around a :class:`LossModule`): DDP all-reduces the gradient in buckets while the backward pass
    is still running. DDP averages over the ranks, so each rank's loss is scaled by
    ``share * world_size`` before ``backward()``. DDP copies the reduced gradient into the existing
    ``.grad`` tensors (``gradient_as_bucket_view=False``), which are views into the
    :class:`~sclatent.optim.FlatAdam`'s flat gradient; ``find_unused_parameters=True`` because
    some configurations own parameters their loss does not use (the Poisson VAE's ``log_theta``),
    which would otherwise stall DDP's reduction.
  - Adversarial modules (``parameter_groups()``, e.g. the GAN) keep one all-reduce of each group's
    flat gradient per group step (:meth:`DistributedContext.sum_gradients_`): their groups are
    frozen in turn (``requires_grad_(False)``) and step on different objectives, which DDP, with
    its one fixed set of parameters reduced per backward, does not fit.
  - The VAE's direct-gradient pass (:mod:`sclatent.modules.fused_elbo`) builds no autograd graph
    for DDP to hook into: the same one all-reduce of the flat gradient per step.
* sums the per-epoch metric totals (training and validation, the validation cells sharded too)
  over the ranks before taking means, so the history, early stopping and the divergence check
  are the same on every rank, and averages BatchNorm's running statistics once per epoch.

The process group stays up after training (the caller may use it); :func:`teardown` ends it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .data.loader import resolve_device

_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly one-process) training job.

    Attributes
    ----------
    rank
        This process's index in ``0 .. world_size - 1``.
    world_size
        Number of processes training together (1: no torch.distributed launch).
    local_rank
        Index among the processes of this machine (selects the GPU).
    device
        The compute device of this process.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        """True when several processes train together (the distributed code path is taken)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and shows progress."""
        return self.rank == 0

    def rank_seed(self, seed: int) -> int:
        """Seed of this rank's own randomness (dropout, sampling): differs per rank, ``seed`` on rank 0."""
        return seed + self.rank

    # ----------------------------------------------------------------- collectives

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values, one broadcast per dtype."""
        if not self.enabled:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            offset = 0
            with torch.no_grad():
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (the start of training)."""
        self.broadcast_([*module.parameters(), *module.buffers()])

    def average_running_statistics_(self, module: torch.nn.Module) -> None:
        """Average BatchNorm's running means and variances over the ranks, in place (one all-reduce).

        BatchNorm normalises each rank's minibatch with that rank's statistics in training (it is
        not synchronised: SyncBatchNorm would cost a collective per layer and step), so the running
        statistics drift apart across ranks; averaging them once per epoch keeps the evaluated and
        saved model the same on every rank. Other buffers are left alone: they are either constants
        or, like the step count, equal on all ranks already.
        """
        if not self.enabled:
            return
        buffers = [b for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var"))]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        with torch.no_grad():
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()

    def data_parallel(self, module: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel:
        """``module``'s loss as a :class:`~torch.nn.parallel.DistributedDataParallel` (one-objective modules).

        Call it after the :class:`~sclatent.optim.FlatAdam` over ``module``'s parameters exists:
        DDP then copies each step's reduced (rank-averaged) gradient into the optimiser's gradient
        views. Calling the result with ``(batch, kl_weight)`` returns ``module.loss(batch,
        kl_weight=kl_weight)``; the backward pass of its ``loss`` reduces the gradients.

        Buffers are not broadcast on each forward (BatchNorm's running statistics are averaged once
        per epoch by :meth:`average_running_statistics_`); unused parameters are searched for on
        each forward (see the module docstring), and a parameter no rank used keeps its gradient
        (zero after ``zero_grad``).
        """
        from torch.nn.parallel import DistributedDataParallel

        # newer torch renames broadcast_buffers (deprecated) to forward_sync_buffers; both off here
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
            no_buffer_sync = {"forward_sync_buffers": False}
        else:
            no_buffer_sync = {"broadcast_buffers": False}
        return DistributedDataParallel(
            LossModule(module),
            device_ids=[self.device] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=False,
            find_unused_parameters=True,
            **no_buffer_sync,
        )

    def sum_gradients_(self, optimizer, weight: float) -> None:
        """Replace each rank's gradient ``g_r`` of ``optimizer``'s parameters by ``sum_r weight_r * g_r``.

        With ``weight`` this rank's share of the global minibatch (its cells / all ranks' cells) and
        ``g_r`` the gradient of its own minibatch's mean loss, the result is the gradient of the
        global minibatch's mean loss, on every rank.

        A :class:`~sclatent.optim.FlatAdam` keeps every gradient as a view into one flat buffer, so
        this is one all-reduce per optimiser step. Its fallback (parameters of mixed devices or
        dtypes) is reduced parameter by parameter, a missing gradient counting as zero.
        """
        if not self.enabled:
            return
        grad = getattr(optimizer, "grad", None)
        if getattr(optimizer, "flat", None) is not None and grad is not None:
            grad.mul_(weight)
            dist.all_reduce(grad)
            return
        for p in optimizer.parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(weight)
            dist.all_reduce(p.grad)

    def sum_totals(self, totals: dict) -> dict:
        """Sum a (nested) dict of per-epoch float totals over the ranks; the same result on every rank.

        The dicts are gathered whole (one ``all_gather_object`` per epoch, not per step) rather than
        packed into one tensor, because ranks may report different keys: a rank without validation
        cells has none of a module's extra terms. Sums are taken in rank order in Python floats
        (float64), so every rank gets bit-identical means and takes the same early-stopping decisions.
        """
        if not self.enabled:
            return totals
        gathered: list[dict] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, totals)
        return _sum_dicts(gathered)

    def gather_objects(self, obj) -> list:
        """``[rank 0's obj, rank 1's obj, ...]`` on every rank (pickled; for small per-epoch state)."""
        if not self.enabled:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.enabled:
            dist.barrier()

    # ----------------------------------------------------------------- sharding

    def shard_evenly(self, cells: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of ``cells`` (near-equal parts, for evaluation passes)."""
        if not self.enabled:
            return cells
        return np.array_split(np.asarray(cells), self.world_size)[self.rank]


class LossModule(torch.nn.Module):
    """A module whose ``forward`` is another module's ``loss``: what DDP wraps.

    DDP reduces gradients of what goes through its ``forward``; the modules of this package train
    on ``loss(batch, kl_weight=...)`` instead, so this adapter routes that call through ``forward``.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch, kl_weight: float):
        return self.module.loss(batch, kl_weight=kl_weight)


def _sum_dicts(dicts: Sequence[dict]) -> dict:
    """Key-wise sum of dicts whose values are numbers or dicts of the same form (union of the keys)."""
    out: dict = {}
    for d in dicts:
        for key, value in d.items():
            if isinstance(value, dict):
                out[key] = _sum_dicts([out.get(key, {}), value])
            else:
                out[key] = out.get(key, 0) + value
    return out


def global_step_sizes(n_cells: int, batch_size: int, world_size: int) -> np.ndarray:
    """Cells per rank of every global minibatch of an epoch over ``n_cells`` shuffled cells.

    Consecutive chunks of ``world_size * batch_size`` cells of the epoch's order are the global
    minibatches, each split into ``world_size`` parts whose sizes differ by at most one (rank
    ``r`` takes part ``r``). A final chunk too small to give every rank two cells (BatchNorm needs
    two) is folded into the previous minibatch rather than dropped, so that every cell is seen once
    per epoch.

    Returns
    -------
    numpy.ndarray
        ``(n_steps, world_size)`` int64: row ``s`` holds the sizes of step ``s``'s parts; rows sum to
        the global minibatch sizes and the whole array to ``n_cells``.
    """
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}.")
    if n_cells < 2 * world_size:
        raise ValueError(
            f"{n_cells} training cells cannot give each of {world_size} processes two cells per minibatch "
            "(BatchNorm needs two); use fewer processes or more cells."
        )
    chunk = world_size * batch_size
    totals = [chunk] * (n_cells // chunk)
    remainder = n_cells % chunk
    if remainder:
        if remainder < 2 * world_size and totals:
            totals[-1] += remainder
        else:
            totals.append(remainder)
    ranks = np.arange(world_size)
    return np.array([total // world_size + (ranks < total % world_size) for total in totals], dtype=np.int64)


def rank_minibatches(order: torch.Tensor, step_sizes: np.ndarray, rank: int) -> tuple[torch.Tensor, list[int]]:
    """Rank ``rank``'s cells of an epoch and its minibatch sizes.

    Parameters
    ----------
    order
        ``(n_cells,)`` the epoch's order of the training cells, the same on every rank.
    step_sizes
        ``(n_steps, world_size)`` from :func:`global_step_sizes`.
    rank
        This process's rank.

    Returns
    -------
    tuple of (torch.Tensor, list of int)
        ``(cells, batch_sizes)``: the rank's cells in minibatch order (``(sum(batch_sizes),)`` int64)
        and its ``n_steps`` minibatch sizes, for ``data.iterate(cells, ..., batch_sizes=batch_sizes)``.
    """
    ends = np.cumsum(step_sizes.reshape(-1))  # part ends, step-major: (step 0: rank 0, 1, ...), (step 1: ...)
    begins = ends - step_sizes.reshape(-1)
    world_size = step_sizes.shape[1]
    mine = slice(rank, None, world_size)
    index = np.concatenate([np.arange(b, e) for b, e in zip(begins[mine], ends[mine], strict=True)])
    return order[torch.from_numpy(index)], step_sizes[:, rank].tolist()


# --------------------------------------------------------------------- launch detection


def launched() -> bool:
    """True when this process is one of several started by torchrun (or in a multi-process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return all(v in os.environ for v in _LAUNCH_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch (for "only rank 0 writes" guards)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _launch_device(accelerator: str, local_rank: int) -> torch.device:
    """The device of one process of a launch: one GPU per process (``cuda:LOCAL_RANK``) or the CPU."""
    if accelerator in ("auto", None):
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu"):
        accelerator = f"cuda:{local_rank}"  # an explicit "cuda:k" is taken as given
    device = resolve_device(accelerator)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group exists: nccl binds to it
    return device


def context(accelerator: str = "auto") -> DistributedContext:
    """This process's :class:`DistributedContext`, joining the process group of a torchrun launch.

    Without a launch (``WORLD_SIZE`` unset or 1): a one-process context on
    ``resolve_device(accelerator)``; nothing is initialised. Under a launch: the device is
    ``cuda:LOCAL_RANK`` when ``accelerator`` is ``"auto"`` with CUDA available or ``"cuda"``, else
    the CPU; the default process group is initialised if it is not yet (nccl for CUDA, gloo for
    the CPU) and left up for the caller (end it with :func:`teardown`). An existing group is used
    as it is.
    """
    if not launched():
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=resolve_device(accelerator))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 says this is a distributed launch, but torch.distributed is unavailable.")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    device = _launch_device(accelerator, local_rank)
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE > 1 but {', '.join(missing)} unset: start the processes with torchrun "
                "(torchrun --standalone --nproc_per_node=N ...), which sets them."
            )
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    elif device.type == "cpu" and dist.get_backend() == "nccl":
        raise RuntimeError(
            "The process group uses nccl, which cannot reduce CPU tensors; train with accelerator='cuda' "
            "or initialise the group with backend='gloo'."
        )
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device
    )


def teardown() -> None:
    """Destroy the default process group if there is one (the end of a distributed program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
