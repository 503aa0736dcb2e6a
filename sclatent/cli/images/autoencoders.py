"""``sclatent mnist-ae`` (PCA-as-AE, bottleneck, sparse, contractive, tied, denoising) and ``sclatent mnist-mae``.

Both print their numbers beside PCA fitted (by SVD) on the same training images at the same
code size: ``mnist-ae`` the test reconstruction error (and for a corruption the error on
corrupted test images), ``mnist-mae`` the linear-probe accuracy (with raw pixels too).
"""

from __future__ import annotations

import argparse

from ._common import (
    MODEL_DEFAULT,
    Timer,
    add_image_arguments,
    add_model_arguments,
    build_model,
    flat,
    load_images,
    output_folder,
    timed_training,
    write_summary,
)


def mnist_ae(args: argparse.Namespace) -> dict:
    import numpy as np
    from scipy.linalg import subspace_angles
    from sklearn.decomposition import PCA

    from ...images.autoencoder import ImageAutoencoder
    from ...images.plotting import plot_image_grid
    from ...plotting import plot_training_history

    train, test = load_images(args, "mnist-ae")
    out = output_folder(args)
    model = build_model(ImageAutoencoder, train.shape, args)
    train_seconds = timed_training(model, args, train, validation=test)
    model.save(out / "model", overwrite=True)

    x_train, x_test = flat(train.unit()), flat(test.unit())
    pca = PCA(n_components=args.n_latent, svd_solver="full").fit(x_train)
    noise = model.hyperparameters["noise"]
    summary = {
        "dataset": train.name,
        "kind": args.kind,
        "n_train": len(train),
        "n_test": len(test),
        "n_latent": args.n_latent,
        "noise": noise,
        "noise_rate": model.hyperparameters["noise_rate"],
        "epochs": len(model.history["epoch"]),
        "train_seconds": train_seconds,
        "test_mse": float(model.reconstruction_error(test).mean()),
        "pca_test_mse": float(((pca.inverse_transform(pca.transform(x_test)) - x_test) ** 2).mean()),
    }
    if args.kind == "linear":
        angles = np.degrees(subspace_angles(model.decoder_basis(), pca.components_.T))
        summary["max_principal_angle_deg"] = float(angles.max())
        summary["mean_principal_angle_deg"] = float(angles.mean())
    shown = test.subset(min(10, len(test)), seed=args.seed)
    rows = [shown.unit()]
    titles = "test image"
    if noise != "none":
        rate = model.hyperparameters["noise_rate"]
        summary["test_mse_corrupted"] = float(model.reconstruction_error(test, noise=noise, seed=args.seed).mean())
        # PCA "denoises" by projecting the corrupted image (its mean fills nothing in for hidden pixels)
        corrupted, _ = model.corrupt(test, noise, rate, seed=args.seed)
        flat_corrupted = flat(corrupted)
        summary["pca_test_mse_corrupted"] = float(
            ((pca.inverse_transform(pca.transform(flat_corrupted)) - x_test) ** 2).mean()
        )
        summary["corrupted_input_mse"] = float(((flat_corrupted - x_test) ** 2).mean())
        rows.append(np.clip(model.corrupt(shown, noise, rate, seed=args.seed)[0], 0, 1))
        rows.append(model.reconstruct(shown, noise=noise, seed=args.seed))
        titles += f" | {noise}-corrupted | reconstruction"
    else:
        rows.append(model.reconstruct(shown))
        titles += " | reconstruction"
    rows.append(
        pca.inverse_transform(pca.transform(shown.unit().reshape(len(shown), -1))).reshape(len(shown), *train.shape)
    )
    titles += f" | PCA-{args.n_latent}"
    grid = np.clip(np.concatenate(rows), 0.0, 1.0)
    plot_image_grid(grid, out / "reconstructions.png", n_columns=len(shown), title=titles)
    plot_training_history(model.history, out / "training.png")

    print("\nSummary (squared error per pixel, intensities in [0, 1]; lower is better)")
    print(
        f"  {args.kind} AE, code {args.n_latent}: test {summary['test_mse']:.5f}   PCA-{args.n_latent}: "
        f"{summary['pca_test_mse']:.5f}"
    )
    if noise != "none":
        print(
            f"  {noise}-corrupted test images: AE {summary['test_mse_corrupted']:.5f}   PCA projection "
            f"{summary['pca_test_mse_corrupted']:.5f}   corrupted input itself {summary['corrupted_input_mse']:.5f}"
        )
    if args.kind == "linear":
        print(
            f"  principal angles to PCA's subspace: max {summary['max_principal_angle_deg']:.2f} deg, "
            f"mean {summary['mean_principal_angle_deg']:.2f} deg"
        )
    write_summary(out, summary)
    return summary


