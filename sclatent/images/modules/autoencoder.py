"""Image and vector autoencoders as a pure ``torch.nn.Module``: PCA, bottleneck, sparse, contractive, tied, denoising.

Data flow for an item ``x`` (an image flattened to ``D`` pixels, intensities in ``[0, 1]``)::

    x~    = corrupt(x)                     gaussian / salt / masking (+ mask, width 2D) / none; training only
    code  = W_c MLP(x~)                    bottleneck, linear code            (n_latent)
    x^    = sigmoid(W_o MLP(code))         Bernoulli mean per pixel           (D)
    loss  = BCE(x^, x) + sparsity |code|_1 + contractive ||d code / d x~||_F^2

``kind`` picks a preset (each can be combined with the others' options):

* ``"linear"``: PCA as an autoencoder (Baldi & Hornik 1989): ``code = W_e (x - m)``,
  ``x^ = W_d code + m`` with the pixel means ``m`` of the training set, no hidden layer, no noise,
  trained by squared error. At the optimum ``W_d`` spans the top-``n_latent`` principal subspace.
* ``"bottleneck"``: the MLP autoencoder above with nothing added.
* ``"sparse"``: an L1 penalty on the code (weight ``sparsity``).
* ``"contractive"``: the squared Frobenius norm of the encoder's Jacobian (Rifai et al. 2011),
  one Hutchinson probe per item (:func:`sclatent.nn.regularisers.contractive_penalty`).
* ``"tied"``: each decoder matrix is the transpose of its encoder mirror
  (:class:`sclatent.modules.autoencoder.TiedLinear`).
* ``"denoising"``: the input is corrupted in training (Vincent et al. 2008, 2010) by
  :class:`sclatent.nn.noise.InputNoise` and the clean item reconstructed.

Why Bernoulli cross-entropy for the non-linear kinds: intensities in ``[0, 1]`` are read as pixel
"on" probabilities (Vincent et al. 2010 use the same cross-entropy for MNIST); the per-pixel loss
is minimised at ``x^ = x`` like squared error, but its gradient through the sigmoid does not
vanish when the output saturates at 0 or 1, where most MNIST pixels sit. For targets that are not
exactly 0 or 1 it is not a normalised log-likelihood (its minimum is the targets' binary entropy,
not 0), so the module also reports the squared error ``mse`` (per pixel), the number compared with
PCA. Why squared error for ``"linear"``: it is the objective whose optimum is PCA's subspace.
``likelihood="gaussian"`` trains any kind by squared error (``0.5 * sum (x^ - x)^2``, the
unit-variance Gaussian NLL up to a constant) with an unbounded linear output, for vectors that
are not intensities.

No BatchNorm: the code of an item then depends on that item only, so the Hutchinson estimate is a
per-item Jacobian norm and ``encode`` of one image does not depend on its minibatch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.arrays import ArrayBatch
from ..nn import MLP
from ..nn.noise import InputNoise, gaussian_noise, masking_noise
from ..nn.regularisers import contractive_penalty
from ._base import LossOutput
from .autoencoder import TiedLinear

IMAGE_AE_KINDS: tuple[str, ...] = ("linear", "bottleneck", "sparse", "contractive", "tied", "denoising")
IMAGE_AE_LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian")


def reconstruction_nll(output: torch.Tensor, target: torch.Tensor, likelihood: str) -> torch.Tensor:
    """``(B, D)`` per-entry loss: Bernoulli cross-entropy of logits ``output``, or half the squared error.

    Nats per entry (the Gaussian's constant ``0.5 log 2 pi`` left out).
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(output, target, reduction="none")
    return 0.5 * (output - target) ** 2


class ImageAutoencoderModule(nn.Module):
    """(Denoising / sparse / contractive / tied / linear) autoencoder of ``(B, *input_shape)`` items.

    Parameters
    ----------
    input_shape
        Shape of one item, flattened to ``D`` features inside.
    kind
        One of :data:`IMAGE_AE_KINDS`; ``"linear"`` is PCA (the other kinds differ only by the
        options below, which the user class sets from ``kind``).
    n_latent, n_hidden, n_layers
        Code width and the hidden ReLU MLPs of encoder and decoder.
    noise, noise_rate
        Training corruption (:class:`sclatent.nn.noise.InputNoise`).
    sparsity, contractive
        Weights of the L1 penalty on the code and of the contractive penalty (per item, nats).
    tied_weights
        Decoder matrices are the transposes of the encoder's.
    likelihood
        ``"bernoulli"`` (cross-entropy, sigmoid output) or ``"gaussian"`` (squared error).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        kind: str = "bottleneck",
        n_latent: int = 32,
        n_hidden: int = 256,
        n_layers: int = 1,
        noise: str = "none",
        noise_rate: float = 0.0,
        sparsity: float = 0.0,
        contractive: float = 0.0,
        tied_weights: bool = False,
        likelihood: str = "bernoulli",
    ) -> None:
        super().__init__()
        if kind not in IMAGE_AE_KINDS:
            raise ValueError(f"kind must be one of {IMAGE_AE_KINDS}, got {kind!r}.")
        if likelihood not in IMAGE_AE_LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {IMAGE_AE_LIKELIHOODS}, got {likelihood!r}.")
        if sparsity < 0 or contractive < 0:
            raise ValueError("sparsity and contractive weights must be >= 0.")
        if n_latent < 1 or n_hidden < 1 or n_layers < 1:
            raise ValueError("n_latent, n_hidden and n_layers must be >= 1.")
        self.linear = kind == "linear"
        if self.linear and (noise != "none" or sparsity or contractive or likelihood != "gaussian"):
            raise ValueError(
                "kind='linear' is PCA as an autoencoder: squared error (likelihood='gaussian'), no noise, "
                "no sparsity or contractive penalty; use kind='bottleneck' with those options instead."
            )
        self.input_shape = tuple(input_shape)
        self.n_features = n_features = math.prod(self.input_shape)
        if n_latent > n_features:
            raise ValueError(f"n_latent ({n_latent}) must not exceed the number of features ({n_features}).")
        self.kind, self.likelihood, self.n_latent = kind, likelihood, n_latent
        self.sparsity, self.contractive, self.tied_weights = float(sparsity), float(contractive), tied_weights
        self.noise = InputNoise(noise, noise_rate)
        # pixel means of the training items, centring the linear AE's input (set by the model class)
        self.register_buffer("input_mean", torch.zeros(n_features))
        if self.linear:
            self.encoder = self.decoder = None
            self.code = nn.Linear(n_features, n_latent, bias=False)
            self.out = TiedLinear(self.code, n_features) if tied_weights else nn.Linear(n_latent, n_features)
            return
        mlp = dict(n_layers=n_layers, use_batch_norm=False, dropout_rate=0.0)
        self.encoder = MLP(self.noise.output_width(n_features), n_hidden, **mlp)
        self.code = nn.Linear(n_hidden, n_latent)
        self.decoder = MLP(n_latent, n_hidden, **mlp)
        if tied_weights:
            # decoder layer i mirrors encoder layer n_layers - 1 - i (the first mirrors the code layer);
            # the output mirrors the image columns of the input layer (not the mask's, under masking)
            self.decoder.layers[0].linear = TiedLinear(self.code, n_hidden)
            for i in range(1, n_layers):
                self.decoder.layers[i].linear = TiedLinear(self.encoder.layers[n_layers - i].linear, n_hidden)
            self.out = TiedLinear(self.encoder.layers[0].linear, n_features)
        else:
            self.out = nn.Linear(n_hidden, n_features)

    # -------------------------------------------------------------------- pieces

    def corrupt(
        self, x: torch.Tensor, kind: str | None = None, rate: float | None = None, generator=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x~, mask)`` for flat items ``(B, D)``: ``kind``/``rate`` (default the module's) applied
        whatever the mode, ``mask`` 1.0 where ``"salt"``/``"masking"`` hid an entry (else zeros)."""
        kind = self.noise.kind if kind is None else kind
        rate = self.noise.rate if rate is None else rate
        InputNoise(kind, rate)  # validates the pair
        if kind == "gaussian" and rate > 0:
            return gaussian_noise(x, rate, generator), torch.zeros_like(x)
        if kind in ("salt", "masking") and rate > 0:
            return masking_noise(x, rate, generator)
        return x, torch.zeros_like(x)

    def encoder_input(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """What the encoder reads from flat, possibly corrupted items: centred for the linear AE, the
        mask (zeros when None) concatenated under ``"masking"`` noise."""
        if self.linear:
            return x - self.input_mean
        if self.noise.kind == "masking":
            return torch.cat([x, torch.zeros_like(x) if mask is None else mask], dim=-1)
        return x

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n_latent)`` code of flat items ``(B, D)`` as given (no corruption added)."""
        u = self.encoder_input(x, mask)
        return self.code(u) if self.linear else self.code(self.encoder(u))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` decoder output: logits (Bernoulli) or the reconstruction itself (Gaussian)."""
        if self.linear:
            return self.out(code) + self.input_mean
        return self.out(self.decoder(code))

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        """The reconstruction in input units from :meth:`decode`'s output."""
        return torch.sigmoid(output) if self.likelihood == "bernoulli" else output

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, *input_shape)`` reconstruction of items ``x`` (as given: corrupt them first to denoise)."""
        flat = x.reshape(len(x), -1)
        return self.mean(self.decode(self.encode(flat, mask))).reshape(x.shape)

    # -------------------------------------------------------------------- objective

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0) -> LossOutput:
        """Per-item loss of the clean item given its corrupted version (training mode) or itself
        (evaluation), plus the penalties. ``extra``: ``mse`` (squared error per pixel, always),
        ``l1`` and ``contractive`` (when weighted). ``kl_weight`` is unused (no KL)."""
        x = batch.x.reshape(batch.size, -1)
        if self.training and self.noise.kind != "none":
            corrupted, mask = self.corrupt(x)
        else:
            corrupted, mask = x, None
        penalise_jacobian = self.contractive > 0 and self.training
        if penalise_jacobian:
            corrupted = corrupted.detach().requires_grad_(True)
        code = self.encode(corrupted, mask)
        output = self.decode(code)
        reconstruction = reconstruction_nll(output, x, self.likelihood).sum(-1)
        extra = {"mse": ((self.mean(output.detach()) - x) ** 2).mean(-1)}
        total = reconstruction
        if self.sparsity > 0:
            extra["l1"] = code.abs().sum(-1)
            total = total + self.sparsity * extra["l1"]
        if penalise_jacobian:
            extra["contractive"] = contractive_penalty(code, corrupted)
            total = total + self.contractive * extra["contractive"]
        return LossOutput(
            loss=total.mean(), reconstruction=reconstruction, kl=torch.zeros_like(reconstruction), extra=extra
        )
