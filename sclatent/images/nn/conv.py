"""Small convolutional encoders for images, shared by the image models."""

from __future__ import annotations

from torch import nn


class ConvEncoder(nn.Module):
    """``(B, C, H, W)`` images -> ``(B, n_out)`` features: stride-2 conv stages, then a linear layer.

    Each stage is Conv3x3(stride 2) -> (BatchNorm) -> LeakyReLU(0.2), halving ``H`` and ``W``
    (rounded up); the flattened last stage feeds ``Linear(-, n_out)``.

    Parameters
    ----------
    in_channels, image_size
        Input channels and ``(H, W)``.
    n_out
        Output width.
    widths
        Channels of the stages.
    batch_norm
        BatchNorm after each convolution (off for critics trained with a gradient penalty).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        n_out: int,
        widths: tuple[int, ...] = (32, 64),
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, (h, w) = in_channels, image_size
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, stride=2, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2))
            channels, h, w = width, (h + 1) // 2, (w + 1) // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.out = nn.Linear(channels * h * w, n_out)
        self.n_out = n_out

    def forward(self, x):
        return self.out(self.features(x))
