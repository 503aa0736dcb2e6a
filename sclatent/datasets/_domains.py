"""Two unpaired image domains made from one labelled set, for image-to-image translation (CycleGAN).

Domain A is the images as they are, domain B the same kind of images restyled by a known transform
(inverted, rotated, thickened or thinned strokes). :func:`unpaired_domains` draws the two from
*disjoint* random halves, so no image of A has its own transformed copy in B: a translator cannot
learn from pairs, only from the two distributions. The labels stay attached for evaluation (does a
translated image still show the same digit?) and are never needed for training.

Because the transform is known, it is also the oracle translation: the upper bound a learned
translator is compared with.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._images import ImageSet

DOMAIN_KINDS = ("invert", "rotate", "thicken", "thin")


def _disk(radius: int) -> np.ndarray:
    """``(2r + 1, 2r + 1)`` boolean footprint of the pixels within ``radius`` of the centre."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def _check_radius(radius: int) -> int:
    if int(radius) != radius or radius < 1:
        raise ValueError(f"radius must be a positive integer (pixels), got {radius!r}.")
    return int(radius)


def invert(images: ImageSet) -> ImageSet:
    """Ink and background swapped: grey level ``g`` becomes ``levels - 1 - g``. Its own inverse."""
    return ImageSet(
        (images.levels - 1 - images.images.astype(np.int64)).astype(np.uint8),
        images.labels,
        images.levels,
        f"{images.name}/inverted",
    )


def rotate(images: ImageSet, quarter_turns: int = 1) -> ImageSet:
    """Every image rotated by ``90 * quarter_turns`` degrees anticlockwise (exact, no interpolation).

    Needs square images for ``quarter_turns`` odd; four quarter turns give the images back.
    """
    h, w = images.shape
    if quarter_turns % 2 and h != w:
        raise ValueError(f"an odd number of quarter turns needs square images, got {h}x{w}.")
    turned = np.ascontiguousarray(np.rot90(images.images, k=quarter_turns, axes=(1, 2)))
    return ImageSet(turned, images.labels, images.levels, f"{images.name}/rotated{90 * (quarter_turns % 4)}")


def thicken(images: ImageSet, radius: int = 1) -> ImageSet:
    """Strokes thickened by grey dilation: each pixel takes the maximum over a disk of ``radius`` pixels.

    Radius 1 (a 3x3 cross) adds about one pixel to every side of a stroke; ink (the sum of grey
    levels) never decreases.
    """
    footprint = _disk(_check_radius(radius))[None]  # no mixing across images
    dilated = ndimage.grey_dilation(images.images, footprint=footprint, mode="constant", cval=0)
    return ImageSet(dilated.astype(np.uint8), images.labels, images.levels, f"{images.name}/thickened{radius}")


def thin(images: ImageSet, radius: int = 1) -> ImageSet:
    """Strokes thinned by grey erosion (the minimum over a disk of ``radius`` pixels).

    Erosion removes strokes narrower than about ``2 * radius + 1`` pixels entirely, so thin digits
    can lose parts; thickening (dilation) is the better-behaved restyling.
    """
    footprint = _disk(_check_radius(radius))[None]
    eroded = ndimage.grey_erosion(images.images, footprint=footprint, mode="constant", cval=0)
    return ImageSet(eroded.astype(np.uint8), images.labels, images.levels, f"{images.name}/thinned{radius}")


def domain_transform(images: ImageSet, kind: str) -> ImageSet:
    """The restyling ``kind`` (one of :data:`DOMAIN_KINDS`) with its default setting applied to ``images``.

    ``"invert"``: ``invert`` (``255 - x``); ``"rotate"``: :func:`rotate` by 90 degrees; ``"thicken"`` /
    ``"thin"``: ``thicken`` / ``thin`` (grey dilation / erosion) with radius 1.
    """
    if not isinstance(images, ImageSet):
        raise TypeError(f"expected an ImageSet (e.g. sclatent.datasets.mnist()), got {type(images).__name__}.")
    if kind == "invert":
        return invert(images)
    if kind == "rotate":
        return rotate(images, 1)
    if kind == "thicken":
        return thicken(images, 1)
    if kind == "thin":
        return thin(images, 1)
    raise ValueError(f"unknown domain kind {kind!r}; choose one of {', '.join(DOMAIN_KINDS)}.")


def unpaired_domains(images: ImageSet, kind: str, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Split ``images`` at random into two disjoint halves: A as they are, B restyled by ``kind``.

    Parameters
    ----------
    images
        Labelled images, e.g. ``sclatent.datasets.mnist("train")``.
    kind
        The restyling of domain B, one of :data:`DOMAIN_KINDS`.
    seed
        Seeds the split.

    Returns
    -------
    domain_a, domain_b : ImageSet
        :class:`ImageSet` s of ``ceil(N / 2)`` and ``floor(N / 2)`` images, each in the original order;
        no image of ``images`` is in both, so no (a, transform(a)) pair exists. Names end in ``/A``
        and ``/B-<kind>``. Labels are kept for evaluation only.
    """
    if len(images) < 2:
        raise ValueError(f"need at least two images to make two domains, got {len(images)}.")
    order = np.random.default_rng(seed).permutation(len(images))
    half = (len(images) + 1) // 2
    first, second = np.sort(order[:half]), np.sort(order[half:])
    domain_a = ImageSet(images.images[first], images.labels[first], images.levels, f"{images.name}/A")
    restyled = domain_transform(
        ImageSet(images.images[second], images.labels[second], images.levels, images.name), kind
    )
    domain_b = ImageSet(restyled.images, restyled.labels, restyled.levels, f"{images.name}/B-{kind}")
    return domain_a, domain_b
