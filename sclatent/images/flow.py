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

import numpy as np
import torch

from ..data.arrays import ArrayData
from ..modules.density_flow import EnergyFlowModule, SampleFlowModule
from ..modules.image_flow import ImageFlowModule
from ..nn.pixels import bits_per_dim as _bits_per_dim
from ._base import ArrayModel


class ImageFlow(ArrayModel):
    """Multi-scale RealNVP/Glow on images of ``levels`` grey levels: exact NLL, bits/dim, samples.

    Inputs are intensities ``k / (levels - 1)`` in ``[0, 1]`` (what ``ImageSet.unit()`` gives) and
    must lie on that grid; each time an image is seen it is dequantised to ``(k + u) / levels``,
    ``u ~ U(0, 1)`` (Theis et al. 2016). The training loss is the NLL of the dequantised images in
    nats per image; ``history["train_bits_per_dim"]`` the same in bits per pixel of the discrete
    data (an upper bound on the discrete model's, by Jensen).

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(C, H, W)``, e.g. ``(28, 28)``; ``H``, ``W`` divisible by ``2 ** n_scales``.
    levels
        Grey levels of the data (256 for MNIST, 17 for the 8x8 digits).
    n_scales, n_steps, n_hidden, mask, scale, learn_prior, preprocess, alpha
        See :class:`sclatent.modules.image_flow.ImageFlowModule`.
    seed
        Initial weights (including the 1x1 convolutions' rotations) and training.

    Examples
    --------
    >>> train, test = sclatent.datasets.digits("train"), sclatent.datasets.digits("test")
    >>> flow = ImageFlow((8, 8), levels=17, n_scales=2, n_steps=4).train(train, max_epochs=20)
    >>> flow.bits_per_dim(test), flow.sample(16, temperature=0.7).shape
    """

    module_class = ImageFlowModule

    def __init__(
        self,
        input_shape: tuple[int, ...],
        levels: int = 256,
        n_scales: int = 2,
        n_steps: int = 8,
        n_hidden: int = 64,
        mask: str = "channel",
        scale: str = "tanh",
        learn_prior: bool = True,
        preprocess: str = "logit",
        alpha: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__(
            input_shape,
            seed=seed,
            levels=levels,
            n_scales=n_scales,
            n_steps=n_steps,
            n_hidden=n_hidden,
            mask=mask,
            scale=scale,
            learn_prior=learn_prior,
            preprocess=preprocess,
            alpha=alpha,
        )
        self.levels = int(levels)

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
        generator = torch.Generator().manual_seed(self.seed)
        pick = torch.randperm(len(train_indices), generator=generator)[:512]
        x = data.x[torch.as_tensor(train_indices[pick.numpy()], device=data.device)]
        self.module.initialise(self.module.dequantise(x, generator=None if x.is_cuda else generator))

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
        generator = torch.Generator().manual_seed(seed)

        def function(batch):
            total = torch.zeros(batch.size, dtype=torch.float64)
            for _ in range(n_samples):
                noise_generator = None if batch.x.is_cuda else generator
                total += self.module.log_prob(self.module.dequantise(batch.x, noise_generator)).double().cpu()
            return total / n_samples

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
        generator = torch.Generator().manual_seed(seed)
        return self.module.sample(n, temperature, generator).cpu().numpy().astype(np.float32)


class EnergyFlow(ArrayModel):
    """A planar flow ``q`` fitted to ``p(z) = exp(-U(z)) / Z`` (``U1`` .. ``U4``) by reverse KL.

    Parameters
    ----------
    input_shape
        ``(2,)`` (first so that :meth:`load` can rebuild it; pass the rest by keyword).
    energy
        ``"U1"`` .. ``"U4"``.
    n_flows
        Planar layers ``K``.
    bounded
        Energies with the wall outside ``|z1| <= 4`` (finite ``Z``; see :func:`sclatent.datasets.energy`).

    Examples
    --------
    >>> flow = EnergyFlow(energy="U1", n_flows=16).train(max_epochs=20)
    >>> flow.reverse_kl()  # nats
    """

    module_class = EnergyFlowModule
    input_range = None

    def __init__(
        self,
        input_shape: tuple[int, ...] = (2,),
        seed: int = 0,
        energy: str = "U1",
        n_flows: int = 16,
        bounded: bool = True,
    ) -> None:
        super().__init__(input_shape, seed=seed, energy=energy, n_flows=n_flows, bounded=bounded)

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
        ``train_elbo`` is the bound ``-F`` on ``log Z``, ``train_reverse_kl`` the divergence (nats).
        """
        seed = kwargs.get("seed")
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        if x is None:
            if n_samples < 2:
                raise ValueError(f"n_samples must be >= 2, got {n_samples}.")
            x = torch.randn((n_samples, 2), generator=generator).numpy()
        kwargs.setdefault("validation", torch.randn((4096, 2), generator=generator).numpy())
        return super().train(x, None, max_epochs=max_epochs, batch_size=batch_size, lr=lr, **kwargs)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``(n, 2)`` draws of the fitted ``q``."""
        self.module.eval()
        return self.module.sample(n, torch.Generator().manual_seed(seed)).cpu().numpy()

    def log_prob(self, z, batch_size: int = 4096) -> np.ndarray:
        """``(N,)`` ``log q(z)`` (nats) of the flow at points ``(N, 2)`` (layer inverses by bisection)."""
        return self._map(lambda b: self.module.log_prob(b.x), z, batch_size)

    @torch.no_grad()
    def reverse_kl(self, n_samples: int = 65536, seed: int = 1) -> float:
        """Monte Carlo ``KL(q || p) = E_q[log q + U] + log Z`` (nats) on fresh seeded draws."""
        self.module.eval()
        u = torch.randn((n_samples, 2), generator=torch.Generator().manual_seed(seed)).to(self.device)
        z, log_det = self.module(u)
        log_q = -0.5 * (u.pow(2).sum(-1) + 2 * np.log(2 * np.pi)) - log_det
        return float((log_q + self.module.energy(z)).mean()) + self.module.log_z


class DensityFlow(ArrayModel):
    """A pyro flow (planar or RealNVP) fitted to samples ``(N, D)`` by maximum likelihood.

    Parameters
    ----------
    input_shape
        ``(D,)``, e.g. ``(2,)`` for the toy samplers.
    kind, n_flows, n_hidden
        See :class:`sclatent.nn.flows.FlowPrior`.

    Examples
    --------
    >>> x = sclatent.datasets.two_moons(2000)
    >>> flow = DensityFlow((2,), kind="realnvp").train(x, max_epochs=50)
    >>> flow.log_prob(x).mean()
    """

    module_class = SampleFlowModule
    input_range = None

    def __init__(
        self,
        input_shape: tuple[int, ...] = (2,),
        seed: int = 0,
        kind: str = "realnvp",
        n_flows: int = 8,
        n_hidden: int = 64,
    ) -> None:
        super().__init__(input_shape, seed=seed, kind=kind, n_flows=n_flows, n_hidden=n_hidden)

    def log_prob(self, x, batch_size: int = 4096) -> np.ndarray:
        """``(N,)`` ``log p(x)`` (nats)."""
        return self._map(lambda b: self.module.log_prob(b.x), x, batch_size)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``(n, D)`` draws."""
        self.module.eval()
        return self.module.sample(n, torch.Generator().manual_seed(seed)).cpu().numpy()


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
