"""Invertible image layers of RealNVP (Dinh et al. 2017) and Glow (Kingma & Dhariwal 2018).

Every layer maps ``(B, C, H, W)`` tensors and has

* ``forward(x) -> (y, log_det)``: the normalising direction (data towards noise) with
  ``log |det dy/dx|`` per item, ``(B,)``;
* ``inverse(y) -> x``: the generating direction, exact (no iterative solve).

Why these blocks are not pyro's: pyro (used for the vector flows, :mod:`sclatent.nn.flows` and the
2-D density flows) has no actnorm and no squeeze. Its ``GeneralizedChannelPermute`` is an LU 1x1
convolution, but it learns ``U``'s diagonal directly, which can pass through zero (a singular ``W``)
and has no fixed sign; Glow's ``sign(s) exp(log|s|)`` keeps ``W`` invertible by construction. Its
``AffineCoupling`` splits one axis (channel masks via ``dim=-3``, no checkerboard), clamps the
log-scale to ``[-5, 3]`` (zero gradient outside) instead of a smooth bound, and, like every pyro
``Transform``, caches ``(x, y)`` pairs, which a multi-scale flow with splits would have to clear by
hand. The blocks here share one small contract instead, which the multi-scale flow
(:class:`sclatent.images.modules.flow.ImageFlowModule`) chains.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

CouplingMask = Literal["channel", "checkerboard"]
CouplingScale = Literal["tanh", "sigmoid"]
MASKS = get_args(CouplingMask)
SCALES = get_args(CouplingScale)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + b) exp(s)`` with data-dependent initialisation (Glow, sec. 3.1).

    On the first forward pass in training mode (or an explicit :meth:`initialise`), ``b`` and ``s``
    are set so that the minibatch's output has zero mean and unit variance per channel; after that
    they are ordinary parameters. The ``initialised`` buffer is saved in the state dict, so a loaded
    model is not re-initialised on its next batch.

    ``log |det| = H W sum_c s_c`` per item.
    """

    def __init__(self, n_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, n_channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, n_channels, 1, 1))
        self.register_buffer("initialised", torch.tensor(False))
        self.eps = eps

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """Set ``b = -mean``, ``s = -log std`` per channel from ``x`` ``(B, C, H, W)``."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialised.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialised):
            self.initialise(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        log_det = x.shape[2] * x.shape[3] * self.log_scale.sum()
        return y, log_det.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvertibleConv1x1(nn.Module):
    """A learned channel mixing ``y_{:, h, w} = W x_{:, h, w}``, ``W = P L (U + diag(sign(s) |s|))``.

    The LU parameterisation (Glow, sec. 3.2) makes ``log |det| = H W sum log|s|`` cost ``O(C)``
    instead of a ``O(C^3)`` determinant: ``P`` is a fixed permutation, ``L`` unit lower
    triangular, ``U`` strictly upper triangular, ``sign(s)`` fixed and ``log |s|`` learned. ``W``
    starts as a random rotation (its LU decomposition), so the layer starts volume-preserving.
    """

    def __init__(self, n_channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(n_channels, n_channels, generator=generator, dtype=torch.float64))
        p, lower, upper = scipy.linalg.lu(q.numpy())
        s = np.diag(upper)
        self.register_buffer("permutation", torch.as_tensor(p, dtype=torch.float32))
        self.register_buffer("sign_s", torch.as_tensor(np.sign(s), dtype=torch.float32))
        self.register_buffer("lower_mask", torch.tril(torch.ones(n_channels, n_channels), -1))
        self.lower = nn.Parameter(torch.as_tensor(np.tril(lower, -1), dtype=torch.float32))
        self.upper = nn.Parameter(torch.as_tensor(np.triu(upper, 1), dtype=torch.float32))
        self.log_s = nn.Parameter(torch.as_tensor(np.log(np.abs(s)), dtype=torch.float32))

    def weight(self) -> torch.Tensor:
        """The ``(C, C)`` mixing matrix ``P L (U + diag(sign(s) exp(log|s|)))``."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight()
        y = F.conv2d(x, w[:, :, None, None])
        log_det = x.shape[2] * x.shape[3] * self.log_s.sum()
        return y, log_det.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = torch.linalg.inv(self.weight())
        return F.conv2d(y, w_inv[:, :, None, None])


def checkerboard(height: int, width: int, parity: int = 0) -> torch.Tensor:
    """``(1, 1, H, W)`` 0/1 mask, 1 where ``(h + w + parity)`` is even: the pixels a coupling keeps."""
    h = torch.arange(height)[:, None]
    w = torch.arange(width)[None, :]
    return ((h + w + parity) % 2 == 0).float()[None, None]


