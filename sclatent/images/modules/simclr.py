"""SimCLR on images (Chen et al. 2020) as a pure ``torch.nn.Module``, on the cell model's NT-Xent.

For a minibatch of ``B`` images::

    v1, v2 = aug(x)                   two random views per image (crop/affine/blur/noise, adjacent crops)
    h      = f(v)                     conv (or MLP) encoder -> linear, the representation  (B, n_representation)
    p      = g(h)                     projection head, training only                       (B, n_projection)
    loss   = NT-Xent(p1, p2; tau)     each view must pick its partner among the other 2B - 2

The representation a user gets is ``h`` of the clean image; the projection head is discarded
(SimCLR: the layer before the head keeps more information than the one the loss sees).
:func:`sclatent.modules.contrastive.nt_xent` and :class:`~sclatent.modules.contrastive.ProjectionHead`
are the same objects the cell model trains with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.arrays import ArrayBatch
from ..nn import MLP
from ..nn.conv import ConvEncoder
from ..nn.image_augment import ImageAugmentation
from ._base import LossOutput
from .contrastive import EVALUATION_SEED, ProjectionHead, nt_xent


class ImageSimCLRModule(nn.Module):
    """Images -> two augmented views -> encoder -> projection head -> NT-Xent.

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(C, H, W)`` of one image.
    n_representation
        Width of the representation ``h`` (the encoder's output).
    encoder
        ``"conv"`` (:class:`sclatent.nn.conv.ConvEncoder`: stride-2 conv stages of ``widths``
        channels, then a linear layer) or ``"mlp"`` (``n_layers`` of Linear -> BatchNorm -> ReLU
        of width ``n_hidden`` on the flattened image, then a linear layer).
    widths
        Channels of the conv stages.
    n_hidden, n_layers
        The MLP encoder's width and depth.
    n_projection, n_projection_hidden
        Output and hidden widths of the projection head.
    temperature
        NT-Xent temperature ``tau > 0``.
    augmentations
        Keyword arguments of :class:`sclatent.nn.image_augment.ImageAugmentation` (its defaults
        for those not given).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_representation: int = 64,
        encoder: str = "conv",
        widths: tuple[int, ...] = (32, 64),
        n_hidden: int = 256,
        n_layers: int = 2,
        n_projection: int = 32,
        n_projection_hidden: int = 128,
        temperature: float = 0.5,
        augmentations: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(f"input_shape must be (H, W) or (C, H, W), got {tuple(input_shape)}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if min(n_representation, n_projection, n_projection_hidden) < 1:
            raise ValueError("n_representation, n_projection and n_projection_hidden must be >= 1.")
        if encoder not in ("conv", "mlp"):
            raise ValueError(f"encoder must be 'conv' or 'mlp', got {encoder!r}.")
        self.input_shape = tuple(input_shape)
        self.channels = 1 if len(input_shape) == 2 else int(input_shape[0])
        self.temperature = float(temperature)
        try:
            self.augment = ImageAugmentation(**(augmentations or {}))
        except TypeError as err:
            raise ValueError(
                f"unknown augmentation setting ({err}); see sclatent.nn.image_augment.ImageAugmentation."
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
        """Per-image NT-Xent (``reconstruction`` and ``extra["nt_xent"]``, nats; the mean over the
        image's two views as anchors). ``kl_weight`` is unused (no KL; ``kl`` is zeros).

        In evaluation mode the views come from a generator seeded with
        :data:`sclatent.modules.contrastive.EVALUATION_SEED`, so the held-out loss is deterministic.
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
        return LossOutput(
            loss=per_image.mean(),
            reconstruction=per_image,
            kl=torch.zeros_like(per_image),
            extra={"nt_xent": per_image},
        )
