"""Training steps by kind: one optimiser update (or one per player) on one minibatch.

The epoch loop of :mod:`sclatent.train` calls a step object per minibatch and never branches on
the kind of model. Three kinds, picked once per ``fit`` by :func:`make_step`:

- :class:`AutogradStep`: ``module.loss`` -> ``backward()`` -> Adam. Every one-objective module.
- :class:`DirectGradientStep`: ``module.loss_and_gradients`` writes the gradients itself (the
  count VAE's fused pass, :mod:`sclatent.modules.fused_elbo`), then Adam. Chosen when the module
  says it can (:meth:`~sclatent.contracts.Module.supports_direct_gradients`) and nothing hooks
  into autograd's backward pass.
- :class:`AdversarialStep`: each parameter group due this minibatch steps on its own objective
  with the other groups frozen (an :class:`~sclatent.contracts.AdversarialModule`, e.g. a GAN).

:class:`DistributedStep` wraps any of them for a ``torchrun`` job (:mod:`sclatent.distributed`):
each rank runs the inner step on its part of the global minibatch, and the ranks' gradients are
combined before every update, weighted by each rank's share of the global minibatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch

from .contracts import AdversarialModule, Batch, LossOutput, Module
from .distributed import DistributedContext
from .optim import FlatAdam

#: What a step returns: one ``(group, output)`` per update it made (``group`` None for one objective).
StepOutputs = list[tuple[str | None, LossOutput]]
#: Called with an optimiser after the gradients are in place and before it steps.
BeforeUpdate = Callable[[FlatAdam], None]
#: ``(parameter, bool mask)`` pairs whose False entries must not train (:meth:`Module.gradient_masks`).
Masks = list[tuple[torch.nn.Parameter, torch.Tensor]]
#: Any of the step kinds below.
Step = Union["AutogradStep", "DirectGradientStep", "AdversarialStep", "DistributedStep"]


def _apply_masks(masks: Masks) -> None:
    """Zero the gradient of every masked-out entry (in place: the optimiser's flat gradient views)."""
    for parameter, mask in masks:
        if parameter.grad is not None:
            parameter.grad.mul_(mask.to(parameter.grad.device))


class AutogradStep:
    """``loss`` -> ``backward`` -> Adam step, for a one-objective :class:`~sclatent.contracts.Module`.

    ``objective(batch, kl_weight)`` computes the :class:`LossOutput`; by default ``module.loss``
    (a distributed run passes its DistributedDataParallel wrapper of it).
    """

    def __init__(
        self,
        module: Module,
        optimizer: FlatAdam,
        objective: Callable[[Batch, float], LossOutput] | None = None,
        masks: Masks = (),
    ) -> None:
        self.module, self.optimizer, self.masks = module, optimizer, list(masks)
        self.objective = objective or (lambda batch, kl_weight: module.loss(batch, kl_weight=kl_weight))

    @property
    def optimizers(self) -> dict[str, FlatAdam]:
        return {"adam": self.optimizer}

    def __call__(
        self,
        batch: Batch,
        kl_weight: float,
        global_step: int,
        loss_scale: float = 1.0,
        before_update: BeforeUpdate | None = None,
    ) -> StepOutputs:
        out = self.objective(batch, kl_weight)
        self.optimizer.zero_grad()
        (out.loss if loss_scale == 1.0 else out.loss * loss_scale).backward()
        _apply_masks(self.masks)
        if before_update is not None:
            before_update(self.optimizer)
        self.optimizer.step()
        return [(None, out)]


class DirectGradientStep:
    """``loss_and_gradients`` (gradients written without autograd) -> Adam step."""

    def __init__(self, module: Module, optimizer: FlatAdam, masks: Masks = ()) -> None:
        self.module, self.optimizer, self.masks = module, optimizer, list(masks)

    @property
    def optimizers(self) -> dict[str, FlatAdam]:
        return {"adam": self.optimizer}

    def __call__(
        self, batch: Batch, kl_weight: float, global_step: int, before_update: BeforeUpdate | None = None
    ) -> StepOutputs:
        out = self.module.loss_and_gradients(batch, kl_weight=kl_weight)
        _apply_masks(self.masks)
        if before_update is not None:
            before_update(self.optimizer)
        self.optimizer.step()
        return [(None, out)]


class AdversarialStep:
    """One update per parameter group due on this minibatch, each on its own objective.

    Freezing the other groups (``requires_grad_(False)``) keeps autograd from computing their
    weight gradients at all (a generator step still backpropagates *through* the critic to its
    input, but needs no gradient for the critic's weights), and only the group's own optimiser steps.
    """

    def __init__(self, module: AdversarialModule, optimizers: dict[str, FlatAdam], masks: Masks = ()) -> None:
        self.module, self._optimizers, self.masks = module, optimizers, list(masks)
        self.groups = checked_parameter_groups(module)

    @property
    def optimizers(self) -> dict[str, FlatAdam]:
        return self._optimizers

    def __call__(
        self, batch: Batch, kl_weight: float, global_step: int, before_update: BeforeUpdate | None = None
    ) -> StepOutputs:
        return [
            (name, self._update(batch, name, kl_weight, before_update))
            for name in self.module.groups_to_step(global_step)
        ]

    def _update(self, batch: Batch, name: str, kl_weight: float, before_update: BeforeUpdate | None) -> LossOutput:
        frozen = [p for other, params in self.groups.items() if other != name for p in params]
        for p in frozen:
            p.requires_grad_(False)
        try:
            out = self.module.loss(batch, kl_weight=kl_weight, group=name)
            self._optimizers[name].zero_grad()
            out.loss.backward()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        _apply_masks(self.masks)
        if before_update is not None:
            before_update(self._optimizers[name])
        self._optimizers[name].step()
        return out


class DistributedStep:
    """An inner step run on this rank's part of each global minibatch of a torchrun job.

    Every update uses the gradient of the *global* minibatch's mean loss: each rank's gradient of
    its own part is weighted by its share (its cells / the global minibatch's) and the ranks'
    gradients are summed. An :class:`AutogradStep` runs under
    :class:`~torch.nn.parallel.DistributedDataParallel` (which reduces in buckets during the
    backward pass and averages, hence the loss scaled by ``share * world_size``); the other kinds
    sum each optimiser's flat gradient in one all-reduce before it steps.
    """

    def __init__(self, inner: AutogradStep | DirectGradientStep | AdversarialStep, context: DistributedContext) -> None:
        self.inner, self.context = inner, context
        self.uses_ddp = isinstance(inner, AutogradStep)
        if self.uses_ddp:
            # made after the optimiser exists, so DDP fills the optimiser's flat gradient views
            parallel = context.data_parallel(inner.module)
            inner.objective = parallel

    @property
    def optimizers(self) -> dict[str, FlatAdam]:
        return self.inner.optimizers

    def __call__(self, batch: Batch, kl_weight: float, global_step: int, share: float) -> StepOutputs:
        if self.uses_ddp:
            return self.inner(batch, kl_weight, global_step, loss_scale=share * self.context.world_size)

        def combine(optimizer: FlatAdam) -> None:
            self.context.sum_gradients_(optimizer, share)

        return self.inner(batch, kl_weight, global_step, before_update=combine)


def checked_parameter_groups(module: AdversarialModule) -> dict[str, list[torch.nn.Parameter]]:
    """The module's trainable parameter groups, checked non-empty and disjoint."""
    groups = {name: [p for p in params if p.requires_grad] for name, params in module.parameter_groups().items()}
    seen: set[int] = set()
    for name, params in groups.items():
        if not params:
            raise ValueError(f"parameter group {name!r} has no trainable parameters.")
        ids = {id(p) for p in params}
        if ids & seen:
            raise ValueError(f"parameter group {name!r} shares parameters with another group.")
        seen |= ids
    return groups


def make_optimizers(module: Module, lr: float, weight_decay: float, eps: float) -> dict[str, FlatAdam]:
    """One :class:`FlatAdam` per parameter group (``{"adam": ...}`` for a one-objective module)."""
    defaults = {"lr": lr, "weight_decay": weight_decay, "eps": eps}
    if not isinstance(module, AdversarialModule):
        return {"adam": FlatAdam([p for p in module.parameters() if p.requires_grad], **defaults)}
    settings = module.optimizer_settings()
    return {
        name: FlatAdam(params, **{**defaults, **settings.get(name, {})})
        for name, params in checked_parameter_groups(module).items()
    }


def has_backward_hooks(module: Module) -> bool:
    """Whether a hook waits on autograd's backward pass of some parameter (the direct path runs none)."""
    return any(p._backward_hooks or p._post_accumulate_grad_hooks for p in module.parameters())


def make_step(
    module: Module, optimizers: dict[str, FlatAdam], distributed: DistributedContext | None = None
) -> AutogradStep | DirectGradientStep | AdversarialStep | DistributedStep:
    """The step kind for ``module``, chosen once: adversarial, direct gradients or autograd,
    wrapped for distribution when ``distributed`` is a multi-process context; every kind zeroes the
    gradients the module's :meth:`~sclatent.contracts.Module.gradient_masks` exclude before each update."""
    masks = module.gradient_masks()
    if isinstance(module, AdversarialModule):
        step = AdversarialStep(module, optimizers, masks)
    elif module.supports_direct_gradients() and not has_backward_hooks(module):
        step = DirectGradientStep(module, optimizers["adam"], masks)
    else:
        step = AutogradStep(module, optimizers["adam"], masks=masks)
    if distributed is not None and distributed.enabled:
        return DistributedStep(step, distributed)
    return step
