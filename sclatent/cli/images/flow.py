"""``sclatent mnist-flow`` (multi-scale Glow on dequantised MNIST: bits/dim, samples) and ``sclatent toy-flow``
(a planar flow fitted to a 2-D energy of Rezende & Mohamed 2015 by reverse KL)."""

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

# MNIST test bits/dim as tabulated by Grathwohl et al. (2019, FFJORD, ICLR), Table 2: Glow 1.05, RealNVP 1.06
# (the Glow and RealNVP papers' own tables report CIFAR-10 / ImageNet / LSUN, not MNIST)
REFERENCE_GLOW = 1.05
REFERENCE_REALNVP = 1.06


def mnist_flow(args: argparse.Namespace) -> dict:
    from ...images.flow import ImageFlow, pixel_histogram_bits_per_dim
    from ...images.plotting import plot_image_grid
    from ...plotting import plot_training_history

    train, test = load_images(args, "mnist-flow")
    out = output_folder(args)
    model = build_model(ImageFlow, train.shape, args, levels=train.levels)
    train_seconds = timed_training(model, args, train, validation=test)
    model.save(out / "model", overwrite=True)
    with Timer() as eval_timer:
        test_bpd = model.bits_per_dim(test, seed=args.seed)
    baseline = pixel_histogram_bits_per_dim(train, test)
    plot_training_history(model.history, out / "training.png", panels=["bits_per_dim"])
    for temperature in sorted({1.0, args.temperature}):
        plot_image_grid(
            model.sample(100, temperature=temperature, seed=args.seed),
            out / f"samples_T{temperature:g}.png",
            n_columns=10,
            title=f"flow samples, temperature {temperature:g}",
        )
    summary = {
        "dataset": train.name,
        "n_train": len(train),
        "n_test": len(test),
        "levels": train.levels,
        "n_scales": args.n_scales,
        "n_steps": args.n_steps,
        "epochs": len(model.history["epoch"]),
        "train_seconds": train_seconds,
        "test_bits_per_dim": test_bpd,
        "eval_seconds": eval_timer.seconds,
        "baseline_pixel_histogram_bits_per_dim": baseline,
    }
    if args.dataset == "mnist":
        summary["reference_glow_bits_per_dim"] = REFERENCE_GLOW
    print("\nSummary (bits per dimension of the test images, lower is better)")
    print(f"  flow (dequantised, {train.levels} levels)     {test_bpd:.3f}")
    print(f"  independent per-pixel histogram      {baseline:.3f}")
    if args.dataset == "mnist":
        print(
            f"  literature: Glow {REFERENCE_GLOW}, RealNVP {REFERENCE_REALNVP} (as tabulated in Grathwohl et al. 2019, "
            f"FFJORD, Table 2), far larger models trained on GPUs; this run: {summary['epochs']} epochs, "
            f"{train_seconds:.0f} s"
        )
    write_summary(out, summary)
    return summary


def toy_flow(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from ...datasets import density_grid, energy
    from ...images.flow import EnergyFlow
    from ...images.plotting import plot_density_panels

    out = output_folder(args)
    print(f"sclatent toy-flow: planar flow with {args.n_flows} layers fitted to {args.energy} by reverse KL")
    model = build_model(EnergyFlow, (2,), args)
    kl_before = model.reverse_kl(seed=args.seed + 1)
    train_seconds = timed_training(model, args, n_samples=args.n_samples)
    model.save(out / "model", overwrite=True)
    kl = model.reverse_kl(seed=args.seed + 1)
    grid = density_grid(4.0, 150)
    target = torch.exp(-energy(args.energy)(grid)).numpy()
    fitted = np.exp(model.log_prob(grid.reshape(-1, 2).numpy())).reshape(grid.shape[:2])
    plot_density_panels(
        [[target], [fitted]],
        (-4, 4, -4, 4),
        out / "density.png",
        row_titles=[f"exp(-{args.energy})", f"planar flow, K={args.n_flows}"],
    )
    log_z = model.module.log_z
    summary = {
        "energy": args.energy,
        "n_flows": args.n_flows,
        "epochs": len(model.history["epoch"]),
        "train_seconds": train_seconds,
        "log_normaliser": log_z,
        "elbo_log_z": log_z - kl,
        "reverse_kl": kl,
        "reverse_kl_at_init": kl_before,
    }
    print("\nSummary (nats)")
    print(f"  reverse KL(q || p)     {kl:.4f}   (the initial standard normal: {kl_before:.4f})")
    print(f"  ELBO of log Z          {log_z - kl:.4f}   (log Z by quadrature {log_z:.4f})")
    write_summary(out, summary)
    return summary


def add_command(commands: argparse._SubParsersAction) -> None:
    from ...images import EnergyFlow, ImageFlow

    parser = commands.add_parser(
        "mnist-flow",
        help="train a multi-scale Glow on dequantised MNIST; test bits/dim, samples",
        description=(
            "Train a multi-scale RealNVP/Glow flow (actnorm, LU 1x1 convolutions, affine couplings) on "
            "dequantised MNIST and report test bits/dim beside an independent per-pixel histogram."
        ),
    )
    add_image_arguments(parser, default_epochs=5)
    # (levels: the data's)
    add_model_arguments(parser, ImageFlow, dict.fromkeys(("n_scales", "n_steps", "n_hidden", "mask"), MODEL_DEFAULT))
    parser.add_argument("--temperature", type=float, default=0.7, help="a second sample grid at this temperature")
    parser.set_defaults(func=mnist_flow)

    toy = commands.add_parser(
        "toy-flow",
        help="fit a planar flow to a 2-D energy (Rezende & Mohamed 2015) by reverse KL; density plot",
        description="Fit a planar flow to exp(-U) for U in U1..U4 by reverse KL and plot target and fitted densities.",
    )
    add_model_arguments(toy, EnergyFlow, {"energy": MODEL_DEFAULT, "n_flows": MODEL_DEFAULT})
    toy.add_argument("--n-samples", type=int, default=32768, help="pool of base draws per epoch")
    toy.add_argument("--max-epochs", type=int, default=20)
    toy.add_argument("--batch-size", type=int, default=256)
    toy.add_argument("--lr", type=float, default=1e-2)
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--accelerator", default="auto")
    toy.add_argument("--out", required=True, help="output folder: model, density.png, summary.json")
    toy.set_defaults(func=toy_flow)
