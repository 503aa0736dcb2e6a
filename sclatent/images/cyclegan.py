"""``CycleGAN``: translate digits between two unpaired domains, and judge the translation by classifiers.

The domains come from :func:`sclatent.datasets.unpaired_domains` (e.g. MNIST and its thickened
version, drawn from disjoint halves). Training never sees a label; :func:`evaluate_translation`
uses them afterwards to ask whether a translated digit is still the same digit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..datasets import ImageSet, domain_transform, rotate
from ._base import ArrayModel
from .classifier import DigitClassifier
from .metrics import frechet_distance
from .modules.cyclegan import DIRECTIONS, CycleGANHyperparameters, CycleGANModule


class CycleGAN(ArrayModel):
    """CycleGAN (Zhu et al. 2017) between grey-scale image domains A and B, from unpaired examples.

    Generators ``G: A -> B`` and ``F: B -> A`` (small ResNet generators, outputs in [0, 1]) and
    PatchGAN discriminators, trained adversarially (least squares) with cycle-consistency and
    identity L1 losses; see :class:`sclatent.images.modules.cyclegan.CycleGANModule` for the objective.

    Parameters
    ----------
    input_shape
        ``(H, W)`` of the images of both domains, e.g. ``(28, 28)`` (``(1, H, W)`` is read as ``(H, W)``).
    {hyperparameters}
    seed
        Initial weights and, by default, training.

    Notes
    -----
    The default sizes (16 filters, 2 residual blocks: 113 k parameters in all) take about 1 s per
    minibatch of 64 MNIST pairs on one CPU thread; 8 filters is 4x cheaper.

    Examples
    --------
    >>> a, b = sclatent.datasets.unpaired_domains(sclatent.datasets.mnist("train").subset(20000), "thicken")
    >>> model = CycleGAN((28, 28)).train(a, b, max_epochs=3)
    >>> thick = model.translate(a.unit()[:16])              # A -> B
    >>> model.cycle_error(a.unit()[:1000], "a_to_b")       # mean |a - F(G(a))| per pixel
    """

    module_class = CycleGANModule
    hyperparameters_class = CycleGANHyperparameters
    # True only inside train(), whose items are (A image, B image) pairs
    _accept_pairs: ClassVar[bool] = False

    def __init__(self, input_shape: tuple[int, ...], *, seed: int = 0, **hyperparameters: Any) -> None:
        # grey-scale images (1, H, W) are stored as (H, W)
        shape = tuple(int(s) for s in input_shape)
        shape = shape[1:] if len(shape) == 3 and shape[0] == 1 else shape
        super().__init__(shape, seed=seed, **hyperparameters)

    def _check_inputs(self, x, y=None, require_labels: bool = False):
        # inside train(), the items are (A image, B image) pairs (N, 2, H, W) built there
        if self._accept_pairs and not isinstance(x, ImageSet):
            return np.asarray(x, dtype=np.float32), None
        return super()._check_inputs(x, y, require_labels)

    def _pairs(self, domain_a, domain_b, rng: np.random.Generator) -> np.ndarray:
        """``(n, 2, H, W)`` items pairing every A image with a random B image, ``n = max(N_A, N_B)``.

        The smaller domain is repeated in fresh random orders to length ``n``, so each epoch shows
        every image of both domains at least once.
        """
        a, _ = self._check_inputs(domain_a)
        b, _ = self._check_inputs(domain_b)
        if len(a) < 1 or len(b) < 1:
            raise ValueError(f"both domains need images, got {len(a)} A and {len(b)} B images.")
        n = max(len(a), len(b))

        def order(m: int) -> np.ndarray:
            return np.concatenate([rng.permutation(m) for _ in range(-(-n // m))])[:n]

        return np.stack([a[order(len(a))], b[order(len(b))]], axis=1)

    def train(
        self,
        domain_a,
        domain_b,
        max_epochs: int = 5,
        batch_size: int = 64,
        lr: float = 5e-4,
        validation: tuple | None = None,
        accelerator: str = "auto",
        seed: int | None = None,
        progress_bar: bool = True,
    ) -> CycleGAN:
        """Fit both generators and discriminators through :func:`sclatent.train.fit` (Adam, betas (0.5, 0.999)).

        Parameters
        ----------
        domain_a, domain_b
            Images of the two domains (:class:`ImageSet` s or float arrays ``(N, H, W)`` in [0, 1]);
            unpaired, of any sizes. Labels are ignored.
        max_epochs
            Passes over ``max(N_A, N_B)`` (A image, B image) items.
        batch_size, lr
            Minibatch size and learning rate of both groups (the paper: 1 and 2e-4; with minibatches
            of 64, and so 64 times fewer updates, 5e-4 trains MNIST restylings in a few epochs).
        validation
            ``(held-out A, held-out B)`` evaluated each epoch into ``history["validation_*"]``.
        accelerator, seed, progress_bar
            As in :meth:`ArrayModel.train`; ``seed`` (default the model's) also draws the A/B pairing.

        Returns
        -------
        CycleGAN
            The model, trained in place. ``history`` holds per epoch ``train_generators_loss``,
            ``train_discriminators_loss``, ``train_cycle_a``, ``train_cycle_b``, ``train_identity_a``,
            ``train_identity_b``, ``train_adversarial_a_to_b``, ``train_adversarial_b_to_a``,
            ``train_discriminator_a``, ``train_discriminator_b`` (means per item).
        """
        seed = self.seed if seed is None else seed
        rng = np.random.default_rng(seed)
        pairs = self._pairs(domain_a, domain_b, rng)
        held_out = None
        if validation is not None:
            if not isinstance(validation, tuple) or len(validation) != 2:
                raise ValueError("validation must be a tuple (held-out A images, held-out B images).")
            held_out = self._pairs(*validation, rng)
        self._accept_pairs = True
        try:
            return super().train(
                pairs,
                max_epochs=max_epochs,
                batch_size=batch_size,
                lr=lr,
                validation=held_out,
                accelerator=accelerator,
                seed=seed,
                progress_bar=progress_bar,
            )
        finally:
            del self._accept_pairs  # back to the class's False

    # ----------------------------------------------------------------- translation

    def translate(self, x, direction: str = "a_to_b", batch_size: int = 512) -> np.ndarray:
        """``(N, H, W)`` images ``x`` in [0, 1] translated by ``G`` (``"a_to_b"``) or ``F`` (``"b_to_a"``)."""
        self._check_direction(direction)
        return self._map(lambda batch: self.module.translate(batch.x, direction), x, batch_size)

    def cycle(self, x, direction: str = "a_to_b", batch_size: int = 512) -> np.ndarray:
        """``(N, H, W)`` round trips: ``F(G(x))`` for ``"a_to_b"`` (x in A), ``G(F(x))`` for ``"b_to_a"``."""
        self._check_direction(direction)
        return self._map(lambda batch: self.module.cycle(batch.x, direction), x, batch_size)

    def cycle_error(self, x, direction: str = "a_to_b", batch_size: int = 512) -> float:
        """Mean ``|x - cycle(x)|`` per pixel, in intensity units ([0, 1]); 0 is a perfect round trip."""
        images, _ = self._check_inputs(x)
        return float(np.abs(self.cycle(images, direction, batch_size) - images).mean())

    @staticmethod
    def _check_direction(direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}.")


def _inverse_transform(images: ImageSet, kind: str) -> ImageSet | None:
    """The exact inverse of ``domain_transform(., kind)``, or None (dilation/erosion lose information)."""
    if kind == "invert":
        return domain_transform(images, "invert")
    if kind == "rotate":
        return rotate(images, 3)
    return None


def evaluate_translation(
    model: CycleGAN,
    test_a: ImageSet,
    test_b: ImageSet,
    kind: str,
    classifier_a: DigitClassifier,
    classifier_b: DigitClassifier,
) -> dict[str, float]:
    """Cycle errors, translation accuracies and Frechet distances of a trained CycleGAN, with baselines.

    Parameters
    ----------
    model
        The trained translator.
    test_a, test_b
        Held-out labelled images of the two domains (e.g. ``unpaired_domains(mnist("test"), kind)``).
    kind
        The restyling that made domain B (see :data:`sclatent.datasets.DOMAIN_KINDS`): the oracle.
    classifier_a, classifier_b
        :class:`DigitClassifier` s trained on labelled images of domain A and domain B.

    Returns
    -------
    dict
        ``cycle_error_a`` (``|a - F(G(a))|``) and ``cycle_error_b`` (``|b - G(F(b))|``), per pixel in
        [0, 1] units; for each direction ``d`` in ``a_to_b`` / ``b_to_a`` (source ``s``, target domain
        classifier ``C``): ``accuracy_<d>`` (``C`` reads the translated image as the source's digit),
        ``identity_accuracy_<d>`` (``C`` on the untranslated source: what doing nothing scores),
        ``oracle_accuracy_<d>`` (``C`` on the true transform of the source, or for a transform without
        an exact inverse on the real target test images: the upper bound), ``frechet_<d>``
        (translated sources vs the real target test images, in ``C``'s features),
        ``frechet_identity_<d>`` (untranslated sources vs the same) and ``frechet_oracle_<d>``
        (oracle images vs the same: the real-vs-real floor at this sample size; NaN for ``b_to_a``
        when the transform has no exact inverse).
    """
    report = {
        "cycle_error_a": model.cycle_error(test_a, "a_to_b"),
        "cycle_error_b": model.cycle_error(test_b, "b_to_a"),
    }
    oracle_ab = domain_transform(test_a, kind)
    oracle_ba = _inverse_transform(test_b, kind)
    setups = [
        ("a_to_b", test_a, test_b, classifier_b, oracle_ab.unit(), test_a.labels),
        (
            "b_to_a",
            test_b,
            test_a,
            classifier_a,
            *((oracle_ba.unit(), test_b.labels) if oracle_ba is not None else (test_a.unit(), test_a.labels)),
        ),
    ]
    for direction, source, target, classifier, oracle, oracle_labels in setups:
        translated = model.translate(source, direction)
        report[f"accuracy_{direction}"] = float((classifier.predict(translated) == source.labels).mean())
        report[f"identity_accuracy_{direction}"] = float((classifier.predict(source) == source.labels).mean())
        report[f"oracle_accuracy_{direction}"] = float((classifier.predict(oracle) == oracle_labels).mean())
        real = classifier.features(target)
        report[f"frechet_{direction}"] = frechet_distance(classifier.features(translated), real)
        report[f"frechet_identity_{direction}"] = frechet_distance(classifier.features(source), real)
        # without an exact inverse the oracle images are the target test images themselves: no
        # real-vs-real distance to report (it would be 0 by construction)
        exact = direction == "a_to_b" or oracle_ba is not None
        report[f"frechet_oracle_{direction}"] = (
            frechet_distance(classifier.features(oracle), real) if exact else float("nan")
        )
    return report


def domain_classifier(images: ImageSet, max_epochs: int = 1, seed: int = 0, **train_kwargs) -> DigitClassifier:
    """A :class:`DigitClassifier` trained on labelled images of one domain (the referee of translations)."""
    h, w = images.shape
    return DigitClassifier((h, w), seed=seed).train(images, max_epochs=max_epochs, **train_kwargs)
