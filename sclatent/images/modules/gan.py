"""GANs of images (DCGAN-style or MLP), pure torch: the players, their objectives, sampling.

Data flow for a minibatch of real images ``x`` in [0, 1] (labels ``y`` when class-conditional)::

    z ~ N(0, I)                              noise                                  (n_latent)
    x~ = sigmoid(G(z, onehot(y)))            generator: an image in [0, 1]
    D(x, y) = w . h(x) + e_y . h(x) + b      discriminator: one logit / critic score per image
                                             (projection conditioning, Miyato & Koyama 2018)

Objectives (``loss``):

* ``"nonsaturating"`` (Goodfellow et al. 2014, section 3): D minimises the binary cross-entropy
  ``-log sigmoid(D(x)) - log(1 - sigmoid(D(x~)))``; G minimises ``-log sigmoid(D(x~))`` (the
  non-saturating form: strong gradients while D still rejects the samples).
* ``"wgan-gp"`` (Gulrajani et al. 2017): the critic minimises ``D(x~) - D(x) + lambda (||grad D(x^)|| - 1)^2``
  at random points ``x^`` between real and generated images; G minimises ``-D(x~)``.

Either may add spectral normalisation of the discriminator's layers (Miyato et al. 2018), which
bounds each layer's largest singular value by 1 through power iteration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.arrays import ArrayBatch
from ..nn.conv import ConvEncoder
from ..nn.conv_decoder import ConvDecoder
from ._base import LossOutput
from .gan import gradient_penalty

ARCHITECTURES = ("dcgan", "mlp")
LOSSES = ("nonsaturating", "wgan-gp")


def nonsaturating_losses(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item ``(discriminator, generator)`` losses of the non-saturating GAN, in nats.

    ``discriminator = -log sigmoid(real) - log(1 - sigmoid(fake))`` (binary cross-entropy, real = 1)
    and ``generator = -log sigmoid(fake)``, both computed stably with ``softplus``:
    ``-log sigmoid(l) = softplus(-l)`` and ``-log(1 - sigmoid(l)) = softplus(l)``.
    """
    return F.softplus(-real_logits) + F.softplus(fake_logits), F.softplus(-fake_logits)


def _check_labels(labels: torch.Tensor | None, n_classes: int) -> None:
    if n_classes and labels is None:
        raise ValueError("this GAN is class-conditional: pass labels (the class of each image).")


class ImageGenerator(nn.Module):
    """``(z, labels) -> `` images ``(B, *input_shape)`` in [0, 1] (a sigmoid output).

    ``"dcgan"``: :class:`sclatent.nn.conv_decoder.ConvDecoder` (Linear -> BN -> ReLU, transposed
    convolutions). ``"mlp"``: Linear -> BN -> ReLU per hidden width, then Linear to the pixels.
    The class one-hot (conditional GANs) is concatenated to ``z``.
    """

    def __init__(
        self, input_shape: tuple[int, ...], n_latent: int, n_classes: int, architecture: str, widths: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.input_shape, self.n_classes = tuple(input_shape), n_classes
        n_in = n_latent + n_classes
        if architecture == "dcgan":
            channels = 1 if len(input_shape) == 2 else input_shape[0]
            self.net = ConvDecoder(n_in, channels, tuple(input_shape[-2:]), widths=widths)
        else:
            layers: list[nn.Module] = []
            width = n_in
            for h in widths:
                layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, math.prod(input_shape)))
            self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(labels, self.n_classes)
        inputs = z if not self.n_classes else torch.cat([z, F.one_hot(labels, self.n_classes).to(z.dtype)], dim=-1)
        return torch.sigmoid(self.net(inputs)).reshape(z.shape[0], *self.input_shape)


