"""A DCGAN-style convolutional decoder: a vector to an image through transposed convolutions.

The mirror of :class:`sclatent.images.nn.conv.ConvEncoder`; shared by the image generators (GAN, and any
model that decodes a latent vector into pixels).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn


class ConvDecoder(nn.Module):
    """``(B, n_in)`` vectors -> ``(B, C, H, W)`` unbounded outputs (logits) of images.

    ``Linear(n_in, widths[0] * h0 * w0)`` reshaped to ``(widths[0], h0, w0)``, then one
    ConvTranspose(4x4, stride 2) stage per further width and a last one to ``out_channels``
    (each but the last followed by (BatchNorm) -> ReLU, as in DCGAN, Radford et al. 2016). Each
    stage doubles the size, so ``h0 = ceil(H / 2^s)`` for ``s = len(widths)`` stages, and the
    result is centre-cropped to ``(H, W)`` (e.g. 28x28 from 7x7 with two stages, 8x8 from 2x2).

    Parameters
    ----------
    n_in
        Input width.
    out_channels, image_size
        Output channels ``C`` and ``(H, W)``.
    widths
        Channels of the feature maps, from the first (smallest) to the last before the output.
    batch_norm
        BatchNorm after the linear layer and after each hidden convolution.
    """

    def __init__(
        self,
        n_in: int,
        out_channels: int,
        image_size: tuple[int, int],
        widths: tuple[int, ...] = (128, 64),
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths needs at least one entry (the channels of the first feature map).")
        self.image_size = tuple(int(s) for s in image_size)
        self.out_channels = out_channels
        n_stages = len(widths)
        self.start = tuple(math.ceil(s / 2**n_stages) for s in self.image_size)
        self.widths = tuple(widths)
        h0, w0 = self.start
        self.project = nn.Linear(n_in, widths[0] * h0 * w0)
        # the projection's own normalisation lives on the reshaped map (per channel, as in DCGAN)
        self.project_post = nn.Sequential(*([nn.BatchNorm2d(widths[0])] if batch_norm else []), nn.ReLU())
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(widths):
            layers.append(nn.ConvTranspose2d(width_in, width_out, 4, stride=2, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width_out))
            layers.append(nn.ReLU())
        layers.append(nn.ConvTranspose2d(widths[-1], out_channels, 4, stride=2, padding=1))
        self.stages = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h0, w0 = self.start
        x = self.project_post(self.project(z).view(z.shape[0], self.widths[0], h0, w0))
        x = self.stages(x)
        # centre crop of the (possibly larger) power-of-two multiple of the start size
        (height, width), (full_h, full_w) = self.image_size, x.shape[-2:]
        top, left = (full_h - height) // 2, (full_w - width) // 2
        return x[..., top : top + height, left : left + width]
