"""Tutorial 9: a GAN of MNIST digits, judged by a digit classifier trained here.

Run ``python tutorials/09_mnist_gan.py``: it trains a digit classifier (one epoch), then two
class-conditional DCGAN-style GANs on MNIST (the non-saturating loss and WGAN-GP; same
architecture, data, epochs and seed), draws their samples beside real digits and a pixel-Gaussian
baseline, plots the training curves, scores everything with the classifier and writes
``tutorials/09_mnist_gan.md`` with the numbers and figures ``tutorials/figures/09_*.png``.
About 10 CPU minutes at one thread (``EPOCHS`` sets the length; the GANs are far from converged).
Needs MNIST in ``$SCLATENT_DATA_DIR/MNIST/raw``.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import sclatent
from sclatent.images import DigitClassifier, ImageGAN, evaluate_image_gan
from sclatent.images.metrics import gaussian_baseline_samples
from sclatent.images.plotting import plot_image_grid
from sclatent.plotting import plot_training_history

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
EPOCHS = 2
N_EVAL = 5000
LOSSES = ("nonsaturating", "wgan-gp")
# WGAN-GP: 2 critic steps per generator step (the paper: 5), more generator updates in a short run
N_CRITIC = {"nonsaturating": 1, "wgan-gp": 2}
LR = 1e-3  # DCGAN's 2e-4 suits long runs; 1e-3 learnt faster in a few epochs (measured on a 9,600-image subset)
ARCHITECTURE = {"architecture": "dcgan", "generator_widths": (64, 32), "discriminator_widths": (32, 64)}


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    train, test = sclatent.datasets.mnist("train"), sclatent.datasets.mnist("test")

    start = time.perf_counter()
    classifier = DigitClassifier((28, 28), seed=0).train(train, max_epochs=1, progress_bar=False)
    classifier_seconds = time.perf_counter() - start
    classifier_accuracy = float((classifier.predict(test) == test.labels).mean())
    print(f"classifier: {classifier_accuracy:.2%} test accuracy after {classifier_seconds:.0f} s")

    gans, rows = {}, []
    for loss in LOSSES:
        gan = ImageGAN((28, 28), loss=loss, conditional=True, n_critic=N_CRITIC[loss], seed=0, **ARCHITECTURE)
        start = time.perf_counter()
        gan.train(train, max_epochs=EPOCHS, lr=LR, progress_bar=False)
        seconds = time.perf_counter() - start
        scores = evaluate_image_gan(gan, classifier, train, test, n=N_EVAL, seed=0)
        gans[loss] = gan
        rows.append({"loss": loss, "seconds": seconds, **scores})
        print(loss, f"{seconds:.0f} s", {k: round(v, 3) for k, v in scores["model"].items()})
        plot_training_history(gan.history, FIGURES / f"09_training_{loss}.png")

    # one grid: real digits, the baseline, each GAN; ten columns = digits 0-9
    labels = np.tile(np.arange(10), 4)
    order = np.random.default_rng(0).permutation(len(test))
    real = np.concatenate([test.unit()[order][test.labels[order] == d][:4] for d in range(10)])
    real = real.reshape(10, 4, 28, 28).transpose(1, 0, 2, 3).reshape(40, 28, 28)
    baseline = gaussian_baseline_samples(train.unit(), 40, labels=train.labels, seed=0, intended=labels)
    panels = {"held-out real digits": real, "per-class pixel Gaussian (baseline)": baseline}
    panels.update({f"GAN, {loss} loss": gans[loss].sample(40, labels=labels, seed=0) for loss in LOSSES})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 2.2), constrained_layout=True)
    for ax, (title, images) in zip(axes, panels.items()):
        canvas = images.reshape(4, 10, 28, 28).transpose(0, 2, 1, 3).reshape(4 * 28, 10 * 28)
        ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.savefig(FIGURES / "09_comparison.png", dpi=120)
    plt.close(fig)
    plot_image_grid(
        gans["nonsaturating"].sample(100, labels=np.tile(np.arange(10), 10), seed=1),
        FIGURES / "09_samples.png",
        n_columns=10,
        title="conditional DCGAN, non-saturating loss (column = intended digit)",
    )
    write_markdown(rows, classifier_accuracy, classifier_seconds, len(train))


def write_markdown(rows: list[dict], classifier_accuracy: float, classifier_seconds: float, n_train: int) -> None:
    def line(name: str, s: dict) -> str:
        return (
            f"| {name} | {s['frechet']:.2f} | {s['accuracy']:.3f} | {s['confidence']:.3f} | {s['class_entropy']:.3f} |"
        )

    table = [
        "| images (5,000 each) | classifier-Frechet distance (lower better) | accuracy vs intended digit | "
        "confidence | predicted-class entropy (nats) |",
        "|---|---|---|---|---|",
        line("held-out real test images (floor)", rows[0]["real"]),
        line("per-class pixel Gaussian (baseline)", rows[0]["baseline"]),
    ]
    table += [line(f"GAN, {r['loss']} loss ({r['seconds']:.0f} s)", r["model"]) for r in rows]
    text = TEMPLATE.format(
        epochs=EPOCHS,
        n_train=n_train,
        classifier_accuracy=classifier_accuracy,
        classifier_seconds=classifier_seconds,
        table="\n".join(table),
    )
    (HERE / "09_mnist_gan.md").write_text(text)


TEMPLATE = """# Tutorial 9: a GAN of MNIST digits, judged by a classifier trained here

