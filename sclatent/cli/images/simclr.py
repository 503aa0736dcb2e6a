"""``sclatent mnist-simclr``: contrastive (SimCLR) image representations, judged by a linear probe."""

from __future__ import annotations

import argparse


def _flat(x):
    return x.reshape(len(x), -1)


def mnist_simclr(args: argparse.Namespace) -> dict:
    import numpy as np
    from sklearn.decomposition import PCA

    from ..images import SimCLR
    from ..metrics.images import labels_per_class, linear_probe_accuracy
    from ..plotting import plot_image_grid, plot_points_by_label, plot_training_history
    from ._images import Timer, load_images, output_folder, write_summary

    train, test = load_images(args, "mnist-simclr")
    out = output_folder(args)
    augmentations = {
        "crop_min_area": args.crop_min_area,
        "rotation": args.rotation,
        "translation": args.translation,
        "noise_std": args.noise_std,
        "adjacent_probability": args.adjacent_probability,
        "adjacent_shift": args.adjacent_shift,
    }
    model = SimCLR(
        train.shape,
        n_representation=args.n_representation,
        n_projection=args.n_projection,
        temperature=args.temperature,
        augmentations=augmentations,
        encoder=args.encoder,
        seed=args.seed,
    )
    with Timer() as timer:
        model.train(
            train, max_epochs=args.max_epochs, batch_size=args.batch_size, accelerator=args.accelerator, lr=args.lr
        )
    h_train, h_test = model.get_representation(train), model.get_representation(test)
    x_train, x_test = _flat(train.unit()), _flat(test.unit())
    # PCA at the representation's width: the linear baseline with the same number of features
    pca = PCA(n_components=min(args.n_representation, x_train.shape[1], len(x_train)), random_state=args.seed)
    p_train, p_test = pca.fit_transform(x_train), pca.transform(x_test)
    features = {"simclr": (h_train, h_test), "pca": (p_train, p_test), "pixels": (x_train, x_test)}

    summary = {"train_images": len(train), "test_images": len(test), "epochs": len(model.history["epoch"])}
    summary["train_seconds"] = timer.seconds
    summary["train_nt_xent"] = model.history["train_nt_xent"][-1]
    for name, (f_train, f_test) in features.items():
        summary[f"probe_accuracy_{name}"] = linear_probe_accuracy(f_train, train.labels, f_test, test.labels)
    if args.labels_per_class:
        try:
            few = labels_per_class(train.labels, args.labels_per_class, seed=args.seed)
        except ValueError as err:
            print(f"  (few-label probe skipped: {err})")
        else:
            for name, (f_train, f_test) in features.items():
                summary[f"probe_accuracy_{name}_{args.labels_per_class}_per_class"] = linear_probe_accuracy(
                    f_train[few], train.labels[few], f_test, test.labels
                )

    model_dir = model.save(out / "model", overwrite=True)
    v1, v2 = model.views(train.unit()[:12], seed=args.seed)
    grid = np.concatenate([train.unit()[:12], v1, v2])
    plot_image_grid(grid, out / "views.png", n_columns=12, title="images (top), first and second views")
    plot_training_history(model.history, out / "training.png", panels=["nt_xent"])
    h2 = PCA(n_components=2, random_state=args.seed).fit_transform(h_test)
    plot_points_by_label(h2, test.labels, out / "representation_pca.png", title="SimCLR representation (PCA)")
    print("\nSummary")
    write_summary(out, summary)
    print(
        f"  linear probe    SimCLR {summary['probe_accuracy_simclr']:.4f} | PCA-{pca.n_components_} "
        f"{summary['probe_accuracy_pca']:.4f} | raw pixels {summary['probe_accuracy_pixels']:.4f} (test accuracy)"
    )
    print(f"  wrote           {model_dir}/ (model), views.png, training.png, representation_pca.png")
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    from ._images import add_image_arguments

    parser = commands.add_parser(
        "mnist-simclr",
        help="train SimCLR on MNIST; linear-probe accuracy beside PCA and raw pixels; views and plots",
        description=(
            "Self-supervised SimCLR (augmented views + NT-Xent) on MNIST (or --dataset digits); the representation "
            "is scored by a logistic-regression probe on the test labels, beside PCA at the same width and raw pixels."
        ),
    )
    add_image_arguments(parser, default_epochs=15, default_n_train=20000)
    parser.set_defaults(batch_size=256)  # NT-Xent's negatives are the minibatch
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-representation", type=int, default=64)
    parser.add_argument("--n-projection", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--encoder", choices=["conv", "mlp"], default="conv")
    parser.add_argument("--crop-min-area", type=float, default=0.6, help="random resized crop area ~ U(this, 1)")
    parser.add_argument("--rotation", type=float, default=15.0, help="largest rotation (degrees)")
    parser.add_argument("--translation", type=float, default=0.1, help="largest shift (fraction of the side)")
    parser.add_argument("--noise-std", type=float, default=0.1, help="Gaussian pixel noise std")
    parser.add_argument(
        "--adjacent-probability", type=float, default=0.5, help="probability that a pair's crops are adjacent"
    )
    parser.add_argument("--adjacent-shift", type=float, default=0.15, help="largest offset of adjacent crops (side)")
    parser.add_argument(
        "--labels-per-class", type=int, default=100, help="also probe with this many labels per class (0: skip)"
    )
    parser.set_defaults(func=mnist_simclr)
