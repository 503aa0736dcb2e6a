"""Image autoencoders on MNIST: PCA as a linear AE, the AE variants beside PCA, the masked AE's linear probe.

Run from the repository root (or through ``benchmarks/bench_images.py``)::

    PYTHONPATH=. SCLATENT_DATA_DIR=../shared/data python benchmarks/bench_image_autoencoders.py [--quick] [--seed 0]

Protocol (one seed; intensities in [0, 1]; errors are squared error per pixel on the 10,000 test images):

- Linear AE (:class:`sclatent.images.ImageAutoencoder`, ``kind="linear"``, code ``K``): squared
  error on pixel-mean-centred images, Adam batch 1024, ``LINEAR_EPOCHS[0]`` epochs at lr 1e-2 then
  ``LINEAR_EPOCHS[1]`` at 1e-3. Rows: the largest principal angle between its decoder's column
  space and the top-``K`` principal subspace of the training images (sklearn PCA), the mean angle
  beside it; its test error beside PCA's. Reference: 0 degrees and PCA's error exactly, the optimum
  of the linear AE's squared error (Baldi & Hornik 1989); MNIST's eigen-gaps near ``K`` are small
  (ratios ~1.04-1.1), so minibatch Adam approaches the subspace slowly and the smallest directions
  are the last to align.
- AE variants (``bottleneck``, ``sparse``, ``contractive``, ``tied``, denoising with ``gaussian``
  (sd 0.3), ``salt`` and ``masking`` (25 % of pixels)), code ``K``, one hidden layer of 256 ReLUs
  each way, Bernoulli cross-entropy, Adam 1e-3 batch 128, ``AE_EPOCHS`` epochs. Row: the test
  error on clean images beside PCA-``K``'s; for the denoising kinds a second row: the error of
  reconstructions of *corrupted* test images (seeded) against the clean ones, beside PCA's
  projection of the same corrupted images and the corrupted images themselves. No literature
  number fits these settings (papers report other codes, losses and epochs): PCA measured here is
  the baseline.
- Masked AE (:class:`sclatent.images.MaskedImageAutoencoder`): 4x4 patches, 75 % hidden, conv
  encoder, 64-d representation, ``MAE_EPOCHS`` epochs. Row: linear-probe accuracy
  (:func:`sclatent.images.metrics.linear_probe_accuracy`: standardised features, multinomial
  logistic regression fitted on the 60,000 training labels) on the test set, beside PCA-64 and the
  raw pixels with the same probe. Literature: He et al. (2022), *Masked Autoencoders Are Scalable
  Vision Learners*, report ImageNet only (ViT encoders, 800-1600 epochs), no MNIST number; the
  reference given is a linear classifier on raw MNIST pixels, LeCun et al. (1998), *Gradient-based
  learning applied to document recognition*, Fig. 9 / Appendix C: 12.0 % test error for a linear
  classifier (1-layer network), 7.6 % for the pairwise linear classifier, i.e. 88-92.4 % accuracy.

CPU budget: about 5 minutes at 2 threads on an idle machine in full mode, sized from 1-thread
measurements on a shared (busy) 2-core machine: ~2 s per epoch of the linear AE, ~7.5 s per epoch
of an MLP AE (10 s contractive), ~33 s per epoch of the masked AE, on the 60,000 training images;
roughly 40 + 7 x 3 x 8 + 5 x 33 s plus the probes at one busy thread. With a GPU (CUDA available)
every model trains ``GPU_FACTOR`` times as many epochs (not yet run).
"""

from __future__ import annotations

import argparse
import time

K = 32
LINEAR_EPOCHS = (10, 10)
AE_EPOCHS = 3
MAE_EPOCHS = 5
MAE_LATENT = 64
GPU_FACTOR = 10
QUICK = {"n_train": 3000, "n_test": 1000, "linear_epochs": (10, 5), "ae_epochs": 2, "mae_epochs": 2}
VARIANTS = {
    "bottleneck": dict(kind="bottleneck"),
    "sparse": dict(kind="sparse"),
    "contractive": dict(kind="contractive"),
    "tied": dict(kind="tied"),
    "denoising-gaussian": dict(kind="denoising", noise="gaussian", noise_rate=0.3),
    "denoising-salt": dict(kind="denoising", noise="salt", noise_rate=0.25),
    "denoising-masking": dict(kind="denoising", noise="masking", noise_rate=0.25),
}
PROBE_REFERENCE = 0.924
PROBE_REFERENCE_TEXT = (
    "no MNIST number for MAE (He et al. 2022 report ImageNet only); a linear classifier on raw pixels: "
    "88.0 % (1-layer network, 12.0 % error) to 92.4 % (pairwise linear, 7.6 % error)"
)
PROBE_REFERENCE_SOURCE = "LeCun, Bottou, Bengio & Haffner 1998 (Proc. IEEE), Fig. 9 / Appendix C, linear classifiers"