class ImageDiscriminator(nn.Module):
    """``(x, labels) -> (B,)`` logits (non-saturating) or critic scores (WGAN-GP).

    Features ``h``: ``"dcgan"`` stride-2 convolutions with LeakyReLU(0.2)
    (:class:`sclatent.nn.conv.ConvEncoder`, no BatchNorm: the gradient penalty is per image and a
    batch statistic would couple the images) then LeakyReLU; ``"mlp"`` Linear -> LeakyReLU(0.2)
    layers. Output ``w . h + b``, plus ``e_y . h`` for a class-conditional discriminator.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_classes: int,
        architecture: str,
        widths: tuple[int, ...],
        n_features: int,
        spectral_norm: bool,
    ) -> None:
        super().__init__()
        self.input_shape, self.n_classes = tuple(input_shape), n_classes
        # (B, H, W) images get their channel axis before the convolutions
        self.add_channel = architecture == "dcgan" and len(input_shape) == 2
        if architecture == "dcgan":
            channels = 1 if len(input_shape) == 2 else input_shape[0]
            encoder = ConvEncoder(channels, tuple(input_shape[-2:]), n_features, widths=widths, batch_norm=False)
            self.features = nn.Sequential(encoder, nn.LeakyReLU(0.2))
        else:
            layers: list[nn.Module] = [nn.Flatten()]
            width = math.prod(input_shape)
            for h in (*widths, n_features):
                layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
                width = h
            self.features = nn.Sequential(*layers)
        self.out = nn.Linear(n_features, 1)
        self.embedding = nn.Embedding(n_classes, n_features) if n_classes else None
        if self.embedding is not None:
            nn.init.normal_(self.embedding.weight, std=0.02)
        if spectral_norm:
            for module in list(self.modules()):
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    nn.utils.parametrizations.spectral_norm(module)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(labels, self.n_classes)
        h = self.features(x.unsqueeze(1) if self.add_channel else x)
        score = self.out(h).squeeze(-1)
        if self.embedding is not None:
            score = score + (self.embedding(labels) * h).sum(-1)
        return score


class ImageGANModule(nn.Module):
    """Generator and discriminator of images, trained by :func:`sclatent.train.fit` as two parameter groups.

    Parameters
    ----------
    input_shape
        ``(H, W)``, ``(C, H, W)`` or ``(D,)`` (``"mlp"`` only) of one item; values in [0, 1].
    n_latent
        Width of the generator's Gaussian noise ``z``.
    architecture
        ``"dcgan"`` (transposed-convolution generator, convolutional discriminator) or ``"mlp"``.
    loss
        ``"nonsaturating"`` or ``"wgan-gp"`` (see the module docstring).
    spectral_norm
        Spectral normalisation of every discriminator layer.
    n_classes
        0: unconditional; otherwise a class-conditional GAN over this many classes.
    generator_widths, discriminator_widths
        ``"dcgan"``: channels of the generator's feature maps (smallest map first) and of the
        discriminator's stride-2 stages; ``"mlp"``: hidden widths. Default per architecture.
    n_features
        Width of the discriminator's last feature layer.
    n_critic
        Discriminator updates per generator update (default 1 non-saturating, 5 WGAN-GP).
    gradient_penalty_weight
        ``lambda`` of WGAN-GP (10 in the paper); unused by the non-saturating loss.
    betas
        Adam betas of both players (default ``(0.5, 0.999)`` as DCGAN, ``(0.5, 0.9)`` for WGAN-GP).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_latent: int = 64,
        architecture: str = "dcgan",
        loss: str = "nonsaturating",
        spectral_norm: bool = False,
        n_classes: int = 0,
        generator_widths: tuple[int, ...] | None = None,
        discriminator_widths: tuple[int, ...] | None = None,
        n_features: int = 128,
        n_critic: int | None = None,
        gradient_penalty_weight: float = 10.0,
        betas: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}.")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        if architecture == "dcgan" and len(input_shape) not in (2, 3):
            raise ValueError(
                f"architecture='dcgan' needs images (H, W) or (C, H, W), got input_shape={tuple(input_shape)}; "
                "use architecture='mlp' for vectors."
            )
        if n_latent < 1 or n_classes < 0 or n_features < 1:
            raise ValueError(
                f"n_latent and n_features must be >= 1 and n_classes >= 0, got {n_latent}, {n_features}, {n_classes}."
            )
        n_critic = (5 if loss == "wgan-gp" else 1) if n_critic is None else int(n_critic)
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}.")
        if gradient_penalty_weight < 0:
            raise ValueError(f"gradient_penalty_weight must be >= 0, got {gradient_penalty_weight}.")
        dcgan = architecture == "dcgan"
        generator_widths = tuple(generator_widths or ((128, 64) if dcgan else (256, 512)))
        discriminator_widths = tuple(discriminator_widths or ((64, 128) if dcgan else (512, 256)))
        self.input_shape, self.n_latent, self.n_classes = tuple(input_shape), int(n_latent), int(n_classes)
        self.loss_name, self.n_critic = loss, n_critic
        self.gradient_penalty_weight = float(gradient_penalty_weight)
        self.betas = tuple(betas) if betas is not None else ((0.5, 0.9) if loss == "wgan-gp" else (0.5, 0.999))
        self.generator = ImageGenerator(input_shape, n_latent, n_classes, architecture, generator_widths)
        self.discriminator = ImageDiscriminator(
            input_shape, n_classes, architecture, discriminator_widths, n_features, spectral_norm
        )

    # ----------------------------------------------------------------- the trainer's protocol

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The two players, discriminator first (the order of their updates within a minibatch)."""
        return {
            "discriminator": list(self.discriminator.parameters()),
            "generator": list(self.generator.parameters()),
        }

    def groups_to_step(self, step: int) -> list[str]:
        """The discriminator updates on every minibatch; the generator on every ``n_critic``-th."""
        return ["discriminator", "generator"] if (step + 1) % self.n_critic == 0 else ["discriminator"]

    def optimizer_settings(self) -> dict[str, dict]:
        # eps 1e-8, not the trainer's scVI default 0.01, which would damp these small gradients
        return {name: {"betas": self.betas, "eps": 1e-8} for name in ("discriminator", "generator")}

    # ----------------------------------------------------------------- generation

    def generate(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """``(n, *input_shape)`` images in [0, 1] from fresh noise (differentiable in the generator).

        With a (CPU) ``torch.Generator`` the noise is drawn on the CPU and moved, so a seed gives
        the same images on any device.
        """
        device = next(self.generator.parameters()).device
        z = torch.randn(n, self.n_latent, generator=generator, device=None if generator else device).to(device)
        return self.generator(z, labels)

    # ----------------------------------------------------------------- objectives

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0, group: str = "discriminator") -> LossOutput:
        """The objective of ``group`` (``"discriminator"`` or ``"generator"``) on one minibatch of real images.

        As many images as the minibatch holds are generated (with its labels when
        class-conditional). ``extra`` holds per image: non-saturating, ``real_probability`` and
        ``fake_probability`` (``sigmoid(D)``: 0.5 when D cannot tell); WGAN-GP, ``wasserstein``
        (``D(real) - D(fake)``) and, for the critic with gradients enabled, ``gradient_penalty``.
        ``reconstruction`` and ``kl`` are zeros (a GAN has no likelihood); ``kl_weight`` is ignored.
        """
        if group not in ("discriminator", "generator"):
            raise ValueError(f"group must be 'discriminator' or 'generator', got {group!r}.")
        labels = batch.y if self.n_classes else None
        real = batch.x
        zeros = torch.zeros(batch.size, device=real.device)
        if group == "discriminator":
            with torch.no_grad():
                fake = self.generate(batch.size, labels)
            real_score, fake_score = self.discriminator(real, labels), self.discriminator(fake, labels)
            if self.loss_name == "nonsaturating":
                per_item, _ = nonsaturating_losses(real_score, fake_score)
                extra = {
                    "real_probability": torch.sigmoid(real_score).detach(),
                    "fake_probability": torch.sigmoid(fake_score).detach(),
                }
                return LossOutput(loss=per_item.mean(), reconstruction=zeros, kl=zeros, extra=extra)
            wasserstein = real_score - fake_score
            extra = {"wasserstein": wasserstein.detach()}
            loss = -wasserstein.mean()
            if torch.is_grad_enabled() and self.gradient_penalty_weight > 0:
                penalty = gradient_penalty(self.discriminator, real, fake, labels)
                extra["gradient_penalty"] = penalty.detach()
                loss = loss + self.gradient_penalty_weight * penalty.mean()
            return LossOutput(loss=loss, reconstruction=zeros, kl=zeros, extra=extra)
        # the generator: make the discriminator score its images as real
        fake_score = self.discriminator(self.generate(batch.size, labels), labels)
        # (no extra terms: the history would merge them with the discriminator's of the same name)
        generator_loss = (
            nonsaturating_losses(fake_score, fake_score)[1] if self.loss_name == "nonsaturating" else -fake_score
        )
        return LossOutput(loss=generator_loss.mean(), reconstruction=zeros, kl=zeros)
