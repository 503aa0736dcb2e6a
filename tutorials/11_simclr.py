"""Tutorial 11: SimCLR on MNIST, a self-supervised representation judged by a linear probe.

Run ``python tutorials/11_simclr.py`` (with ``SCLATENT_DATA_DIR`` pointing at the folder holding
``MNIST/raw``): it trains :class:`sclatent.images.SimCLR` on a random 10,000 MNIST training images
(no labels), draws augmented views, embeds the test set (t-SNE of SimCLR, PCA and VAE features
coloured by digit), scores every representation with a logistic-regression probe on all labels
and on 100 labels per class, ablates two augmentations (adjacent views, crops), and writes
``tutorials/11_simclr.md`` and ``tutorials/figures/11_*.png``. About 6 CPU minutes at one thread.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

import sclatent
from sclatent.images import ImageVAE, SimCLR
from sclatent.images.metrics import labels_per_class, linear_probe_accuracy
from sclatent.images.plotting import plot_image_grid, plot_points_by_label
from sclatent.plotting import plot_training_history

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
N_TRAIN, EPOCHS, VAE_EPOCHS, N_REPRESENTATION, PER_CLASS, N_TSNE = 10000, 8, 20, 64, 100, 2000
ABLATIONS = {
    "default": {},
    "no adjacent views": {"adjacent_probability": 0.0},
    "no crops (affine, blur, noise only)": {"crop_min_area": 1.0},
}


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    train = sclatent.datasets.mnist("train").subset(N_TRAIN, seed=0)
    test = sclatent.datasets.mnist("test")
    x_train, x_test = train.unit().reshape(len(train), -1), test.unit().reshape(len(test), -1)
    few = labels_per_class(train.labels, PER_CLASS, seed=0)

    features, seconds, models = {}, {}, {}
    for name, augmentations in ABLATIONS.items():
        model = SimCLR((28, 28), n_representation=N_REPRESENTATION, augmentations=augmentations, seed=0)
        if name == "default":
            features["SimCLR, untrained encoder"] = (model.get_representation(train), model.get_representation(test))
        start = time.perf_counter()
        model.train(train, max_epochs=EPOCHS, progress_bar=False, validation=test.subset(2000, seed=1))
        seconds[name] = time.perf_counter() - start
        models[name] = model
        features[f"SimCLR ({name})"] = (model.get_representation(train), model.get_representation(test))
    pca = PCA(N_REPRESENTATION, random_state=0).fit(x_train)
    features[f"PCA-{N_REPRESENTATION}"] = (pca.transform(x_train), pca.transform(x_test))
    features["raw pixels (784)"] = (x_train, x_test)
    vae = ImageVAE((28, 28), n_latent=N_REPRESENTATION, seed=0)
    start = time.perf_counter()
    vae.train(train, max_epochs=VAE_EPOCHS, progress_bar=False)
    seconds["vae"] = time.perf_counter() - start
    features[f"VAE latent-{N_REPRESENTATION}"] = (
        vae.get_latent_representation(train),
        vae.get_latent_representation(test),
    )

    scores = {}
    for name, (f_train, f_test) in features.items():
        scores[name] = (
            linear_probe_accuracy(f_train, train.labels, f_test, test.labels),
            linear_probe_accuracy(f_train[few], train.labels[few], f_test, test.labels),
        )
        print(f"{name:45s} all labels {scores[name][0]:.4f}   {PER_CLASS}/class {scores[name][1]:.4f}")

    model = models["default"]
    plot_views(model, train, FIGURES / "11_views.png")
    plot_training_history(model.history, FIGURES / "11_training.png", panels=["nt_xent"])
    plot_embeddings(features, test, FIGURES / "11_tsne.png")
    plot_probe(scores, FIGURES / "11_probe.png")
    write_markdown(scores, seconds, train, test, model)


def plot_views(model: SimCLR, train, path: Path) -> None:
    """Twelve training digits (top row) and three pairs of views of each (rows below)."""
    images = train.unit()[:12]
    rows = [images]
    for seed in range(3):
        v1, v2 = model.views(images, seed=seed)
        rows += [v1, v2]
    plot_image_grid(np.concatenate(rows), path, n_columns=12, title="digits (top) and three pairs of SimCLR views")


def plot_embeddings(features: dict, test, path: Path) -> None:
    """t-SNE of the test images' features (a random 2,000) for SimCLR, PCA and the VAE latent."""
    keep = np.sort(np.random.default_rng(0).choice(len(test), N_TSNE, replace=False))
    shown = ["SimCLR (default)", f"PCA-{N_REPRESENTATION}", f"VAE latent-{N_REPRESENTATION}"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), constrained_layout=True)
    for ax, name in zip(axes, shown, strict=True):
        f_test = features[name][1][keep]
        f_test = (f_test - f_test.mean(0)) / (f_test.std(0) + 1e-6)
        points = TSNE(2, init="pca", random_state=0, perplexity=30).fit_transform(f_test)
        plot_points_by_label(points, test.labels[keep], ax=ax, title=f"{name}: t-SNE of test images")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_probe(scores: dict, path: Path) -> None:
    names = list(scores)
    positions = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(10, 4.2), constrained_layout=True)
    for offset, (column, label) in zip((-0.2, 0.2), ((0, "all 10,000 labels"), (1, f"{PER_CLASS} labels / class"))):
        values = [scores[n][column] for n in names]
        bars = ax.bar(positions + offset, values, width=0.4, label=label)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(positions, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0.5, 1.05)
    ax.set_ylabel("linear-probe test accuracy")
    ax.legend(loc="lower left")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_markdown(scores: dict, seconds: dict, train, test, model: SimCLR) -> None:
    rows = [
        "| features | dimension | probe, all labels | probe, 100 / class |",
        "|---|---|---|---|",
    ]
    for name, (full, few) in scores.items():
        dim = 784 if name.startswith("raw") else N_REPRESENTATION
        rows.append(f"| {name} | {dim} | {full:.4f} | {few:.4f} |")
    simclr, pca = scores["SimCLR (default)"], scores[f"PCA-{N_REPRESENTATION}"]
    vae, pixels = scores[f"VAE latent-{N_REPRESENTATION}"], scores["raw pixels (784)"]
    untrained = scores["SimCLR, untrained encoder"]
    no_adjacent, no_crop = scores["SimCLR (no adjacent views)"], scores["SimCLR (no crops (affine, blur, noise only))"]
    body = f"""# Tutorial 11: SimCLR on MNIST

Generated by `python tutorials/11_simclr.py` (numbers below are from that run, one CPU thread on
a shared machine: the seconds are indicative only).

SimCLR (Chen et al. 2020) learns a representation without labels: every image is augmented twice,
an encoder maps both views to `h`, a projection head maps `h` to `z`, and NT-Xent asks each view's
`z` to pick its partner among the other `2B - 2` views of the minibatch. The loss and the head are
the very objects the cell contrastive model trains with (`sclatent.nn.contrastive.nt_xent`,
`ProjectionHead`); only the encoder (`sclatent.images.nn.conv.ConvEncoder`) and the augmentations
(`sclatent.images.nn.augment`) are image-specific. The head is thrown away: the representation is
`h` of the clean image.

```python
import sclatent
from sclatent.images import SimCLR
from sclatent.images.metrics import linear_probe_accuracy

train = sclatent.datasets.mnist("train").subset({N_TRAIN}, seed=0)   # labels unused for training
test = sclatent.datasets.mnist("test")
model = SimCLR((28, 28), n_representation={N_REPRESENTATION}, n_projection=32, temperature=0.5)
model.train(train, max_epochs={EPOCHS})                        # batch 256: 510 negatives per anchor
h_train, h_test = model.get_representation(train), model.get_representation(test)
linear_probe_accuracy(h_train, train.labels, h_test, test.labels)
```

The same from the command line: `sclatent mnist-simclr --out runs/simclr` (views, curves, a PCA of
the representation, the probe beside PCA and raw pixels in `summary.json`).

## The views

`ImageAugmentation` draws, per image and on the device, a random resized crop (area >= 60 %,
aspect 3/4 to 4/3), a random affine map (rotation <= 15 deg, shift <= 10 %, zoom 0.9-1.1,
shear <= 10 deg; probability 0.8), a Gaussian blur (sigma <= 1 pixel; probability 0.3) and pixel
noise (std 0.1, clipped to [0, 1]; probability 0.5). Crop and affine are composed into one
`affine_grid` matrix, so each view is resampled once. **Adjacent views**, our reading of the
lecture's term: for half of the pairs the second crop is not drawn independently but is the first
crop moved by at most 15 % of the side, so the two views are overlapping windows at nearby
positions of the same digit (overlap >= `(1 - 0.15 / w)(1 - 0.15 / h)` of the crop, `w, h` its
side fractions; tested). Every strength has an off value, and with all off a view is the image.

![views](figures/11_views.png)

## Training

{len(train)} images, {EPOCHS} epochs, {seconds["default"]:.0f} s. NT-Xent per image falls from
{model.history["train_nt_xent"][0]:.2f} to {model.history["train_nt_xent"][-1]:.2f} nats (chance,
a uniform pick among 511 views, is log 511 = 6.24). The dashed curve is 2,000 held-out test images
on fixed (seeded) views, scored in minibatches of 1,024: each anchor has 2,047 candidates there
(chance log 2047 = 7.62), so its level is not comparable with the training curve's, only its trend.

![training](figures/11_training.png)

## Linear probe

A logistic regression (standardised features) fitted on the training images' features and labels,
scored on all {len(test)} test images; "100 / class" fits it on 1,000 labelled images only (the same
ones for every row). The VAE is `ImageVAE` (Bernoulli, 2 x 200 MLP, {N_REPRESENTATION}-d latent,
posterior means) trained {VAE_EPOCHS} epochs on the same images; PCA has the representation's
width; "untrained encoder" is SimCLR's network at its random initialisation.

{chr(10).join(rows)}

![probe](figures/11_probe.png)

With all labels SimCLR's probe is {100 * (simclr[0] - pca[0]):+.1f} points from PCA's,
{100 * (simclr[0] - pixels[0]):+.1f} from raw pixels' and {100 * (simclr[0] - vae[0]):+.1f} from the
VAE latent's; with 100 labels per class the differences are {100 * (simclr[1] - pca[1]):+.1f},
{100 * (simclr[1] - pixels[1]):+.1f} and {100 * (simclr[1] - vae[1]):+.1f}. Training moved the
encoder {100 * (simclr[0] - untrained[0]):+.1f} points ({100 * (simclr[1] - untrained[1]):+.1f}
with few labels) beyond what its random initialisation already gives: a random conv network is a
strong baseline on MNIST, and it is the baseline that isolates what the contrastive objective learnt.
The ablation rows retrain with one augmentation switched off (same data, epochs and seed): without
adjacent views the probe moves {100 * (no_adjacent[0] - simclr[0]):+.1f} / {100 * (no_adjacent[1] - simclr[1]):+.1f}
points (all labels / 100 per class), without crops {100 * (no_crop[0] - simclr[0]):+.1f} /
{100 * (no_crop[1] - simclr[1]):+.1f}. On centred 28x28 digits at this short budget, neither crops
nor adjacent views are needed: the other augmentations (affine maps, blur, noise) suffice (one seed;
differences of a few tenths of a point are within seed-to-seed noise; the affine maps were not
ablated).

## The representation

t-SNE of 2,000 random test images' features (standardised), coloured by digit:

![t-SNE](figures/11_tsne.png)

The benchmark section (`benchmarks/bench_image_simclr.py`) trains on 20,000 images for longer and
reports the same probe beside these baselines and the literature.
"""
    (HERE / "11_simclr.md").write_text(body)


if __name__ == "__main__":
    main()
