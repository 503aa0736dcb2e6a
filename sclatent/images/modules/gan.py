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
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ...contracts import AdversarialModule, LossOutput
from ...hyperparameters import Hyperparameters, setting
from ...nn.regularisers import gradient_penalty
from ..data import ArrayBatch
from ..nn.conv import ConvEncoder
from ..nn.conv_decoder import ConvDecoder

Architecture = Literal["dcgan", "mlp"]
GANLoss = Literal["nonsaturating", "wgan-gp"]
ARCHITECTURES = get_args(Architecture)
LOSSES = get_args(GANLoss)


@dataclass(frozen=True)
class ImageGANHyperparameters(Hyperparameters):
    """The image GAN's hyperparameters, declared once: read by :class:`ImageGANModule`,
    :class:`sclatent.images.ImageGAN` and ``sclatent mnist-gan``.

    ``conditional`` and ``n_classes`` are the model's: it gives the module ``n_classes`` classes to
    condition on, or 0 (unconditional).
    """

    family: ClassVar[str] = "ImageGAN"

    n_latent: int = setting(64, "Width of the generator's noise z ~ N(0, I).", minimum=1)
    architecture: Architecture = setting(
        "dcgan",
        "dcgan (transposed-convolution generator with BatchNorm, stride-2 convolutional discriminator) or mlp.",
    )
    loss: GANLoss = setting(
        "nonsaturating", "nonsaturating (Goodfellow et al. 2014) or wgan-gp (Gulrajani et al. 2017)."
    )
    spectral_norm: bool = setting(False, "Spectral normalisation of the discriminator's layers (Miyato et al. 2018).")
    conditional: bool = setting(
        False,
        "Class-conditional generator and (projection) discriminator; training then needs labels.",
        module=False,
    )
    n_classes: int = setting(10, "Classes of a conditional GAN.", module=False)
    generator_widths: tuple[int, ...] | None = setting(
        None,
        "dcgan: channels of the generator's feature maps (smallest map first); mlp: its hidden widths. "
        "None: (128, 64) dcgan, (256, 512) mlp.",
        cli=False,
    )
    discriminator_widths: tuple[int, ...] | None = setting(
        None,
        "dcgan: channels of the discriminator's stride-2 stages; mlp: its hidden widths. "
        "None: (64, 128) dcgan, (512, 256) mlp.",
        cli=False,
    )
    n_features: int = setting(128, "Width of the discriminator's last feature layer.", minimum=1)
    n_critic: int | None = setting(
        None, "Discriminator updates per generator update; None: 1 non-saturating, 5 WGAN-GP.", minimum=1
    )
    gradient_penalty_weight: float = setting(
        10.0, "lambda of WGAN-GP (10 in the paper); unused by the non-saturating loss.", minimum=0.0
    )
    betas: tuple[float, ...] | None = setting(
        None, "Adam betas of both players; None: (0.5, 0.999) as DCGAN, (0.5, 0.9) for WGAN-GP.", cli=False
    )

    def validate(self) -> None:
        if self.conditional and self.n_classes < 2:
            raise ValueError(f"a conditional GAN needs n_classes >= 2, got {self.n_classes}.")


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

    ``"dcgan"``: :class:`sclatent.images.nn.conv_decoder.ConvDecoder` (Linear -> BN -> ReLU, transposed
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
    (:class:`sclatent.images.nn.conv.ConvEncoder`, no BatchNorm: the gradient penalty is per image and a
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


class ImageGANModule(AdversarialModule):
    """Generator and discriminator of images, trained by :func:`sclatent.train.fit` as two parameter groups.

    Parameters
    ----------
    input_shape
        ``(H, W)``, ``(C, H, W)`` or ``(D,)`` (``"mlp"`` only) of one item; values in [0, 1].
    n_classes
        0: unconditional; otherwise a class-conditional GAN over this many classes (the model
        passes its ``n_classes`` when ``conditional``).
    **hyperparameters
        :class:`ImageGANHyperparameters` (its model-only ``conditional`` and ``n_classes`` aside):
        ``n_latent`` (width of the generator's Gaussian noise ``z``), ``architecture``
        (``"dcgan"``: transposed-convolution generator, convolutional discriminator; or ``"mlp"``),
        ``loss`` (``"nonsaturating"`` or ``"wgan-gp"``, see the module docstring), ``spectral_norm``
        (of every discriminator layer), ``generator_widths`` and ``discriminator_widths`` (``"dcgan"``:
        channels of the generator's feature maps, smallest map first, and of the discriminator's
        stride-2 stages; ``"mlp"``: hidden widths; default per architecture), ``n_features`` (width
        of the discriminator's last feature layer), ``n_critic`` (discriminator updates per generator
        update, default 1 non-saturating, 5 WGAN-GP), ``gradient_penalty_weight`` (``lambda`` of
        WGAN-GP, 10 in the paper) and ``betas`` (Adam betas of both players, default
        ``(0.5, 0.999)`` as DCGAN, ``(0.5, 0.9)`` for WGAN-GP).
    """

    def __init__(self, input_shape: tuple[int, ...], n_classes: int = 0, **hyperparameters: Any) -> None:
        super().__init__()
        settings = ImageGANHyperparameters.from_dict(hyperparameters)
        n_latent, architecture, loss = settings.n_latent, settings.architecture, settings.loss
        n_features = settings.n_features
        if architecture == "dcgan" and len(input_shape) not in (2, 3):
            raise ValueError(
                f"architecture='dcgan' needs images (H, W) or (C, H, W), got input_shape={tuple(input_shape)}; "
                "use architecture='mlp' for vectors."
            )
        if n_classes < 0:
            raise ValueError(f"n_classes must be >= 0, got {n_classes}.")
        n_critic = (5 if loss == "wgan-gp" else 1) if settings.n_critic is None else int(settings.n_critic)
        dcgan = architecture == "dcgan"
        generator_widths = tuple(settings.generator_widths or ((128, 64) if dcgan else (256, 512)))
        discriminator_widths = tuple(settings.discriminator_widths or ((64, 128) if dcgan else (512, 256)))
        self.input_shape, self.n_latent, self.n_classes = tuple(input_shape), int(n_latent), int(n_classes)
        self.loss_name, self.n_critic = loss, n_critic
        self.gradient_penalty_weight = float(settings.gradient_penalty_weight)
        betas = settings.betas
        self.betas = tuple(betas) if betas is not None else ((0.5, 0.9) if loss == "wgan-gp" else (0.5, 0.999))
        self.generator = ImageGenerator(input_shape, n_latent, n_classes, architecture, generator_widths)
        self.discriminator = ImageDiscriminator(
            input_shape, n_classes, architecture, discriminator_widths, n_features, settings.spectral_norm
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

    def generate(
        self,
        n: int,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise_device: torch.device | str | None = None,
    ):
        """``(n, *input_shape)`` images in [0, 1] from fresh noise (differentiable in the generator).

        The noise is drawn on ``noise_device`` (default: the CPU with a (CPU) ``generator``, else
        the generator network's device) and moved: a seeded caller draws it on the CPU, so that a
        seed gives the same images on any device.
        """
        device = next(self.generator.parameters()).device
        if noise_device is None:
            noise_device = "cpu" if generator is not None else device
        z = torch.randn(n, self.n_latent, generator=generator, device=noise_device).to(device)
        return self.generator(z, labels)

    # ----------------------------------------------------------------- objectives

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0, group: str = "discriminator") -> LossOutput:
        """The objective of ``group`` (``"discriminator"`` or ``"generator"``) on one minibatch of real images.

        As many images as the minibatch holds are generated (with its labels when
        class-conditional). Terms, per image: for the discriminator, non-saturating,
        ``real_probability`` and ``fake_probability`` (``sigmoid(D)``: 0.5 when D cannot tell);
        WGAN-GP, ``wasserstein`` (``D(real) - D(fake)``) and, with gradients enabled,
        ``gradient_penalty``. The generator reports its loss only. ``kl_weight`` is ignored.
        """
        if group not in ("discriminator", "generator"):
            raise ValueError(f"group must be 'discriminator' or 'generator', got {group!r}.")
        labels = batch.y if self.n_classes else None
        real = batch.x
        if group == "discriminator":
            with torch.no_grad():
                fake = self.generate(batch.size, labels)
            real_score, fake_score = self.discriminator(real, labels), self.discriminator(fake, labels)
            if self.loss_name == "nonsaturating":
                per_item, _ = nonsaturating_losses(real_score, fake_score)
                terms = {
                    "real_probability": torch.sigmoid(real_score).detach(),
                    "fake_probability": torch.sigmoid(fake_score).detach(),
                }
                return LossOutput(loss=per_item.mean(), terms=terms)
            wasserstein = real_score - fake_score
            terms = {"wasserstein": wasserstein.detach()}
            loss = -wasserstein.mean()
            if torch.is_grad_enabled() and self.gradient_penalty_weight > 0:
                penalty = gradient_penalty(self.discriminator, real, fake, labels)
                terms["gradient_penalty"] = penalty.detach()
                loss = loss + self.gradient_penalty_weight * penalty.mean()
            return LossOutput(loss=loss, terms=terms)
        # the generator: make the discriminator score its images as real
        fake_score = self.discriminator(self.generate(batch.size, labels), labels)
        # (no terms: the history would merge them with the discriminator's of the same name)
        generator_loss = (
            nonsaturating_losses(fake_score, fake_score)[1] if self.loss_name == "nonsaturating" else -fake_score
        )
        return LossOutput(loss=generator_loss.mean())
