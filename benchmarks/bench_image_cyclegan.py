"""CycleGAN between MNIST digits and thickened digits from a disjoint half: does a translation keep the digit?

Run (about 5 minutes at 2 threads in full mode, sized from 1-thread measurements on a busy machine)::

    OMP_NUM_THREADS=2 PYTHONPATH=. SCLATENT_DATA_DIR=../shared/data python benchmarks/bench_image_cyclegan.py

Protocol (seeded; labels are used by the referees only, never by the CycleGAN):

- Domains: a random 20,000-image subset of the MNIST training set split by
  :func:`sclatent.datasets.unpaired_domains` into 10,000 images as they are (A) and 10,000 *other*
  images thickened by grey dilation with a radius-1 cross (B): no image has its own restyled copy
  in the other domain. Test: the 10,000 MNIST test images split the same way (5,000 per domain).
- Model: :class:`sclatent.images.CycleGAN` with 8 filters and 2 residual blocks per generator
  (29 k parameters in all), least squares GAN, lambda_cycle 10, lambda_identity 0.5 (as Zhu et
  al. 2017), Adam lr 5e-4 betas (0.5, 0.999), minibatches of 64, ``EPOCHS`` passes.
- Referees: two :class:`sclatent.images.DigitClassifier` s, one trained on the 60,000 labelled
  training digits (domain A) and one on the same digits thickened (domain B), one epoch each.
- Rows (A = thin, B = thick):

  * cycle error ``|a - F(G(a))|`` and ``|b - G(F(b))|`` (mean per pixel, intensities in [0, 1]),
    beside the untrained network and the morphological round trips ``erode(dilate(a))``
    (closing) / ``dilate(erode(b))`` (opening), the hand-made reference;
  * translation accuracy: classifier B reads ``G(a)`` (is it a's digit?), beside the identity map
    (classifier B on ``a`` untranslated) and the oracle (classifier B on ``dilate(a)``, the true
    transform); B -> A likewise with classifier A, beside the identity map, erosion ``erode(b)``
    (a hand-made inverse) and the real A test digits (the oracle: dilation has no exact inverse);
  * Frechet distance of translations to the real test digits of the target domain in the target
    referee's 128 features, beside the identity map, the hand-made transform and (A -> B) the true
    transform of the same digits (real vs real at this sample size).

Literature: Zhu et al. 2017 (CycleGAN) report no MNIST results; nor is there a standard published
number for this domain pair, so no reference value is given.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sclatent.datasets import domain_transform, mnist, unpaired_domains
from sclatent.datasets._domains import thicken, thin
from sclatent.images import CycleGAN, evaluate_translation
from sclatent.images.cyclegan import domain_classifier
from sclatent.images.metrics import frechet_distance

KIND = "thicken"
N_TRAIN = 20000  # images split into the two domains (10,000 each)
EPOCHS = 5
LR = 5e-4
NETWORK = dict(n_filters=8, n_residual_blocks=2)
QUICK = dict(n_train=2000, n_test=1000, n_classifier=5000, epochs=1)
SOURCE = "Zhu et al. 2017 (ICCV), CycleGAN: no MNIST experiments"


def run(quick: bool = False, seed: int = 0, data_dir=None) -> list[dict]:
    """Train on MNIST (subsets when ``quick``) and return the benchmark rows (see the module docstring)."""
    n_train, n_test, n_classifier, epochs = (
        (QUICK["n_train"], QUICK["n_test"], QUICK["n_classifier"], QUICK["epochs"])
        if quick
        else (N_TRAIN, None, None, EPOCHS)
    )
    train_set, test_set = mnist("train", data_dir), mnist("test", data_dir)
    domain_a, domain_b = unpaired_domains(train_set.subset(n_train, seed=seed), KIND, seed=seed)
    test_a, test_b = unpaired_domains(test_set.subset(n_test, seed=seed), KIND, seed=seed + 1)

    start = time.perf_counter()
    referee_set = train_set.subset(n_classifier, seed=seed)
    classifier_a = domain_classifier(referee_set, max_epochs=1, seed=seed, progress_bar=False)
    classifier_b = domain_classifier(domain_transform(referee_set, KIND), max_epochs=1, seed=seed, progress_bar=False)
    referee_seconds = time.perf_counter() - start

    untrained = CycleGAN(train_set.shape, seed=seed, **NETWORK)
    model = CycleGAN(train_set.shape, seed=seed, **NETWORK)
    start = time.perf_counter()
    model.train(domain_a, domain_b, max_epochs=epochs, batch_size=64, lr=LR, progress_bar=False)
    train_seconds = time.perf_counter() - start
    report = evaluate_translation(model, test_a, test_b, KIND, classifier_a, classifier_b)

    # hand-made morphology: dilation is the true A -> B map; erosion is its closest hand-made inverse
    a, b = test_a.unit(), test_b.unit()
    closing, opening = thin(thicken(test_a)).unit(), thicken(thin(test_b)).unit()
    eroded = thin(test_b)
    accuracy_eroded = float((classifier_a.predict(eroded) == test_b.labels).mean())
    frechet_eroded = frechet_distance(classifier_a.features(eroded), classifier_a.features(test_a))

    settings = (
        f"MNIST {len(domain_a)} A + {len(domain_b)} B unpaired training digits (B thickened, disjoint halves); "
        f"test {len(test_a)} + {len(test_b)}; CycleGAN {NETWORK}, lsgan, lambda_cycle 10, lambda_identity 0.5, "
        f"{epochs} epochs, batch 64, lr {LR}; referees: DigitClassifier 1 epoch on {len(referee_set)} digits "
        f"of each domain ({referee_seconds:.0f} s); {torch.get_num_threads()} threads; seed {seed}"
    )

    def row(metric, value, unit, lower, beside):
        return {
            "family": f"cyclegan-mnist-{KIND}",
            "metric": metric,
            "value": float(value),
            "unit": unit,
            "lower_is_better": lower,
            "reference": None,
            "reference_text": "no published MNIST figure (CycleGAN paper has none)",
            "reference_source": SOURCE,
            "beside": {k: float(v) for k, v in beside.items()},
            "train_seconds": train_seconds,
            "settings": settings,
        }

    unit_l1 = "mean |error| per pixel (intensity in [0, 1])"
    return [
        row(
            "cycle error A->B->A |a - F(G(a))|",
            report["cycle_error_a"],
            unit_l1,
            True,
            {
                "untrained CycleGAN": untrained.cycle_error(a, "a_to_b"),
                "erode(dilate(a)) (morphological closing)": np.abs(closing - a).mean(),
            },
        ),
        row(
            "cycle error B->A->B |b - G(F(b))|",
            report["cycle_error_b"],
            unit_l1,
            True,
            {
                "untrained CycleGAN": untrained.cycle_error(b, "b_to_a"),
                "dilate(erode(b)) (morphological opening)": np.abs(opening - b).mean(),
            },
        ),
        row(
            "translation accuracy A->B (thick-digit classifier reads G(a) as a's digit)",
            report["accuracy_a_to_b"],
            "fraction",
            False,
            {
                "identity map (a untranslated)": report["identity_accuracy_a_to_b"],
                "oracle: dilate(a), the true transform": report["oracle_accuracy_a_to_b"],
            },
        ),
        row(
            "translation accuracy B->A (thin-digit classifier reads F(b) as b's digit)",
            report["accuracy_b_to_a"],
            "fraction",
            False,
            {
                "identity map (b untranslated)": report["identity_accuracy_b_to_a"],
                "erode(b) (hand-made inverse)": accuracy_eroded,
                "oracle: real A test digits": report["oracle_accuracy_b_to_a"],
            },
        ),
        row(
            "Frechet distance G(a) vs real B test digits (thick-digit classifier features)",
            report["frechet_a_to_b"],
            "squared feature units",
            True,
            {
                "identity map (a untranslated)": report["frechet_identity_a_to_b"],
                "real vs real: dilate(a)": report["frechet_oracle_a_to_b"],
            },
        ),
        row(
            "Frechet distance F(b) vs real A test digits (thin-digit classifier features)",
            report["frechet_b_to_a"],
            "squared feature units",
            True,
            {"identity map (b untranslated)": report["frechet_identity_b_to_a"], "erode(b)": frechet_eroded},
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="subsets, one epoch (< 1 minute)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for r in run(quick=args.quick, seed=args.seed):
        beside = ", ".join(f"{k} {v:.4g}" for k, v in r["beside"].items())
        print(f"{r['metric']}: {r['value']:.4g} ({r['unit']}); beside: {beside}")
    print(f"train {r['train_seconds']:.0f} s; {r['settings']}")


if __name__ == "__main__":
    main()
