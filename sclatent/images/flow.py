"""Normalizing flows: ``ImageFlow`` (multi-scale Glow on dequantised images), ``EnergyFlow`` (planar flow fitted
to an unnormalised 2-D energy by reverse KL) and ``DensityFlow`` (a pyro flow fitted to samples by maximum
likelihood).

All three train through :meth:`ArrayModel.train` and so the one trainer :func:`sclatent.train.fit`.
``EnergyFlow`` has no data: its "items" are a pool of seeded standard-normal base draws ``u``, which
the trainer shuffles into minibatches like any array; the module pushes them through the flow and
scores them against the energy. A fixed pool is Monte Carlo with common random numbers; a flow of
``5 K`` parameters cannot overfit tens of thousands of draws, and ``history["validation_reverse_kl"]``,
measured on a separate pool, would show it if it did.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..base import seeded
from ._base import ArrayModel
from .data import ArrayData
from .modules.density_flow import (
    DensityFlowHyperparameters,
    EnergyFlowHyperparameters,
    EnergyFlowModule,
    SampleFlowModule,
)
from .modules.flow import ImageFlowHyperparameters, ImageFlowModule
from .nn.pixels import bits_per_dim as _bits_per_dim


class ImageFlow(ArrayModel):
    """Multi-scale RealNVP/Glow on images of ``levels`` grey levels: exact NLL, bits/dim, samples.

    Inputs are intensities ``k / (levels - 1)`` in ``[0, 1]`` (what ``ImageSet.unit()`` gives) and
    must lie on that grid; each time an image is seen it is dequantised to ``(k + u) / levels``,
    ``u ~ U(0, 1)`` (Theis et al. 2016). The training loss is the NLL of the dequantised images in
    nats per image (``history["train_nll"]``); ``history["train_bits_per_dim"]`` the same in bits
    per pixel of the discrete data (an upper bound on the discrete model's, by Jensen).

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(C, H, W)``, e.g. ``(28, 28)``; ``H``, ``W`` divisible by ``2 ** n_scales``.
    {hyperparameters}
    seed
        Initial weights (including the 1x1 convolutions' rotations) and training.

    Examples
    --------
    >>> train, test = sclatent.datasets.digits("train"), sclatent.datasets.digits("test")
    >>> flow = ImageFlow((8, 8), levels=17, n_scales=2, n_steps=4).train(train, max_epochs=20)
    >>> flow.bits_per_dim(test), flow.sample(16, temperature=0.7).shape
    """

    module_class = ImageFlowModule
    hyperparameters_class = ImageFlowHyperparameters

    @property
    def levels(self) -> int:
        """Grey levels of the data."""
        return self.hyperparameters["levels"]

    def _check_inputs(self, x, y=None, require_labels: bool = False):
        levels = getattr(x, "levels", None)
        if levels is not None and levels != self.levels:
            raise ValueError(
                f"the images have {levels} grey levels but this flow was built for levels={self.levels}; "
                f"build ImageFlow(..., levels={levels})."
            )
        x, y = super()._check_inputs(x, y, require_labels)
        grid = x * (self.levels - 1)
        if x.size and np.abs(grid - np.round(grid)).max() > 1e-3:
            raise ValueError(
                f"ImageFlow models discrete images: intensities must be k / {self.levels - 1} for integer grey "
                f"levels k (levels={self.levels}); quantise the images or set levels to the data's."
            )
        return x, y

    def _before_training(self, data: ArrayData, train_indices: np.ndarray) -> None:
        """Actnorm's data-dependent initialisation on up to 512 seeded random training images (first call only)."""
        if self.module.initialised:
            return
        with seeded(self.seed, data.device):
            pick = torch.randperm(len(train_indices))[:512]
            x = data.x[torch.as_tensor(train_indices[pick.numpy()], device=data.device)]
            self.module.initialise(self.module.dequantise(x))

    def train(self, x, y=None, max_epochs: int = 10, batch_size: int = 64, lr: float = 1e-3, **kwargs) -> ImageFlow:
        """Maximum likelihood on freshly dequantised images (see :meth:`ArrayModel.train`)."""
        return super().train(x, y, max_epochs=max_epochs, batch_size=batch_size, lr=lr, **kwargs)

    def log_prob(self, x, n_samples: int = 1, seed: int = 0, batch_size: int = 256) -> np.ndarray:
        """``(N,)`` log-density (nats) of the dequantised images on the unit cube ``[0, 1)^D``.

        Averaged over ``n_samples`` seeded dequantisations ``u``: ``E_u log p((k + u) / K)``, a lower
        bound on ``log P(k) + D log K`` of the discrete images.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")

        def function(batch):
            total = torch.zeros(batch.size, dtype=torch.float64)
            for _ in range(n_samples):
                total += self.module.log_prob(self.module.dequantise(batch.x)).double().cpu()
            return total / n_samples

        with seeded(seed, self.device):
            return self._map(function, x, batch_size)

    def bits_per_dim(self, x, n_samples: int = 1, seed: int = 0) -> float:
        """Mean bits per dimension of the discrete images ``x`` (``(NLL + D log K) / (D log 2)``, dequantised NLL)."""
        nll = -self.log_prob(x, n_samples=n_samples, seed=seed)
        return float(_bits_per_dim(float(nll.mean()), self.module.n_dims, self.levels))

    def sample(self, n: int, temperature: float = 1.0, seed: int = 0) -> np.ndarray:
        """``(n, *input_shape)`` float32 images in ``[0, 1]`` (continuous values; ``temperature < 1`` shrinks the
        latents' spread, trading diversity for cleaner samples)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        self.module.eval()
        # (the latents are drawn on the CPU and moved: a seed gives the same images on any device)
        with seeded(seed, self.device):
            return self.module.sample(n, temperature).cpu().numpy().astype(np.float32)


class EnergyFlow(ArrayModel):
    """A planar flow ``q`` fitted to ``p(z) = exp(-U(z)) / Z`` (``U1`` to ``U4``) by reverse KL.

    Parameters
    ----------
    input_shape
        ``(2,)`` (the default; the energies are 2-D).
    {hyperparameters}
    seed
        Initial weights and, by default, training (its pool of base draws too).

    Examples
    --------
    >>> flow = EnergyFlow(energy="U1", n_flows=16).train(max_epochs=20)
    >>> flow.reverse_kl()  # nats
    """

    module_class = EnergyFlowModule
    hyperparameters_class = EnergyFlowHyperparameters
    input_range = None

    def __init__(self, input_shape: tuple[int, ...] = (2,), *, seed: int = 0, **hyperparameters: Any) -> None:
        super().__init__(input_shape, seed=seed, **hyperparameters)

    def train(
        self,
        x=None,
        y=None,
        n_samples: int = 32768,
        max_epochs: int = 20,
        batch_size: int = 256,
        lr: float = 1e-2,
        **kwargs,
    ) -> EnergyFlow:
        """Minimise the free energy on a pool of ``n_samples`` seeded base draws (plus 4,096 for validation).

        ``x`` may give the pool of base draws ``(N, 2)`` explicitly; by default it is drawn from the
        model's seed (or ``seed=``). Each epoch is one pass over the pool. ``history``:
        ``train_elbo`` is the bound ``-F`` on ``log Z`` (``-(train_energy + train_log_q)``),
        ``train_reverse_kl`` the divergence (nats); early stopping watches the ELBO.
        """
        seed = kwargs.get("seed")
        if x is None and n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {n_samples}.")
        with seeded(self.seed if seed is None else seed):
            if x is None:
                x = torch.randn((n_samples, 2)).numpy()
            validation = torch.randn((4096, 2)).numpy()
        kwargs.setdefault("validation", validation)
        return super().train(x, None, max_epochs=max_epochs, batch_size=batch_size, lr=lr, **kwargs)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``(n, 2)`` draws of the fitted ``q``."""
        self.module.eval()
        with seeded(seed, self.device):
            return self.module.sample(n).cpu().numpy()

    def log_prob(self, z, batch_size: int = 4096) -> np.ndarray:
        """``(N,)`` ``log q(z)`` (nats) of the flow at points ``(N, 2)`` (layer inverses by bisection)."""
        return self._map(lambda b: self.module.log_prob(b.x), z, batch_size)

    @torch.no_grad()
    def reverse_kl(self, n_samples: int = 65536, seed: int = 1) -> float:
        """Monte Carlo ``KL(q || p) = E_q[log q + U] + log Z`` (nats) on fresh seeded draws."""
        self.module.eval()
        with seeded(seed):
            u = torch.randn((n_samples, 2)).to(self.device)
        z, log_det = self.module(u)
        log_q = -0.5 * (u.pow(2).sum(-1) + 2 * np.log(2 * np.pi)) - log_det
        return float((log_q + self.module.energy(z)).mean()) + self.module.log_z


class DensityFlow(ArrayModel):
    """A pyro flow (planar or RealNVP) fitted to samples ``(N, D)`` by maximum likelihood.

    Parameters
    ----------
    input_shape
        ``(D,)``, e.g. ``(2,)`` for the toy samplers (the default).
    {hyperparameters}
    seed
        Initial weights and, by default, training.

    Examples
    --------
    >>> x = sclatent.datasets.two_moons(2000)
    >>> flow = DensityFlow((2,), kind="realnvp").train(x, max_epochs=50)
    >>> flow.log_prob(x).mean()
    """

    module_class = SampleFlowModule
    hyperparameters_class = DensityFlowHyperparameters
    input_range = None

    def __init__(self, input_shape: tuple[int, ...] = (2,), *, seed: int = 0, **hyperparameters: Any) -> None:
        super().__init__(input_shape, seed=seed, **hyperparameters)

    def log_prob(self, x, batch_size: int = 4096) -> np.ndarray:
        """``(N,)`` ``log p(x)`` (nats)."""
        return self._map(lambda b: self.module.log_prob(b.x), x, batch_size)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``(n, D)`` draws."""
        self.module.eval()
        with seeded(seed, self.device):
            return self.module.sample(n).cpu().numpy()


def pixel_histogram_bits_per_dim(train, test, smoothing: float = 1.0) -> float:
    """Bits/dim on ``test`` of a model-free baseline: an independent histogram of grey levels per pixel.

    ``P(pixel j = k) = (n_jk + smoothing) / (N + K smoothing)`` fitted on ``train`` (Laplace smoothing),
    both :class:`~sclatent.datasets.ImageSet` s of the same ``levels`` ``K``. As a piecewise-constant
    density of the dequantised pixels it is directly comparable with a flow's dequantised bits/dim.
    """
    if train.levels != test.levels or train.shape != test.shape:
        raise ValueError("train and test must have the same image shape and number of grey levels.")
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}.")
    levels = train.levels
    flat_train = train.images.reshape(len(train), -1).astype(np.int64)
    n_pixels = flat_train.shape[1]
    counts = np.zeros((n_pixels, levels))
    np.add.at(counts, (np.broadcast_to(np.arange(n_pixels), flat_train.shape), flat_train), 1.0)
    log_p = np.log(counts + smoothing) - np.log(len(train) + levels * smoothing)
    flat_test = test.images.reshape(len(test), -1).astype(np.int64)
    nll_bits = -log_p[np.arange(n_pixels), flat_test].mean() / np.log(2.0)
    return float(nll_bits)
