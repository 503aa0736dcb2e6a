"""A multi-scale RealNVP/Glow flow on dequantised images: exact log-likelihood by change of variables.

``x`` (grey levels ``k`` of ``K``, dequantised to ``(k + u) / K`` in ``[0, 1)``) is mapped to
latents by::

    preprocess -> [squeeze -> K x (actnorm -> 1x1 conv -> affine coupling) -> split] x (L - 1)
               -> squeeze -> K x (actnorm -> 1x1 conv -> affine coupling)

(Dinh et al. 2017, sec. 3.6; Kingma & Dhariwal 2018, fig. 2). At each split half of the channels
is factored out as a latent ``z_l`` with a prior ``N(mu(h), sigma(h)^2)`` computed by a
zero-initialised convolution of the half ``h`` that carries on (``learn_prior=True``; a standard
normal otherwise), and the last level's latent has a learned per-channel Gaussian (or standard
normal). Then::

    log p(x) = sum_l log p(z_l | h_l) + log |det d(z_1, ..., z_L) / dx|

in nats, where the log-determinant includes the preprocessing's: ``"logit"`` maps
``x -> logit(alpha + (1 - 2 alpha) x)`` (RealNVP, ``alpha = 0.05``), ``"center"`` maps
``x -> x - 1/2`` (Glow; Jacobian 1). Bits per dimension of the discrete data follow from the
density of the dequantised data on the unit cube (:func:`sclatent.images.nn.pixels.bits_per_dim`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from ...contracts import LossOutput, Module
from ...hyperparameters import Hyperparameters, setting
from ..data import ArrayBatch
from ..nn.glow import CouplingMask, CouplingScale, FlowStep, Squeeze
from ..nn.pixels import bits_per_dim, dequantise

Preprocessing = Literal["logit", "center"]
PREPROCESSING = get_args(Preprocessing)
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class ImageFlowHyperparameters(Hyperparameters):
    """The image flow's hyperparameters, declared once: read by :class:`ImageFlowModule`,
    :class:`sclatent.images.ImageFlow` and ``sclatent mnist-flow``."""

    family: ClassVar[str] = "ImageFlow"

    levels: int = setting(
        256, "Grey levels K of the data (256 for MNIST, 17 for the 8x8 digits); inputs are k / (K - 1).", minimum=2
    )
    n_scales: int = setting(
        2, "Squeeze levels L of the multi-scale architecture (image sides divisible by 2^L).", minimum=1
    )
    n_steps: int = setting(8, "Flow steps (actnorm, 1x1 convolution, affine coupling) per scale.", minimum=1)
    n_hidden: int = setting(64, "Channels of each coupling network.", minimum=1)
    mask: CouplingMask = setting(
        "channel", "Couplings split by channel (Glow) or checkerboard (RealNVP); consecutive ones alternate halves."
    )
    scale: CouplingScale = setting("tanh", "Coupling scale function.")
    learn_prior: bool = setting(
        True,
        "Learned Gaussian priors on the factored-out latents (conditioned on the kept half) and the top latent; "
        "otherwise standard normals.",
    )
    preprocess: Preprocessing = setting(
        "logit", "logit(alpha + (1 - 2 alpha) x) (RealNVP) or x - 1/2 (Glow) before the flow."
    )
    alpha: float = setting(0.05, "Logit squashing, in [0, 0.5): keeps logit finite at 0 and 1.")

    def validate(self) -> None:
        if not 0.0 <= self.alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {self.alpha}.")


def _gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """``log N(z; mean, exp(log_std)^2)`` summed over all but the first axis: ``(B,)``."""
    log_p = -0.5 * (((z - mean) * torch.exp(-log_std)) ** 2 + 2 * log_std + _LOG_2PI)
    return log_p.flatten(1).sum(1)


class ImageFlowModule(Module):
    """Multi-scale Glow on images ``(B, C, H, W)`` (or ``(B, H, W)``) of ``levels`` grey levels.

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(C, H, W)``; ``H`` and ``W`` divisible by ``2 ** n_scales``.
    **hyperparameters
        :class:`ImageFlowHyperparameters`: ``levels`` (grey levels ``K`` of the data; inputs in
        ``[0, 1]`` are read as ``k / (K - 1)``), ``n_scales`` (levels ``L`` of the multi-scale
        architecture), ``n_steps`` (flow steps per scale), ``n_hidden`` (channels of each coupling's
        conditioner), ``mask`` (``"channel"``, Glow, or ``"checkerboard"``, RealNVP; consecutive
        couplings alternate which half is kept), ``scale`` (``"tanh"`` or ``"sigmoid"``, see
        :class:`sclatent.images.nn.glow.AffineCoupling`), ``learn_prior`` (learned Gaussian priors
        on the factored-out latents, conditioned on the kept half, and on the top latent; otherwise
        standard normals), ``preprocess`` (``"logit"`` with ``alpha``, or ``"center"``) and
        ``alpha`` (logit squashing, keeps ``logit`` finite at 0 and 1).
    """

    # early stopping watches the NLL (minimised) unless told otherwise
    default_monitor = "nll"

    def __init__(self, input_shape: tuple[int, ...], **hyperparameters: Any) -> None:
        super().__init__()
        settings = ImageFlowHyperparameters.from_dict(hyperparameters)
        levels, n_scales, n_steps, n_hidden = settings.levels, settings.n_scales, settings.n_steps, settings.n_hidden
        mask, scale, learn_prior = settings.mask, settings.scale, settings.learn_prior
        preprocess, alpha = settings.preprocess, settings.alpha
        if len(input_shape) not in (2, 3):
            raise ValueError(f"input_shape must be (H, W) or (C, H, W), got {tuple(input_shape)}.")
        c, h, w = (1, *input_shape) if len(input_shape) == 2 else tuple(input_shape)
        if h % 2**n_scales or w % 2**n_scales:
            raise ValueError(
                f"{n_scales} scales halve the image {n_scales} times, so height and width must be divisible by "
                f"{2**n_scales}; got {h}x{w}. Use fewer scales (n_scales) or pad the images."
            )
        self.input_shape = tuple(input_shape)
        self.image_shape = (c, h, w)
        self.n_dims = c * h * w
        self.levels, self.n_scales, self.preprocess, self.alpha = int(levels), int(n_scales), preprocess, float(alpha)
        self.learn_prior = learn_prior
        self.squeeze = Squeeze()
        # the 1x1 convolutions' random rotations come from this generator: the model's seed fixes them
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        self.scales = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        channels = c
        for s in range(n_scales):
            channels *= 4
            steps = [FlowStep(channels, mask, i % 2, n_hidden, scale, generator) for i in range(n_steps)]
            self.scales.append(nn.ModuleList(steps))
            if s < n_scales - 1:
                channels //= 2
                prior = nn.Conv2d(channels, 2 * channels, 3, padding=1)
                nn.init.zeros_(prior.weight)
                nn.init.zeros_(prior.bias)
                self.split_priors.append(prior)
        self.top_mean = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn_prior)
        self.top_log_std = nn.Parameter(torch.zeros(1, channels, 1, 1), requires_grad=learn_prior)

    # ----------------------------------------------------------------- preprocessing

    def _to_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.image_shape)

    def _preprocess(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.preprocess == "center":
            return x - 0.5, x.new_zeros(x.shape[0])
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        log_det = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        return y, log_det

    def _postprocess(self, y: torch.Tensor) -> torch.Tensor:
        if self.preprocess == "center":
            return y + 0.5
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    # ----------------------------------------------------------------- the bijection

    def _split_prior(self, s: int, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.learn_prior:
            zero = kept.new_zeros(kept.shape)
            return zero, zero
        mean, log_std = self.split_priors[s](kept).chunk(2, dim=1)
        return mean, log_std

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Latents of images ``x`` in ``(0, 1)``: ``([z_1, ..., z_L], log |det dz/dx| (B,), log p(z) (B,))``."""
        h, log_det = self._preprocess(self._to_image(x))
        log_prior = x.new_zeros(x.shape[0])
        zs = []
        for s, steps in enumerate(self.scales):
            h, _ = self.squeeze(h)
            for step in steps:
                h, ld = step(h)
                log_det = log_det + ld
            if s < self.n_scales - 1:
                z, h = h.chunk(2, dim=1)
                log_prior = log_prior + _gaussian_log_prob(z, *self._split_prior(s, h))
                zs.append(z)
        zs.append(h)
        log_prior = log_prior + _gaussian_log_prob(h, self.top_mean, self.top_log_std)
        return zs, log_det, log_prior

    def decode(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """Images ``(B, *input_shape)`` from latents, the exact inverse of :meth:`encode`."""
        h = zs[-1]
        for s in reversed(range(self.n_scales)):
            if s < self.n_scales - 1:
                h = torch.cat([zs[s], h], dim=1)
            for step in reversed(self.scales[s]):
                h = step.inverse(h)
            h = self.squeeze.inverse(h)
        return self._postprocess(h).reshape(h.shape[0], *self.input_shape)

    def flatten(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """``(B, D)``: the latents of :meth:`encode` concatenated (the flow as a map ``R^D -> R^D``)."""
        return torch.cat([z.flatten(1) for z in zs], dim=1)

    def unflatten(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`flatten`."""
        shapes = self._latent_shapes()
        sizes = [math.prod(s) for s in shapes]
        return [part.reshape(z.shape[0], *shape) for part, shape in zip(z.split(sizes, dim=1), shapes)]

    def _latent_shapes(self) -> list[tuple[int, int, int]]:
        c, h, w = self.image_shape
        shapes = []
        for s in range(self.n_scales):
            c, h, w = 4 * c, h // 2, w // 2
            if s < self.n_scales - 1:
                c //= 2
                shapes.append((c, h, w))
        shapes.append((c, h, w))
        return shapes

    # ----------------------------------------------------------------- densities and samples

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` (nats) of continuous images in ``(0, 1)``, ``(B, *input_shape) -> (B,)``."""
        _, log_det, log_prior = self.encode(x)
        return log_prior + log_det

    def dequantise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Intensities ``k / (K - 1)`` to ``(k + u) / K``, ``u ~ U(0, 1)`` (fresh each call)."""
        k = torch.round(x * (self.levels - 1))
        return dequantise(k, self.levels, generator).to(x.dtype)

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0) -> LossOutput:
        """Terms ``nll`` (nats per image of the freshly dequantised minibatch, the loss) and
        ``bits_per_dim`` (the same in bits per pixel of the discrete data)."""
        x = self.dequantise(batch.x)
        nll = -self.log_prob(x)
        return LossOutput(
            loss=nll.mean(), terms={"nll": nll, "bits_per_dim": bits_per_dim(nll, self.n_dims, self.levels)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, *input_shape)`` images in ``[0, 1]``: latents drawn with standard deviations times ``temperature``."""
        param = self.top_mean
        shapes = self._latent_shapes()

        def noise(shape):
            return torch.randn((n, *shape), generator=generator, dtype=param.dtype).to(param.device)

        h = self.top_mean + temperature * torch.exp(self.top_log_std) * noise(shapes[-1])
        # walk down the scales: each split's prior is conditioned on the half above it
        for s in reversed(range(self.n_scales - 1)):
            steps_above = self.scales[s + 1]
            for step in reversed(steps_above):
                h = step.inverse(h)
            h = self.squeeze.inverse(h)
            mean, log_std = self._split_prior(s, h)
            z = mean + temperature * torch.exp(log_std) * noise(shapes[s])
            h = torch.cat([z, h], dim=1)
        for step in reversed(self.scales[0]):
            h = step.inverse(h)
        h = self.squeeze.inverse(h)
        return self._postprocess(h).clamp(0.0, 1.0).reshape(n, *self.input_shape)

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation of every actnorm from dequantised images ``x`` (one pass in train mode)."""
        was_training = self.training
        self.train()
        self.log_prob(x)
        self.train(was_training)

    @property
    def initialised(self) -> bool:
        return all(bool(step.actnorm.initialised) for steps in self.scales for step in steps)
