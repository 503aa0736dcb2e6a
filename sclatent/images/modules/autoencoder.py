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
  (:class:`sclatent.nn.blocks.TiedLinear`).
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

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ...contracts import LossOutput, Module
from ...hyperparameters import Hyperparameters, setting
from ...nn import MLP
from ...nn.blocks import TiedLinear
from ...nn.noise import InputNoise, NoiseKind, gaussian_noise, masking_noise
from ...nn.regularisers import contractive_penalty
from ..data import ArrayBatch

ImageAEKind = Literal["linear", "bottleneck", "sparse", "contractive", "tied", "denoising"]
ImageAELikelihood = Literal["bernoulli", "gaussian"]
#: The presets ``kind`` may name.
IMAGE_AE_KINDS: tuple[str, ...] = get_args(ImageAEKind)
IMAGE_AE_LIKELIHOODS: tuple[str, ...] = get_args(ImageAELikelihood)

# what each kind sets unless the caller says otherwise (over the plain defaults below)
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": dict(likelihood="gaussian"),
    "bottleneck": {},
    "sparse": dict(sparsity=0.1),
    "contractive": dict(contractive=0.1),
    "tied": dict(tied_weights=True),
    "denoising": dict(noise="masking", noise_rate=0.25),
}
PLAIN_DEFAULTS: dict[str, Any] = {
    "noise": "none",
    "sparsity": 0.0,
    "contractive": 0.0,
    "tied_weights": False,
    "likelihood": "bernoulli",
}
# the rate of each corruption unless given (or set by the kind)
DEFAULT_NOISE_RATE: dict[str, float] = {"none": 0.0, "gaussian": 0.3, "salt": 0.25, "masking": 0.25}


@dataclass(frozen=True)
class ImageAutoencoderHyperparameters(Hyperparameters):
    """The image autoencoders' hyperparameters, declared once: read by :class:`ImageAutoencoderModule`,
    :class:`sclatent.images.ImageAutoencoder` and ``sclatent mnist-ae``.

    A setting left None takes the value ``kind`` gives it (:func:`resolved_settings`); the model
    stores the resolved values.
    """

    family: ClassVar[str] = "ImageAutoencoder"

    kind: ImageAEKind = setting(
        "bottleneck",
        "linear (PCA as an autoencoder: squared error on pixel-mean-centred inputs), bottleneck (MLP), sparse "
        "(L1 on the code, default weight 0.1), contractive (Hutchinson ||J||_F^2, default weight 0.1), tied "
        "(decoder = transposed encoder) or denoising (default noise='masking' at rate 0.25).",
    )
    n_latent: int = setting(32, "Code width.", minimum=1)
    n_hidden: int = setting(
        256, "Width of the hidden MLP layers of encoder and decoder (unused by kind='linear').", minimum=1
    )
    n_layers: int = setting(1, "Hidden MLP layers of encoder and decoder (unused by kind='linear').", minimum=1)
    noise: NoiseKind | None = setting(
        None,
        "Training corruption: none, gaussian (std noise_rate), salt (each pixel set to 0 with probability "
        "noise_rate) or masking (as salt, the mask of hidden pixels concatenated to the input); clean in "
        "evaluation. None: the kind's.",
    )
    noise_rate: float | None = setting(
        None, "Std (gaussian, default 0.3) or hidden fraction (salt, masking, default 0.25) of the corruption."
    )
    sparsity: float | None = setting(
        None, "Weight of the L1 penalty on the code (nats per item per unit of |code|_1).", minimum=0.0
    )
    contractive: float | None = setting(
        None, "Weight of the contractive penalty (nats per item per unit of ||J||_F^2).", minimum=0.0
    )
    tied_weights: bool | None = setting(
        None, "Decoder matrices are the transposes of the encoder's (also for kind='linear')."
    )
    likelihood: ImageAELikelihood | None = setting(
        None,
        "bernoulli (cross-entropy on intensities in [0, 1]) or gaussian (squared error; forced for "
        "kind='linear'; inputs may then be any finite vectors). None: the kind's.",
    )

    def validate(self) -> None:
        if self.kind == "linear" and (
            self.noise not in (None, "none")
            or self.sparsity
            or self.contractive
            or self.likelihood not in (None, "gaussian")
        ):
            raise ValueError(
                "kind='linear' is PCA as an autoencoder: squared error (likelihood='gaussian'), no noise, "
                "no sparsity or contractive penalty; use kind='bottleneck' with those options instead."
            )
        if self.kind == "denoising" and self.noise == "none":
            raise ValueError("kind='denoising' needs a corruption: noise='gaussian', 'salt' or 'masking'.")


