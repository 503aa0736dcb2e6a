"""``sclatent mnist-vae``: a Bernoulli VAE on binarised MNIST; test NLL (IWAE bound), latent plots, samples."""

from __future__ import annotations

import argparse

from ._common import (
    MODEL_DEFAULT,
    Timer,
    add_image_arguments,
    add_model_arguments,
    build_model,
    load_images,
    output_folder,
    timed_training,
    write_summary,
)

# Burda et al. (2016), Table 1: one stochastic layer (50 units, two deterministic layers of 200),
# trained with the VAE objective (k = 1) for 3,280 passes on dynamically binarised MNIST
REFERENCE_NLL = 86.76


def mnist_vae(args: argparse.Namespace) -> dict:
    import numpy as np

    from ...images.plotting import plot_image_grid, plot_latent_manifold, plot_points_by_label
    from ...images.vae import ImageVAE, pixel_bernoulli_nll
    from ...plotting import plot_training_history

    train, test = load_images(args, "mnist-vae")
    out = output_folder(args)
    model = build_model(ImageVAE, train.shape, args)
    train_seconds = timed_training(model, args, train, validation=test)
    model.save(out / "model", overwrite=True)

    # the same seeded binarisation of the test images that the model's evaluation uses
    test_binary = model.observed(test)
    with Timer() as eval_timer:
        elbo = model.get_elbo(test_binary)
        iwae = model.get_marginal_ll(test_binary, n_samples=args.n_is_samples, seed=args.seed)
    baseline = float(pixel_bernoulli_nll(train, test_binary).mean())

    plot_training_history(model.history, out / "training.png")
    plot_image_grid(model.sample(100, seed=args.seed), out / "samples.png", n_columns=10, title="samples: E[x | z]")
    pairs = np.stack([test_binary[:50], model.reconstruct(test_binary[:50])], axis=1).reshape(100, *train.shape)
    plot_image_grid(pairs, out / "reconstructions.png", n_columns=10, title="binarised test image | reconstruction")
    latent = model.get_latent_representation(test_binary)
    if model.n_latent == 2:
        plot_points_by_label(latent, test.labels, out / "latent.png", title="test set: posterior means")
        grid, coords = model.decode_grid(20)
        plot_latent_manifold(grid, coords, out / "manifold.png", title="E[x | z] over the latent plane")
    else:
        # a 2-D view of a higher-dimensional latent: its first two principal components
        centred = latent - latent.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        plot_points_by_label(
            centred @ vt[:2].T, test.labels, out / "latent.png", title="test set: PCA of posterior means"
        )

    summary = {
        "dataset": train.name,
        "n_train": len(train),
        "n_test": len(test),
        "n_latent": model.n_latent,
        "binarisation": model.hyperparameters["binarisation"],
        "epochs": len(model.history["epoch"]),
        "train_seconds": train_seconds,
        "test_elbo": elbo,
        "test_nll_iwae": -iwae,
        "is_samples": args.n_is_samples,
        "eval_seconds": eval_timer.seconds,
        "baseline_pixel_bernoulli_nll": baseline,
    }
    if args.dataset == "mnist":
        summary["reference_nll_burda2016"] = REFERENCE_NLL
    print("\nSummary (nats per image, lower NLL is better)")
    print(f"  test NLL (IWAE bound, k={args.n_is_samples})  {-iwae:.2f}   (-ELBO {-elbo:.2f})")
    print(f"  independent per-pixel Bernoulli           {baseline:.2f}")
    if args.dataset == "mnist":
        print(
            f"  literature: {REFERENCE_NLL} (Burda et al. 2016, Table 1, same architecture, 3,280 epochs; "
            f"this run: {summary['epochs']})"
        )
    write_summary(out, summary)
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    from ...images import ImageVAE

    parser = commands.add_parser(
        "mnist-vae",
        help="train a Bernoulli VAE on binarised MNIST; test NLL, latent plots, samples",
        description=(
            "Train an MLP VAE with a Bernoulli decoder on dynamically (or fixed) binarised MNIST and "
            "report the test NLL by importance sampling (IWAE bound) beside a per-pixel baseline."
        ),
    )
    add_image_arguments(parser, default_epochs=20)
    add_model_arguments(
        parser,
        ImageVAE,
        {"n_latent": MODEL_DEFAULT, "n_hidden": MODEL_DEFAULT, "n_layers": MODEL_DEFAULT, "binarisation": "dynamic"},
        helps={"n_latent": "latent dimension; 2 adds the latent-plane figures"},
    )
    parser.add_argument("--n-is-samples", type=int, default=1000, help="importance samples k of the IWAE bound")
    parser.set_defaults(func=mnist_vae)
