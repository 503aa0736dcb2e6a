"""CycleGAN (Zhu et al. 2017): translation between two unpaired image domains, pure torch.

Two generators, ``G: A -> B`` and ``F: B -> A``, and two PatchGAN discriminators, ``D_A`` (real A
vs ``F(b)``) and ``D_B`` (real B vs ``G(a)``). For a minibatch of A images ``a`` and unrelated B
images ``b`` (each term a mean over pixels or patches per image)::

    generators:      L_GAN(D_B, G(a)) + L_GAN(D_A, F(b))
                     + lambda_cycle * (|F(G(a)) - a|_1 + |G(F(b)) - b|_1)           cycle consistency
                     + lambda_identity * lambda_cycle * (|G(b) - b|_1 + |F(a) - a|_1)   identity
    discriminators:  L_D(D_B, b, G(a)) + L_D(D_A, a, F(b))

Least squares GAN (Mao et al. 2017; the paper's choice): ``L_GAN(D, fake) = (D(fake) - 1)^2``,
``L_D(D, real, fake) = ((D(real) - 1)^2 + D(fake)^2) / 2`` (halved, as in the paper, to slow D
relative to G). ``gan_loss="bce"`` swaps in the non-saturating cross-entropy loss
``softplus(-D(fake))`` / ``(softplus(-D(real)) + softplus(D(fake))) / 2``.

Training items are ``(2, H, W)``: channel 0 an A image, channel 1 a B image. The loss never
compares the two channels of one item, so their pairing only decides which B images share a
minibatch with which A images; no correspondence is learnt or needed.

Left out from the paper: the history buffer of 50 generated images the discriminators also see
(a stabiliser; the discriminators here see the current generators' images) and the linear
learning-rate decay (a schedule the trainer does not have).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ...contracts import AdversarialModule, LossOutput
from ...hyperparameters import Hyperparameters, setting
from ..data import ArrayBatch

CycleGANLoss = Literal["lsgan", "bce"]
GAN_LOSSES = get_args(CycleGANLoss)
DIRECTIONS = ("a_to_b", "b_to_a")


@dataclass(frozen=True)
class CycleGANHyperparameters(Hyperparameters):
    """CycleGAN's hyperparameters, declared once: read by :class:`CycleGANModule`,
    :class:`sclatent.images.CycleGAN` and ``sclatent mnist-cyclegan``."""

    family: ClassVar[str] = "CycleGAN"

    n_filters: int = setting(
        16,
        "First-layer width of every network (the inner layers have twice as many); 16 filters and 2 residual "
        "blocks: 113 k parameters, 8 filters is 4x cheaper.",
    )
    n_residual_blocks: int = setting(
        2, "Residual blocks in each generator (the paper: 9 for 256x256 images; 2-3 suffice for digits)."
    )
    lambda_cycle: float = setting(10.0, "Weight of the cycle-consistency L1 losses (10, as the paper).")
    lambda_identity: float = setting(
        0.5, "Weight of the identity L1 losses relative to lambda_cycle (0.5, as the paper); 0 turns them off."
    )
    gan_loss: CycleGANLoss = setting("lsgan", "lsgan (least squares, the paper's) or bce (non-saturating).")
    betas: tuple[float, ...] = setting((0.5, 0.999), "Adam betas of both groups (the paper's).", cli=False)

    def validate(self) -> None:
        if self.lambda_cycle < 0 or self.lambda_identity < 0:
            raise ValueError(
                f"loss weights must be >= 0, got lambda_cycle={self.lambda_cycle}, "
                f"lambda_identity={self.lambda_identity}."
            )
        if self.n_filters < 1 or self.n_residual_blocks < 0:
            raise ValueError(
                f"need n_filters >= 1 and n_residual_blocks >= 0, got {self.n_filters} and {self.n_residual_blocks}."
            )


class ResidualBlock(nn.Module):
    """``x + conv(relu(norm(conv(x))))``: two 3x3 convolutions with reflection padding and instance norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TranslationGenerator(nn.Module):
    """``(B, 1, H, W) -> (B, 1, H, W)`` in [0, 1]: the ResNet generator of CycleGAN, shrunk for digits.

    Conv 5x5 (``n_filters``) -> Conv 3x3 stride 2 (``2 n_filters``) -> ``n_residual_blocks`` residual
    blocks at half resolution -> nearest upsampling to ``(H, W)`` and Conv 3x3 (``n_filters``) ->
    Conv 5x5 -> sigmoid. Instance norm and ReLU after each inner convolution, reflection padding
    (no border artefacts); upsampling then convolving (instead of a transposed convolution) avoids
    checkerboard patterns and works for odd sizes.
    """

    def __init__(self, image_size: tuple[int, int], n_filters: int = 32, n_residual_blocks: int = 3) -> None:
        super().__init__()
        self.image_size = tuple(image_size)
        wide = 2 * n_filters
        # a 5x5 reflection pad needs at least 3 pixels per side: 8x8 digits are the smallest sensible input
        self.down = nn.Sequential(
            nn.ReflectionPad2d(2),
            nn.Conv2d(1, n_filters, 5),
            nn.InstanceNorm2d(n_filters, affine=True),
            nn.ReLU(),
            nn.Conv2d(n_filters, wide, 3, stride=2, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(wide, affine=True),
            nn.ReLU(),
            *[ResidualBlock(wide) for _ in range(n_residual_blocks)],
        )
        self.up = nn.Sequential(
            nn.Conv2d(wide, n_filters, 3, padding=1, padding_mode="reflect"),
            nn.InstanceNorm2d(n_filters, affine=True),
            nn.ReLU(),
            nn.ReflectionPad2d(2),
            nn.Conv2d(n_filters, 1, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.down(x), size=self.image_size, mode="nearest")
        return torch.sigmoid(self.up(h))


class PatchDiscriminator(nn.Module):
    """``(B, 1, H, W) -> (B, h, w)`` real/fake scores of overlapping patches (a small PatchGAN).

    Conv 4x4 stride 2 (``n_filters``, no norm) -> Conv 4x4 stride 2 (``2 n_filters``, instance norm)
    -> Conv 3x3 to one score per location, LeakyReLU(0.2) between. On 28x28 digits the 7x7 score
    map's receptive fields are 14x14 pixels: strokes and their thickness, not whole digits.
    """

    def __init__(self, n_filters: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, n_filters, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(n_filters, 2 * n_filters, 4, stride=2, padding=1),
            nn.InstanceNorm2d(2 * n_filters, affine=True),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * n_filters, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def generator_adversarial_loss(scores: torch.Tensor, gan_loss: str = "lsgan") -> torch.Tensor:
    """``(B,)`` the generator's adversarial loss per image from patch scores ``(B, h, w)`` of its fakes.

    ``lsgan``: mean of ``(D - 1)^2``; ``bce``: mean of ``softplus(-D)`` (non-saturating).
    """
    per_patch = (scores - 1.0) ** 2 if gan_loss == "lsgan" else F.softplus(-scores)
    return per_patch.flatten(1).mean(1)


def discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor, gan_loss: str = "lsgan") -> torch.Tensor:
    """``(B,)`` a discriminator's loss per image pair, halved as in Zhu et al. 2017.

    ``lsgan``: ``((D(real) - 1)^2 + D(fake)^2) / 2``; ``bce``: ``(softplus(-D(real)) + softplus(D(fake))) / 2``,
    each a mean over patches.
    """
    if gan_loss == "lsgan":
        real, fake = (real_scores - 1.0) ** 2, fake_scores**2
    else:
        real, fake = F.softplus(-real_scores), F.softplus(fake_scores)
    return 0.5 * (real.flatten(1).mean(1) + fake.flatten(1).mean(1))


def l1_per_image(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean absolute difference per image (intensity units)."""
    return (x - target).abs().flatten(1).mean(1)


class CycleGANModule(AdversarialModule):
    """Generators ``G`` (A -> B), ``F`` (B -> A) and discriminators ``D_A``, ``D_B``, trained by
    :func:`sclatent.train.fit` in two parameter groups.

    Parameters
    ----------
    input_shape
        ``(H, W)`` (or ``(1, H, W)``) of one image of either domain.
    **hyperparameters
        :class:`CycleGANHyperparameters`: ``n_filters`` (width of the first convolution of every
        network; the inner layers have twice as many), ``n_residual_blocks`` (in each generator),
        ``lambda_cycle`` (weight of the cycle-consistency L1 losses, 10 in the paper),
        ``lambda_identity`` (weight of the identity L1 losses as a fraction of ``lambda_cycle``: 0.5
        in the paper, i.e. an absolute weight of 5; 0 turns them off), ``gan_loss`` (``"lsgan"``,
        least squares, the paper's, or ``"bce"``, non-saturating cross-entropy) and ``betas`` (Adam
        betas of both groups, the paper's ``(0.5, 0.999)``).
    """

    def __init__(self, input_shape: tuple[int, ...], **hyperparameters: Any) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 3 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 2:
            raise ValueError(
                f"CycleGAN translates grey-scale images (H, W) or (1, H, W), got input_shape {input_shape}."
            )
        if min(shape) < 8:
            raise ValueError(f"images must be at least 8x8 pixels, got {shape[0]}x{shape[1]}.")
        settings = CycleGANHyperparameters.from_dict(hyperparameters)
        n_filters, n_residual_blocks = settings.n_filters, settings.n_residual_blocks
        lambda_cycle, lambda_identity, gan_loss, betas = (
            settings.lambda_cycle,
            settings.lambda_identity,
            settings.gan_loss,
            settings.betas,
        )
        self.image_size = shape
        self.lambda_cycle, self.lambda_identity = float(lambda_cycle), float(lambda_identity)
        self.gan_loss = gan_loss
        self.betas = tuple(betas)
        self.g_ab = TranslationGenerator(shape, n_filters, n_residual_blocks)
        self.g_ba = TranslationGenerator(shape, n_filters, n_residual_blocks)
        self.d_a = PatchDiscriminator(n_filters)
        self.d_b = PatchDiscriminator(n_filters)

    # ----------------------------------------------------------------- the trainer's protocol

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Generators first, then discriminators: the update order of the paper within a minibatch."""
        return {
            "generators": [*self.g_ab.parameters(), *self.g_ba.parameters()],
            "discriminators": [*self.d_a.parameters(), *self.d_b.parameters()],
        }

    def groups_to_step(self, step: int) -> list[str]:
        """Both groups update on every minibatch."""
        return ["generators", "discriminators"]

    def optimizer_settings(self) -> dict[str, dict]:
        # eps 1e-8 rather than the trainer's scVI default 0.01, which would damp GAN gradients
        return {name: {"betas": self.betas, "eps": 1e-8} for name in ("generators", "discriminators")}

    # ----------------------------------------------------------------- translation

    def translate(self, x: torch.Tensor, direction: str = "a_to_b") -> torch.Tensor:
        """``(B, H, W)`` images translated by ``G`` (``"a_to_b"``) or ``F`` (``"b_to_a"``)."""
        net = self._generator(direction)
        return net(x.reshape(-1, 1, *self.image_size)).reshape(-1, *self.image_size)

    def cycle(self, x: torch.Tensor, direction: str = "a_to_b") -> torch.Tensor:
        """``(B, H, W)`` round trips ``F(G(x))`` (``"a_to_b"``: x in A) or ``G(F(x))`` (``"b_to_a"``)."""
        back = "b_to_a" if direction == "a_to_b" else "a_to_b"
        return self.translate(self.translate(x, direction), back)

    def _generator(self, direction: str) -> nn.Module:
        if direction == "a_to_b":
            return self.g_ab
        if direction == "b_to_a":
            return self.g_ba
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}.")

    # ----------------------------------------------------------------- objectives

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 2, H, W)`` training items -> A images and B images, each ``(B, 1, H, W)``."""
        if x.dim() != 4 or x.shape[1] != 2 or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(
                f"CycleGAN training items are (B, 2, {self.image_size[0]}, {self.image_size[1]}) "
                f"(an A image and a B image), got {tuple(x.shape)}."
            )
        return x[:, :1], x[:, 1:]

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0, group: str = "generators") -> LossOutput:
        """The objective of ``group`` on a minibatch of ``(B, 2, H, W)`` items (A image, B image).

        Terms (per item) for ``"generators"``: ``adversarial_a_to_b`` / ``adversarial_b_to_a``
        (``L_GAN`` of ``G`` and ``F``), ``cycle_a`` (``|F(G(a)) - a|``), ``cycle_b``
        (``|G(F(b)) - b|``), ``identity_a`` (``|F(a) - a|``), ``identity_b`` (``|G(b) - b|``), L1 in
        intensity units; for ``"discriminators"``: ``discriminator_a`` / ``discriminator_b``.
        ``kl_weight`` is ignored.
        """
        a, b = self.split(batch.x)
        if group == "generators":
            fake_b, fake_a = self.g_ab(a), self.g_ba(b)
            adv_ab = generator_adversarial_loss(self.d_b(fake_b), self.gan_loss)
            adv_ba = generator_adversarial_loss(self.d_a(fake_a), self.gan_loss)
            cycle_a, cycle_b = l1_per_image(self.g_ba(fake_b), a), l1_per_image(self.g_ab(fake_a), b)
            total = adv_ab + adv_ba + self.lambda_cycle * (cycle_a + cycle_b)
            extra = {"adversarial_a_to_b": adv_ab, "adversarial_b_to_a": adv_ba, "cycle_a": cycle_a, "cycle_b": cycle_b}
            if self.lambda_identity > 0:
                identity_a, identity_b = l1_per_image(self.g_ba(a), a), l1_per_image(self.g_ab(b), b)
                total = total + self.lambda_identity * self.lambda_cycle * (identity_a + identity_b)
                extra.update(identity_a=identity_a, identity_b=identity_b)
            return LossOutput(total.mean(), terms={k: v.detach() for k, v in extra.items()})
        if group == "discriminators":
            with torch.no_grad():
                fake_b, fake_a = self.g_ab(a), self.g_ba(b)
            loss_a = discriminator_loss(self.d_a(a), self.d_a(fake_a), self.gan_loss)
            loss_b = discriminator_loss(self.d_b(b), self.d_b(fake_b), self.gan_loss)
            terms = {"discriminator_a": loss_a.detach(), "discriminator_b": loss_b.detach()}
            return LossOutput((loss_a + loss_b).mean(), terms=terms)
        raise ValueError(f"group must be 'generators' or 'discriminators', got {group!r}.")
