"""Tests for the image VAE (sclatent.images.ImageVAE, sclatent.images.modules.vae).

Covers: the Bernoulli and Gaussian log-likelihoods against torch.distributions / scipy, the IWAE
bound against log p(x) by quadrature on a 1-D latent, ELBO <= IWAE(k) <= 0 and the bound rising
with k on trained 8x8 digits, losses decreasing, shapes/dtypes/ranges, that dynamic binarisation
draws new binary images every epoch (and fixed does not), the seeded evaluation binarisation,
reproducibility, save/load, the documented errors, the per-pixel baseline and ``sclatent mnist-vae``
on digits. Everything runs on the bundled digits with tiny models (well under a minute).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from sclatent.cli import main
from sclatent.datasets import digits
from sclatent.images import ImageVAE
from sclatent.images.modules.vae import ImageVAEModule, bernoulli_log_prob
from sclatent.images.plotting import plot_latent_manifold
from sclatent.images.vae import binarise_fixed_seed, pixel_bernoulli_nll

TRAIN = dict(accelerator="cpu", progress_bar=False)
SMALL = dict(n_latent=2, n_hidden=64, n_layers=1)


@pytest.fixture(scope="module")
def data():
    return digits("train"), digits("test")


@pytest.fixture(scope="module")
def trained(data):
    train, test = data
    return ImageVAE((8, 8), **SMALL).train(train, max_epochs=40, validation=test, **TRAIN)


# ----------------------------------------------------------------------------- likelihoods


def test_bernoulli_log_prob_matches_torch_and_scipy():
    gen = torch.Generator().manual_seed(0)
    logits = 6 * torch.randn(5, 7, 30, generator=gen, dtype=torch.float64)
    x = torch.bernoulli(torch.full((7, 30), 0.4, dtype=torch.float64), generator=gen)
    ours = bernoulli_log_prob(logits, x)
    assert ours.shape == (5, 7)
    reference = torch.distributions.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    torch.testing.assert_close(ours, reference)
    p = torch.sigmoid(logits).numpy()
    np.testing.assert_allclose(ours.numpy(), stats.bernoulli.logpmf(x.numpy(), p).sum(-1), rtol=1e-6)
    # stable where log(sigmoid) would round to log 0
    assert torch.isfinite(bernoulli_log_prob(torch.tensor([[-200.0, 200.0]]), torch.tensor([[1.0, 0.0]]))).all()


def test_gaussian_log_likelihood_matches_torch():
    module = ImageVAEModule((3, 4), n_latent=2, likelihood="gaussian", binarisation=None)
    with torch.no_grad():
        module.log_var.fill_(math.log(0.3))
    mean, x = torch.randn(6, 12), torch.randn(6, 12)
    reference = torch.distributions.Normal(mean, math.sqrt(0.3)).log_prob(x).sum(-1)
    torch.testing.assert_close(module.log_likelihood(mean, x), reference)


def test_iwae_bound_approaches_log_px_by_quadrature():
    # a 1-D latent: log p(x) = log int p(x | z) N(z; 0, 1) dz exactly by quadrature
    torch.manual_seed(3)
    module = ImageVAEModule((8, 8), n_latent=1, n_hidden=16, n_layers=1).double().eval()
    x = torch.as_tensor(binarise_fixed_seed(digits().unit()[:4], seed=1), dtype=torch.float64).reshape(4, 64)
    z = torch.linspace(-10, 10, 20001, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        log_joint = module.log_likelihood(module.decode(z).unsqueeze(1), x) - 0.5 * (z**2 + math.log(2 * math.pi))
        exact = torch.logsumexp(log_joint + math.log(20 / 20000), dim=0)
    gen = torch.Generator().manual_seed(0)
    bound = module.marginal_log_likelihood(x, n_samples=20000, generator=gen)
    assert bound.shape == (4,)
    # Monte Carlo error at k = 20000 is ~0.005 nats here (measured); one sample is off by up to ~2
    assert (bound - exact).abs().max() < 0.03, (bound, exact)
    # small chunks (here 7 samples per decoder pass) give the same bound: one log-sum-exp over all samples
    chunked = module.marginal_log_likelihood(x, 20000, torch.Generator().manual_seed(1), max_rows=64 * 4 * 7)
    assert (chunked - exact).abs().max() < 0.03


def test_pixel_bernoulli_baseline():
    rng = np.random.default_rng(0)
    train = rng.random((50, 6))
    test = (rng.random((9, 6)) < 0.5).astype(np.float32)
    p = (train.sum(0) + 1) / 52
    expected = -stats.bernoulli.logpmf(test, p).sum(1)
    np.testing.assert_allclose(pixel_bernoulli_nll(train, test), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="values"):
        pixel_bernoulli_nll(train, test[:, :5])


# ----------------------------------------------------------------------------- trained model


def test_losses_decrease(trained):
    history = trained.history
    assert len(history["epoch"]) == 40
    assert history["train_elbo"][-1] > history["train_elbo"][0] + 5
    assert history["validation_elbo"][-1] > history["validation_elbo"][0] + 5
    assert all(k >= 0 for k in history["train_kl"])


def test_elbo_below_iwae_below_zero_and_rising_with_k(trained, data):
    test = data[1]
    elbo = trained.get_elbo(test)
    bounds = [trained.get_marginal_ll(test, n_samples=k, seed=1) for k in (1, 10, 100, 1000)]
    assert elbo <= bounds[-1] <= 0.0
    # L_1 is an unbiased estimate of the ELBO (one sample each; the ELBO's KL term is analytic)
    assert abs(bounds[0] - elbo) < 1.0
    assert bounds[0] < bounds[1] < bounds[2] < bounds[3] + 0.05
    per_image = trained.get_marginal_ll(test, n_samples=100, seed=1, return_mean=False)
    assert per_image.shape == (len(test),) and per_image.dtype == np.float32
    assert np.isclose(per_image.mean(), bounds[2], atol=1e-4)
    # the model beats independent pixels on the same binary images
    assert -bounds[-1] < pixel_bernoulli_nll(data[0], trained.observed(test)).mean()


def test_shapes_dtypes_and_ranges(trained, data):
    test = data[1]
    z = trained.get_latent_representation(test)
    assert z.shape == (len(test), 2) and z.dtype == np.float32
    draws = trained.get_latent_representation(test, give_mean=False, seed=4)
    assert draws.shape == z.shape and not np.allclose(draws, z)
    recon = trained.reconstruct(test)
    assert recon.shape == (len(test), 8, 8) and recon.dtype == np.float32
    assert recon.min() >= 0.0 and recon.max() <= 1.0
    samples = trained.sample(25, seed=0)
    assert samples.shape == (25, 8, 8) and samples.min() >= 0.0 and samples.max() <= 1.0
    binary = trained.sample(25, seed=0, binary=True)
    assert set(np.unique(binary)) <= {0.0, 1.0}
    np.testing.assert_array_equal(trained.sample(25, seed=0), samples)
    # flattened inputs and tensors are accepted
    np.testing.assert_array_equal(trained.get_latent_representation(torch.as_tensor(test.unit().reshape(-1, 64))), z)


def test_decode_grid(trained):
    grid, coords = trained.decode_grid(n=5, quantile=0.1)
    assert grid.shape == (5, 5, 8, 8)
    np.testing.assert_allclose(coords, stats.norm.ppf(np.linspace(0.1, 0.9, 5)), rtol=1e-5)
    np.testing.assert_allclose(grid[0, 4], trained.decode([[coords[4], coords[4]]])[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grid[4, 0], trained.decode([[coords[0], coords[0]]])[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grid[0, 0], trained.decode([[coords[0], coords[4]]])[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="2-D latent"):
        ImageVAE((8, 8), n_latent=3).decode_grid()
    with pytest.raises(ValueError, match="shape"):
        trained.decode(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="grid"):
        plot_latent_manifold(grid[:4], coords)


def test_evaluation_is_deterministic_and_uses_one_binarisation(trained, data):
    test = data[1]
    binary = trained.observed(test)
    assert set(np.unique(binary)) <= {0.0, 1.0}
    # a seeded stochastic binarisation: about as many pixels on as the mean intensity says
    assert abs(binary.mean() - test.unit().mean()) < 0.01
    np.testing.assert_array_equal(trained.observed(test), binary)
    assert not np.array_equal(trained.observed(test, binarisation_seed=1), binary)
    # binary images pass through unchanged, so scoring them equals scoring the grey images
    assert trained.get_elbo(binary) == trained.get_elbo(test)
    assert trained.get_marginal_ll(binary, 50) == trained.get_marginal_ll(test, 50)
    assert trained.get_marginal_ll(test, 50, seed=2) != trained.get_marginal_ll(test, 50, seed=3)


# ----------------------------------------------------------------------------- binarisation in training


def _inputs_seen(binarisation: str, epochs: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """What the model saw per epoch when trained on 200 copies of one grey image (one minibatch an epoch)."""
    image = digits().unit()[0]
    model = ImageVAE((8, 8), binarisation=binarisation, **SMALL)
    seen = []
    observe = model.module.observe
    model.module.observe = lambda x: seen.append(observe(x)) or seen[-1]
    model.train(np.repeat(image[None], 200, axis=0), max_epochs=epochs, batch_size=200, **TRAIN)
    return np.stack([s.numpy() for s in seen]), image.reshape(64)


def test_dynamic_binarisation_draws_new_images_every_epoch():
    seen, image = _inputs_seen("dynamic")
    assert seen.shape == (2, 200, 64) and set(np.unique(seen)) <= {0.0, 1.0}
    # copies of one image get different binary versions, and so does each epoch
    assert len(np.unique(seen[0], axis=0)) > 100
    assert (seen[0] != seen[1]).any(axis=1).mean() > 0.9
    # each pixel is on with probability equal to its intensity
    assert np.abs(seen.mean((0, 1)) - image).max() < 0.1


def test_fixed_binarisation_thresholds_once():
    seen, image = _inputs_seen("fixed")
    expected = (image > 0.5).astype(np.float32)
    assert (seen == expected).all()


# ----------------------------------------------------------------------------- reproducibility, persistence, errors


def test_seeded_training_is_reproducible(data):
    train = data[0].subset(300, seed=0)
    runs = [ImageVAE((8, 8), seed=s, **SMALL).train(train, max_epochs=3, **TRAIN) for s in (5, 5, 6)]
    assert runs[0].history["train_elbo"] == runs[1].history["train_elbo"]
    np.testing.assert_array_equal(runs[0].get_latent_representation(train), runs[1].get_latent_representation(train))
    assert runs[0].history["train_elbo"] != runs[2].history["train_elbo"]


def test_save_load_round_trip(trained, data, tmp_path):
    test = data[1]
    trained.save(tmp_path / "vae")
    loaded = ImageVAE.load(tmp_path / "vae")
    assert loaded.hyperparameters == trained.hyperparameters
    assert loaded.history == trained.history and loaded.is_trained
    np.testing.assert_array_equal(loaded.get_latent_representation(test), trained.get_latent_representation(test))
    assert loaded.get_marginal_ll(test, 20) == trained.get_marginal_ll(test, 20)
    assert "ImageVAE" in repr(loaded) and "trained for 40 epochs" in repr(loaded)


def test_gaussian_decoder_on_continuous_data():
    rng = np.random.default_rng(0)
    # continuous vectors outside [0, 1]: a noisy 1-D curve in 3-D
    t = rng.uniform(-2, 2, 600)
    x = np.stack([t, t**2 - 1, np.sin(2 * t)], 1) + 0.05 * rng.standard_normal((600, 3))
    model = ImageVAE((3,), n_latent=1, n_hidden=32, n_layers=1, likelihood="gaussian")
    assert model.hyperparameters["binarisation"] is None
    model.train(x.astype(np.float32), max_epochs=60, batch_size=64, lr=3e-3, **TRAIN)
    assert model.history["train_elbo"][-1] > model.history["train_elbo"][0] + 3
    # a log-density: with a good fit in these units it is positive, and the bound still beats the ELBO
    assert model.get_marginal_ll(x, 200) >= model.get_elbo(x)
    np.testing.assert_array_equal(model.observed(x), x.astype(np.float32))
    assert model.sample(4, seed=0).shape == (4, 3)
    with pytest.raises(ValueError, match="bernoulli"):
        model.sample(4, binary=True)


def test_errors():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        ImageVAE((8, 8), likelihood="poisson")
    with pytest.raises(ValueError, match="binarisation must be one of"):
        ImageVAE((8, 8), binarisation="otsu")
    with pytest.raises(ValueError, match="binarisation must be None"):
        ImageVAE((8, 8), likelihood="gaussian", binarisation="fixed")
    model = ImageVAE((8, 8), **SMALL)
    with pytest.raises(ValueError, match=r"intensities in \[0.0, 1.0\]"):
        model.train(np.full((10, 8, 8), 16.0, dtype=np.float32), **TRAIN)
    with pytest.raises(ValueError, match="built for"):
        model.get_latent_representation(np.zeros((3, 7, 7)))
    with pytest.raises(ValueError, match="n_samples"):
        model.get_marginal_ll(np.zeros((3, 8, 8)), n_samples=0)


# ----------------------------------------------------------------------------- command line


def test_cli_on_digits(tmp_path):
    out = tmp_path / "run"
    args = ["mnist-vae", "--dataset", "digits", "--max-epochs", "3", "--n-latent", "2", "--n-hidden", "32"]
    assert main([*args, "--n-layers", "1", "--n-is-samples", "20", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["n_latent"] == 2
    assert 0 < summary["test_nll_iwae"] <= -summary["test_elbo"] + 1.0
    assert summary["baseline_pixel_bernoulli_nll"] > 0
    for name in ("samples.png", "reconstructions.png", "latent.png", "manifold.png", "training.png"):
        assert (out / name).stat().st_size > 1000
    assert ImageVAE.load(out / "model").n_latent == 2