def mnist_mae(args: argparse.Namespace) -> dict:
    import numpy as np
    from sklearn.decomposition import PCA

    from ...images.masked import MaskedImageAutoencoder
    from ...images.metrics import linear_probe_accuracy
    from ...images.plotting import plot_image_grid
    from ...plotting import plot_training_history

    train, test = load_images(args, "mnist-mae")
    out = output_folder(args)
    model = build_model(MaskedImageAutoencoder, train.shape, args)
    train_seconds = timed_training(model, args, train, validation=test)
    model.save(out / "model", overwrite=True)
    x_train, x_test = flat(train.unit()), flat(test.unit())
    with Timer() as probe_timer:
        accuracy = linear_probe_accuracy(
            model.get_representation(train), train.labels, model.get_representation(test), test.labels
        )
        pca = PCA(n_components=args.n_latent, svd_solver="full").fit(x_train)
        pca_accuracy = linear_probe_accuracy(pca.transform(x_train), train.labels, pca.transform(x_test), test.labels)
        raw_accuracy = linear_probe_accuracy(x_train, train.labels, x_test, test.labels)
    shown = test.subset(min(10, len(test)), seed=args.seed)
    reconstruction, mask = model.reconstruct(shown, mask_seed=args.seed)
    grid = np.concatenate([shown.unit() * (1 - mask) + 0.25 * mask, reconstruction, shown.unit()])
    plot_image_grid(
        grid,
        out / "reconstructions.png",
        n_columns=len(shown),
        title="masked input (grey: hidden) | reconstruction | original",
    )
    plot_training_history(model.history, out / "training.png")
    summary = {
        "dataset": train.name,
        "n_train": len(train),
        "n_test": len(test),
        "encoder": args.encoder,
        "patch_size": args.patch_size,
        "mask_ratio": args.mask_ratio,
        "n_masked_patches": model.module.n_masked,
        "n_latent": args.n_latent,
        "epochs": len(model.history["epoch"]),
        "train_seconds": train_seconds,
        "probe_seconds": probe_timer.seconds,
        "linear_probe_accuracy": accuracy,
        "pca_linear_probe_accuracy": pca_accuracy,
        "raw_pixel_linear_probe_accuracy": raw_accuracy,
        "test_masked_mse": float(model.masked_error(test, mask_seed=args.seed).mean()),
    }
    print("\nSummary (linear probe: logistic regression on frozen features, test accuracy)")
    print(f"  masked AE representation ({args.n_latent}-d): {accuracy:.4f}")
    print(f"  PCA ({args.n_latent}-d):                       {pca_accuracy:.4f}")
    print(f"  raw pixels ({x_train.shape[1]}-d):                {raw_accuracy:.4f}")
    write_summary(out, summary)
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    from ...images import ImageAutoencoder, MaskedImageAutoencoder

    parser = commands.add_parser(
        "mnist-ae",
        help="train an image autoencoder (linear/PCA, bottleneck, sparse, contractive, tied, denoising) on MNIST",
        description=(
            "Train an autoencoder on MNIST and report its test reconstruction error (and denoising error) "
            "beside PCA at the same code size; the linear kind also reports principal angles to PCA's subspace."
        ),
    )
    add_image_arguments(parser, default_epochs=10)
    offered = ("kind", "noise", "noise_rate", "n_latent", "n_hidden", "n_layers")
    add_model_arguments(parser, ImageAutoencoder, dict.fromkeys(offered, MODEL_DEFAULT))
    parser.set_defaults(func=mnist_ae)

    parser = commands.add_parser(
        "mnist-mae",
        help="train a masked autoencoder on MNIST; linear-probe accuracy beside PCA and raw pixels",
        description=(
            "Hide random patches of MNIST digits, train an autoencoder to fill them in, and evaluate its "
            "representation by a linear probe on held-out labels beside PCA (same size) and raw pixels."
        ),
    )
    add_image_arguments(parser, default_epochs=10)
    offered = ("patch_size", "mask_ratio", "n_latent", "encoder")
    add_model_arguments(parser, MaskedImageAutoencoder, dict.fromkeys(offered, MODEL_DEFAULT))
    parser.set_defaults(func=mnist_mae)
