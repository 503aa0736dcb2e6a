"""Tutorial 7: image autoencoders on MNIST: PCA as a linear AE, the AE variants, a masked AE.

Run ``python tutorials/07_image_autoencoders.py``: on a random subset of MNIST (the 8x8 digits
when MNIST is not available) it trains PCA as a linear autoencoder and compares its subspace with
the SVD's, trains each autoencoder variant at the same code size and compares reconstruction and
denoising errors with PCA's, trains a masked autoencoder and compares its linear-probe accuracy
with PCA and raw pixels, then writes ``tutorials/07_image_autoencoders.md`` with the numbers and
figures ``tutorials/figures/07_*.png``. About 3-5 CPU minutes at one thread.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

import sclatent
from sclatent.images import ImageAutoencoder, MaskedImageAutoencoder
from sclatent.images.metrics import linear_probe_accuracy
from sclatent.images.plotting import plot_image_grid

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
N_TRAIN, N_TEST = 10_000, 2_000
K = 32
EPOCHS = 10
VARIANTS = {
    "bottleneck": dict(kind="bottleneck"),
    "sparse": dict(kind="sparse"),
    "contractive": dict(kind="contractive"),
    "tied": dict(kind="tied"),
    "denoising (gaussian 0.3)": dict(kind="denoising", noise="gaussian", noise_rate=0.3),
    "denoising (salt 0.25)": dict(kind="denoising", noise="salt", noise_rate=0.25),
    "denoising (masking 0.25)": dict(kind="denoising", noise="masking", noise_rate=0.25),
}


def load():
    try:
        train, test = sclatent.datasets.mnist("train"), sclatent.datasets.mnist("test")
    except sclatent.datasets.DatasetUnavailableError:
        return sclatent.datasets.digits("train"), sclatent.datasets.digits("test")
    # random subsets, never slices: MNIST's test set is ordered
    return train.subset(N_TRAIN, seed=0), test.subset(N_TEST, seed=0)


def main() -> None:
    FIGURES.mkdir(exist_ok=True)
    torch.set_num_threads(1)
    train, test = load()
    shape = train.shape
    x_train = train.unit().reshape(len(train), -1).astype(np.float64)
    x_test = test.unit().reshape(len(test), -1).astype(np.float64)
    k = min(K, x_train.shape[1] // 2)
    pca = PCA(n_components=k, svd_solver="full").fit(x_train)

    def pca_reconstruct(x):
        return pca.inverse_transform(pca.transform(x.reshape(len(x), -1)))

    pca_test = float(((pca_reconstruct(x_test) - x_test) ** 2).mean())

    # ---- 1. PCA as a linear autoencoder
    linear = ImageAutoencoder(shape, kind="linear", n_latent=k, seed=0)
    start = time.perf_counter()
    linear.train(train, max_epochs=30, batch_size=512, lr=1e-2, progress_bar=False)
    linear.train(train, max_epochs=30, batch_size=512, lr=1e-3, progress_bar=False)
    linear_seconds = time.perf_counter() - start
    angles = np.degrees(subspace_angles(linear.decoder_basis(), pca.components_.T))
    linear_test = float(linear.reconstruction_error(test).mean())
    print(
        f"linear AE: principal angles max {angles.max():.2f} mean {angles.mean():.2f} deg; "
        f"test MSE {linear_test:.5f} vs PCA {pca_test:.5f} ({linear_seconds:.0f} s)"
    )

    # ---- 2. the variants
    shown = test.subset(10, seed=1)
    rows = [shown.unit(), pca_reconstruct(shown.unit()).reshape(10, *shape), linear.reconstruct(shown)]
    labels = ["test image", f"PCA-{k}", "linear AE"]
    results = []
    denoise_rows, denoise_labels = [], []
    models = {}
    for name, options in VARIANTS.items():
        model = ImageAutoencoder(shape, n_latent=k, n_hidden=256, seed=0, **options)
        start = time.perf_counter()
        model.train(train, max_epochs=EPOCHS, progress_bar=False)
        seconds = time.perf_counter() - start
        models[name] = model
        h = model.hyperparameters
        result = {"name": name, "clean": float(model.reconstruction_error(test).mean()), "seconds": seconds}
        if h["noise"] != "none":
            corrupted, _ = model.corrupt(test, seed=0)
            result["corrupted"] = float(model.reconstruction_error(test, noise=h["noise"], seed=0).mean())
            result["pca_corrupted"] = float(((pca_reconstruct(corrupted) - x_test) ** 2).mean())
            result["input_corrupted"] = float(((corrupted.reshape(len(test), -1) - x_test) ** 2).mean())
            plain = models["bottleneck"]
            result["plain_corrupted"] = float(
                plain.reconstruction_error(test, h["noise"], h["noise_rate"], seed=0).mean()
            )
            shown_corrupted, _ = model.corrupt(shown, seed=0)
            denoise_rows += [np.clip(shown_corrupted, 0, 1), model.reconstruct(shown, noise=h["noise"], seed=0)]
            denoise_labels += [f"{h['noise']}-corrupted", "denoised"]
        else:
            rows.append(model.reconstruct(shown))
            labels.append(name)
        result["l1"] = float(np.abs(model.encode(test)).sum(1).mean())
        results.append(result)
        print(name, {key: round(v, 5) for key, v in result.items() if isinstance(v, float)})
    plot_image_grid(
        np.clip(np.concatenate(rows), 0, 1),
        FIGURES / "07_reconstructions.png",
        n_columns=10,
        title="rows: " + " | ".join(labels),
    )
    plot_image_grid(
        np.clip(np.concatenate([shown.unit(), *denoise_rows]), 0, 1),
        FIGURES / "07_denoising.png",
        n_columns=10,
        title="rows: clean | " + " | ".join(denoise_labels),
    )

    # ---- 3. masked autoencoder and linear probes
    patch = 4 if shape[0] % 4 == 0 and shape[0] > 8 else 2
    n_latent = min(64, x_train.shape[1] // 2)
    mae = MaskedImageAutoencoder(shape, patch_size=patch, mask_ratio=0.75, n_latent=n_latent, seed=0)
    start = time.perf_counter()
    mae.train(train, max_epochs=EPOCHS, progress_bar=False)
    mae_seconds = time.perf_counter() - start
    probe = linear_probe_accuracy(
        mae.get_representation(train), train.labels, mae.get_representation(test), test.labels
    )
    pca64 = PCA(n_components=n_latent, svd_solver="full").fit(x_train)
    pca_probe = linear_probe_accuracy(pca64.transform(x_train), train.labels, pca64.transform(x_test), test.labels)
    raw_probe = linear_probe_accuracy(x_train, train.labels, x_test, test.labels)
    dae_probe = linear_probe_accuracy(
        models["denoising (masking 0.25)"].encode(train),
        train.labels,
        models["denoising (masking 0.25)"].encode(test),
        test.labels,
    )
    print(
        f"masked AE probe {probe:.4f}, PCA-{n_latent} {pca_probe:.4f}, raw {raw_probe:.4f}, "
        f"masking DAE code-{k} {dae_probe:.4f} ({mae_seconds:.0f} s)"
    )
    reconstruction, mask = mae.reconstruct(shown, mask_seed=0)
    plot_image_grid(
        np.concatenate([shown.unit() * (1 - mask) + 0.3 * mask, reconstruction, shown.unit()]),
        FIGURES / "07_masked.png",
        n_columns=10,
        title="masked input (grey: hidden) | reconstruction | original",
    )
    mae_masked_mse = float(mae.masked_error(test, mask_seed=0).mean())

    write_markdown(
        train,
        test,
        k,
        angles,
        linear_test,
        pca_test,
        linear_seconds,
        results,
        n_latent,
        patch,
        mae,
        probe,
        pca_probe,
        raw_probe,
        dae_probe,
        mae_seconds,
        mae_masked_mse,
    )


def write_markdown(
    train,
    test,
    k,
    angles,
    linear_test,
    pca_test,
    linear_seconds,
    results,
    n_latent,
    patch,
    mae,
    probe,
    pca_probe,
    raw_probe,
    dae_probe,
    mae_seconds,
    mae_masked_mse,
) -> None:
    variant_rows = "\n".join(
        f"| {r['name']} | {r['clean']:.4f} | {r.get('corrupted', float('nan')):.4f} | "
        f"{r.get('plain_corrupted', float('nan')):.4f} | {r.get('pca_corrupted', float('nan')):.4f} | "
        f"{r.get('input_corrupted', float('nan')):.4f} | {r['l1']:.1f} | {r['seconds']:.0f} |"
        for r in results
    ).replace("nan", "—")
    text = f"""# Tutorial 7: autoencoders on images: PCA, bottleneck, sparse, contractive, tied, denoising, masked

