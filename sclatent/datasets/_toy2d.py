"""2-D toy densities: seeded samplers (two moons, rings, Gaussian mixture) and the four energies of
Rezende & Mohamed (2015), Table 1.

The samplers return ``(N, 2)`` float32 arrays. The energies ``U(z)`` are torch functions of
``(..., 2)`` tensors returning ``(...)``; the target density is ``p(z) = exp(-U(z)) / Z``.

``U2``-``U4`` do not decay along ``z1`` (they are periodic in ``z1``), so ``exp(-U)`` has no finite
normaliser on the plane; Rezende & Mohamed show them on ``[-4, 4]^2``. :func:`energy` therefore
adds, by default, a wall ``1/2 (max(|z1| - 4, 0) / 0.2)^2`` that is exactly zero inside that box
(the densities there are the paper's) and makes every ``Z`` finite, so the reverse KL of a fitted
flow is a true divergence (:func:`log_normaliser` integrates ``Z`` on a grid).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

ENERGIES = ("U1", "U2", "U3", "U4")
BOX = 4.0
_WALL_WIDTH = 0.2


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def two_moons(n: int = 1000, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """Two interleaved half circles (radius 1, centres ``(0, 0)`` and ``(1, 0.5)``) plus Gaussian noise.

    Returns ``(n, 2)`` float32, half of the points on each moon (the first moon gets the odd one).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    rng = _rng(seed)
    n_upper = n - n // 2
    t_upper = rng.uniform(0, math.pi, n_upper)
    t_lower = rng.uniform(0, math.pi, n // 2)
    upper = np.stack([np.cos(t_upper), np.sin(t_upper)], 1)
    lower = np.stack([1 - np.cos(t_lower), 0.5 - np.sin(t_lower)], 1)
    points = np.concatenate([upper, lower]) + noise * rng.standard_normal((n, 2))
    return points[rng.permutation(n)].astype(np.float32)


def rings(n: int = 1000, radii: tuple[float, ...] = (1.0, 2.0, 3.0), noise: float = 0.08, seed: int = 0) -> np.ndarray:
    """Concentric circles of the given radii, points spread in proportion to circumference, plus noise.

    Returns ``(n, 2)`` float32.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if not radii or min(radii) <= 0:
        raise ValueError(f"radii must be positive, got {radii}.")
    rng = _rng(seed)
    r = np.asarray(radii, dtype=float)
    which = rng.choice(len(r), size=n, p=r / r.sum())
    angle = rng.uniform(0, 2 * math.pi, n)
    points = r[which, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    return (points + noise * rng.standard_normal((n, 2))).astype(np.float32)


def gaussian_mixture(
    n: int = 1000, n_components: int = 8, radius: float = 3.0, std: float = 0.3, seed: int = 0
) -> np.ndarray:
    """Equal-weight isotropic Gaussians (standard deviation ``std``) centred evenly on a circle of ``radius``.

    Returns ``(n, 2)`` float32.
    """
    if n < 1 or n_components < 1:
        raise ValueError(f"n and n_components must be >= 1, got {n} and {n_components}.")
    rng = _rng(seed)
    which = rng.integers(0, n_components, n)
    angle = 2 * math.pi * which / n_components
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], 1)
    return (centres + std * rng.standard_normal((n, 2))).astype(np.float32)


# ----------------------------------------------------------------- Rezende & Mohamed (2015), Table 1


def _w1(z: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * z[..., 0] / 4)


def _w2(z: torch.Tensor) -> torch.Tensor:
    return 3 * torch.exp(-0.5 * ((z[..., 0] - 1) / 0.6) ** 2)


def _w3(z: torch.Tensor) -> torch.Tensor:
    return 3 * torch.sigmoid((z[..., 0] - 1) / 0.3)


def _neg_logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``-log(exp(a) + exp(b))``, stable."""
    return -torch.logaddexp(a, b)


def U1(z: torch.Tensor) -> torch.Tensor:
    """A ring of radius 2 with two modes at ``z1 = +-2``: ``1/2 ((|z| - 2) / 0.4)^2 - log(e^{-1/2 ((z1 - 2)/0.6)^2}
    + e^{-1/2 ((z1 + 2)/0.6)^2})``."""
    ring = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2
    return ring + _neg_logaddexp(-0.5 * ((z[..., 0] - 2) / 0.6) ** 2, -0.5 * ((z[..., 0] + 2) / 0.6) ** 2)


def U2(z: torch.Tensor) -> torch.Tensor:
    """A sine wave: ``1/2 ((z2 - w1(z)) / 0.4)^2``, ``w1 = sin(2 pi z1 / 4)``."""
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2


def U3(z: torch.Tensor) -> torch.Tensor:
    """Two sine waves that part around ``z1 = 1``:
    ``-log(e^{-1/2 ((z2 - w1)/0.35)^2} + e^{-1/2 ((z2 - w1 + w2)/0.35)^2})``, ``w2 = 3 e^{-1/2 ((z1 - 1)/0.6)^2}``."""
    a = -0.5 * ((z[..., 1] - _w1(z)) / 0.35) ** 2
    b = -0.5 * ((z[..., 1] - _w1(z) + _w2(z)) / 0.35) ** 2
    return _neg_logaddexp(a, b)


def U4(z: torch.Tensor) -> torch.Tensor:
    """A sine wave and a step: ``-log(e^{-1/2 ((z2 - w1)/0.4)^2} + e^{-1/2 ((z2 - w1 + w3)/0.35)^2})``,
    ``w3 = 3 sigmoid((z1 - 1) / 0.3)``."""
    a = -0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2
    b = -0.5 * ((z[..., 1] - _w1(z) + _w3(z)) / 0.35) ** 2
    return _neg_logaddexp(a, b)


_ENERGY_FUNCTIONS = {"U1": U1, "U2": U2, "U3": U3, "U4": U4}


def energy(name: str, bounded: bool = True):
    """The energy ``U`` called ``name`` (``"U1"`` to ``"U4"``), as a function ``(..., 2) -> (...)``.

    Parameters
    ----------
    bounded
        Add the wall ``1/2 (max(|z1| - 4, 0) / 0.2)^2`` (zero on the paper's box ``[-4, 4]^2``), which makes
        ``exp(-U)`` normalisable for ``U2``-``U4``; see the module docstring.
    """
    if name not in _ENERGY_FUNCTIONS:
        raise ValueError(f"energy must be one of {ENERGIES}, got {name!r}.")
    function = _ENERGY_FUNCTIONS[name]
    if not bounded:
        return function

    def bounded_energy(z: torch.Tensor) -> torch.Tensor:
        outside = torch.relu(z[..., 0].abs() - BOX)
        return function(z) + 0.5 * (outside / _WALL_WIDTH) ** 2

    bounded_energy.__name__ = bounded_energy.__qualname__ = f"{name}_bounded"
    bounded_energy.__doc__ = f"{name} plus the wall outside |z1| <= {BOX}."
    return bounded_energy


@functools.lru_cache(maxsize=16)
def log_normaliser(name: str, bounded: bool = True, limit: float = 7.0, n_grid: int = 701) -> float:
    """``log Z = log int exp(-U(z)) dz`` by the midpoint rule on ``[-limit, limit]^2`` (nats).

    With the default wall the mass beyond ``|z1| = 5`` and ``|z2| = 5`` is negligible (below 1e-10
    relative), so the error is the quadrature's (below 1e-6 nats at the default step 0.02). Cached.
    """
    if not bounded and name != "U1":
        raise ValueError(f"{name} is not normalisable on the plane without the wall; use bounded=True.")
    step = 2 * limit / n_grid
    axis = torch.linspace(-limit + step / 2, limit - step / 2, n_grid, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    log_density = -energy(name, bounded)(grid)
    return float(torch.logsumexp(log_density.flatten(), 0) + 2 * math.log(step))


def density_grid(limit: float = BOX, n: int = 200) -> torch.Tensor:
    """``(n, n, 2)`` float32 points on ``[-limit, limit]^2``, indexed ``[i_z2, i_z1]`` (``imshow(origin="lower")``)."""
    axis = torch.linspace(-limit, limit, n)
    z2, z1 = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([z1, z2], dim=-1)
