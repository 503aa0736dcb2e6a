"""Normalizing flows for a learned prior ``p(z)`` on a VAE's latent space.

A flow prior is ``p(z) = N(g(z); 0, I) |det dg/dz|`` with ``g = g_K o ... o g_1`` a chain of
invertible layers mapping a latent ``z`` to a standard-normal ``u``. The VAE needs ``log p(z)`` at
samples of its posterior (in the KL term and in the importance weights of the marginal
likelihood) many times per step and needs prior *samples* only rarely (generating cells). So each
layer is applied in the normalising direction ``z -> u`` (one forward pass, exact log-determinant)
and the generating direction ``u -> z`` is its inverse.

Layers
------
``planar``
    pyro's :class:`~pyro.distributions.transforms.Planar`, ``y = x + u_hat tanh(w.x + b)``
    (Rezende & Mohamed 2015). pyro gives no inverse, and its constraint ``w.u_hat > -1`` cannot
    represent the identity (``u = 0`` still gives ``u_hat = -0.31 w / |w|^2``). :class:`PlanarLayer`
    subclasses it to (a) shift the constraint so that ``u = 0`` is exactly the identity (the flow
    starts as the standard-normal prior) and (b) invert it numerically: with ``a = w.x + b`` the
    layer gives ``w.y + b = a + beta tanh(a)``, ``beta = w.u_hat > -1``, strictly increasing in
    ``a``, so ``a`` is found by bisection on ``[w.y + b - |beta|, w.y + b + |beta|]`` and then
    ``x = y - u_hat tanh(a)``.
``realnvp``
    pyro's :class:`~pyro.distributions.transforms.AffineCoupling` (RealNVP; exact inverse and
    log-determinant) with a :class:`pyro.nn.DenseNN` conditioner whose last layer is zero-initialised
    (identity at the start). Consecutive couplings reverse the coordinates so that every coordinate
    gets transformed; pyro's ``Permute`` is a plain ``Transform`` (not an ``nn.Module``, so its index
    tensor would not follow ``.to(device)``), hence the reversal here is a ``flip``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions.transforms import AffineCoupling, Planar
from pyro.nn import DenseNN
from torch import nn

FLOW_KINDS = ("planar", "realnvp")
# log(e - 1): softplus of it is 1, so the shifted constraint maps w.u = 0 to w.u_hat = 0
_SHIFT = math.log(math.e - 1.0)


class PlanarLayer(Planar):
    """pyro's planar layer, identity at ``u = 0``, with a numerical inverse.

    ``y = x + u_hat tanh(w.x + b)`` with ``u_hat = u + (m(w.u) - w.u) w / |w|^2`` and
    ``m(a) = softplus(a + log(e - 1)) - 1 > -1``, which keeps the layer invertible (pyro uses
    ``softplus(a) - 1``; the shift makes ``m(0) = 0``). Inputs ``(..., d)``.

    Parameters
    ----------
    dim
        Latent dimension ``d``.
    identity_init
        Start with ``u = 0`` (the identity map); otherwise pyro's random initialisation.
    """

    def __init__(self, dim: int, identity_init: bool = True) -> None:
        super().__init__(dim)
        if identity_init:
            with torch.no_grad():
                self.u.zero_()

    def u_hat(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        alpha = (u * w).sum(-1, keepdim=True)
        return u + (F.softplus(alpha + _SHIFT) - 1.0 - alpha) * w / w.pow(2).sum(-1, keepdim=True)

    def _inverse(self, y: torch.Tensor, n_iter: int = 100) -> torch.Tensor:
        u_hat = self.u_hat(self.u, self.w)
        beta = (self.w * u_hat).sum()
        target = y @ self.w + self.bias  # = a + beta tanh(a)
        half = beta.abs() + 1e-12
        lo, hi = target - half, target + half
        # bisection: the root is bracketed and f(a) = a + beta tanh(a) increases strictly
        for _ in range(n_iter):
            mid = 0.5 * (lo + hi)
            above = mid + beta * torch.tanh(mid) > target
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        a = 0.5 * (lo + hi)
        return y - u_hat * torch.tanh(a).unsqueeze(-1)


def affine_coupling(dim: int, hidden: int, identity_init: bool = True) -> AffineCoupling:
    """pyro's RealNVP coupling on ``(..., dim)``: the last ``dim - dim // 2`` coordinates are scaled and
    shifted by a one-hidden-layer ReLU network of the first ``dim // 2``."""
    split = dim // 2
    hypernet = DenseNN(split, [hidden], param_dims=[dim - split, dim - split])
    if identity_init:
        with torch.no_grad():
            hypernet.layers[-1].weight.zero_()
            hypernet.layers[-1].bias.zero_()
    return AffineCoupling(split, hypernet)