Generated by `python tutorials/07_image_autoencoders.py` (numbers below are from that run: one CPU
thread on a shared machine, {len(train)} random MNIST training and {len(test)} test images; the
seconds are indicative only). The benchmark (`benchmarks/bench_image_autoencoders.py`) runs the
same models on all of MNIST.

```python
from sclatent.datasets import mnist
from sclatent.images import ImageAutoencoder, MaskedImageAutoencoder

train, test = mnist("train"), mnist("test")
pca_ae = ImageAutoencoder((28, 28), kind="linear", n_latent=32).train(train, max_epochs=30, lr=1e-2)
dae = ImageAutoencoder((28, 28), kind="denoising", noise="masking", noise_rate=0.25).train(train)
dae.reconstruction_error(test, noise="masking")   # (N,) squared error per pixel vs the clean images
dae.encode(test)                                  # (N, 32) codes
mae = MaskedImageAutoencoder((28, 28), patch_size=4, mask_ratio=0.75).train(train)
mae.get_representation(test)                      # (N, 64) features for a linear probe
```

`kind` is a preset: `"sparse"` adds an L1 penalty on the code (weight 0.1), `"contractive"` the
squared Frobenius norm of the encoder's Jacobian (weight 0.1, one Hutchinson probe per image, the
function `sclatent.nn.regularisers.contractive_penalty` shared with the count autoencoder),
`"tied"` makes every decoder matrix the transpose of its encoder mirror, `"denoising"` corrupts
the input in training with the core's `InputNoise` (`gaussian`, `salt`, or `masking`, which also
hands the encoder the mask). The non-linear kinds are trained by Bernoulli cross-entropy on the
intensities (sigmoid output; its gradient does not vanish where the output saturates at 0 or 1,
where most MNIST pixels are); the linear kind by squared error, whose optimum is PCA.

