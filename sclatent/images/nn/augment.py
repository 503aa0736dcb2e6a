"""Batched, seeded image augmentations on the compute device, for contrastive learning (SimCLR).

Every image of a minibatch gets its own random transformation, drawn as tensors on the images'
device; geometry is one ``affine_grid`` + ``grid_sample`` per view (crop and affine composed into
one ``2 x 3`` matrix, so an image is resampled once, not once per step). The order a view goes
through::

    box      random resized crop: area fraction ~ U(crop_min_area, 1), aspect ~ log-U(ratio)
    box'     adjacent view (pairs only): the second view's box is the first's, moved by <= max_shift
    A        random affine: rotation, translation, scale, shear (each with probability affine_probability)
    x        = grid_sample(x, box o A)     bilinear, zero (background) outside the image
    x        = blur(x, sigma),  sigma ~ U(0, blur_sigma)     with probability blur_probability
    x        = clip(x + noise_std * N(0, 1), 0, 1)           with probability noise_probability

Coordinates are ``affine_grid``'s normalised ones: ``[-1, 1]`` across the image, ``(x, y)``
order. A *box* is ``(cx, cy, w, h)``: centre in normalised coordinates and width/height as
fractions of the image side, so it covers ``[cx - w, cx + w] x [cy - h, cy + h]``.

**Adjacent views.** We read the lecture's "adjacent views" as two overlapping crops taken at
nearby positions of the same image (as neighbouring patches of a scene are views of the same
object): the first crop is a random resized crop, the second has the same size and its centre
moved by ``d ~ U(-max_shift, max_shift)`` per axis (a fraction of the image side, i.e.
``2 * max_shift`` in normalised units), then clamped into the image. Clamping only moves it back
towards the first crop, so per axis the two windows overlap on at least ``w - max_shift`` of the
side (``w`` the crop's fraction): the overlap is at least ``(1 - max_shift / w) * (1 - max_shift / h)``
of each crop's area (:func:`adjacent_overlap` computes it exactly).

Each function takes an optional ``torch.Generator`` on the images' device; without one they use
torch's global generator, which :func:`sclatent.train.fit` seeds, so seeded training is
reproducible. Outputs keep the input's shape (``(B, H, W)`` or ``(B, C, H, W)``) and, for inputs
in ``[0, 1]``, stay in ``[0, 1]`` (bilinear weights and blur kernels are convex; noise is clipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _uniform(n: int, low: float, high: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``(n,)`` draws from ``U(low, high)`` on ``like``'s device and dtype."""
    u = torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)
    return low + (high - low) * u


