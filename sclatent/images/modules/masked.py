"""Masked image modelling as a pure ``torch.nn.Module``: hide random patches, reconstruct them.

Data flow for an image ``x`` (``H x W``, intensities in ``[0, 1]``) cut into ``P`` square
patches of ``patch_size`` pixels a side::

    M      = exactly round(mask_ratio * P) patches drawn uniformly per image        (P,) bool
    x_vis  = x with the pixels of the patches in M set to 0                        (H W)
    z      = encoder(x_vis, M)                                                     representation (n_latent)
    x^     = sigmoid(W_o MLP(z))                                                   every pixel
    loss   = sum over pixels of masked patches of BCE(x^, x)                       nats per image

As in He et al. (2022) the loss counts the hidden patches only (reconstructing visible pixels is
copying), the mask is random per image and per step, and a high ratio (0.75, theirs) makes the
task need the digit's shape rather than local interpolation. Exactly ``round(ratio * P)`` patches
per image (not coin flips) so every image weighs the same in the loss; the mask is drawn by
:func:`sclatent.modules.masked.draw_gene_mask`, the masked-gene pretraining's sampler.

Two encoders, both reading the visible image and the mask (so a hidden patch differs from a
blank one) and neither He et al.'s ViT, which sees only the visible patches:

* ``"conv"`` (default): :class:`sclatent.nn.conv.ConvEncoder` (two stride-2 3x3 stages, no
  BatchNorm) on two channels, the visible image and its pixel mask, then a linear map to
  ``n_latent``;
* ``"mlp"``: a ReLU MLP on ``[x_vis, M]`` (``H W + P`` inputs), then a linear map to ``n_latent``.

Why not a ViT: on a CPU the budget is a few minutes, which buys several MNIST epochs of these
encoders but few of a transformer, whose strengths (global attention over many tokens, scale) do
not show on 49 tokens of 4x4 pixels. Why conv by default: measured on 10,000 MNIST training
images, 10 epochs, mask ratio 0.75, 64-d representation, 2,000 test images: linear probe 0.912
(conv) vs 0.832 (MLP), beside 0.908 for PCA-64 and 0.892 for raw pixels. The MLP's code of a fully
visible image is far from any input it was trained on (always 75 % hidden); the convolution's
local filters transfer to the unmasked image much better.

The representation (:meth:`MaskedImageAutoencoderModule.represent`) is the code of the full,
unmasked image (``M`` all False), the input the encoder meets at evaluation time in a linear probe.
No BatchNorm: the representation of an image must not depend on its minibatch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.arrays import ArrayBatch
from ..nn import MLP
from ..nn.conv import ConvEncoder
from ._base import LossOutput
from .masked import draw_gene_mask, n_masked_genes

# seed of the fixed masks of evaluation mode (validation loss): the same patches every epoch
EVAL_MASK_SEED = 1234
MASKED_IMAGE_ENCODERS: tuple[str, ...] = ("mlp", "conv")


def n_masked_patches(n_patches: int, mask_ratio: float) -> int:
    """Patches hidden per image: ``round(mask_ratio * n_patches)``, at least 1 and at most ``n_patches - 1``."""
    return n_masked_genes(n_patches, mask_ratio)


def masked_patch_loss(output: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` Bernoulli cross-entropy of logits ``output`` ``(B, D)`` against ``target``, summed over
    the pixels where ``pixel_mask`` (``(B, D)``, 1.0 hidden) is set; visible pixels contribute 0."""
    return (F.binary_cross_entropy_with_logits(output, target, reduction="none") * pixel_mask).sum(-1)


