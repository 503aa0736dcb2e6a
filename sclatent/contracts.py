"""The contracts the trainer works on: what a module computes, and what the data yield.

Every pure-torch model of the package, cell or image, is a :class:`Module`: it maps a minibatch
to a :class:`LossOutput` in :meth:`Module.loss`, and may offer a faster, autograd-free
:meth:`Module.loss_and_gradients`. A model trained by several players in turn (a GAN) is an
:class:`AdversarialModule`: named parameter groups, which groups step on which minibatch, and one
objective per group. Every dataset the trainer iterates is a :class:`TrainingData`: minibatches
over given indices, in a seeded order. :func:`sclatent.train.fit` calls these methods and nothing
else; it never asks a module or a dataset what it happens to have.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn


@runtime_checkable
class Batch(Protocol):
    """A minibatch: the trainer only needs its number of items (``MiniBatch``, ``ArrayBatch``)."""

    @property
    def size(self) -> int: ...


@dataclass
class LossOutput:
    """A module's objective on one minibatch.

    Attributes
    ----------
    loss
        Scalar the optimiser minimises (averaged over the minibatch, warm-up weighted).
    terms
        Named ``(B,)`` per-item terms (nats or the module's unit). The trainer logs the mean of
        each as ``train_<name>`` / ``validation_<name>``: e.g. ``reconstruction`` and ``kl`` for a
        VAE, ``nt_xent`` for a contrastive model, ``cross_entropy`` and ``accuracy`` for a classifier.
    elbo_terms
        For a model with an evidence lower bound only: the names of the terms whose negated sum is
        the ELBO (``("reconstruction", "kl")``); the trainer then logs ``*_elbo`` too. Empty for
        models without one (autoencoders, contrastive models, GANs, classifiers).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    elbo_terms: tuple[str, ...] = ()

    @classmethod
    def variational(
        cls,
        loss: torch.Tensor,
        reconstruction: torch.Tensor,
        kl: torch.Tensor,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> LossOutput:
        """The output of a model with an ELBO: ``elbo = -(reconstruction + kl)`` per item.

        ``reconstruction`` is the ``(B,)`` negative log-likelihood, ``kl`` the ``(B,)`` unweighted
        KL divergence (nats); ``extra`` further ``(B,)`` terms to log.
        """
        terms = {"reconstruction": reconstruction, "kl": kl, **(extra or {})}
        return cls(loss=loss, terms=terms, elbo_terms=("reconstruction", "kl"))

    @property
    def has_elbo(self) -> bool:
        return bool(self.elbo_terms)

    @property
    def elbo(self) -> torch.Tensor:
        """``(B,)`` evidence lower bound per item, nats; a ``ValueError`` for a model without one."""
        if not self.elbo_terms:
            raise ValueError("this module's objective is not an evidence lower bound (no elbo_terms).")
        total = self.terms[self.elbo_terms[0]]
        for name in self.elbo_terms[1:]:
            total = total + self.terms[name]
        return -total


class Module(nn.Module, metaclass=abc.ABCMeta):
    """A pure-torch model on the trainer's contract (it knows minibatches, never AnnData or loops).

    Required: :meth:`loss`. Optional: :attr:`default_monitor`, and the direct-gradient pair
    :meth:`supports_direct_gradients` / :meth:`loss_and_gradients`, a faster training step that
    writes gradients without autograd (the count VAE's fused pass).
    """

    #: What early stopping watches unless the caller says otherwise: ``"elbo"`` (maximised) or the
    #: name of a logged term or ``"loss"`` (minimised); the held-out value when there is one.
    default_monitor: ClassVar[str] = "loss"

    @abc.abstractmethod
    def loss(self, batch, kl_weight: float = 1.0) -> LossOutput:
        """The objective on ``batch``; ``kl_weight`` scales a KL term in ``loss`` (warm-up)."""

    def supports_direct_gradients(self) -> bool:
        """Whether :meth:`loss_and_gradients` may replace autograd for training this module as it
        is now (its configuration, device and dtype). The trainer asks once, before training."""
        return False

    def loss_and_gradients(self, batch, kl_weight: float = 1.0) -> LossOutput:
        """:meth:`loss` with the gradient of its ``loss`` written into every trainable parameter's
        ``.grad`` (replacing what was there, as ``zero_grad()`` then ``backward()`` would)."""
        raise NotImplementedError(f"{type(self).__name__} has no direct-gradient pass.")

    def loss_and_gradients_by_autograd(self, batch, kl_weight: float = 1.0) -> LossOutput:
        """:meth:`loss_and_gradients` through autograd: for the minibatches a direct pass cannot take
        (the same result, the graph freed, the returned tensors detached)."""
        out = self.loss(batch, kl_weight=kl_weight)
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.zero_()
        out.loss.backward()
        return LossOutput(out.loss.detach(), {k: v.detach() for k, v in out.terms.items()}, out.elbo_terms)

    def restrict_gradients(self, masks: dict[str, torch.Tensor]) -> None:
        """Train only some entries of some parameters: ``{parameter name: bool mask of its shape}``,
        True on the entries that train. Every step kind zeroes the other entries' gradients before
        the optimiser steps (the new batch rows of a query model: :meth:`sclatent.model.BaseModel.load_query_data`).
        Training-time state, not saved; an empty dict lifts it."""
        names = dict(self.named_parameters())
        unknown = sorted(set(masks) - set(names))
        if unknown:
            raise ValueError(f"masks name parameters {unknown} that {type(self).__name__} does not have.")
        for name, mask in masks.items():
            if mask.shape != names[name].shape or mask.dtype != torch.bool:
                raise ValueError(f"the mask of {name} must be a bool tensor of shape {tuple(names[name].shape)}.")
        self.__dict__["_gradient_masks"] = dict(masks)

    def gradient_masks(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """``(parameter, mask)`` pairs set by :meth:`restrict_gradients` (none by default)."""
        masks = self.__dict__.get("_gradient_masks", {})
        names = dict(self.named_parameters())
        return [(names[name], mask) for name, mask in masks.items()]


class AdversarialModule(Module):
    """A module trained by several players in turn, each on its own objective (a GAN).

    The trainer keeps one optimiser per parameter group; on each minibatch the groups named by
    :meth:`groups_to_step` each take one step on ``loss(batch, group=name)`` with the other groups
    frozen.
    """

    @abc.abstractmethod
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Disjoint named parameter groups; their insertion order is the order of updates."""

    @abc.abstractmethod
    def groups_to_step(self, step: int) -> list[str]:
        """The groups that update on the ``step``-th minibatch of training (counted from 0 over all epochs)."""

    def optimizer_settings(self) -> dict[str, dict]:
        """Per-group :class:`~sclatent.optim.FlatAdam` keyword overrides (``lr``, ``betas``, ...); none by default."""
        return {}

    @abc.abstractmethod
    def loss(self, batch, kl_weight: float = 1.0, group: str | None = None) -> LossOutput:
        """The objective of ``group`` on ``batch``."""


class TrainingData(abc.ABC):
    """What the trainer iterates: items (cells, images) addressed by index, cut into minibatches.

    Implemented by :class:`sclatent.data.CellData` (counts in memory),
    :class:`sclatent.data.OnDiskCellData` (streamed from disk),
    :class:`sclatent.data.neighbours.NeighbourData` (with a kNN neighbour per cell) and
    :class:`sclatent.images.data.ArrayData` (dense arrays).
    """

    #: One line on where the data live, shown in the progress bar (e.g. ``"streaming from disk"``).
    storage_note: str = ""

    @property
    @abc.abstractmethod
    def n_cells(self) -> int:
        """Number of items (cells, images)."""

    @abc.abstractmethod
    def iterate(
        self,
        cells: np.ndarray | torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        batch_sizes: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """Minibatches over ``cells`` (indices into this data).

        With ``shuffle`` the order is :meth:`epoch_order` of ``generator``; ``drop_last`` drops a
        final minibatch smaller than ``batch_size``; ``batch_sizes`` (positive, summing to
        ``len(cells)``) sets every minibatch's size, overriding both (a distributed rank's parts).
        """

    def epoch_order(self, cells: np.ndarray | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n,)`` int64: the order in which ``iterate(cells, shuffle=True, generator=generator)``
        visits ``cells``, drawn with the same generator calls (a uniform permutation by default)."""
        cells = index_tensor(cells)
        return cells[torch.randperm(cells.numel(), generator=generator)]


def index_tensor(cells: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``cells`` as an int64 tensor (a tensor stays on its device)."""
    if torch.is_tensor(cells):
        return cells.to(torch.int64)
    return torch.as_tensor(np.asarray(cells), dtype=torch.int64)


def checked_batch_sizes(batch_sizes: Sequence[int], n_cells: int) -> list[int]:
    """``batch_sizes`` as ints, after checking they are positive and cover the ``n_cells`` items."""
    sizes = [int(s) for s in batch_sizes]
    if any(s < 1 for s in sizes) or sum(sizes) != n_cells:
        raise ValueError(
            f"batch_sizes must be positive and sum to the number of cells ({n_cells}), got {len(sizes)} sizes "
            f"summing to {sum(sizes)}."
        )
    return sizes


def minibatch_sizes(
    n: int, batch_size: int, drop_last: bool = False, batch_sizes: Sequence[int] | None = None
) -> list[int]:
    """Sizes of the minibatches of an ``n``-item pass, as :meth:`TrainingData.iterate` cuts them."""
    if batch_sizes is not None:
        return checked_batch_sizes(batch_sizes, n)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [min(batch_size, stop - b) for b in range(0, stop, batch_size)]
