"""SimCLR on images (Chen et al. 2020) as a pure ``torch.nn.Module``, on the cell model's NT-Xent.

For a minibatch of ``B`` images::

    v1, v2 = aug(x)                   two random views per image (crop/affine/blur/noise, adjacent crops)
    h      = f(v)                     conv (or MLP) encoder -> linear, the representation  (B, n_representation)
    p      = g(h)                     projection head, training only                       (B, n_projection)
    loss   = NT-Xent(p1, p2; tau)     each view must pick its partner among the other 2B - 2

The representation a user gets is ``h`` of the clean image; the projection head is discarded
(SimCLR: the layer before the head keeps more information than the one the loss sees).
:func:`sclatent.nn.contrastive.nt_xent` and :class:`~sclatent.nn.contrastive.ProjectionHead`
are the same objects the cell model trains with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ...contracts import LossOutput, Module
from ...hyperparameters import Hyperparameters, setting
from ...nn import MLP
from ...nn.contrastive import EVALUATION_SEED, ProjectionHead, nt_xent
from ..data import ArrayBatch
from ..nn.augment import ImageAugmentation
from ..nn.conv import ConvEncoder


@dataclass(frozen=True)
class SimCLRHyperparameters(Hyperparameters):
    """SimCLR's hyperparameters, declared once: read by :class:`ImageSimCLRModule`,
    :class:`sclatent.images.SimCLR` and ``sclatent mnist-simclr``."""

    family: ClassVar[str] = "SimCLR"

    n_representation: int = setting(64, "Width of the representation h (the encoder's output).", minimum=1)
    n_projection: int = setting(32, "Width of the projection head's output (the space NT-Xent compares).", minimum=1)
    temperature: float = setting(0.5, "NT-Xent temperature tau > 0.")
    augmentations: dict[str, Any] | None = setting(
        None,
        "Settings of sclatent.images.nn.augment.ImageAugmentation (crop, affine, blur, noise, adjacent views; "
        "its defaults for the others), e.g. {'noise_std': 0.2}.",
        cli=False,
    )
    encoder: Literal["conv", "mlp"] = setting(
        "conv",
        "conv (stride-2 conv stages of widths channels, then a linear layer) or mlp (n_layers of "
        "Linear -> BatchNorm -> ReLU of width n_hidden on the flattened image, then a linear layer).",
    )
    widths: tuple[int, ...] = setting((32, 64), "Channels of the conv encoder's stages.")
    n_hidden: int = setting(256, "Width of the MLP encoder.", minimum=1)
    n_layers: int = setting(2, "Depth of the MLP encoder.", minimum=1)
    n_projection_hidden: int = setting(128, "Hidden width of the projection head.", minimum=1)

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.augmentations is not None and not isinstance(self.augmentations, dict):
            raise ValueError(
                "augmentations must be a dict of ImageAugmentation settings or None, "
                f"got {type(self.augmentations).__name__}."
            )


class ImageSimCLRModule(Module):
    """Images -> two augmented views -> encoder -> projection head -> NT-Xent.

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(C, H, W)`` of one image.
    **hyperparameters
        :class:`SimCLRHyperparameters`: ``n_representation`` (width of the representation ``h``,
        the encoder's output), ``encoder`` (``"conv"``: :class:`sclatent.images.nn.conv.ConvEncoder`,
        stride-2 conv stages of ``widths`` channels, then a linear layer; ``"mlp"``: ``n_layers`` of
        Linear -> BatchNorm -> ReLU of width ``n_hidden`` on the flattened image, then a linear
        layer), ``n_projection`` and ``n_projection_hidden`` (output and hidden widths of the
        projection head), ``temperature`` (NT-Xent's ``tau > 0``) and ``augmentations`` (keyword
        arguments of :class:`sclatent.images.nn.augment.ImageAugmentation`, its defaults for those
        not given).
    """

    default_monitor = "nt_xent"

    def __init__(self, input_shape: tuple[int, ...], **hyperparameters: Any) -> None:
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(f"input_shape must be (H, W) or (C, H, W), got {tuple(input_shape)}.")
        settings = SimCLRHyperparameters.from_dict(hyperparameters)
        n_representation, n_projection, n_projection_hidden = (
            settings.n_representation,
            settings.n_projection,
            settings.n_projection_hidden,
        )
        encoder, widths, n_hidden, n_layers = settings.encoder, settings.widths, settings.n_hidden, settings.n_layers
        temperature, augmentations = settings.temperature, settings.augmentations
        self.input_shape = tuple(input_shape)
        self.channels = 1 if len(input_shape) == 2 else int(input_shape[0])
        self.temperature = float(temperature)
        try:
            self.augment = ImageAugmentation(**(augmentations or {}))
        except TypeError as err:
            raise ValueError(
                f"unknown augmentation setting ({err}); see sclatent.images.nn.augment.ImageAugmentation."
            ) from None
        size = tuple(int(s) for s in input_shape[-2:])
        if encoder == "conv":
            self.encoder = ConvEncoder(self.channels, size, n_representation, widths=tuple(widths))
        else:
            n_in = self.channels * size[0] * size[1]
            self.encoder = nn.Sequential(
                nn.Flatten(),
                MLP(n_in, n_hidden, n_layers=n_layers, dropout_rate=0.0),
                nn.Linear(n_hidden, n_representation),
            )
        self.projection = ProjectionHead(n_representation, n_projection, n_projection_hidden)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *input_shape)`` -> ``(B, C, H, W)``."""
        return x.unsqueeze(1) if x.dim() == 3 else x

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_representation)`` representation ``h`` of images ``x`` (no augmentation, no head)."""
        return self.encoder(self._images(x))

    def views(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two random views ``(B, C, H, W)`` of each image of ``x``."""
        return self.augment.pair(self._images(x), generator)

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0) -> LossOutput:
        """Term ``nt_xent``: per-image NT-Xent (nats; the mean over the image's two views as
        anchors), the loss. ``kl_weight`` is unused (no KL).

        In evaluation mode the views come from a generator seeded with
        :data:`sclatent.nn.contrastive.EVALUATION_SEED`, so the held-out loss is deterministic.
        """
        generator = None
        if not self.training:
            generator = torch.Generator(device=batch.x.device).manual_seed(EVALUATION_SEED)
        v1, v2 = self.views(batch.x, generator)
        # one pass over both views: BatchNorm sees 2B images, as in SimCLR
        h = self.encoder(torch.cat([v1, v2]))
        p1, p2 = self.projection(h).chunk(2)
        per_anchor = nt_xent(p1, p2, self.temperature)
        per_image = 0.5 * (per_anchor[: batch.size] + per_anchor[batch.size :])
        return LossOutput(loss=per_image.mean(), terms={"nt_xent": per_image})
