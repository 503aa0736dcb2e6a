"""Tutorial 6: a Bernoulli VAE on binarised MNIST, its 2-D latent space and its test NLL.

Run ``python tutorials/06_mnist_vae.py`` (needs MNIST under ``$SCLATENT_DATA_DIR/MNIST/raw``). It
trains two ``ImageVAE`` s on the 60,000 training digits (dynamic binarisation; a 2-D latent
for the pictures and the 50-D latent of Burda et al. 2016 for the likelihood), draws the test
set in the 2-D latent plane, the decoded digits over that plane and samples of both models, and
prints the test NLL by importance sampling beside a per-pixel baseline. About 2.5 CPU minutes
at one thread; figures go to ``tutorials/figures/06_*.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import sclatent
from sclatent.images import ImageVAE
from sclatent.images.plotting import plot_image_grid, plot_latent_manifold, plot_points_by_label
from sclatent.images.vae import pixel_bernoulli_nll
from sclatent.plotting import plot_training_history

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
EPOCHS = 15
N_IS_IMAGES = 1000  # a seeded random subset of the test set for the k = 1000 bound (~10 s per model)


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    train, test = sclatent.datasets.mnist("train"), sclatent.datasets.mnist("test")
    subset = test.subset(N_IS_IMAGES, seed=0)  # random, never a slice: the test set is ordered

    models = {}
    for n_latent in (2, 50):
        model = ImageVAE(train.shape, n_latent=n_latent, seed=0)
        start = time.perf_counter()
        model.train(train, max_epochs=EPOCHS, validation=subset, progress_bar=False, accelerator="cpu")
        print(f"{n_latent}-d latent: {EPOCHS} epochs in {time.perf_counter() - start:.0f} s")
        models[n_latent] = model

    # one seeded binarisation of the test images, scored by both models and the baseline
    test_binary = models[2].observed(test)
    subset_binary = models[2].observed(subset)
    baseline = pixel_bernoulli_nll(train, test_binary).mean()
    print(f"\ntest NLL, nats per image (lower is better); independent per-pixel Bernoulli: {baseline:.2f}")
    print("| latent | -ELBO (10,000 images) | " + " | ".join(f"IWAE k={k}" for k in (1, 10, 100, 1000)) + " |")
    for n_latent, model in models.items():
        neg_elbo = -model.get_elbo(test_binary)
        bounds = [-model.get_marginal_ll(subset_binary, n_samples=k, seed=0) for k in (1, 10, 100, 1000)]
        print(f"| {n_latent} | {neg_elbo:.2f} | " + " | ".join(f"{b:.2f}" for b in bounds) + " |")

    two_d = models[2]
    latent = two_d.get_latent_representation(test_binary)
    plot_points_by_label(latent, test.labels, FIGURES / "06_latent.png", title="10,000 test digits: posterior means")
    grid, coords = two_d.decode_grid(n=20)
    plot_latent_manifold(grid, coords, FIGURES / "06_manifold.png", title="E[x | z] over the 2-D latent plane")
    samples = np.concatenate([two_d.sample(50, seed=1), models[50].sample(50, seed=1)])
    plot_image_grid(samples, FIGURES / "06_samples.png", n_columns=10, title="samples: 2-D latent (top), 50-D (bottom)")
    pairs = np.stack([subset_binary[:30], models[50].reconstruct(subset_binary[:30])], axis=1)
    title = "binarised test digit | 50-D reconstruction"
    plot_image_grid(pairs.reshape(60, *train.shape), FIGURES / "06_reconstructions.png", n_columns=10, title=title)
    plot_training_history(models[50].history, FIGURES / "06_training.png")


if __name__ == "__main__":
    main()