Generated by `python tutorials/09_mnist_gan.py` (numbers below are from that run, one CPU thread on
a shared machine: the seconds are indicative only).

A GAN has no likelihood to report, and with no internet there is no Inception network for the usual
FID. So the referee is trained here: `sclatent.images.DigitClassifier`, a small CNN
({classifier_accuracy:.1%} MNIST test accuracy after one epoch, {classifier_seconds:.0f} s). Its
penultimate features give a Frechet distance (FID's formula in a digit classifier's space) and its
probabilities give confidence, class coverage and, for a class-conditional generator, whether the
digit drawn is the one asked for.

```python
import numpy as np
import sclatent
from sclatent.images import DigitClassifier, ImageGAN, evaluate_image_gan

train, test = sclatent.datasets.mnist("train"), sclatent.datasets.mnist("test")
gan = ImageGAN((28, 28), architecture="dcgan", loss="nonsaturating", conditional=True)  # or loss="wgan-gp"
gan.train(train, max_epochs={epochs}, lr=1e-3)   # Adam betas (0.5, 0.999), batch 64
digits = gan.sample(100, labels=np.arange(100) % 10, seed=0)   # (100, 28, 28) in [0, 1]
classifier = DigitClassifier((28, 28)).train(train, max_epochs=1)
evaluate_image_gan(gan, classifier, train, test, n=5000)     # model / real / baseline scores
```

The generator maps `z ~ N(0, I)` (64-D) and the one-hot digit through a linear layer to a 7x7 map,
two transposed convolutions (BatchNorm, ReLU) and a sigmoid; the discriminator is two stride-2
convolutions with LeakyReLU and no BatchNorm (the gradient penalty is per image), with projection
conditioning on the digit (Miyato & Koyama 2018). The two players are two parameter groups of the
package's one trainer, each with its own Adam. The non-saturating loss (Goodfellow et al. 2014)
trains the discriminator by binary cross-entropy and the generator to minimise `-log D(G(z))`;
WGAN-GP (Gulrajani et al. 2017) trains a critic with a gradient penalty (weight 10), Adam betas
(0.5, 0.9), here twice per generator step (the paper: five; `n_critic=5` is the default) so that the
generator gets more updates in a short run. `spectral_norm=True` adds spectral normalisation
(Miyato et al. 2018) instead of or besides the penalty. Here both ran {epochs} epochs on all
{n_train} training images with learning rate 1e-3 (DCGAN's 2e-4, the class default, suits long
runs; 1e-3 learnt faster in a few epochs on a subset) and small widths (generator 64-32 channels,
discriminator 32-64) to fit a CPU budget.

![samples](figures/09_samples.png)

![real, baseline and GAN digits](figures/09_comparison.png)

## Scores

Every row compares 5,000 images with the same 5,000 held-out real test images (a random half of
the test set; MNIST's test set is ordered, so never a slice). The floor is the other random half;
the baseline is a model-free generator, a Gaussian with each digit's training-pixel mean and
covariance, clipped to [0, 1]. Equal sample sizes matter: the Frechet estimate is biased upward at
small N.

{table}

How to read it. The pixel Gaussian draws blurry, noisy digits that the classifier nonetheless reads
correctly (its per-class mean dominates), so accuracy alone flatters it; its Frechet distance is
where it is far from real digits. A GAN that has learnt the digits' shapes moves the Frechet
distance towards the floor; the class entropy near log 10 = 2.303 says no digit is missing (no
mode collapse at the class level). These GANs ran only {epochs} epochs on a CPU: their distances
are far from the floor, and published MNIST GANs train for tens of epochs on GPUs. There is no
published number in this feature space: Lucic et al. 2018 ("Are GANs Created Equal?") report MNIST
FIDs with Inception features, a different space and scale, so they are not comparable.

## Training curves

Non-saturating: each player's loss in nats per image and the discriminator's mean probability of
"real" on real and generated images (0.5 each when it cannot tell):

![non-saturating](figures/09_training_nonsaturating.png)

WGAN-GP: the critic's Wasserstein estimate (it falls as the generator improves) and the gradient
penalty:

![WGAN-GP](figures/09_training_wgan-gp.png)

The same from the command line: `sclatent mnist-gan --conditional --out results/gan` (add
`--loss wgan-gp`, `--spectral-norm`, `--architecture mlp`, `--dataset digits` for a run without
MNIST files).
"""


if __name__ == "__main__":
    main()
