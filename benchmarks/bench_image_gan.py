"""Benchmark section: GANs on MNIST judged by a digit classifier trained in the same run.

With no internet there is no Inception network, so every number here uses the features and
probabilities of :class:`sclatent.images.DigitClassifier` (one epoch on the MNIST training set,
~98 % test accuracy). Per GAN, rows give the classifier-Frechet distance between 5,000 samples and
5,000 held-out real test images, the classifier's mean confidence, the entropy of its predicted-class
histogram (mode coverage; log 10 = 2.303 is all digits equally) and the accuracy against the digit
the class-conditional generator was asked for. Beside each: the same figure for 5,000 other
held-out real test images (the floor: a random half of the test set against the other half) and for
a model-free generator (a per-class Gaussian with the training pixels' mean and covariance, clipped
to [0, 1]). Equal sample sizes everywhere (the Frechet estimate is biased upward at small N).

CPU budget (full mode): about 5 minutes at 2 threads on an idle machine, sized from 1-thread
measurements on a busy machine (see ``FULL``): the classifier (~20 s) and two conditional
DCGAN-style GANs with small widths, the non-saturating loss and WGAN-GP, 3 epochs each (1-thread CPU
time measured: ~61 s / epoch non-saturating, ~66 s WGAN-GP, 14 s the classifier; 2 threads assumed
~1.4x faster). Learning rate 1e-3 (not DCGAN's 2e-4) and, for WGAN-GP, 2 critic steps per generator
step (not the paper's 5): both learnt faster in a short budget on a 9,600-image subset (one seed).
Both GANs are far from converged (published MNIST GANs train for tens of epochs on a GPU).

Literature: there is no standard MNIST Frechet distance with a custom classifier, so no number here
is comparable to a published one. Lucic et al. 2018 ("Are GANs Created Equal?", NeurIPS, Table 2)
report MNIST FIDs with Inception features (single digits to ~20 for the best of a large
hyperparameter search): a different feature space and scale, quoted only as context.

Run: ``PYTHONPATH=. python benchmarks/bench_image_gan.py [--quick] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import time

import torch

FAMILY = "image_gan"
# settings of the full run: epochs per GAN chosen so that the section fits ~5 min at 2 threads
FULL = {
    "n_train": None,
    "n_eval": 5000,
    "classifier_epochs": 1,
    "gans": [
        {"loss": "nonsaturating", "max_epochs": 3, "n_critic": 1},
        {"loss": "wgan-gp", "max_epochs": 3, "n_critic": 2},
    ],
}
QUICK = {
    "n_train": 2000,
    "n_eval": 500,
    "classifier_epochs": 1,
    "gans": [
        {"loss": "nonsaturating", "max_epochs": 1, "n_critic": 1},
        {"loss": "wgan-gp", "max_epochs": 1, "n_critic": 2},
    ],
}
# DCGAN's 2e-4 suits long runs; 1e-3 learnt faster within a few epochs (measured on a 9,600-image subset)
LR = 1e-3
ARCHITECTURE = {"architecture": "dcgan", "generator_widths": (64, 32), "discriminator_widths": (32, 64)}
REFERENCE_TEXT = (
    "no comparable published value: a Frechet distance in this run's own digit-classifier feature space; "
    "Lucic et al. 2018 report MNIST FIDs with Inception features (different space and scale)"
)
REFERENCE_SOURCE = "Lucic et al. 2018, Are GANs Created Equal? (NeurIPS), Table 2 (Inception FID, not comparable)"


def run(quick: bool = False, seed: int = 0, data_dir=None) -> list[dict]:
    """Train the classifier and the GANs; one row per (GAN, metric). See the module docstring."""
    from sclatent import datasets
    from sclatent.images import DigitClassifier, ImageGAN, evaluate_image_gan

    config = QUICK if quick else FULL
    train, test = datasets.mnist("train", data_dir), datasets.mnist("test", data_dir)
    if config["n_train"] is not None:
        train = train.subset(config["n_train"], seed=seed)
    start = time.perf_counter()
    classifier = DigitClassifier((28, 28), seed=seed).train(
        train, max_epochs=config["classifier_epochs"], progress_bar=False
    )
    classifier_seconds = time.perf_counter() - start
    classifier_accuracy = float((classifier.predict(test) == test.labels).mean())
    rows: list[dict] = []
    for gan_settings in config["gans"]:
        settings = {**ARCHITECTURE, "loss": gan_settings["loss"], "n_critic": gan_settings["n_critic"]}
        start = time.perf_counter()
        gan = ImageGAN((28, 28), conditional=True, seed=seed, **settings)
        gan.train(train, max_epochs=gan_settings["max_epochs"], lr=LR, progress_bar=False)
        train_seconds = time.perf_counter() - start
        scores = evaluate_image_gan(gan, classifier, train, test, n=config["n_eval"], seed=seed)
        n = min(config["n_eval"], len(test) // 2)
        described = (
            f"conditional DCGAN (G widths 64-32, D widths 32-64), loss {gan_settings['loss']}, "
            f"{gan_settings['max_epochs']} epochs on {len(train)} images, batch 64, Adam {LR:g} "
            f"betas {gan.module.betas}, n_critic {gan.module.n_critic}; classifier 1 CNN epoch "
            f"({classifier_accuracy:.1%} test accuracy, {classifier_seconds:.0f} s); {n} images per set; "
            f"torch threads {torch.get_num_threads()}"
        )
        for metric, key, unit, lower in (
            ("classifier-Frechet distance", "frechet", "squared feature units", True),
            ("classifier accuracy vs intended digit", "accuracy", "fraction", False),
            ("classifier confidence", "confidence", "mean max probability", False),
            ("predicted-class entropy", "class_entropy", "nats (log 10 = 2.303)", False),
        ):
            rows.append(
                {
                    "family": FAMILY,
                    "metric": f"{metric} ({gan_settings['loss']})",
                    "value": float(scores["model"][key]),
                    "unit": unit,
                    "lower_is_better": lower,
                    "reference": None,
                    "reference_text": REFERENCE_TEXT,
                    "reference_source": REFERENCE_SOURCE,
                    "beside": {
                        "held-out real images (floor)": float(scores["real"][key]),
                        "per-class pixel Gaussian": float(scores["baseline"][key]),
                    },
                    "train_seconds": float(train_seconds),
                    "settings": described,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subsets, < 60 s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    for row in run(quick=args.quick, seed=args.seed):
        beside = ", ".join(f"{k} {v:.4g}" for k, v in row["beside"].items())
        print(f"{row['metric']:55s} {row['value']:9.4g}   beside: {beside}   ({row['train_seconds']:.0f} s)")
    print(f"total {time.perf_counter() - start:.0f} s; settings: {row['settings']}")


if __name__ == "__main__":
    main()
