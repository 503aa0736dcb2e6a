"""Seeded outputs of every model, pinned before the house was rebuilt (issue 15).

Each case trains one model for a few epochs with a fixed seed on bundled or simulated data and
records numbers a user sees: the per-epoch training loss, latents, likelihoods, samples. The
values in ``seeded_outputs.json`` were written by the code as it stood before the refactor
(``python tests/test_seeded_outputs.py --write`` on commit e6f6751, one torch thread, every case
in one fresh interpreter in sorted order); the test computes them the same way and asserts that
today's code gives the same numbers to float rounding: relative 1e-3 (absolute 1e-4 near zero).
Bit-for-bit equality held only on the CPU that wrote the pins: on an AVX-512 Xeon the same code and
wheels moved the last digits (relative 1e-8 to 2e-3; BLAS and oneDNN pick other kernels),
and SimCLR's representation, amplified by two epochs of training, by up to 30 % while its losses
agreed to 1e-7, so that entry is held to 35 % (a gross change, not rounding, still fails).

Regenerate only when a change is *meant* to alter results, and say so in the commit. Changed since:
the VAE cases' ``marginal_ll`` (issue 18: the importance-sampled likelihood now runs through the
training path's fused softmax kernel; the same numbers to float32 rounding, ~1e-7 relative); the
VAE cases pass the training schedule they were pinned with, as ``train()``'s defaults changed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

PINNED = Path(__file__).with_name("seeded_outputs.json")


def _numbers(array, head: int = 4) -> list[float]:
    """A few entries and the sum of an array, as Python floats (exact through JSON)."""
    flat = np.asarray(array, dtype=np.float64).ravel()
    return [float(v) for v in flat[:head]] + [float(flat.sum())]


def _cells(n_cells: int = 240, n_genes: int = 50, seed: int = 0):
    import sclatent

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sclatent.datasets.synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=3, seed=seed)


def _train_losses(model) -> list[float]:
    return [float(v) for v in model.history["train_loss"]]


# ----------------------------------------------------------------------------- cell models


def case_vae_default() -> dict:
    from sclatent.model import VAE

    adata = _cells()
    VAE.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    # the schedule the pins were written with (train()'s defaults changed with issue 18)
    model = VAE(adata, n_hidden=32, seed=3).train(
        max_epochs=3, batch_size=64, lr=1e-3, early_stopping=False, max_kl_weight=1.0, progress_bar=False
    )
    return {
        "train_loss": _train_losses(model),
        "latent": _numbers(model.get_latent_representation()),
        "marginal_ll": float(model.get_marginal_ll(indices=model.validation_indices, n_mc_samples=20)),
        "normalized": _numbers(model.get_normalized_expression(return_numpy=True, seed=1)),
        "elbo": float(model.get_elbo()),
        "posterior_sample": _numbers(model.posterior_predictive_sample(seed=2)),
    }


def case_vae_variants() -> dict:
    from sclatent.model import VAE

    out = {}
    variants = {
        "poisson_latent_library_planar": dict(
            gene_likelihood="poisson", use_observed_library=False, prior="planar", n_flows=2
        ),
        "nb_gene_batch_iaf_two_layers": dict(
            gene_likelihood="nb", dispersion="gene-batch", posterior="iaf", n_posterior_flows=2, n_layers=2
        ),
        "zinb_gene_cell_realnvp": dict(dispersion="gene-cell", prior="realnvp", n_flows=2, flow_hidden=8),
    }
    for name, settings in variants.items():
        adata = _cells(seed=1)
        VAE.setup_anndata(adata, batch_key="batch")
        model = VAE(adata, n_hidden=16, n_latent=4, seed=0, **settings)
        model.train(
            max_epochs=2, batch_size=64, lr=1e-3, early_stopping=False, max_kl_weight=1.0, progress_bar=False
        )
        out[name] = {
            "train_loss": _train_losses(model),
            "latent": _numbers(model.get_latent_representation()),
            "marginal_ll": float(model.get_marginal_ll(indices=np.arange(20), n_mc_samples=10)),
        }
    return out


def case_denoising_ae() -> dict:
    from sclatent.model import DenoisingAE

    adata = _cells()
    DenoisingAE.setup_anndata(adata, batch_key="batch")
    model = DenoisingAE(adata, n_hidden=32, n_latent=8, seed=2).train(max_epochs=3, progress_bar=False)
    return {
        "train_loss": _train_losses(model),
        "latent": _numbers(model.get_latent_representation()),
        "denoised": _numbers(model.impute(return_matrix=True, layer_out=None)),
    }


def case_masked_gene_model() -> dict:
    from sclatent.model import MaskedGeneModel

    adata = _cells()
    MaskedGeneModel.setup_anndata(adata, labels_key="cell_type")
    model = MaskedGeneModel(adata, n_hidden=32, n_latent=8, seed=1)
    model.train(max_epochs=3, batch_size=64, progress_bar=False)
    pretrain = _train_losses(model)
    model.fine_tune(labels_key="cell_type", fraction_labelled=0.5, max_epochs=2, progress_bar=False)
    return {
        "train_loss": pretrain,
        "masked_nll": float(model.get_masked_nll()),
        "latent": _numbers(model.get_latent_representation()),
        "proba": _numbers(model.predict_proba()),
        "labelled": [int(i) for i in model.labelled_indices[:6]],
    }


def case_contrastive() -> dict:
    from sclatent.model import ContrastiveModel

    adata = _cells()
    ContrastiveModel.setup_anndata(adata)
    model = ContrastiveModel(adata, n_hidden=32, n_latent=8, n_neighbors=5, seed=4)
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    return {"train_loss": _train_losses(model), "latent": _numbers(model.get_latent_representation())}


def case_cell_gan() -> dict:
    from sclatent.model import CellGAN

    adata = _cells()
    CellGAN.setup_anndata(adata, labels_key="cell_type")
    model = CellGAN(adata, n_noise=8, generator_hidden=(32,), critic_hidden=(32,), n_critic=2, seed=5)
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    counts = model.sample(12, seed=0).X
    counts = counts.toarray() if hasattr(counts, "toarray") else counts
    return {"train_loss": _train_losses(model), "sample": _numbers(counts)}


# ----------------------------------------------------------------------------- image / vector models


def _digits(n: int = 160):
    import sclatent

    return sclatent.datasets.digits("train").subset(n, seed=0)


def case_image_vae() -> dict:
    from sclatent.images import ImageVAE

    x = _digits()
    model = ImageVAE((8, 8), n_latent=2, n_hidden=16, seed=1).train(x, max_epochs=2, batch_size=32, progress_bar=False)
    return {
        "train_loss": _train_losses(model),
        "latent": _numbers(model.get_latent_representation(x)),
        "marginal_ll": _numbers(model.get_marginal_ll(x.unit()[:8], n_samples=10)),
        "sample": _numbers(model.sample(4, seed=0)),
    }


def case_image_autoencoders() -> dict:
    from sclatent.images import ImageAutoencoder, MaskedImageAutoencoder

    x = _digits()
    out = {}
    for kind, settings in {
        "bottleneck": {},
        "denoising": {"noise": "masking"},
        "contractive": {},
        "tied": {},
        "linear": {},
    }.items():
        model = ImageAutoencoder((8, 8), kind=kind, n_latent=4, n_hidden=16, seed=0, **settings)
        model.train(x, max_epochs=2, batch_size=32, progress_bar=False)
        out[kind] = {"train_loss": _train_losses(model), "code": _numbers(model.encode(x))}
    mae = MaskedImageAutoencoder((8, 8), patch_size=2, n_latent=8, n_hidden=16, encoder="mlp", seed=0)
    mae.train(x, max_epochs=2, batch_size=32, progress_bar=False)
    out["masked"] = {"train_loss": _train_losses(mae), "representation": _numbers(mae.get_representation(x))}
    return out


def case_image_flows() -> dict:
    from sclatent.datasets import two_moons
    from sclatent.images import DensityFlow, EnergyFlow, ImageFlow

    x = _digits()
    flow = ImageFlow((8, 8), levels=17, n_scales=1, n_steps=2, n_hidden=8, seed=0)
    flow.train(x, max_epochs=2, batch_size=32, progress_bar=False)
    energy = EnergyFlow(energy="U2", n_flows=4, seed=0).train(n_samples=512, max_epochs=2, progress_bar=False)
    moons = two_moons(400, seed=0)
    density = DensityFlow((2,), kind="realnvp", n_flows=2, n_hidden=8, seed=0)
    density.train(moons, max_epochs=2, batch_size=64, progress_bar=False)
    return {
        "image_flow": {"train_loss": _train_losses(flow), "bits_per_dim": float(flow.bits_per_dim(x))},
        "energy_flow": {"train_loss": _train_losses(energy), "reverse_kl": float(energy.reverse_kl(n_samples=512))},
        "density_flow": {"train_loss": _train_losses(density), "log_prob": _numbers(density.log_prob(moons))},
    }


def case_image_gans() -> dict:
    from sclatent.datasets import unpaired_domains
    from sclatent.images import CycleGAN, DigitClassifier, ImageGAN

    x = _digits()
    gan = ImageGAN((8, 8), architecture="mlp", n_latent=8, loss="wgan-gp", seed=0)
    gan.train(x, max_epochs=2, batch_size=32, progress_bar=False)
    a, b = unpaired_domains(_digits(64), "invert", seed=0)
    cycle = CycleGAN((8, 8), n_filters=2, n_residual_blocks=1, seed=0)
    cycle.train(a, b, max_epochs=1, batch_size=16, progress_bar=False)
    classifier = DigitClassifier((8, 8), seed=0).train(x, max_epochs=1, batch_size=32, progress_bar=False)
    return {
        "gan": {"train_loss": _train_losses(gan), "sample": _numbers(gan.sample(4, seed=0))},
        "cyclegan": {"train_loss": _train_losses(cycle), "translate": _numbers(cycle.translate(a.unit()[:4]))},
        "classifier": {"train_loss": _train_losses(classifier), "proba": _numbers(classifier.predict_proba(x))},
    }


def case_simclr() -> dict:
    from sclatent.images import SimCLR

    x = _digits()
    model = SimCLR((8, 8), n_representation=8, n_projection=4, seed=0)
    model.train(x, max_epochs=2, batch_size=64, progress_bar=False)
    return {"train_loss": _train_losses(model), "representation": _numbers(model.get_representation(x))}


CASES = {name[5:]: function for name, function in sorted(globals().items()) if name.startswith("case_")}


def _run(name: str) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return json.loads(json.dumps(CASES[name]()))
    finally:
        torch.set_num_threads(previous)


def _run_all() -> dict:
    """Every case in sorted order, as the pins were written; a failing case reports its traceback."""
    out = {}
    for name in sorted(CASES):
        try:
            out[name] = _run(name)
        except Exception:  # reported per case by the test
            out[name] = {"error": traceback.format_exc()}
    return out


@pytest.fixture(scope="module")
def outputs() -> dict:
    """All cases computed in a fresh interpreter, as the pins were.

    Bit-for-bit equality holds between processes with the same history only: MKL's kernels depend on
    memory alignment, so an earlier test's allocations (a scanpy PCA, say) can move the last bits.
    """
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--print"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


#: relative tolerance of every pinned number, and looser ones (see the module docstring) by (case, path)
RTOL = 1e-3
#: absolute slack for entries near zero (sums of centred codes)
ATOL = 1e-4
LOOSER_RTOL = {("simclr", "representation"): 0.35}


def _leaves(value, path: str = "") -> dict[str, list[float]]:
    """``{"a/b": [numbers]}`` for a pinned case's nested dicts of numbers and lists of numbers."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{path}/{key}".lstrip("/")).items()}
    return {path: [float(v) for v in np.atleast_1d(value)]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_seeded_outputs_are_unchanged(name, outputs):
    pinned = json.loads(PINNED.read_text())
    assert name in pinned, f"no pinned values for {name}: run python tests/test_seeded_outputs.py --write {name}"
    assert "error" not in outputs[name], outputs[name].get("error")
    expected, actual = _leaves(pinned[name]), _leaves(outputs[name])
    assert actual.keys() == expected.keys()
    for path, numbers in expected.items():
        assert len(actual[path]) == len(numbers), path
        rtol = LOOSER_RTOL.get((name, path), RTOL)
        np.testing.assert_allclose(actual[path], numbers, rtol=rtol, atol=ATOL, err_msg=f"{name}: {path}")


def test_seeded_comparison_tells_rounding_from_a_change():
    numbers = {"latent": [0.5, -0.25, 12.0]}
    rounded = {"latent": [0.5 * (1 + 1e-6), -0.25, 12.0 * (1 - 1e-6)]}
    changed = {"latent": [0.5 * 1.01, -0.25, 12.0]}
    assert _leaves({"case": numbers}) == {"case/latent": [0.5, -0.25, 12.0]}
    np.testing.assert_allclose(_leaves(rounded)["latent"], numbers["latent"], rtol=RTOL, atol=ATOL)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(_leaves(changed)["latent"], numbers["latent"], rtol=RTOL, atol=ATOL)


if __name__ == "__main__":  # pragma: no cover - the fixture's worker, and regenerating the pins
    if "--print" in sys.argv:
        print(json.dumps(_run_all()))
        raise SystemExit(0)
    if "--write" not in sys.argv:
        raise SystemExit("usage: python tests/test_seeded_outputs.py --write [CASE ...]")
    names = [a for a in sys.argv[1:] if a != "--write"] or sorted(CASES)
    pinned = json.loads(PINNED.read_text()) if PINNED.exists() else {}
    for name in names:
        pinned[name] = _run(name)
        print(name, "done")
    PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