class MaskedImageAutoencoderModule(nn.Module):
    """Masked autoencoder of ``(B, H, W)`` (or ``(B, 1, H, W)``) images.

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(1, H, W)``; ``patch_size`` must divide ``H`` and ``W``.
    patch_size
        Side of the square patches, pixels.
    mask_ratio
        Fraction of patches hidden per image in training, in (0, 1).
    n_latent
        Width of the representation.
    n_hidden, n_layers
        Hidden ReLU MLP of the decoder (and of the encoder when ``encoder="mlp"``).
    encoder
        ``"conv"`` or ``"mlp"`` (see the module docstring).
    conv_widths
        Channels of the conv encoder's stride-2 stages.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        patch_size: int = 4,
        mask_ratio: float = 0.75,
        n_latent: int = 64,
        n_hidden: int = 512,
        n_layers: int = 2,
        encoder: str = "conv",
        conv_widths: tuple[int, ...] = (32, 64),
    ) -> None:
        super().__init__()
        if len(input_shape) not in (2, 3) or (len(input_shape) == 3 and input_shape[0] != 1):
            raise ValueError(f"input_shape must be (H, W) or (1, H, W) (grey-scale images), got {input_shape}.")
        height, width = input_shape[-2:]
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(
                f"patch_size ({patch_size}) must divide the image sides {height} x {width}; "
                f"choose a divisor, e.g. {math.gcd(height, width)}."
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        if n_latent < 1 or n_hidden < 1 or n_layers < 1:
            raise ValueError("n_latent, n_hidden and n_layers must be >= 1.")
        self.input_shape = tuple(input_shape)
        self.height, self.width, self.patch_size = height, width, patch_size
        self.grid = (height // patch_size, width // patch_size)
        self.n_patches = self.grid[0] * self.grid[1]
        if self.n_patches < 2:
            raise ValueError(f"patch_size {patch_size} leaves one patch: at least two are needed to hide some.")
        self.mask_ratio, self.n_latent = float(mask_ratio), n_latent
        self.n_pixels = height * width
        if encoder not in MASKED_IMAGE_ENCODERS:
            raise ValueError(f"encoder must be one of {MASKED_IMAGE_ENCODERS}, got {encoder!r}.")
        self.encoder_kind = encoder
        mlp = dict(n_layers=n_layers, use_batch_norm=False, dropout_rate=0.0)
        if encoder == "mlp":
            self.encoder = MLP(self.n_pixels + self.n_patches, n_hidden, **mlp)
            self.code = nn.Linear(n_hidden, n_latent)
        else:
            # channels: the visible image and the pixel mask
            self.encoder = ConvEncoder(2, (height, width), n_latent, widths=conv_widths, batch_norm=False)
            self.code = None
        self.decoder = MLP(n_latent, n_hidden, **mlp)
        self.out = nn.Linear(n_hidden, self.n_pixels)

    @property
    def n_masked(self) -> int:
        """Patches hidden per image."""
        return n_masked_patches(self.n_patches, self.mask_ratio)

    def draw_mask(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``(n, n_patches)`` bool, exactly :attr:`n_masked` True per row, uniformly placed."""
        return draw_gene_mask(n, self.n_patches, self.mask_ratio, generator=generator, device=device)

    def pixel_mask(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """``(B, H * W)`` float mask (1.0 hidden) of the pixels of the hidden patches ``(B, n_patches)``."""
        grid = patch_mask.reshape(-1, *self.grid).to(torch.float32)
        pixels = grid.repeat_interleave(self.patch_size, dim=1).repeat_interleave(self.patch_size, dim=2)
        return pixels.reshape(len(patch_mask), self.n_pixels)

    def represent(self, x: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n_latent)`` code of images ``x`` with the patches in ``patch_mask`` hidden (None: none)."""
        flat = x.reshape(len(x), -1)
        if patch_mask is None:
            patch_mask = torch.zeros(len(x), self.n_patches, dtype=torch.bool, device=x.device)
        pixel_mask = self.pixel_mask(patch_mask)
        visible = flat * (1.0 - pixel_mask)
        if self.encoder_kind == "conv":
            images = torch.stack([visible, pixel_mask], dim=1).reshape(len(x), 2, self.height, self.width)
            return self.encoder(images)
        return self.code(self.encoder(torch.cat([visible, patch_mask.to(flat.dtype)], dim=-1)))

    def forward(self, x: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """``(B, H * W)`` logits of every pixel given the visible patches of ``x``."""
        return self.out(self.decoder(self.represent(x, patch_mask)))

    def loss(self, batch: ArrayBatch, kl_weight: float = 1.0) -> LossOutput:
        """Cross-entropy of the hidden patches' pixels given the visible ones (nats per image).

        Training draws fresh masks from torch's generator; evaluation uses masks drawn from
        :data:`EVAL_MASK_SEED` (the same patches for the same minibatch every epoch).
        ``extra``: ``masked_mse``, the squared error per hidden pixel. ``kl_weight`` is unused.
        """
        generator = None
        if not self.training:
            generator = torch.Generator(device=batch.x.device).manual_seed(EVAL_MASK_SEED)
        patch_mask = self.draw_mask(batch.size, generator, batch.x.device)
        pixel_mask = self.pixel_mask(patch_mask)
        target = batch.x.reshape(batch.size, -1)
        output = self(batch.x, patch_mask)
        reconstruction = masked_patch_loss(output, target, pixel_mask)
        squared = ((torch.sigmoid(output.detach()) - target) ** 2 * pixel_mask).sum(-1) / pixel_mask.sum(-1)
        zeros = torch.zeros_like(reconstruction)
        return LossOutput(
            loss=reconstruction.mean(), reconstruction=reconstruction, kl=zeros, extra={"masked_mse": squared}
        )