## 1. PCA is a linear autoencoder

A linear encoder and decoder trained by squared error on pixel-mean-centred images reach PCA's
optimum: the decoder's columns span the top-{k} principal subspace (Baldi & Hornik 1989), though
not the principal axes themselves (any invertible {k}x{k} mix of the code is as good). After 30
epochs at lr 1e-2 and 30 at 1e-3 (batch 512, {linear_seconds:.0f} s):

- principal angles between the decoder's column space and sklearn's PCA subspace: largest
  **{angles.max():.2f}°**, mean {angles.mean():.2f}°, median {np.median(angles):.2f}° (a random
  {k}-dimensional subspace of R^784 is at ~80-90°);
- test reconstruction error **{linear_test:.5f}** vs PCA's {pca_test:.5f} (squared error per pixel).

The largest angles belong to the last components, whose variances are within a few percent of
their neighbours outside the subspace: the loss barely distinguishes them, so gradient descent
aligns them last (the tests use the 8x8 digits at a larger eigen-gap, and full-batch steps, to
reach < 0.5°).

![reconstructions](figures/07_reconstructions.png)

## 2. The variants at the same code size ({k})

Squared error per pixel on the test images; "corrupted" columns reconstruct seeded corrupted
test images and compare with the clean ones. {EPOCHS} epochs each, one hidden layer of 256 ReLUs
each way, Adam 1e-3, batch 128; "L1 of code" is the mean L1 norm of the test codes.

| model | clean | corrupted | plain AE, same corrupted | PCA-{k} of corrupted | corrupted input | L1 of code | train s |
|---|---|---|---|---|---|---|---|
| PCA-{k} (SVD) | {pca_test:.4f} | | | | | | |
| linear AE | {linear_test:.4f} | | | | | | {linear_seconds:.0f} |
{variant_rows}

![denoising](figures/07_denoising.png)

Reading the table: the denoising models trade a little clean accuracy for robustness to the
corruption they were trained on. The sparse model's code is much smaller in L1 norm, but part
of that is scale (a free decoder can undo a uniformly shrunk code), the same limitation as the
count autoencoder's.

## 3. Masked autoencoder and a linear probe

{patch}x{patch} patches, {mae.module.n_masked} of {mae.module.n_patches} hidden per image (ratio
0.75, He et al. 2022), the loss on the hidden pixels only; a small conv encoder reads the visible
image and the mask ({mae_seconds:.0f} s, {EPOCHS} epochs; test squared error per hidden pixel
{mae_masked_mse:.4f}). A linear probe (standardised logistic regression on the {len(train)} training
labels, frozen features) on the test images:

| features | dim | test accuracy |
|---|---|---|
| masked AE representation | {n_latent} | **{probe:.4f}** |
| PCA | {n_latent} | {pca_probe:.4f} |
| raw pixels | {x_dim(train)} | {raw_probe:.4f} |
| masking-DAE code (section 2) | {k} | {dae_probe:.4f} |

He et al. (2022) report ImageNet only; on MNIST the comparison that matters is with PCA and the
raw pixels, measured here with the same probe (LeCun et al. 1998 list linear classifiers on raw
MNIST pixels at 7.6-12 % test error).

![masked](figures/07_masked.png)
"""
    (HERE / "07_image_autoencoders.md").write_text(text)
    print(f"wrote {HERE / '07_image_autoencoders.md'}")


def x_dim(images) -> int:
    return int(np.prod(images.shape))


if __name__ == "__main__":
    main()
