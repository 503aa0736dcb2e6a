"""``ImageVAE``: a VAE with a Bernoulli (binarised images) or Gaussian (continuous values) decoder."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from ..base import seeded
from ..datasets import ImageSet
from ._base import ArrayModel
from .modules.vae import ImageVAEHyperparameters, ImageVAEModule, resolved_binarisation


def binarise_fixed_seed(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A stochastic binarisation that is the same on every call: pixel on iff ``U < intensity``.

    ``U`` are uniforms from ``numpy.random.default_rng(seed)`` in the array's C order, so a given
    test set and seed always give the same binary images (independent of batch size and device).
    Already binary inputs are returned unchanged.
    """
    x = np.asarray(x, dtype=np.float32)
    return (np.random.default_rng(seed).random(x.shape, dtype=np.float32) < x).astype(np.float32)


def pixel_bernoulli_nll(train, test_binary: np.ndarray) -> np.ndarray:
    """NLL (nats per image) of binary images under independent per-pixel Bernoullis fitted on ``train``.

    The model-free baseline of a binarised-image likelihood: ``p_d`` is the mean training
    intensity of pixel ``d`` (the probability that a dynamically binarised training pixel is on),
    smoothed as ``(n p_d + 1) / (n + 2)`` so that a pixel never on in training does not cost
    infinitely many nats when it is on in a test image.

    Parameters
    ----------
    train
        ``(N, ...)`` intensities in [0, 1] (or an :class:`ImageSet`).
    test_binary
        ``(M, ...)`` binary images with the same number of values per item.

    Returns
    -------
    numpy.ndarray
        ``(M,)`` negative log-likelihoods, nats.
    """
    train = train.unit() if isinstance(train, ImageSet) else np.asarray(train, dtype=np.float64)
    train = train.reshape(len(train), -1)
    test = np.asarray(test_binary, dtype=np.float64).reshape(len(test_binary), -1)
    if test.shape[1] != train.shape[1]:
        raise ValueError(f"train items have {train.shape[1]} values, test items {test.shape[1]}.")
    n = len(train)
    p = (train.sum(0) + 1.0) / (n + 2.0)
    return -(test @ np.log(p) + (1.0 - test) @ np.log1p(-p))