class AffineCoupling(nn.Module):
    """RealNVP affine coupling: the masked half conditions a scale and shift of the other half.

    With a kept part ``x_a`` and a transformed part ``x_b``: ``y_a = x_a``,
    ``y_b = x_b * scale(x_a) + shift(x_a)``, ``log |det| = sum log scale``. The conditioner is
    ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3`` whose last convolution is zero-initialised,
    so a fresh coupling is exactly the identity (``scale = 1``, ``shift = 0``).

    Parameters
    ----------
    n_channels
        ``C`` of the inputs.
    mask
        ``"channel"``: ``x_a`` is the first ``C // 2`` channels (needs ``C >= 2``);
        ``"checkerboard"``: ``x_a`` the pixels where ``h + w + parity`` is even (all channels).
    parity
        Which checkerboard colour (or, for channel masks, which half: 1 swaps the halves) is kept.
    n_hidden
        Channels of the conditioner.
    scale
        ``"tanh"`` (default): ``scale = exp(a * tanh(h))`` with a learned per-channel ``a``
        (started at 1): ``|log scale| <= |a|``, so one coupling can neither blow up nor collapse a
        pixel on a bad step, and the inverse divides by a number bounded away from 0 (RealNVP's
        choice). ``"sigmoid"``: ``scale = 2 sigmoid(h)`` (Glow's sigmoid, centred so that ``h = 0``
        is the identity, where Glow's ``sigmoid(h + 2)`` starts at 0.88): contractions are
        unbounded, expansions at most 2x.
    """

    def __init__(
        self, n_channels: int, mask: str = "channel", parity: int = 0, n_hidden: int = 64, scale: str = "tanh"
    ) -> None:
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}.")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}.")
        if mask == "channel" and n_channels < 2:
            raise ValueError(
                f"a channel mask needs at least 2 channels, got {n_channels}; squeeze first or use mask='checkerboard'."
            )
        self.mask, self.parity, self.scale_kind = mask, int(parity) % 2, scale
        self.n_channels = n_channels
        if mask == "channel":
            n_keep = n_channels // 2
            self.n_in, self.n_out = (n_keep, n_channels - n_keep) if self.parity == 0 else (n_channels - n_keep, n_keep)
        else:
            self.n_in, self.n_out = n_channels, n_channels
        self.net = nn.Sequential(
            nn.Conv2d(self.n_in, n_hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hidden, n_hidden, 1),
            nn.ReLU(),
            nn.Conv2d(n_hidden, 2 * self.n_out, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale_factor = nn.Parameter(torch.ones(1, self.n_out, 1, 1))

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_first = self.n_in if self.parity == 0 else self.n_out
        first, second = x[:, :n_first], x[:, n_first:]
        return (first, second) if self.parity == 0 else (second, first)

    def _join(self, kept: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([kept, changed] if self.parity == 0 else [changed, kept], dim=1)

    def _scale_shift(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_scale, shift = self.net(kept).chunk(2, dim=1)
        if self.scale_kind == "tanh":
            log_scale = self.scale_factor * torch.tanh(h_scale)
        else:
            log_scale = F.logsigmoid(h_scale) + math.log(2.0)
        return log_scale, shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask == "channel":
            kept, changed = self._split(x)
            log_scale, shift = self._scale_shift(kept)
            y = self._join(kept, changed * torch.exp(log_scale) + shift)
            return y, log_scale.flatten(1).sum(1)
        keep = checkerboard(x.shape[2], x.shape[3], self.parity).to(x)
        log_scale, shift = self._scale_shift(x * keep)
        log_scale, shift = log_scale * (1 - keep), shift * (1 - keep)
        y = x * keep + (1 - keep) * (x * torch.exp(log_scale) + shift)
        return y, log_scale.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.mask == "channel":
            kept, changed = self._split(y)
            log_scale, shift = self._scale_shift(kept)
            return self._join(kept, (changed - shift) * torch.exp(-log_scale))
        keep = checkerboard(y.shape[2], y.shape[3], self.parity).to(y)
        log_scale, shift = self._scale_shift(y * keep)
        return y * keep + (1 - keep) * (y - shift) * torch.exp(-log_scale)


class Squeeze(nn.Module):
    """Space-to-depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, each 2x2 block into channels (``log |det| = 0``)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got {h}x{w}.")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        b, c4, h, w = y.shape
        c = c4 // 4
        return y.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class FlowStep(nn.Module):
    """One Glow step: actnorm -> invertible 1x1 convolution -> affine coupling."""

    def __init__(
        self,
        n_channels: int,
        mask: str = "channel",
        parity: int = 0,
        n_hidden: int = 64,
        scale: str = "tanh",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.actnorm = ActNorm(n_channels)
        self.conv = InvertibleConv1x1(n_channels, generator)
        self.coupling = AffineCoupling(n_channels, mask, parity, n_hidden, scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = x.new_zeros(x.shape[0])
        for layer in (self.actnorm, self.conv, self.coupling):
            x, ld = layer(x)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in (self.coupling, self.conv, self.actnorm):
            y = layer.inverse(y)
        return y
