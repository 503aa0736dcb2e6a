"""Flows on 2-D (or low-dimensional) densities: fit to an energy by reverse KL, or to samples by maximum likelihood.

Reverse KL (Rezende & Mohamed 2015, sec. 6.1)
    ``q`` is a standard normal ``u`` pushed through ``K`` planar layers
    (:class:`sclatent.nn.flows.PlanarLayer`, pyro's ``Planar``), ``z = f_K o ... o f_1 (u)``, with
    ``log q(z) = log N(u; 0, I) - sum_k log |det df_k|``. For a target ``p(z) = exp(-U(z)) / Z``,

        KL(q || p) = E_q[log q(z) + U(z)] + log Z,

    so minimising ``F = E_q[log q(z) + U(z)]`` (the variational free energy; ``-F`` is a lower
    bound on ``log Z``) needs only samples of ``q``, no data. The "minibatch" of this module is a
    batch of base draws ``u`` (see :class:`sclatent.images.EnergyFlow`, which feeds seeded draws to the
    one trainer). Its terms are ``energy`` (``U(z)``) and ``log_q`` (``log q(z)``), whose negated
    sum is the trainer's ELBO: exactly the bound ``-F`` on ``log Z``; ``reverse_kl`` adds the grid-integrated
    ``log Z`` (:func:`sclatent.datasets.log_normaliser`), the divergence itself (nats, >= 0 in
    expectation). The trainer's warm-up weight multiplies ``U`` (the inverse temperature ``beta``
    of Rezende & Mohamed's annealing), so ``kl_warmup_epochs`` anneals from a flat target.

Maximum likelihood on samples
    :class:`SampleFlowModule` is :class:`sclatent.nn.flows.FlowPrior` (pyro's planar or RealNVP
    ``AffineCoupling`` layers, applied in the normalising direction, where ``log p(x)`` is exact)
    trained on ``-log p(x)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from ...contracts import LossOutput, Module
from ...datasets import ENERGIES, log_normaliser
from ...datasets import energy as energy_function
from ...hyperparameters import Hyperparameters, setting
from ...nn.flows import FLOW_KINDS, FlowPrior, PlanarLayer
from ..data import ArrayBatch

_LOG_2PI = math.log(2 * math.pi)
Energy = Literal["U1", "U2", "U3", "U4"]
FlowKind = Literal["planar", "realnvp"]
assert get_args(Energy) == ENERGIES and get_args(FlowKind) == FLOW_KINDS


@dataclass(frozen=True)
class EnergyFlowHyperparameters(Hyperparameters):
    """The energy flow's hyperparameters, declared once: read by :class:`EnergyFlowModule`,
    :class:`sclatent.images.EnergyFlow` and ``sclatent toy-flow``."""

    family: ClassVar[str] = "EnergyFlow"

    energy: Energy = setting("U1", "The target energy U of Rezende & Mohamed (2015), Table 1.")
    n_flows: int = setting(16, "Planar layers K.", minimum=1)
    bounded: bool = setting(
        True, "Energies with the wall outside |z1| <= 4, which makes Z and so the reverse KL finite."
    )


@dataclass(frozen=True)
class DensityFlowHyperparameters(Hyperparameters):
    """The sample flow's hyperparameters, declared once: read by :class:`SampleFlowModule` and
    :class:`sclatent.images.DensityFlow`."""

    family: ClassVar[str] = "DensityFlow"

    kind: FlowKind = setting("realnvp", "Pyro flow layers: planar, or RealNVP affine couplings.")
    n_flows: int = setting(8, "Flow layers.", minimum=1)
    n_hidden: int = setting(64, "Hidden width of each RealNVP coupling's conditioner.", minimum=1)


def _standard_normal_log_prob(u: torch.Tensor) -> torch.Tensor:
    return -0.5 * (u.pow(2).sum(-1) + u.shape[-1] * _LOG_2PI)


def _clear_cache(layer: PlanarLayer) -> None:
    # pyro caches the last (x, y) on a transform; drop it so no graph outlives the step (as FlowPrior does)
    layer._cached_x_y = (None, None)
    if hasattr(layer, "_cached_logDetJ"):
        layer._cached_logDetJ = None


class EnergyFlowModule(Module):
    """Planar flow ``q(z)`` fitted to ``exp(-U(z))`` by reverse KL.

    Parameters
    ----------
    input_shape
        ``(2,)`` (the energies are 2-D).
    **hyperparameters
        :class:`EnergyFlowHyperparameters`: ``energy`` (``"U1"`` .. ``"U4"``, Rezende & Mohamed
        2015, Table 1), ``n_flows`` (number of planar layers ``K``) and ``bounded`` (the energies
        with the wall outside ``|z1| <= 4``, :func:`sclatent.datasets.energy`, which makes ``Z`` and
        so the reverse KL finite).
    """

    # early stopping watches the bound -F on log Z (maximised) unless told otherwise
    default_monitor = "elbo"

    def __init__(self, input_shape: tuple[int, ...] = (2,), **hyperparameters: Any) -> None:
        super().__init__()
        if tuple(input_shape) != (2,):
            raise ValueError(f"the energies U1..U4 are 2-D: input_shape must be (2,), got {tuple(input_shape)}.")
        settings = EnergyFlowHyperparameters.from_dict(hyperparameters)
        energy, n_flows, bounded = settings.energy, settings.n_flows, settings.bounded
        self.energy_name, self.bounded = energy, bounded
        self.energy = energy_function(energy, bounded)
        # identity start: q begins as N(0, I); the layers' random w differ, so they do not train alike
        self.layers = nn.ModuleList([PlanarLayer(2, identity_init=True) for _ in range(n_flows)])
        self.log_z = log_normaliser(energy, bounded) if bounded or energy == "U1" else math.nan

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u -> z = f(u)`` and ``sum_k log |det df_k|``: ``(..., 2) -> ((..., 2), (...))``."""
        log_det = torch.zeros(u.shape[:-1], dtype=u.dtype, device=u.device)
        x = u
        for layer in self.layers:
            y = layer(x)
            log_det = log_det + layer.log_abs_det_jacobian(x, y)
            _clear_cache(layer)
            x = y
        return x, log_det

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """``z -> u`` by each layer's bisection inverse."""
        for layer in reversed(self.layers):
            z = layer._inverse(z)
        return z

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log q(z)`` (nats) of the flow at points ``(..., 2)``: inverted, then the forward log-determinant."""
        u = self.inverse(z)
        _, log_det = self.forward(u)
        return _standard_normal_log_prob(u) - log_det

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0) -> LossOutput:
        """Free energy ``log q(z) + beta U(z)`` at ``z = f(u)`` for the batch's base draws ``u = batch.x``.

        Terms: ``energy`` (``U(z)``) and ``log_q`` (``log q(z)``), nats, whose negated sum is the
        ELBO ``-F`` of ``log Z``; ``reverse_kl`` (``F + log Z``). ``kl_weight`` is ``beta``.
        """
        u = batch.x
        z, log_det = self.forward(u)
        log_q = _standard_normal_log_prob(u) - log_det
        energy_value = self.energy(z)
        free_energy = log_q + energy_value
        terms = {"energy": energy_value, "log_q": log_q, "reverse_kl": free_energy + self.log_z}
        return LossOutput(loss=(log_q + kl_weight * energy_value).mean(), terms=terms, elbo_terms=("energy", "log_q"))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, 2)`` draws of ``q``."""
        param = self.layers[0].w
        u = torch.randn((n, 2), generator=generator, dtype=param.dtype).to(param.device)
        return self.forward(u)[0]


