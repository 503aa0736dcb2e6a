"""A variational autoencoder for images and vectors (Kingma & Welling 2014) as a pure ``torch.nn.Module``.

Generative model, for an item ``x`` of ``D = prod(input_shape)`` values::

    z ~ N(0, I)                                    (n_latent)
    x_d ~ Bernoulli(sigmoid(f_d(z)))               likelihood="bernoulli" (binary pixels)
    x_d ~ N(f_d(z), sigma^2)                       likelihood="gaussian"  (continuous values)

Inference: ``q(z | x) = N(m(x), diag v(x))``; ``f``, ``m`` and ``v`` are MLPs (ReLU, no batch
norm, no dropout: batch statistics would make ``log p(x)`` of one image depend on its minibatch,
and the benchmark models are too small to over-fit in the epochs they get). KL(q || p) is analytic.

Binary pixels: with ``binarisation="dynamic"`` every pass in training mode draws each pixel
``~ Bernoulli(intensity)`` afresh (Salakhutdinov & Murray 2008; the protocol of Burda et al. 2016),
with ``"fixed"`` it is ``intensity > 0.5`` once and for all. Inputs that are already 0/1 pass
through either unchanged, which is how :class:`sclatent.images.ImageVAE` evaluates: it binarises
held-out images once with a seeded generator and hands the module binary data.

Gaussian decoder: one learned variance ``sigma^2`` shared by every value (homoscedastic). Its
optimum is the mean squared reconstruction error, so it cannot collapse onto the near-constant
border pixels of digit images the way a per-pixel or per-item variance does (whose density then
grows without bound). The log-likelihood of continuous data is a log-*density*: it depends on the
data's units, can be positive, and is not comparable with the Bernoulli NLL of binary data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ...contracts import LossOutput, Module
from ...distributions import gaussian_kl, gaussian_log_prob
from ...hyperparameters import Hyperparameters, setting
from ...nn import MLP, GaussianEncoder
from ..data import ArrayBatch
from ..nn.pixels import binarise

Likelihood = Literal["bernoulli", "gaussian"]
Binarisation = Literal["dynamic", "fixed"]
LIKELIHOODS = get_args(Likelihood)


@dataclass(frozen=True)
class ImageVAEHyperparameters(Hyperparameters):
    """The image VAE's hyperparameters, declared once: read by :class:`ImageVAEModule`,
    :class:`sclatent.images.ImageVAE` and ``sclatent mnist-vae``."""

    family: ClassVar[str] = "ImageVAE"

    n_latent: int = setting(50, "Latent dimension.", minimum=1)
    n_hidden: int = setting(200, "Width of the hidden layers of the encoder's and the decoder's MLPs.", minimum=1)
    n_layers: int = setting(2, "Hidden layers of the encoder's and the decoder's MLPs.", minimum=1)
    likelihood: Likelihood = setting(
        "bernoulli", "Decoder: Bernoulli (binarised images) or Gaussian with one learned variance (continuous values)."
    )
    binarisation: Binarisation | None = setting(
        None,
        "Binarisation of a Bernoulli model's training images: dynamic (a fresh Bernoulli draw each pass; the "
        "default) or fixed (threshold 0.5); must be None for the Gaussian decoder.",
    )
    var_eps: float = setting(1e-6, "Floor of the posterior variance (it keeps log q finite).", minimum=0.0, cli=False)

    def validate(self) -> None:
        if self.likelihood == "gaussian" and self.binarisation is not None:
            raise ValueError(
                "the Gaussian decoder models continuous values: binarisation must be None "
                f"(got {self.binarisation!r}); use likelihood='bernoulli' for binarised images."
            )


def resolved_binarisation(likelihood: str, binarisation: str | None) -> str | None:
    """``binarisation`` with a Bernoulli decoder's default (``"dynamic"``) in place of None."""
    return "dynamic" if binarisation is None and likelihood == "bernoulli" else binarisation


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log Bernoulli(x | sigmoid(logits))`` summed over the last axis (nats), ``(...,)``.

    Computed as minus the binary cross-entropy with logits, which is stable for large ``|logits|``
    (``log sigmoid`` never rounds to ``log 0``). ``logits`` and ``x`` broadcast against each other.
    """
    logits, x = torch.broadcast_tensors(logits, x)
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


class ImageVAEModule(Module):
    """MLP VAE with a Bernoulli or Gaussian decoder and a ``N(0, I)`` prior.

    Parameters
    ----------
    input_shape
        Shape of one item (flattened to ``D`` values internally).
    **hyperparameters
        :class:`ImageVAEHyperparameters`: ``n_latent`` (dimension of ``z``), ``n_hidden`` and
        ``n_layers`` (the encoder's and the decoder's MLPs), ``likelihood`` (``"bernoulli"`` for
        binarised images, ``"gaussian"`` for continuous values), ``binarisation`` (``"dynamic"``,
        the Bernoulli default, or ``"fixed"``; None for the Gaussian decoder) and ``var_eps``, the
        floor of the posterior variance (``v = exp(.) + var_eps``: a standard deviation of at
        least 0.001, far below what a trained 2-D latent uses, but it keeps ``log q`` finite).
    """

    default_monitor = "elbo"

    def __init__(self, input_shape: tuple[int, ...], **hyperparameters: Any) -> None:
        super().__init__()
        settings = ImageVAEHyperparameters.from_dict(hyperparameters)
        n_latent, n_hidden, n_layers = settings.n_latent, settings.n_hidden, settings.n_layers
        self.input_shape = tuple(input_shape)
        self.n_input = math.prod(self.input_shape)
        self.n_latent = n_latent
        self.likelihood = settings.likelihood
        self.binarisation = resolved_binarisation(settings.likelihood, settings.binarisation)
        mlp = {"n_layers": n_layers, "dropout_rate": 0.0, "use_batch_norm": False}
        self.encoder = GaussianEncoder(self.n_input, n_latent, n_hidden, var_eps=settings.var_eps, **mlp)
        self.decoder = MLP(n_latent, n_hidden, **mlp)
        self.out = nn.Linear(n_hidden, self.n_input)
        # Gaussian decoder: log sigma^2, one for all values; starts at sigma = 0.1 (a tenth of the
        # [0, 1] intensity range) rather than 1, which would leave the first epochs KL-dominated
        self.log_var = nn.Parameter(torch.tensor(math.log(0.01))) if self.likelihood == "gaussian" else None

    # -------------------------------------------------------------------- pieces

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """What the model sees of items ``x`` ``(B, *input_shape)``: ``(B, D)``, binarised for Bernoulli.

        Dynamic binarisation draws from torch's global generator (seeded by the trainer) on every
        call, in training and in eval mode; binary inputs come back unchanged either way.
        """
        x = x.reshape(x.shape[0], self.n_input)
        if self.likelihood == "bernoulli":
            return binarise(x, self.binarisation)
        return x

    def inference(
        self, x: torch.Tensor, n_samples: int = 1, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Posterior of observed ``x`` ``(B, D)``.

        Returns ``qz_mean, qz_var`` ``(B, n_latent)`` and ``z`` ``(n_samples, B, n_latent)``, reparameterised
        draws (from ``generator`` when given, else torch's global generator).
        """
        h = self.encoder.body(x)
        mean, log_var = self.encoder.heads(h).split(self.n_latent, dim=-1)
        var = torch.exp(log_var) + self.encoder.var_eps
        eps = torch.randn((n_samples, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
        return {"qz_mean": mean, "qz_var": var, "z": mean + var.sqrt() * eps}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output for ``z`` ``(..., n_latent)``: Bernoulli logits or Gaussian means, ``(..., D)``."""
        lead = z.shape[:-1]
        out = self.out(self.decoder(z.reshape(-1, self.n_latent)))
        return out.reshape(*lead, self.n_input)

    def mean(self, decoded: torch.Tensor) -> torch.Tensor:
        """``E[x | z]`` from :meth:`decode`'s output: pixel probabilities or Gaussian means."""
        return torch.sigmoid(decoded) if self.likelihood == "bernoulli" else decoded

    def log_likelihood(self, decoded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log p(x | z)`` (nats, summed over the ``D`` values) from :meth:`decode`'s output, ``(...,)``.

        ``decoded`` ``(..., D)`` and the observed ``x`` ``(B, D)`` broadcast (e.g. ``(k, B, D)`` against ``(B, D)``).
        """
        if self.likelihood == "bernoulli":
            return bernoulli_log_prob(decoded, x)
        decoded, x = torch.broadcast_tensors(decoded, x)
        return gaussian_log_prob(x, decoded, torch.exp(self.log_var))

    # -------------------------------------------------------------------- objectives

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0) -> LossOutput:
        """Negative ELBO per item (one reparameterised sample, analytic KL), KL scaled by ``kl_weight``."""
        x = self.observe(batch.x)
        inf = self.inference(x)
        reconstruction = -self.log_likelihood(self.decode(inf["z"][0]), x)
        kl = gaussian_kl(inf["qz_mean"], inf["qz_var"])
        return LossOutput.variational(torch.mean(reconstruction + kl_weight * kl), reconstruction, kl)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """ELBO per item ``(B,)`` (nats) of observed ``x`` ``(B, D)``: one sample, analytic KL."""
        inf = self.inference(x, generator=generator)
        return self.log_likelihood(self.decode(inf["z"][0]), x) - gaussian_kl(inf["qz_mean"], inf["qz_var"])

    @torch.no_grad()
    def marginal_log_likelihood(
        self,
        x: torch.Tensor,
        n_samples: int = 1000,
        generator: torch.Generator | None = None,
        max_rows: int = 2**22,
    ) -> torch.Tensor:
        """The importance-weighted bound ``L_k`` (Burda et al. 2016) on ``log p(x)`` per item, ``(B,)``, nats.

        ``L_k = log (1/k) sum_i p(x | z_i) p(z_i) / q(z_i | x)`` with ``z_i ~ q(z | x)``; its
        expectation rises with ``k`` from the ELBO (``k = 1``) to ``log p(x)``. The ``k`` samples
        are decoded ``chunk`` at a time, with ``chunk * B * D <= max_rows`` values per pass (about
        16 MB of logits at the default), and combined by a log-sum-exp over all ``k``.
        """
        inf = self.inference(x, n_samples=0)
        mean, std = inf["qz_mean"], inf["qz_var"].sqrt()
        chunk = max(1, min(n_samples, max_rows // max(1, x.shape[0] * self.n_input)))
        log_weights = []
        for start in range(0, n_samples, chunk):
            k = min(chunk, n_samples - start)
            eps = torch.randn((k, *mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * eps
            log_q = gaussian_log_prob(z, mean, inf["qz_var"])
            log_p = gaussian_log_prob(z, 0.0, 1.0)
            log_weights.append(self.log_likelihood(self.decode(z), x) + log_p - log_q)
        return torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(n_samples)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``E[x | z]`` for ``n`` draws ``z ~ N(0, I)``: ``(n, D)``."""
        device = self.out.weight.device
        z = torch.randn((n, self.n_latent), generator=generator, device=device)
        return self.mean(self.decode(z))
