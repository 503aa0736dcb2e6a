"""Pixel-level transforms of image models: binarisation and dequantisation.

* Dynamic binarisation (Salakhutdinov & Murray 2008): every time an image is seen, each pixel
  is drawn ``~ Bernoulli(intensity)``, so the model sees a fresh binary image per epoch.
* Fixed binarisation: ``intensity > threshold``, once (the other convention of the literature;
  NLLs from the two are not comparable).
* Uniform dequantisation (Theis et al. 2016; RealNVP, Glow): a grey level ``k`` of ``K`` becomes
  ``(k + u) / K`` with ``u ~ U(0, 1)``, a continuous density whose log-likelihood lower-bounds the
  discrete one; bits/dim follow from it.
"""

from __future__ import annotations

import math

import torch

BINARISATIONS = ("dynamic", "fixed")


def binarise(
    x: torch.Tensor, mode: str = "dynamic", threshold: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Binary version of intensities ``x`` in ``[0, 1]`` (any shape; float 0/1 values out).

    Parameters
    ----------
    mode
        ``"dynamic"``: Bernoulli draws with probability ``x``; ``"fixed"``: ``x > threshold``.
    """
    if mode == "dynamic":
        return torch.bernoulli(x.clamp(0.0, 1.0), generator=generator)
    if mode == "fixed":
        return (x > threshold).to(x.dtype)
    raise ValueError(f"binarisation must be one of {BINARISATIONS}, got {mode!r}.")


def dequantise(levels_index: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(k + u) / levels`` with ``u ~ U(0, 1)`` for integer grey levels ``0 <= k < levels``.

    Parameters
    ----------
    levels_index
        Grey levels as a float or integer tensor of any shape.
    levels
        Number of levels ``K`` (256 for 8-bit images).

    Returns
    -------
    torch.Tensor
        Values in ``[0, 1)``, same shape, float32.
    """
    k = levels_index.to(torch.float32)
    noise = torch.rand(k.shape, generator=generator, device=k.device)
    return (k + noise) / levels


def bits_per_dim(nll_nats: torch.Tensor | float, n_dims: int, levels: int = 256) -> torch.Tensor | float:
    """Bits per dimension of a negative log-likelihood ``nll_nats`` of data in ``[0, 1]``.

    ``nll_nats`` is the continuous NLL of one dequantised image rescaled to ``[0, 1)`` (a density
    on the unit cube); the discrete data of ``levels`` grey levels have
    ``bits/dim = (nll + n_dims log(levels)) / (n_dims log 2)``.
    """
    return (nll_nats + n_dims * math.log(levels)) / (n_dims * math.log(2.0))
