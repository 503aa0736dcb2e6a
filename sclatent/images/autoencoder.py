"""``ImageAutoencoder``: PCA as a linear autoencoder, and bottleneck / sparse / contractive / tied / denoising AEs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..base import seeded
from ._base import ArrayModel
from .data import ArrayData
from .modules.autoencoder import (
    DEFAULT_NOISE_RATE,
    ImageAutoencoderHyperparameters,
    ImageAutoencoderModule,
    resolved_settings,
)


class ImageAutoencoder(ArrayModel):
    """Autoencoders of images or vectors (see :mod:`sclatent.images.modules.autoencoder` for the maths).

    ``kind`` picks a preset: ``"linear"`` (PCA as an autoencoder: squared error on
    pixel-mean-centred inputs, its decoder converges to the top principal subspace),
    ``"bottleneck"`` (MLP), ``"sparse"`` (L1 on the code, default weight 0.1), ``"contractive"``
    (Hutchinson ``||J||_F^2``, default weight 0.1), ``"tied"`` (decoder = transposed encoder) or
    ``"denoising"`` (default ``noise="masking"`` at rate 0.25). The settings left None take the
    kind's values, and the model stores (and saves) the resolved ones.

    Parameters
    ----------
    input_shape
        Shape of one item, e.g. ``(28, 28)``; flattened inside.
    {hyperparameters}
    seed
        Initial weights and training order.

    Examples
    --------
    >>> train, test = sclatent.datasets.mnist("train"), sclatent.datasets.mnist("test")
    >>> pca = ImageAutoencoder((28, 28), kind="linear", n_latent=32).train(train, max_epochs=20)
    >>> dae = ImageAutoencoder((28, 28), kind="denoising", noise="salt").train(train, max_epochs=10)
    >>> dae.reconstruction_error(test, noise="salt").mean()
    """

    module_class = ImageAutoencoderModule
    hyperparameters_class = ImageAutoencoderHyperparameters

    def __init__(self, input_shape: tuple[int, ...], *, seed: int = 0, **hyperparameters: Any) -> None:
        # the kind's settings in place of the unset ones: saved as such
        resolved = resolved_settings(ImageAutoencoderHyperparameters.from_dict(hyperparameters))
        super().__init__(input_shape, seed=seed, **resolved.to_dict())

    @property
    def input_range(self) -> tuple[float, float] | None:
        # a Gaussian-likelihood model takes any finite values
        return (0.0, 1.0) if self.hyperparameters["likelihood"] == "bernoulli" else None

    def _before_training(self, data: ArrayData, train_indices: np.ndarray) -> None:
        # centre the linear AE on the training pixel means, once (later calls continue training)
        if self.module.linear and not self.is_trained:
            x = data.x[torch.as_tensor(train_indices, device=data.x.device)]
            self.module.input_mean.copy_(x.reshape(len(x), -1).mean(0))

    def train(self, x, y=None, max_epochs: int = 20, **kwargs) -> ImageAutoencoder:
        """Fit by the reconstruction loss plus penalties (see :meth:`ArrayModel.train`).

        ``history`` holds ``train_reconstruction`` (nats per item, the training objective's data
        term), ``train_mse`` (squared error per pixel, on corrupted inputs for denoising kinds) and
        the penalties ``train_l1`` / ``train_contractive``; ``validation_*`` on clean held-out items.
        Early stopping watches ``reconstruction`` unless ``monitor`` says otherwise.
        """
        return super().train(x, y, max_epochs=max_epochs, **kwargs)

    # ----------------------------------------------------------------- inference

    def _noise_rate(self, noise: str | None, noise_rate: float | None) -> float:
        """``noise_rate``, or the model's own rate for its own noise kind, else that kind's default."""
        if noise not in DEFAULT_NOISE_RATE and noise is not None:
            raise ValueError(f"noise must be one of {tuple(DEFAULT_NOISE_RATE)}, got {noise!r}.")
        if noise_rate is not None:
            return float(noise_rate)
        if noise is None or noise == "none":
            return 0.0
        return self.module.noise.rate if noise == self.module.noise.kind else DEFAULT_NOISE_RATE[noise]

    def _corrupted_batches(self, x, noise: str | None, noise_rate: float | None, seed: int, function, batch_size: int):
        """``function(corrupted flat items, mask, clean flat items)`` over eval-mode minibatches of ``x``,
        the corruption drawn with ``seed`` (the same corruption every call)."""
        module = self.module
        rate = self._noise_rate(noise, noise_rate)

        def apply(batch):
            clean = batch.x.reshape(batch.size, -1)
            if noise is None or noise == "none":
                return function(clean, None, clean)
            corrupted, mask = module.corrupt(clean, noise, rate)
            # a model trained with "masking" is told which pixels are hidden; other models are not
            return function(corrupted, mask if module.noise.kind == "masking" else None, clean)

        with seeded(seed, self.device):
            return self._map(apply, x, batch_size)

    def encode(self, x, batch_size: int = 1024) -> np.ndarray:
        """``(N, n_latent)`` codes of clean items ``x`` (for ``"linear"``: PCA scores up to an invertible map)."""
        return self._map(lambda b: self.module.encode(b.x.reshape(b.size, -1)), x, batch_size)

    def reconstruct(
        self, x, noise: str | None = None, noise_rate: float | None = None, seed: int = 0, batch_size: int = 1024
    ) -> np.ndarray:
        """``(N, *input_shape)`` reconstructions of ``x``, or of ``x`` corrupted by ``noise`` first.

        Parameters
        ----------
        x
            Clean items (or an :class:`~sclatent.datasets.ImageSet`).
        noise, noise_rate
            Corrupt ``x`` before encoding (``"gaussian"``, ``"salt"``, ``"masking"``; the rate
            defaults to the model's own for its own kind, else 0.3 / 0.25 / 0.25); what a denoising
            model cleans up. A ``"masking"`` model is given the mask; other models see only zeros.
        seed
            Seed of the corruption (the same corrupted items for the same seed).
        """

        def function(corrupted, mask, clean):
            return self.module.mean(self.module.decode(self.module.encode(corrupted, mask)))

        out = self._corrupted_batches(x, noise, noise_rate, seed, function, batch_size)
        return out.reshape(len(out), *self.input_shape)

    def denoise(self, x_corrupted, mask=None, batch_size: int = 1024) -> np.ndarray:
        """``(N, *input_shape)`` reconstructions of already corrupted items (in [0, 1] for Bernoulli
        models); ``mask`` ``(N, *input_shape)`` (1 where a pixel is hidden) for ``"masking"`` models."""
        if mask is not None:
            mask = np.asarray(mask, dtype=np.float32)
            items, _ = self._check_inputs(x_corrupted)
            if mask.reshape(len(mask), -1).shape != items.reshape(len(items), -1).shape:
                raise ValueError(f"mask must have the shape of the items, got {mask.shape} for {items.shape}.")
            stacked = np.concatenate([items.reshape(len(items), -1), mask.reshape(len(mask), -1)], axis=1)
            data = ArrayData(stacked, None, self.device)
            self.module.eval()
            n = items.reshape(len(items), -1).shape[1]
            with torch.no_grad():
                outputs = [
                    self.module.mean(self.module.decode(self.module.encode(b.x[:, :n], b.x[:, n:]))).cpu()
                    for b in data.iterate(np.arange(len(items)), batch_size)
                ]
            return torch.cat(outputs).numpy().reshape(len(items), *self.input_shape)
        return self.reconstruct(x_corrupted, batch_size=batch_size)

    def corrupt(self, x, noise: str | None = None, noise_rate: float | None = None, seed: int = 0) -> tuple:
        """``(corrupted, mask)``, each ``(N, *input_shape)`` float32: what :meth:`reconstruct` feeds
        the model with the same arguments (``mask`` 1 where ``"salt"`` / ``"masking"`` hid a pixel).
        ``noise`` defaults to the model's own corruption."""
        noise = self.module.noise.kind if noise is None else noise
        rate = self._noise_rate(noise, noise_rate)
        with seeded(seed, self.device):
            out = self._map(lambda b: torch.cat(self.module.corrupt(b.x.reshape(b.size, -1), noise, rate), 1), x)
        n = out.shape[1] // 2
        return out[:, :n].reshape(len(out), *self.input_shape), out[:, n:].reshape(len(out), *self.input_shape)

    def reconstruction_error(
        self, x, noise: str | None = None, noise_rate: float | None = None, seed: int = 0, batch_size: int = 1024
    ) -> np.ndarray:
        """``(N,)`` mean squared error per pixel between the clean items and the reconstructions of
        (optionally corrupted, see :meth:`reconstruct`) items: the denoising error with ``noise``."""

        def function(corrupted, mask, clean):
            recon = self.module.mean(self.module.decode(self.module.encode(corrupted, mask)))
            return ((recon - clean) ** 2).mean(-1)

        return self._corrupted_batches(x, noise, noise_rate, seed, function, batch_size)

    def decoder_basis(self) -> np.ndarray:
        """``(D, n_latent)`` decoder matrix of the linear AE: its columns span the learned subspace."""
        if not self.module.linear:
            raise ValueError("decoder_basis is defined for kind='linear' only.")
        out = self.module.out
        weight = out._source.weight.T if hasattr(out, "_source") else out.weight
        return weight.detach().cpu().numpy().astype(np.float64)
