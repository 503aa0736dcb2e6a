"""``sclatent mnist-simclr``: contrastive (SimCLR) image representations, judged by a linear probe."""

from __future__ import annotations

import argparse

from ._common import (
    MODEL_DEFAULT,
    add_image_arguments,
    add_model_arguments,
    build_model,
    flat,
    load_images,
    output_folder,
    timed_training,
    write_summary,
)

# the ImageAugmentation settings the command offers (defaults: ImageAugmentation's), and their help
AUGMENTATION_OPTIONS = {
    "crop_min_area": "random resized crop area ~ U(this, 1)",
    "rotation": "largest rotation (degrees)",
    "translation": "largest shift (fraction of the side)",
    "noise_std": "Gaussian pixel noise std",
    "adjacent_probability": "probability that a pair's crops are adjacent",
    "adjacent_shift": "largest offset of adjacent crops (side)",
}


def mnist_simclr(args: argparse.Namespace) -> dict:
    import numpy as np
    from sklearn.decomposition import PCA

    from ...images import SimCLR
    from ...images.metrics import labels_per_class, linear_probe_accuracy
    from ...images.plotting import plot_image_grid, plot_points_by_label
    from ...plotting import plot_training_history

    train, test = load_images(args, "mnist-simclr")
    out = output_folder(args)
    augmentations = {name: getattr(args, name) for name in AUGMENTATION_OPTIONS}
    model = build_model(SimCLR, train.shape, args, augmentations=augmentations)
    train_seconds = timed_training(model, args, train)
    h_train, h_test = model.get_representation(train), model.get_representation(test)
    x_train, x_test = flat(train.unit()), flat(test.unit())
    # PCA at the representation's width: the linear baseline with the same number of features
    pca = PCA(n_components=min(args.n_representation, x_train.shape[1], len(x_train)), random_state=args.seed)
    p_train, p_test = pca.fit_transform(x_train), pca.transform(x_test)
    features = {"simclr": (h_train, h_test), "pca": (p_train, p_test), "pixels": (x_train, x_test)}

    summary = {"train_images": len(train), "test_images": len(test), "epochs": len(model.history["epoch"])}
    summary["train_seconds"] = train_seconds
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
    import inspect

    from ...images import SimCLR
    from ...images.nn.augment import ImageAugmentation

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
    offered = ("n_representation", "n_projection", "temperature", "encoder")
    add_model_arguments(parser, SimCLR, dict.fromkeys(offered, MODEL_DEFAULT))
    augmentation = inspect.signature(ImageAugmentation).parameters
    for name, text in AUGMENTATION_OPTIONS.items():
        option = "--" + name.replace("_", "-")
        parser.add_argument(option, type=float, default=augmentation[name].default, help=text)
    parser.add_argument(
        "--labels-per-class", type=int, default=100, help="also probe with this many labels per class (0: skip)"
    )
    parser.set_defaults(func=mnist_simclr)