class FlowPrior(nn.Module):
    """A learned prior ``p(z)``: a standard normal pushed through an invertible flow.

    Parameters
    ----------
    n_latent
        Latent dimension ``d``.
    kind
        ``"planar"`` or ``"realnvp"``.
    n_flows
        Number of layers ``K``.
    n_hidden
        Hidden width of each RealNVP conditioner (unused for planar).
    identity_init
        Start every layer at the identity, so the prior starts as ``N(0, I)``.
    """

    def __init__(
        self, n_latent: int, kind: str = "planar", n_flows: int = 8, n_hidden: int = 64, identity_init: bool = True
    ) -> None:
        super().__init__()
        if kind not in FLOW_KINDS:
            raise ValueError(f"flow kind must be one of {FLOW_KINDS}, got {kind!r}.")
        if n_flows < 1:
            raise ValueError(f"n_flows must be >= 1, got {n_flows}.")
        if kind == "realnvp" and n_latent < 2:
            raise ValueError("a RealNVP prior needs n_latent >= 2 (a coupling splits the coordinates).")
        self.n_latent, self.kind = n_latent, kind
        if kind == "planar":
            layers = [PlanarLayer(n_latent, identity_init) for _ in range(n_flows)]
        else:
            layers = [affine_coupling(n_latent, n_hidden, identity_init) for _ in range(n_flows)]
        self.layers = nn.ModuleList(layers)

    def _flip(self, i: int) -> bool:
        """Whether coordinates are reversed after coupling ``i`` (all but the last)."""
        return self.kind == "realnvp" and i < len(self.layers) - 1

    def normalize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z -> u = g(z)`` and ``log |det dg/dz|``; ``z`` is ``(..., d)``, the log-determinant ``(...)``."""
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        x = z
        for i, layer in enumerate(self.layers):
            y = layer(x)
            log_det = log_det + layer.log_abs_det_jacobian(x, y)
            # pyro caches the last (x, y) and intermediates on the layer; drop them so no autograd
            # graph outlives the step (and the module stays deep-copyable)
            layer._cached_x_y = (None, None)
            if hasattr(layer, "_cached_logDetJ"):
                layer._cached_logDetJ = None
            if hasattr(layer, "_cached_log_scale"):
                layer._cached_log_scale = None
            x = y.flip(-1) if self._flip(i) else y
        return x, log_det

    def generate(self, u: torch.Tensor) -> torch.Tensor:
        """``u -> z = g^{-1}(u)``, the inverse of :meth:`normalize`; ``(..., d)``."""
        x = u
        for i in reversed(range(len(self.layers))):
            if self._flip(i):
                x = x.flip(-1)
            x = self.layers[i]._inverse(x)
        return x

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log p(z)`` (nats), summed over the last dimension: ``(..., d) -> (...)``."""
        u, log_det = self.normalize(z)
        return -0.5 * (u.pow(2).sum(-1) + self.n_latent * math.log(2 * math.pi)) + log_det

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, d)`` draws from the prior."""
        param = next(self.parameters())
        u = torch.randn((n, self.n_latent), generator=generator, dtype=param.dtype, device=param.device)
        return self.generate(u)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, n_latent={self.n_latent}, n_flows={len(self.layers)}"


POSTERIOR_KINDS = ("normal", "iaf")


class IAFPosterior(nn.Module):
    """An inverse-autoregressive flow (Kingma et al. 2016) on the Gaussian posterior's sample.

    ``z = f_K o ... o f_1 (z0)``, ``z0 ~ N(m(x), v(x))``, each ``f_k`` pyro's
    :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive`
    (``y_i = x_i exp(s_i) + t_i`` with ``(t_i, s_i)`` a MADE of ``x_{<i}`` and the cell's context) with a
    :class:`pyro.nn.ConditionalAutoRegressiveNN`. The IAF direction is the cheap one for a posterior:
    sampling ``z`` and its ``log |det|`` take one pass; only the (unused in training) inverse is
    sequential. Each MADE keeps the natural order; consecutive layers reverse the coordinates with a
    ``flip`` (as :class:`FlowPrior` does; an odd number of flips is undone at the end, so the coordinates
    of ``z`` keep their meaning), so nothing device-bound lives outside the modules. The last
    layer of every MADE is zero (``t = s = 0``), so a fresh flow is exactly the identity.

    Parameters
    ----------
    n_latent
        Latent dimension ``d``.
    context_dim
        Width of the conditioning vector (the VAE passes ``[m(x), log v(x)]``, ``2 d``).
    n_flows
        Number of layers ``K``.
    n_hidden
        Hidden width of each MADE (one hidden layer).
    identity_init
        Zero the MADEs' last layers so the flow starts as the identity.
    """

    def __init__(
        self, n_latent: int, context_dim: int, n_flows: int = 4, n_hidden: int = 64, identity_init: bool = True
    ) -> None:
        super().__init__()
        if n_flows < 1:
            raise ValueError(f"n_posterior_flows must be >= 1, got {n_flows}.")
        from pyro.distributions.transforms import ConditionalAffineAutoregressive
        from pyro.nn import ConditionalAutoRegressiveNN

        self.n_latent = n_latent
        layers = []
        for _ in range(n_flows):
            # natural order inside each MADE (the permutation is a registered buffer of the net)
            arn = ConditionalAutoRegressiveNN(
                n_latent, context_dim, [n_hidden], param_dims=[1, 1], permutation=torch.arange(n_latent)
            )
            if identity_init:
                with torch.no_grad():
                    arn.layers[-1].weight.zero_()
                    arn.layers[-1].bias.zero_()
            layers.append(ConditionalAffineAutoregressive(arn))
        self.layers = nn.ModuleList(layers)

    def _flip(self, i: int) -> bool:
        return i < len(self.layers) - 1

    def forward(self, z0: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z0 -> z`` and ``sum_k log |det df_k|``; ``z0`` ``(..., d)``, ``context`` ``(B, c)``
        broadcastable to ``z0``'s leading shape; the log-determinant is ``(...)``."""
        log_det = torch.zeros(z0.shape[:-1], dtype=z0.dtype, device=z0.device)
        x = z0
        for i, layer in enumerate(self.layers):
            t = layer.condition(context)  # a fresh transform each call: no cache outlives the step
            y = t(x)
            log_det = log_det + t.log_abs_det_jacobian(x, y)
            x = y.flip(-1) if self._flip(i) else y
        if self._restore():
            x = x.flip(-1)
        return x, log_det

    def _restore(self) -> bool:
        """Whether an odd number of reversals is undone at the end (so the identity init is the identity)."""
        return (len(self.layers) - 1) % 2 == 1

    def inverse(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``z -> z0``, the inverse of :meth:`forward` (sequential over coordinates)."""
        x = z.flip(-1) if self._restore() else z
        for i in reversed(range(len(self.layers))):
            if self._flip(i):
                x = x.flip(-1)
            x = self.layers[i].condition(context)._inverse(x)
        return x

    def extra_repr(self) -> str:
        return f"n_latent={self.n_latent}, n_flows={len(self.layers)}"