def _chosen(n: int, probability: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``(n,)`` booleans, each True with ``probability`` (no draw at all for 0 or 1)."""
    if probability >= 1.0:
        return torch.ones(n, dtype=torch.bool, device=like.device)
    if probability <= 0.0:
        return torch.zeros(n, dtype=torch.bool, device=like.device)
    return torch.rand(n, generator=generator, device=like.device) < probability


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4:
        return x
    raise ValueError(f"expected images (B, H, W) or (B, C, H, W), got shape {tuple(x.shape)}.")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}.")


# ----------------------------------------------------------------------- geometry


def random_crop_boxes(
    n: int,
    min_area: float,
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    like: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(n, 4)`` random resized crop boxes ``(cx, cy, w, h)`` inside the image.

    Area fraction ``a ~ U(min_area, 1)`` and aspect ratio ``r`` log-uniform in ``ratio`` (as
    torchvision's ``RandomResizedCrop``); ``w = sqrt(a r)``, ``h = sqrt(a / r)``, each clipped to 1;
    the centre is uniform over the positions that keep the box inside the image.

    Parameters
    ----------
    n
        Number of boxes.
    min_area
        Smallest area fraction, in ``(0, 1]``; 1 gives the whole image every time.
    ratio
        ``(low, high)`` aspect ratios (width / height), ``0 < low <= high``.
    like
        Tensor whose device and float dtype the boxes take (default CPU float32).
    generator
        Source of randomness.
    """
    if not 0.0 < min_area <= 1.0:
        raise ValueError(f"crop min_area must be in (0, 1], got {min_area}.")
    low, high = (float(r) for r in ratio)
    if not 0.0 < low <= high:
        raise ValueError(f"crop ratio must be (low, high) with 0 < low <= high, got {tuple(ratio)}.")
    like = torch.zeros(()) if like is None else like
    area = _uniform(n, min_area, 1.0, like, generator)
    log_ratio = _uniform(n, math.log(low), math.log(high), like, generator)
    w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
    h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    cx = (1.0 - w) * _uniform(n, -1.0, 1.0, like, generator)
    cy = (1.0 - h) * _uniform(n, -1.0, 1.0, like, generator)
    return torch.stack([cx, cy, w, h], dim=-1)


def adjacent_boxes(boxes: torch.Tensor, max_shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boxes of the same size as ``boxes`` ``(n, 4)``, centres moved by ``U(-max_shift, max_shift)`` per axis.

    ``max_shift`` is a fraction of the image side (0.1: up to 10 % of the width/height). The moved
    centre is clamped so the box stays inside the image; the clamp moves it back towards the
    original centre, so ``|c' - c| <= max_shift`` (in side fractions) per axis always holds.
    """
    if not 0.0 <= max_shift <= 1.0:
        raise ValueError(f"adjacent max_shift must be in [0, 1] (a fraction of the image side), got {max_shift}.")
    n = boxes.shape[0]
    cx, cy, w, h = boxes.unbind(-1)
    # a fraction f of the side is 2 f in normalised [-1, 1] units
    dx = 2.0 * max_shift * _uniform(n, -1.0, 1.0, boxes, generator)
    dy = 2.0 * max_shift * _uniform(n, -1.0, 1.0, boxes, generator)
    cx2 = torch.maximum(torch.minimum(cx + dx, 1.0 - w), w - 1.0)
    cy2 = torch.maximum(torch.minimum(cy + dy, 1.0 - h), h - 1.0)
    return torch.stack([cx2, cy2, w, h], dim=-1)


def adjacent_overlap(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """``(n,)`` area of the intersection of two sets of boxes, as a fraction of ``boxes_a``'s area."""
    ax, ay, aw, ah = boxes_a.unbind(-1)
    bx, by, bw, bh = boxes_b.unbind(-1)
    ix = (torch.minimum(ax + aw, bx + bw) - torch.maximum(ax - aw, bx - bw)).clamp(min=0.0)
    iy = (torch.minimum(ay + ah, by + bh) - torch.maximum(ay - ah, by - bh)).clamp(min=0.0)
    return ix * iy / (4.0 * aw * ah)


def box_matrices(boxes: torch.Tensor) -> torch.Tensor:
    """``(n, 2, 3)`` ``affine_grid`` matrices that resample box ``(cx, cy, w, h)`` to the full output."""
    cx, cy, w, h = boxes.unbind(-1)
    zero = torch.zeros_like(cx)
    return torch.stack([torch.stack([w, zero, cx], -1), torch.stack([zero, h, cy], -1)], dim=-2)


def random_affine_matrices(
    n: int,
    rotation: float = 0.0,
    translation: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
    like: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(n, 2, 3)`` random affine maps (output -> input coordinates, ``affine_grid``'s convention).

    Parameters
    ----------
    n
        Number of maps.
    rotation
        Largest rotation in degrees: ``U(-rotation, rotation)``.
    translation
        Largest shift as a fraction of the image side, per axis.
    scale
        Zoom factor ``s ~ U(1 - scale, 1 + scale)``, ``0 <= scale < 1`` (> 1 enlarges the digit).
    shear
        Largest horizontal shear angle in degrees.
    like, generator
        Device/dtype of the result and source of randomness.

    Notes
    -----
    All zero gives the identity ``[[1, 0, 0], [0, 1, 0]]`` exactly.
    """
    if rotation < 0 or translation < 0 or shear < 0:
        raise ValueError(f"rotation, translation and shear must be >= 0, got {rotation}, {translation}, {shear}.")
    if not 0.0 <= scale < 1.0:
        raise ValueError(f"affine scale must be in [0, 1) (zoom in 1 +- scale), got {scale}.")
    like = torch.zeros(()) if like is None else like
    angle = torch.deg2rad(_uniform(n, -rotation, rotation, like, generator))
    shear_angle = torch.deg2rad(_uniform(n, -shear, shear, like, generator))
    zoom = _uniform(n, 1.0 - scale, 1.0 + scale, like, generator)
    tx = 2.0 * _uniform(n, -translation, translation, like, generator)
    ty = 2.0 * _uniform(n, -translation, translation, like, generator)
    cos, sin, k = torch.cos(angle), torch.sin(angle), torch.tan(shear_angle)
    # forward map image -> view: R(angle) @ Shear(k) * zoom, then shift; affine_grid wants its inverse
    forward = torch.stack(
        [torch.stack([cos, cos * k - sin], -1), torch.stack([sin, sin * k + cos], -1)], dim=-2
    ) * zoom.view(-1, 1, 1)
    inverse = torch.linalg.inv(forward)
    shift = -(inverse @ torch.stack([tx, ty], -1).unsqueeze(-1))
    return torch.cat([inverse, shift], dim=-1)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """``(n, 2, 3)`` map ``outer o inner`` (``inner`` applied to output coordinates first)."""
    return torch.cat([outer[..., :2] @ inner[..., :2], outer[..., :2] @ inner[..., 2:] + outer[..., 2:]], dim=-1)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Images ``x`` ``(B, [C,] H, W)`` resampled through ``theta`` ``(B, 2, 3)`` (bilinear, zeros outside)."""
    images = _as_4d(x)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view_as(x)


# ----------------------------------------------------------------------- photometric


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` ``(B, [C,] H, W)`` blurred by its own Gaussian, ``sigma`` ``(B,)`` in pixels.

    Separable kernels of radius ``ceil(3 max(sigma))``, normalised to sum 1, zero padding (the
    background); ``sigma = 0`` leaves an image unchanged.
    """
    images = _as_4d(x)
    b, c, height, width = images.shape
    if sigma.shape != (b,):
        raise ValueError(f"sigma must have shape ({b},), got {tuple(sigma.shape)}.")
    if bool((sigma < 0).any()):
        raise ValueError("blur sigma must be >= 0.")
    radius = math.ceil(3.0 * float(sigma.max())) if b else 0
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    # sigma == 0 gives a delta kernel: exp underflows to exactly 0 off-centre
    safe = sigma.clamp(min=1e-6).unsqueeze(-1)
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = kernel / kernel.sum(-1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B * C, 2r + 1): one kernel per image channel
    flat = images.reshape(1, b * c, height, width)
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, -1), padding=(0, radius), groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, -1, 1), padding=(radius, 0), groups=b * c)
    return flat.view_as(x)


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``clip(x + std * eps, 0, 1)``, ``eps ~ N(0, 1)`` per pixel (``std`` in intensity units)."""
    if std < 0:
        raise ValueError(f"noise standard deviation must be >= 0, got {std}.")
    if std == 0.0:
        return x
    noisy = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return noisy.clamp(0.0, 1.0)


# ----------------------------------------------------------------------- composition


class ImageAugmentation(nn.Module):
    """Random views of images in ``[0, 1]``: crop -> affine -> blur -> noise (see the module docstring).

    Every step has a strength and (except the crop, which ``crop_min_area=1`` switches off) a
    per-image probability; with all strengths at zero (``crop_min_area=1``, the rest 0) a view is
    the input itself.

    Parameters
    ----------
    crop_min_area, crop_ratio
        Random resized crop: area fraction ``~ U(crop_min_area, 1)``, aspect ratio in ``crop_ratio``.
    rotation, translation, scale, shear, affine_probability
        Random affine (degrees, side fraction, zoom ``1 +- scale``, degrees), applied to each view
        with ``affine_probability``.
    blur_sigma, blur_probability
        Gaussian blur with ``sigma ~ U(0, blur_sigma)`` pixels, with ``blur_probability``.
    noise_std, noise_probability
        Additive Gaussian noise (clipped to ``[0, 1]``), with ``noise_probability``.
    adjacent_probability, adjacent_shift
        For pairs of views (:meth:`pair`): with ``adjacent_probability`` the second view's crop is
        the first's moved by at most ``adjacent_shift`` of the side (an *adjacent view*); otherwise
        the two crops are drawn independently (standard SimCLR).
    """

    def __init__(
        self,
        crop_min_area: float = 0.6,
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        rotation: float = 15.0,
        translation: float = 0.1,
        scale: float = 0.1,
        shear: float = 10.0,
        affine_probability: float = 0.8,
        blur_sigma: float = 1.0,
        blur_probability: float = 0.3,
        noise_std: float = 0.1,
        noise_probability: float = 0.5,
        adjacent_probability: float = 0.5,
        adjacent_shift: float = 0.15,
    ) -> None:
        super().__init__()
        # validate once, here, with the messages the functions give
        random_crop_boxes(1, crop_min_area, crop_ratio)
        random_affine_matrices(1, rotation, translation, scale, shear)
        adjacent_boxes(torch.zeros(1, 4), adjacent_shift)
        gaussian_noise(torch.zeros(1), noise_std)
        if blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma}.")
        for name, value in (
            ("affine_probability", affine_probability),
            ("blur_probability", blur_probability),
            ("noise_probability", noise_probability),
            ("adjacent_probability", adjacent_probability),
        ):
            _check_probability(name, value)
        self.crop_min_area, self.crop_ratio = float(crop_min_area), tuple(float(r) for r in crop_ratio)
        self.rotation, self.translation = float(rotation), float(translation)
        self.scale, self.shear = float(scale), float(shear)
        self.affine_probability = float(affine_probability)
        self.blur_sigma, self.blur_probability = float(blur_sigma), float(blur_probability)
        self.noise_std, self.noise_probability = float(noise_std), float(noise_probability)
        self.adjacent_probability, self.adjacent_shift = float(adjacent_probability), float(adjacent_shift)

    def boxes(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 4)`` crop boxes for the images ``x`` (the whole image when cropping is off)."""
        if self.crop_min_area >= 1.0:
            return x.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(x.shape[0], 4)
        return random_crop_boxes(x.shape[0], self.crop_min_area, self.crop_ratio, x, generator)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, boxes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One random view of each image of ``x`` ``(B, [C,] H, W)``, same shape, in ``[0, 1]``.

        ``boxes`` ``(B, 4)`` fixes the crops (default: drawn by :meth:`boxes`).
        """
        _as_4d(x)
        n = x.shape[0]
        boxes = self.boxes(x, generator) if boxes is None else boxes
        theta = box_matrices(boxes)
        if self.affine_probability > 0 and (self.rotation or self.translation or self.scale or self.shear):
            affine = random_affine_matrices(n, self.rotation, self.translation, self.scale, self.shear, x, generator)
            identity = box_matrices(x.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(n, 4))
            chosen = _chosen(n, self.affine_probability, x, generator).view(-1, 1, 1)
            theta = compose(theta, torch.where(chosen, affine, identity))
        identity = box_matrices(x.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(n, 4))
        # no geometric change at all (zero strengths): skip the resampling, the view is exactly x
        view = x if torch.equal(theta, identity) else warp(x, theta)
        if self.blur_probability > 0 and self.blur_sigma > 0:
            sigma = _uniform(n, 0.0, self.blur_sigma, x, generator)
            sigma = torch.where(_chosen(n, self.blur_probability, x, generator), sigma, torch.zeros_like(sigma))
            view = gaussian_blur(view, sigma)
        if self.noise_probability > 0 and self.noise_std > 0:
            noisy = gaussian_noise(view, self.noise_std, generator)
            chosen = _chosen(n, self.noise_probability, x, generator).view(-1, *([1] * (x.dim() - 1)))
            view = torch.where(chosen, noisy, view)
        return view

    def pair(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views of each image of ``x``; with ``adjacent_probability`` their crops are adjacent."""
        first = self.boxes(x, generator)
        second = self.boxes(x, generator)
        if self.adjacent_probability > 0 and self.crop_min_area < 1.0:
            moved = adjacent_boxes(first, self.adjacent_shift, generator)
            chosen = _chosen(x.shape[0], self.adjacent_probability, x, generator).unsqueeze(-1)
            second = torch.where(chosen, moved, second)
        return self(x, generator, first), self(x, generator, second)

    def extra_repr(self) -> str:
        return (
            f"crop_min_area={self.crop_min_area}, rotation={self.rotation}, translation={self.translation}, "
            f"scale={self.scale}, shear={self.shear}, affine_probability={self.affine_probability}, "
            f"blur_sigma={self.blur_sigma}, blur_probability={self.blur_probability}, noise_std={self.noise_std}, "
            f"noise_probability={self.noise_probability}, adjacent_probability={self.adjacent_probability}, "
            f"adjacent_shift={self.adjacent_shift}"
        )