def _load(quick: bool, seed: int, data_dir):
    import sclatent

    try:
        train, test = sclatent.datasets.mnist("train", data_dir), sclatent.datasets.mnist("test", data_dir)
    except sclatent.datasets.DatasetUnavailableError as err:
        if not quick:
            raise
        print(f"MNIST unavailable ({err}); quick run on the 8x8 digits")
        return sclatent.datasets.digits("train"), sclatent.datasets.digits("test")
    if quick:
        # random subsets, never slices: the test set is ordered (the first 5,000 are cleaner)
        train, test = train.subset(QUICK["n_train"], seed=seed), test.subset(QUICK["n_test"], seed=seed)
    return train, test


def _row(metric, value, unit, lower, beside, seconds, settings, reference=None, text="", source="") -> dict:
    return {
        "family": "image_autoencoders",
        "metric": metric,
        "value": float(value),
        "unit": unit,
        "lower_is_better": lower,
        "reference": reference,
        "reference_text": text,
        "reference_source": source,
        "beside": {k: float(v) for k, v in beside.items()},
        "train_seconds": float(seconds),
        "settings": settings,
    }


def run(quick: bool = False, seed: int = 0, data_dir=None) -> list[dict]:
    """Rows: linear AE angles and error, each variant's (denoising) error beside PCA, the MAE probe."""
    import numpy as np
    import torch
    from scipy.linalg import subspace_angles
    from sklearn.decomposition import PCA

    from sclatent.images import ImageAutoencoder, MaskedImageAutoencoder
    from sclatent.images.metrics import linear_probe_accuracy

    gpu = torch.cuda.is_available() and not quick
    factor = GPU_FACTOR if gpu else 1
    device = "cuda" if gpu else f"cpu, torch threads {torch.get_num_threads()}"
    train, test = _load(quick, seed, data_dir)
    shape = train.shape
    k = min(K, int(np.prod(shape)) // 2)
    x_train, x_test = (s.unit().reshape(len(s), -1).astype(np.float64) for s in (train, test))
    pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(x_train)

    def pca_error(x):
        return float(((pca.inverse_transform(pca.transform(x)) - x_test) ** 2).mean())

    pca_test = pca_error(x_test)
    data = f"{len(train)} {train.name} / {len(test)} {test.name}"
    rows = []

    # ---- PCA as a linear autoencoder
    epochs = QUICK["linear_epochs"] if quick else tuple(e * factor for e in LINEAR_EPOCHS)
    linear = ImageAutoencoder(shape, kind="linear", n_latent=k, seed=seed)
    start = time.perf_counter()
    linear.train(train, max_epochs=epochs[0], batch_size=1024, lr=1e-2, progress_bar=False)
    linear.train(train, max_epochs=epochs[1], batch_size=1024, lr=1e-3, progress_bar=False)
    seconds = time.perf_counter() - start
    angles = np.degrees(subspace_angles(linear.decoder_basis(), pca.components_.T))
    settings = (
        f"{data}; code {k}; Adam batch 1024, {epochs[0]} epochs lr 1e-2 + {epochs[1]} lr 1e-3; seed {seed}; {device}"
    )
    rows.append(
        _row(
            f"linear AE: largest principal angle to the top-{k} PCA subspace",
            angles.max(),
            "degrees",
            True,
            {"mean principal angle": angles.mean(), "median principal angle": np.median(angles)},
            seconds,
            settings,
            0.0,
            "0 degrees: the linear AE's squared-error optimum spans the top principal subspace",
            "Baldi & Hornik 1989 (Neural Networks 2), Theorem / Fact 4",
        )
    )
    rows.append(
        _row(
            f"linear AE: test reconstruction error, code {k}",
            linear.reconstruction_error(test).mean(),
            "MSE per pixel",
            True,
            {f"PCA-{k} (sklearn, same training images)": pca_test},
            seconds,
            settings,
            pca_test,
            f"PCA-{k}'s test error, measured here: the linear AE's optimum",
            "Baldi & Hornik 1989 (Neural Networks 2)",
        )
    )

    # ---- non-linear variants
    epochs = QUICK["ae_epochs"] if quick else AE_EPOCHS * factor
    plain = None
    for name, options in VARIANTS.items():
        model = ImageAutoencoder(shape, n_latent=k, n_hidden=256, seed=seed, **options)
        start = time.perf_counter()
        model.train(train, max_epochs=epochs, batch_size=128, lr=1e-3, progress_bar=False)
        seconds = time.perf_counter() - start
        h = model.hyperparameters
        settings = (
            f"{data}; {h['kind']} AE 784-256-{k}-256-784 ReLU, Bernoulli CE, noise {h['noise']} {h['noise_rate']}, "
            f"sparsity {h['sparsity']}, contractive {h['contractive']}, tied {h['tied_weights']}; Adam 1e-3 batch 128, "
            f"{epochs} epochs; seed {seed}; {device}"
        )
        rows.append(
            _row(
                f"{name} AE: test reconstruction error, code {k}",
                model.reconstruction_error(test).mean(),
                "MSE per pixel",
                True,
                {f"PCA-{k}": pca_test},
                seconds,
                settings,
                text="no literature number for these settings; PCA at the same code size measured here",
            )
        )
        if h["noise"] != "none":
            corrupted, _ = model.corrupt(test, seed=seed)
            flat = corrupted.reshape(len(test), -1).astype(np.float64)
            rows.append(
                _row(
                    f"{name} AE: error on {h['noise']}-corrupted test images ({h['noise_rate']}), code {k}",
                    model.reconstruction_error(test, noise=h["noise"], seed=seed).mean(),
                    "MSE per pixel",
                    True,
                    {
                        f"PCA-{k} projection of the corrupted images": pca_error(flat),
                        "corrupted images themselves": float(((flat - x_test) ** 2).mean()),
                        # the plain AE (trained first, on clean images) given the same corrupted images
                        "bottleneck AE on the same corrupted images": float(
                            plain.reconstruction_error(
                                test, noise=h["noise"], noise_rate=h["noise_rate"], seed=seed
                            ).mean()
                        ),
                    },
                    seconds,
                    settings,
                    text="no literature number for these settings; PCA and the plain AE measured here",
                )
            )
        if name == "bottleneck":
            plain = model

    # ---- masked autoencoder, linear probe
    epochs = QUICK["mae_epochs"] if quick else MAE_EPOCHS * factor
    patch = 4 if shape[0] % 4 == 0 and shape[0] > 8 else 2
    n_latent = min(MAE_LATENT, int(np.prod(shape)) // 2)
    mae = MaskedImageAutoencoder(shape, patch_size=patch, mask_ratio=0.75, n_latent=n_latent, seed=seed)
    start = time.perf_counter()
    mae.train(train, max_epochs=epochs, batch_size=128, lr=1e-3, progress_bar=False)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = linear_probe_accuracy(
        mae.get_representation(train), train.labels, mae.get_representation(test), test.labels
    )
    pca_mae = PCA(n_components=n_latent, svd_solver="full", random_state=seed).fit(x_train)
    pca_accuracy = linear_probe_accuracy(
        pca_mae.transform(x_train), train.labels, pca_mae.transform(x_test), test.labels
    )
    raw_accuracy = linear_probe_accuracy(x_train, train.labels, x_test, test.labels)
    probe_seconds = time.perf_counter() - start
    rows.append(
        _row(
            f"masked AE: linear-probe test accuracy ({n_latent}-d representation)",
            accuracy,
            "accuracy",
            False,
            {f"PCA-{n_latent}": pca_accuracy, f"raw pixels ({x_train.shape[1]}-d)": raw_accuracy},
            seconds,
            (
                f"{data}; {patch}x{patch} patches, 75 % ({mae.module.n_masked} of {mae.module.n_patches}) hidden, "
                f"conv encoder, Bernoulli CE on hidden pixels, Adam 1e-3 batch 128, {epochs} epochs; probe: "
                f"standardised logistic regression on all training labels ({probe_seconds:.0f} s for the three "
                f"probes); seed {seed}; {device}"
            ),
            PROBE_REFERENCE,
            PROBE_REFERENCE_TEXT,
            PROBE_REFERENCE_SOURCE,
        )
    )
    return rows


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3,000 / 1,000 images, 2-15 epochs (< 60 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for row in run(quick=args.quick, seed=args.seed):
        beside = ", ".join(f"{k} {v:.4g}" for k, v in row["beside"].items())
        print(f"{row['metric']}: {row['value']:.4g} {row['unit']} | {beside}")
        if row["reference"] is not None:
            print(f"    reference: {row['reference_text']} [{row['reference_source']}]")
            print(f"    gap: {row['value'] - row['reference']:+.4g}")
        print(f"    training {row['train_seconds']:.0f} s; {row['settings']}")


if __name__ == "__main__":
    main()