class ImageVAE(ArrayModel):
    """Variational autoencoder for images (binarised, Bernoulli decoder) or continuous vectors (Gaussian decoder).

    MLP encoder and decoder (ReLU, no batch norm, no dropout), Gaussian ``q(z | x)``, ``N(0, I)``
    prior, analytic KL: see :class:`sclatent.images.modules.vae.ImageVAEModule`. The defaults are
    the one-stochastic-layer architecture of Burda et al. (2016): two hidden layers of 200 units
    and 50 latent dimensions (they use tanh units; these are ReLU).

    Binarisation (Bernoulli decoder):

    * training: ``"dynamic"`` draws each pixel ``~ Bernoulli(intensity)`` afresh every time an
      image is seen (a new binary image per epoch); ``"fixed"`` thresholds at 0.5.
    * evaluation (:meth:`get_elbo`, :meth:`get_marginal_ll`, :meth:`get_latent_representation`,
      :meth:`reconstruct`, validation during :meth:`train`): a dynamic model sees held-out
      images binarised *once* with a seeded generator (``binarisation_seed``, see
      :func:`binarise_fixed_seed`): one stochastic binarisation of the test set, fixed by its
      seed, so that every number is deterministic and the ELBO, the IWAE bound and a baseline
      all score the same binary images (:meth:`observed` returns them). A fixed model
      thresholds. Binary inputs are used as they are.

    Gaussian decoder (``likelihood="gaussian"``): inputs may be any finite values; one learned
    variance shared by all values. Its ``get_marginal_ll`` is a log-*density* (units-dependent,
    may be positive), not comparable with the Bernoulli NLL.

    Parameters
    ----------
    input_shape
        Shape of one item, e.g. ``(28, 28)`` or ``(2,)``.
    {hyperparameters}
    seed
        Initial weights and, by default, training (minibatch order, binarisation, z samples).

    Examples
    --------
    >>> train, test = sclatent.datasets.mnist("train"), sclatent.datasets.mnist("test")
    >>> vae = ImageVAE((28, 28), n_latent=2).train(train, max_epochs=10)
    >>> z = vae.get_latent_representation(test)             # (10000, 2)
    >>> vae.get_marginal_ll(test.subset(1000), n_samples=1000)  # log p(x) >= this, nats/image
    """

    module_class = ImageVAEModule
    hyperparameters_class = ImageVAEHyperparameters

    def __init__(self, input_shape: tuple[int, ...], *, seed: int = 0, **hyperparameters: Any) -> None:
        # a Bernoulli model's binarisation defaults to "dynamic": saved as such
        likelihood = hyperparameters.get("likelihood", "bernoulli")
        hyperparameters["binarisation"] = resolved_binarisation(likelihood, hyperparameters.get("binarisation"))
        super().__init__(input_shape, seed=seed, **hyperparameters)

    @property
    def input_range(self) -> tuple[float, float] | None:
        # continuous data need not lie in [0, 1]
        return (0.0, 1.0) if self.hyperparameters["likelihood"] == "bernoulli" else None

    @property
    def n_latent(self) -> int:
        return self.hyperparameters["n_latent"]

    # ----------------------------------------------------------------- data

    def observed(self, x, binarisation_seed: int = 0) -> np.ndarray:
        """Items ``(N, *input_shape)`` float32 as the evaluation methods score them.

        Bernoulli decoder: binarised, by :func:`binarise_fixed_seed` with ``binarisation_seed``
        (dynamic model) or at 0.5 (fixed model); Gaussian decoder: the checked inputs. Passing the
        result back to any method changes nothing (binary images stay as they are), so it is the
        way to score several models on the very same binary test images.
        """
        x, _ = self._check_inputs(x)
        if self.hyperparameters["likelihood"] != "bernoulli":
            return x
        if self.hyperparameters["binarisation"] == "fixed":
            return (x > 0.5).astype(np.float32)
        return binarise_fixed_seed(x, binarisation_seed)

    def _batches(self, x: np.ndarray, batch_size: int):
        for start in range(0, len(x), batch_size):
            chunk = torch.as_tensor(x[start : start + batch_size], device=self.device)
            yield chunk.reshape(len(chunk), -1)

    def train(self, x, y=None, max_epochs: int = 10, validation=None, **kwargs) -> ImageVAE:
        """Maximise the ELBO with Adam (see :meth:`ArrayModel.train` for every option).

        Training images are binarised as the model's ``binarisation`` says; ``validation`` images
        (an array, ``(x, y)`` or an :class:`ImageSet`) are binarised once with seed 0 so that
        ``history["validation_elbo"]`` scores the same binary images every epoch. Labels are ignored.
        """
        if validation is not None:
            vx = validation[0] if isinstance(validation, tuple) else validation
            validation = self.observed(vx)
        return super().train(x, None, max_epochs=max_epochs, validation=validation, **kwargs)

    # ----------------------------------------------------------------- inference

    @torch.no_grad()
    def get_latent_representation(
        self,
        x,
        give_mean: bool = True,
        seed: int | None = 0,
        binarisation_seed: int = 0,
        batch_size: int = 1024,
    ) -> np.ndarray:
        """``(N, n_latent)`` posterior means of ``z`` (or one draw from ``q(z | x)`` with ``give_mean=False``).

        Parameters
        ----------
        x
            Items ``(N, *input_shape)`` in [0, 1] (any finite values for Gaussian) or an :class:`ImageSet`.
        give_mean
            Posterior mean (deterministic) or a sample (seeded by ``seed``).
        binarisation_seed
            Seed of the fixed stochastic binarisation of a dynamic model's inputs.
        """
        observed = self.observed(x, binarisation_seed)
        self.module.eval()
        out = []
        with seeded(seed, self.device):
            for batch in self._batches(observed, batch_size):
                inf = self.module.inference(batch)
                out.append((inf["qz_mean"] if give_mean else inf["z"][0]).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.n_latent), dtype=np.float32)

    @torch.no_grad()
    def decode(self, z, batch_size: int = 1024) -> np.ndarray:
        """``E[x | z]`` (pixel probabilities, or Gaussian means) for latents ``z`` ``(N, n_latent)``.

        Returns ``(N, *input_shape)`` float32.
        """
        z = torch.as_tensor(np.asarray(z, dtype=np.float32))
        if z.ndim != 2 or z.shape[1] != self.n_latent:
            raise ValueError(f"z must have shape (N, {self.n_latent}), got {tuple(z.shape)}.")
        self.module.eval()
        out = [
            self.module.mean(self.module.decode(z[i : i + batch_size].to(self.device))).cpu()
            for i in range(0, len(z), batch_size)
        ]
        decoded = torch.cat(out) if out else torch.zeros((0, self.module.n_input))
        return decoded.reshape(len(z), *self.input_shape).numpy()

    def reconstruct(self, x, binarisation_seed: int = 0, batch_size: int = 1024) -> np.ndarray:
        """``E[x | z = posterior mean]`` of items ``x``: ``(N, *input_shape)`` (probabilities for Bernoulli)."""
        return self.decode(self.get_latent_representation(x, binarisation_seed=binarisation_seed), batch_size)

    @torch.no_grad()
    def sample(self, n: int, seed: int | None = None, binary: bool = False) -> np.ndarray:
        """``n`` items from the model: ``E[x | z]`` for ``z ~ N(0, I)``, ``(n, *input_shape)`` float32.

        For the Bernoulli decoder these are pixel probabilities in [0, 1] (the usual way to show
        samples); ``binary=True`` draws the 0/1 pixels from them instead (same ``seed``).
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        if binary and self.module.likelihood != "bernoulli":
            raise ValueError("binary=True needs likelihood='bernoulli'.")
        self.module.eval()
        with seeded(seed, self.device):
            means = self.module.sample(n)
            if binary:
                means = torch.bernoulli(means)
        return means.cpu().reshape(n, *self.input_shape).numpy()

    @torch.no_grad()
    def decode_grid(self, n: int = 20, quantile: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        """Decoded items over a grid of the 2-D latent plane (Kingma & Welling 2014, figure 4).

        The grid's coordinates are the standard normal quantiles ``Phi^-1(linspace(quantile,
        1 - quantile, n))`` on each axis, so the cells carry equal prior mass.

        Returns
        -------
        grid
            ``(n, n, *input_shape)`` decoded means; ``grid[i, j]`` is at ``z = (coords[j], coords[n - 1 - i])``
            (rows top to bottom = ``z_2`` high to low, as the plane is drawn).
        coords
            ``(n,)`` latent coordinates of the columns (ascending).
        """
        if self.n_latent != 2:
            raise ValueError(f"decode_grid needs a 2-D latent space; this model has n_latent={self.n_latent}.")
        if n < 2 or not 0.0 < quantile < 0.5:
            raise ValueError(f"need n >= 2 and 0 < quantile < 0.5, got n={n}, quantile={quantile}.")
        coords = norm.ppf(np.linspace(quantile, 1.0 - quantile, n)).astype(np.float32)
        z1, z2 = np.meshgrid(coords, coords[::-1])
        decoded = self.decode(np.stack([z1.ravel(), z2.ravel()], axis=1))
        return decoded.reshape(n, n, *self.input_shape), coords

    # ----------------------------------------------------------------- likelihoods

    @torch.no_grad()
    def get_elbo(
        self, x, seed: int | None = 0, binarisation_seed: int = 0, batch_size: int = 1024, return_mean: bool = True
    ):
        """ELBO (nats per item; one sample of ``z``, analytic KL): the mean, or ``(N,)`` per item."""
        observed = self.observed(x, binarisation_seed)
        self.module.eval()
        with seeded(seed, self.device):
            values = torch.cat([self.module.elbo(b).cpu() for b in self._batches(observed, batch_size)])
        return float(values.mean()) if return_mean else values.numpy()

    @torch.no_grad()
    def get_marginal_ll(
        self,
        x,
        n_samples: int = 1000,
        seed: int | None = 0,
        binarisation_seed: int = 0,
        batch_size: int = 100,
        return_mean: bool = True,
    ):
        """Importance-sampled lower bound on ``log p(x)`` (the IWAE bound ``L_k``, ``k = n_samples``).

        ``log (1/k) sum_i p(x, z_i) / q(z_i | x)`` with ``z_i ~ q(z | x)``, nats per item; the test
        NLL reported for binarised MNIST is minus its mean. Items go ``batch_size`` at a time and
        their samples in chunks of at most ``2**22`` decoded values, so memory stays bounded for
        any ``n_samples``.

        Returns
        -------
        float or numpy.ndarray
            The mean over items (float), or ``(N,)`` per item with ``return_mean=False``.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        observed = self.observed(x, binarisation_seed)
        self.module.eval()
        with seeded(seed, self.device):
            values = torch.cat(
                [self.module.marginal_log_likelihood(b, n_samples).cpu() for b in self._batches(observed, batch_size)]
            )
        return float(values.mean()) if return_mean else values.numpy()
