"""``sclatent mnist-gan``: a GAN of digits, judged by a digit classifier trained in the same run."""

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


def mnist_gan(args: argparse.Namespace) -> dict:
    from ...images import DigitClassifier, ImageGAN, evaluate_image_gan
    from ...images.plotting import plot_image_grid
    from ...plotting import plot_training_history

    train, test = load_images(args, "mnist-gan")
    out = output_folder(args)
    shape = train.shape
    gan = build_model(ImageGAN, shape, args)
    train_seconds = timed_training(gan, args, train, progress_bar=False)
    with Timer() as classifier_timer:
        classifier = DigitClassifier(shape, seed=args.seed).train(
            train, max_epochs=args.classifier_epochs, accelerator=args.accelerator, progress_bar=False
        )
    classifier_accuracy = float((classifier.predict(test) == test.labels).mean())
    scores = evaluate_image_gan(gan, classifier, train, test, n=args.n_eval, seed=args.seed)
    n_eval = min(args.n_eval, len(test) // 2)

    gan.save(out / "model", overwrite=True)
    labels = (list(range(10)) * 10) if args.conditional else None
    title = f"{args.architecture} GAN, {args.loss}{' + spectral norm' if args.spectral_norm else ''}"
    plot_image_grid(gan.sample(100, labels=labels, seed=args.seed), out / "samples.png", n_columns=10, title=title)
    plot_training_history(gan.history, out / "training.png")

    summary = {
        "architecture": args.architecture,
        "loss": args.loss,
        "spectral_norm": args.spectral_norm,
        "conditional": args.conditional,
        "epochs": len(gan.history["epoch"]),
        "train_seconds": train_seconds,
        "classifier_seconds": classifier_timer.seconds,
        "classifier_test_accuracy": classifier_accuracy,
        "n_eval": n_eval,
    }
    for row, suffix in (("model", ""), ("real", "_real"), ("baseline", "_baseline")):
        summary.update({f"{key}{suffix}": value for key, value in scores[row].items()})
    print(f"\nSample quality by a digit classifier ({classifier_accuracy:.1%} test accuracy), {n_eval} images each:")
    print(f"  {'':28s} {'Frechet':>8s} {'confidence':>10s} {'class H':>8s} {'accuracy':>8s}")
    names = {"model": "GAN samples", "real": "real vs real (floor)", "baseline": "pixel-Gaussian baseline"}
    for row, name in names.items():
        s = scores[row]
        accuracy = f"{s['accuracy']:8.3f}" if "accuracy" in s else f"{'-':>8s}"
        print(f"  {name:28s} {s['frechet']:8.2f} {s['confidence']:10.3f} {s['class_entropy']:8.3f} {accuracy}")
    print(f"  (class H: entropy of the predicted-class histogram; log 10 = {2.302585:.3f} covers all digits equally)")
    write_summary(out, summary)
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    from ...images import ImageGAN

    parser = commands.add_parser(
        "mnist-gan",
        help="train a GAN on MNIST; sample grid, classifier-Frechet distance beside real images and a baseline",
        description=(
            "Train a DCGAN-style (or MLP) GAN with the non-saturating or WGAN-GP loss on MNIST, then judge its "
            "samples with a digit classifier trained in the same run: Frechet distance in the classifier's "
            "feature space, confidence, class coverage and (conditional) accuracy, beside held-out real images "
            "and a pixel-Gaussian generator."
        ),
    )
    add_image_arguments(
        parser, default_epochs=5, lr_help="Adam learning rate (DCGAN's 2e-4 suits long runs; 1e-3 short ones)"
    )
    offered = ("architecture", "loss", "spectral_norm", "conditional", "n_latent", "n_critic")
    add_model_arguments(parser, ImageGAN, dict.fromkeys(offered, MODEL_DEFAULT))
    parser.add_argument("--classifier-epochs", type=int, default=1, help="epochs of the judging digit classifier")
    parser.add_argument("--n-eval", type=int, default=5000, help="images per compared set (at most half the test set)")
    parser.set_defaults(func=mnist_gan, batch_size=64)
