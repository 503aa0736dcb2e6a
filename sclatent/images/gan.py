"""``ImageGAN``: a GAN of images (DCGAN-style or MLP), non-saturating or WGAN-GP, optionally class-conditional."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..base import seeded
from ._base import ArrayModel
from .modules.gan import ImageGANHyperparameters, ImageGANModule


class ImageGAN(ArrayModel):
    """Generative adversarial network of images in [0, 1], trained by the package's one trainer.

    The generator and the discriminator are two parameter groups of
    :class:`sclatent.images.modules.gan.ImageGANModule`, each with its own Adam (betas
    ``(0.5, 0.999)`` non-saturating, ``(0.5, 0.9)`` WGAN-GP) and its own objective; on each
    minibatch the discriminator steps, and the generator every ``n_critic``-th minibatch. A
    ``conditional`` GAN's training needs labels and :meth:`sample` takes the class of each image.

    Parameters
    ----------
    input_shape
        ``(H, W)`` or ``(C, H, W)`` of the images (``(D,)`` vectors with ``architecture="mlp"``).
    {hyperparameters}
    seed
        Initial weights and, by default, training.

    Examples
    --------
    >>> train = sclatent.datasets.mnist("train")
    >>> gan = ImageGAN((28, 28), conditional=True).train(train, max_epochs=5)
    >>> images = gan.sample(100, labels=np.arange(100) % 10, seed=0)   # (100, 28, 28) in [0, 1]
    """

    module_class = ImageGANModule
    hyperparameters_class = ImageGANHyperparameters

    def _module_kwargs(self) -> dict[str, Any]:
        conditional, n_classes = self.hyperparameters["conditional"], self.hyperparameters["n_classes"]
        return {**super()._module_kwargs(), "n_classes": n_classes if conditional else 0}

    @property
    def conditional(self) -> bool:
        return bool(self.hyperparameters["conditional"])

    @property
    def needs_labels(self) -> bool:
        return self.conditional

    def train(self, x, y=None, max_epochs: int = 20, batch_size: int = 64, lr: float = 2e-4, **kwargs) -> ImageGAN:
        """Fit both players (see :meth:`ArrayModel.train`; early stopping does not apply to a GAN).

        Defaults follow DCGAN (Radford et al. 2016): minibatches of 64, Adam with learning rate
        ``2e-4``. ``history`` holds ``train_discriminator_loss`` and ``train_generator_loss``
        (nats per image for the non-saturating loss) and, non-saturating, the discriminator's mean
        ``train_real_probability`` / ``train_fake_probability``; WGAN-GP, ``train_wasserstein`` (the
        critic's estimate of the Wasserstein-1 distance) and ``train_gradient_penalty``.
        """
        if kwargs.get("early_stopping"):
            raise ValueError("early stopping needs a held-out objective; a GAN has none: train for max_epochs.")
        return super().train(x, y, max_epochs=max_epochs, batch_size=batch_size, lr=lr, **kwargs)

    @torch.no_grad()
    def sample(self, n: int, labels=None, seed: int | None = None, batch_size: int = 1024) -> np.ndarray:
        """``(n, *input_shape)`` float32 generated images in [0, 1] (eval mode: BatchNorm's running statistics).

        Parameters
        ----------
        n
            Number of images.
        labels
            Conditional GANs: ``(n,)`` classes to draw; default ``arange(n) % n_classes`` (every
            class equally often). Unconditional GANs take none.
        seed
            Seeds the noise (the same images on any device); default the global torch RNG.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        if self.conditional:
            n_classes = self.hyperparameters["n_classes"]
            labels = np.arange(n) % n_classes if labels is None else np.asarray(labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be {n} integer classes, got shape {labels.shape} ({labels.dtype}).")
            if n and (labels.min() < 0 or labels.max() >= n_classes):
                raise ValueError(f"labels must lie in [0, {n_classes - 1}], got [{labels.min()}, {labels.max()}].")
        elif labels is not None:
            raise ValueError("this GAN is unconditional: it takes no labels (build it with conditional=True).")
        self.module.eval()
        device = self.device
        # a seeded draw takes the noise from the CPU: the same images on any device
        noise_device = "cpu" if seed is not None else None
        chunks = []
        with seeded(seed, device):
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                chunk_labels = (
                    None if labels is None else torch.as_tensor(labels[start:stop], dtype=torch.int64).to(device)
                )
                chunks.append(self.module.generate(stop - start, chunk_labels, noise_device=noise_device).cpu())
        if not chunks:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        return torch.cat(chunks).numpy().astype(np.float32, copy=False)


def evaluate_image_gan(gan: ImageGAN, classifier, train, test, n: int = 5000, seed: int = 0) -> dict[str, dict]:
    """Classifier-based quality of ``gan``'s samples beside the floor (real images) and a model-free baseline.

    The test images are split at random (MNIST's test set is ordered) into two halves of ``n``
    images (at most half the test set each). The second half is the reference of every Frechet
    distance, so all three rows compare ``n`` images with the same ``n`` real ones:

    * ``"model"``: ``n`` samples of ``gan`` (conditional: every class equally often, the intended
      class being what ``accuracy`` checks);
    * ``"real"``: the first half of the test images (the floor: what a perfect generator scores;
      ``accuracy`` is the classifier's test accuracy);
    * ``"baseline"``: :func:`sclatent.images.metrics.gaussian_baseline_samples` of the training
      images (per class when ``gan`` is conditional).

    Parameters
    ----------
    gan
        A trained :class:`ImageGAN`.
    classifier
        A trained classifier with ``predict_proba`` and ``features`` (a :class:`DigitClassifier`).
    train, test
        :class:`sclatent.datasets.ImageSet` s (the baseline is fitted to ``train``).
    n, seed
        Images per set and the seed of the split, of the samples and of the baseline.

    Returns
    -------
    dict
        ``{"model" | "real" | "baseline": {"frechet", "confidence", "class_entropy"[, "accuracy"]}}``.
    """
    from .metrics import gaussian_baseline_samples, generator_scores

    n = min(int(n), len(test) // 2)
    if n < 2:
        raise ValueError(f"need at least 4 test images for two halves of >= 2, got {len(test)}.")
    order = np.random.default_rng(seed).permutation(len(test))
    images = test.unit().reshape(len(test), *gan.input_shape)
    held_out, reference = images[order[:n]], images[order[n : 2 * n]]
    n_classes = gan.hyperparameters["n_classes"]
    intended = np.arange(n) % n_classes if gan.conditional else None
    samples = gan.sample(n, labels=intended, seed=seed)
    train_images = train.unit().reshape(len(train), *gan.input_shape)
    baseline = gaussian_baseline_samples(
        train_images, n, labels=train.labels if gan.conditional else None, seed=seed, intended=intended
    )
    return {
        "model": generator_scores(classifier, samples, reference, intended),
        "real": generator_scores(classifier, held_out, reference, test.labels[order[:n]] if gan.conditional else None),
        "baseline": generator_scores(classifier, baseline, reference, intended),
    }