def resolved_settings(settings: ImageAutoencoderHyperparameters) -> ImageAutoencoderHyperparameters:
    """``settings`` with every None replaced by what its ``kind`` sets (else the plain default)."""
    kind_defaults = KIND_DEFAULTS[settings.kind]
    values = {**PLAIN_DEFAULTS, **kind_defaults}
    values.update({name: getattr(settings, name) for name in PLAIN_DEFAULTS if getattr(settings, name) is not None})
    if settings.noise_rate is not None:
        values["noise_rate"] = settings.noise_rate
    elif "noise_rate" not in kind_defaults:
        values["noise_rate"] = DEFAULT_NOISE_RATE.get(values["noise"], 0.0)
    return dataclasses.replace(settings, **values)


def reconstruction_nll(output: torch.Tensor, target: torch.Tensor, likelihood: str) -> torch.Tensor:
    """``(B, D)`` per-entry loss: Bernoulli cross-entropy of logits ``output``, or half the squared error.

    Nats per entry (the Gaussian's constant ``0.5 log 2 pi`` left out).
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(output, target, reduction="none")
    return 0.5 * (output - target) ** 2


class ImageAutoencoderModule(Module):
    """(Denoising / sparse / contractive / tied / linear) autoencoder of ``(B, *input_shape)`` items.

    Parameters
    ----------
    input_shape
        Shape of one item, flattened to ``D`` features inside.
    **hyperparameters
        :class:`ImageAutoencoderHyperparameters`: ``kind`` (one of :data:`IMAGE_AE_KINDS`;
        ``"linear"`` is PCA, the other kinds differ only by the settings they default), ``n_latent``,
        ``n_hidden`` and ``n_layers`` (code width and the hidden ReLU MLPs of encoder and decoder),
        ``noise`` and ``noise_rate`` (training corruption, :class:`sclatent.nn.noise.InputNoise`),
        ``sparsity`` and ``contractive`` (weights of the L1 penalty on the code and of the contractive
        penalty, per item, nats), ``tied_weights`` (decoder matrices are the transposes of the
        encoder's) and ``likelihood`` (``"bernoulli"``: cross-entropy, sigmoid output;
        ``"gaussian"``: squared error). Those left None take the kind's values.
    """

    # early stopping watches the reconstruction term (minimised) unless told otherwise
    default_monitor = "reconstruction"

    def __init__(self, input_shape: tuple[int, ...], **hyperparameters: Any) -> None:
        super().__init__()
        settings = resolved_settings(ImageAutoencoderHyperparameters.from_dict(hyperparameters))
        kind, n_latent, n_hidden, n_layers = settings.kind, settings.n_latent, settings.n_hidden, settings.n_layers
        tied_weights = settings.tied_weights
        self.linear = kind == "linear"
        self.input_shape = tuple(input_shape)
        self.n_features = n_features = math.prod(self.input_shape)
        if n_latent > n_features:
            raise ValueError(f"n_latent ({n_latent}) must not exceed the number of features ({n_features}).")
        self.kind, self.likelihood, self.n_latent = kind, settings.likelihood, n_latent
        self.sparsity, self.contractive = float(settings.sparsity), float(settings.contractive)
        self.tied_weights = tied_weights
        self.noise = InputNoise(settings.noise, settings.noise_rate)
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
        (evaluation), plus the penalties. Terms: ``reconstruction`` (nats), ``mse`` (squared error
        per pixel, always), ``l1`` and ``contractive`` (when weighted; ``contractive`` in training
        only). ``kl_weight`` is unused (no KL)."""
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
        terms = {"reconstruction": reconstruction, "mse": ((self.mean(output.detach()) - x) ** 2).mean(-1)}
        total = reconstruction
        if self.sparsity > 0:
            terms["l1"] = code.abs().sum(-1)
            total = total + self.sparsity * terms["l1"]
        if penalise_jacobian:
            terms["contractive"] = contractive_penalty(code, corrupted)
            total = total + self.contractive * terms["contractive"]
        return LossOutput(loss=total.mean(), terms=terms)
