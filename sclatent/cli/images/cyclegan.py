"""``sclatent mnist-cyclegan``: CycleGAN between MNIST and a restyled copy, judged by digit classifiers.

Domain A is one random half of the training images, domain B the other half thickened (or
inverted, rotated, thinned): no pairs. After training, classifiers trained on labelled A and B
images read the translations (labels are used for this evaluation only), beside what doing nothing
(the identity map) and the true transform (the oracle) score.
"""

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


def mnist_cyclegan(args: argparse.Namespace) -> dict:
    import numpy as np

    from ...datasets import domain_transform, unpaired_domains
    from ...images import CycleGAN, evaluate_translation
    from ...images.cyclegan import domain_classifier
    from ...images.plotting import plot_translations
    from ...plotting import plot_training_history

    train, test = load_images(args, "mnist-cyclegan")
    domain_a, domain_b = unpaired_domains(train, args.domain, seed=args.seed)
    test_a, test_b = unpaired_domains(test, args.domain, seed=args.seed + 1)
    print(f"  domains: A = {len(domain_a)} images as they are, B = {len(domain_b)} other images ({args.domain})")
    out = output_folder(args)
    model = build_model(CycleGAN, train.shape, args)
    train_seconds = timed_training(model, args, domain_a, domain_b, progress_bar=not args.no_progress)
    # the referees, trained on labelled images of each domain (the full training set, restyled for B)
    with Timer() as referee_timer:
        classifiers = [
            domain_classifier(images, max_epochs=args.classifier_epochs, seed=args.seed, progress_bar=False)
            for images in (train, domain_transform(train, args.domain))
        ]
    report = evaluate_translation(model, test_a, test_b, args.domain, *classifiers)

    model.save(out / "model", overwrite=True)
    show = np.random.default_rng(args.seed).choice(min(len(test_a), len(test_b)), size=12, replace=False)
    a, b = test_a.unit()[show], test_b.unit()[show]
    fake_b, fake_a = model.translate(a, "a_to_b"), model.translate(b, "b_to_a")
    plot_translations(
        [a, fake_b, model.translate(fake_b, "b_to_a"), b, fake_a, model.translate(fake_a, "a_to_b")],
        ["a", "G(a)", "F(G(a))", "b", "F(b)", "G(F(b))"],
        out / "translations.png",
        title=f"CycleGAN, A = digits, B = {args.domain}",
    )
    panels = ["generators_loss", "discriminators_loss", "cycle_a", "cycle_b", "identity_a", "identity_b"]
    plot_training_history(
        model.history, out / "training.png", panels=[p for p in panels if f"train_{p}" in model.history]
    )

    summary = {
        "domain": args.domain,
        "n_a": len(domain_a),
        "n_b": len(domain_b),
        "epochs": len(model.history["epoch"]),
        "train_seconds": train_seconds,
        "classifier_seconds": referee_timer.seconds,
        **report,
    }
    write_summary(out, summary)
    print("\nSummary (held-out test halves; classifier accuracy: identity map / CycleGAN / oracle transform)")
    for direction, label in (("a_to_b", "A -> B"), ("b_to_a", "B -> A")):
        print(
            f"  {label}  accuracy {report[f'identity_accuracy_{direction}']:.3f}"
            f" / {report[f'accuracy_{direction}']:.3f}"
            f" / {report[f'oracle_accuracy_{direction}']:.3f};  Frechet distance to real "
            f"{report[f'frechet_identity_{direction}']:.2f} / {report[f'frechet_{direction}']:.2f}"
            f" / {report[f'frechet_oracle_{direction}']:.2f}"
        )
    print(f"  cycle error |a - F(G(a))| {report['cycle_error_a']:.4f}, |b - G(F(b))| {report['cycle_error_b']:.4f}")
    print(f"  wrote {out / 'model'}, {out / 'translations.png'}, {out / 'training.png'}")
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    from ...datasets import DOMAIN_KINDS
    from ...images import CycleGAN

    parser = commands.add_parser(
        "mnist-cyclegan",
        help="CycleGAN between MNIST and a thickened/inverted/rotated copy (unpaired), with translation accuracy",
        description="Train a CycleGAN between two disjoint halves of MNIST, one restyled; report cycle error, "
        "translation accuracy and Frechet distances beside the identity map and the true transform.",
    )
    add_image_arguments(parser, default_epochs=5, default_n_train=20000, default_lr=5e-4)
    parser.add_argument("--domain", choices=list(DOMAIN_KINDS), default="thicken", help="the restyling of domain B")
    # 8 filters by default here: 4x cheaper than the model's 16, enough for digits in a few epochs
    offered = {"n_filters": 8, "n_residual_blocks": MODEL_DEFAULT, "lambda_cycle": MODEL_DEFAULT}
    offered.update(lambda_identity=MODEL_DEFAULT, gan_loss=MODEL_DEFAULT)
    add_model_arguments(parser, CycleGAN, offered)
    parser.add_argument("--classifier-epochs", type=int, default=1, help="epochs of each domain's digit classifier")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=mnist_cyclegan, batch_size=64)