class SampleFlowModule(Module):
    """A flow density ``p(x)`` (:class:`sclatent.nn.flows.FlowPrior`) fitted to samples by maximum likelihood.

    Parameters
    ----------
    input_shape
        ``(D,)``.
    **hyperparameters
        :class:`DensityFlowHyperparameters`: ``kind`` (``"planar"`` or ``"realnvp"`` pyro layers),
        ``n_flows`` and ``n_hidden`` (layers and RealNVP conditioner width).
    """

    # early stopping watches the NLL (minimised) unless told otherwise
    default_monitor = "nll"

    def __init__(self, input_shape: tuple[int, ...] = (2,), **hyperparameters: Any) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"SampleFlowModule models vectors: input_shape must be (D,), got {tuple(input_shape)}.")
        settings = DensityFlowHyperparameters.from_dict(hyperparameters)
        self.flow = FlowPrior(
            int(input_shape[0]), kind=settings.kind, n_flows=settings.n_flows, n_hidden=settings.n_hidden
        )

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` (nats), ``(..., D) -> (...)``."""
        return self.flow.log_prob(x)

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0) -> LossOutput:
        """Term ``nll``: ``-log p(x)`` (nats) of each item, the loss."""
        nll = -self.log_prob(batch.x)
        return LossOutput(loss=nll.mean(), terms={"nll": nll})

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.flow.sample(n, generator)
