"""ImageGAN (non-saturating / WGAN-GP / spectral norm, DCGAN or MLP), its conv decoder and the quality metrics."""

import json
import math

import numpy as np
import pytest
import torch

from sclatent import datasets
from sclatent.images import ImageGAN
from sclatent.images.data import ArrayBatch
from sclatent.images.metrics import frechet_distance, gaussian_baseline_samples, generator_scores
from sclatent.images.modules.gan import ImageGANModule, nonsaturating_losses
from sclatent.images.nn.conv_decoder import ConvDecoder
from sclatent.nn.regularisers import gradient_penalty
from sclatent.optim import FlatAdam
from sclatent.steps import AdversarialStep, checked_parameter_groups

SMALL_DCGAN = {"generator_widths": (16, 8), "discriminator_widths": (8, 16), "n_features": 32, "n_latent": 8}
SMALL_MLP = {"architecture": "mlp", "generator_widths": (64,), "discriminator_widths": (64,), "n_features": 32}


@pytest.fixture(scope="module")
def digits():
    return datasets.digits("train", seed=0), datasets.digits("test", seed=0)


def _batch(x: np.ndarray, y: np.ndarray | None = None) -> ArrayBatch:
    x = torch.as_tensor(x, dtype=torch.float32)
    return ArrayBatch(x, None if y is None else torch.as_tensor(y), torch.arange(len(x)))


def _pixel_frechet(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(a.reshape(len(a), -1), b.reshape(len(b), -1))


# ----------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize("size", [(28, 28), (8, 8), (10, 12)])
def test_conv_decoder_output_shape(size):
    decoder = ConvDecoder(5, 2, size, widths=(8, 4))
    assert decoder(torch.randn(3, 5)).shape == (3, 2, *size)


def test_nonsaturating_losses_match_a_hand_computation():
    real, fake = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([-3.0, 0.5, 0.0])
    d_loss, g_loss = nonsaturating_losses(real, fake)
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    expected_d = [-math.log(sig(r)) - math.log(1 - sig(f)) for r, f in zip(real.tolist(), fake.tolist())]
    expected_g = [-math.log(sig(f)) for f in fake.tolist()]
    assert torch.allclose(d_loss, torch.tensor(expected_d), atol=1e-6)
    assert torch.allclose(g_loss, torch.tensor(expected_g), atol=1e-6)
    assert d_loss[2].item() == pytest.approx(2 * math.log(2))  # a D that cannot tell: log 4
    # stable where the naive formula overflows
    assert torch.isfinite(nonsaturating_losses(torch.tensor([-200.0]), torch.tensor([200.0]))[0]).all()


@pytest.mark.parametrize("conditional", [False, True])
def test_module_losses_are_those_of_its_own_discriminator_outputs(digits, conditional):
    train, _ = digits
    module = ImageGANModule((8, 8), n_classes=10 if conditional else 0, **SMALL_DCGAN).eval()
    batch = _batch(train.unit()[:16], train.labels[:16])
    labels = batch.y if conditional else None
    torch.manual_seed(3)
    d_out = module.loss(batch, group="discriminator")
    torch.manual_seed(3)
    fake = module.generate(16, labels)
    real_logits, fake_logits = module.discriminator(batch.x, labels), module.discriminator(fake, labels)
    assert d_out.loss.item() == pytest.approx(nonsaturating_losses(real_logits, fake_logits)[0].mean().item(), rel=1e-5)
    assert torch.allclose(d_out.terms["real_probability"], torch.sigmoid(real_logits))
    torch.manual_seed(4)
    g_out = module.loss(batch, group="generator")
    torch.manual_seed(4)
    expected = -torch.log(torch.sigmoid(module.discriminator(module.generate(16, labels), labels))).mean()
    assert g_out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_wgan_losses_and_image_gradient_penalty():
    module = ImageGANModule((8, 8), loss="wgan-gp", **SMALL_DCGAN).train()
    batch = _batch(torch.rand(6, 8, 8))
    out = module.loss(batch, group="discriminator")
    assert set(out.terms) == {"wasserstein", "gradient_penalty"}
    expected = -out.terms["wasserstein"].mean() + 10 * out.terms["gradient_penalty"].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with torch.no_grad():  # evaluation: no gradient, no penalty
        assert "gradient_penalty" not in module.loss(batch, group="discriminator").terms
    assert module.n_critic == 5 and module.betas == (0.5, 0.9)


def test_gradient_penalty_of_a_linear_critic_on_images_is_closed_form():
    # D(x) = <w, x>: the input gradient is w everywhere, so the penalty is (||w|| - 1)^2 for every image
    w = torch.randn(1, 4, 5)
    penalty = gradient_penalty(
        lambda x, labels: (x * w).flatten(1).sum(-1), torch.rand(3, 1, 4, 5), torch.rand(3, 1, 4, 5), None
    )
    assert torch.allclose(penalty, (w.norm() - 1) ** 2 * torch.ones(3), atol=1e-5)


def test_spectral_norm_bounds_every_discriminator_layer():
    module = ImageGANModule((8, 8), spectral_norm=True, n_classes=10, **SMALL_DCGAN).train()
    with torch.no_grad():  # power iteration advances one step per training-mode forward
        for _ in range(30):
            module.discriminator(torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.int64))
    layers = [m for m in module.discriminator.modules() if hasattr(m, "parametrizations")]
    assert len(layers) == 5  # two convolutions, the feature and output layers, the class embedding
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("player", ["generator", "discriminator"])
def test_each_step_moves_only_its_own_player(player):
    module = ImageGANModule((8, 8), n_classes=10, **SMALL_DCGAN).train()
    groups = checked_parameter_groups(module)
    optimizers = {name: FlatAdam(params, lr=1e-2) for name, params in groups.items()}
    before = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
    batch = _batch(torch.rand(8, 8, 8), torch.arange(8))
    AdversarialStep(module, optimizers)._update(batch, player, 1.0, None)
    for name, params in groups.items():
        moved = any(not torch.equal(p, q) for p, q in zip(params, before[name]))
        assert moved == (name == player)
    assert all(p.requires_grad for params in groups.values() for p in params)  # unfrozen afterwards
    for opt in optimizers.values():
        opt.release()


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize(
    "settings",
    [{}, {"conditional": True}, {**SMALL_MLP, "loss": "wgan-gp"}, {**SMALL_MLP, "conditional": True}],
)
def test_samples_have_the_image_shape_and_range(settings):
    gan = ImageGAN((8, 8), **{**SMALL_DCGAN, **settings})
    images = gan.sample(25, seed=0)
    assert images.shape == (25, 8, 8) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert gan.sample(0).shape == (0, 8, 8)


def test_channel_first_and_vector_shapes():
    assert ImageGAN((1, 8, 8), **SMALL_DCGAN).sample(3).shape == (3, 1, 8, 8)
    assert ImageGAN((64,), **SMALL_MLP).sample(3).shape == (3, 64)


@pytest.mark.parametrize("loss", ["nonsaturating", "wgan-gp"])
def test_training_on_digits_moves_samples_towards_the_data(digits, loss):
    train, test = digits
    gan = ImageGAN((8, 8), loss=loss, seed=0, **SMALL_MLP)
    reference = test.unit()
    before = _pixel_frechet(gan.sample(300, seed=1), reference)
    gan.train(train, max_epochs=12 if loss == "nonsaturating" else 20, batch_size=32, lr=1e-3, progress_bar=False)
    after = _pixel_frechet(gan.sample(300, seed=1), reference)
    assert after < 0.3 * before
    history = gan.history
    assert len(history["epoch"]) == (12 if loss == "nonsaturating" else 20)
    if loss == "nonsaturating":
        # the discriminator beats chance (log 4 nats per image) and tells real from fake on average
        assert history["train_discriminator_loss"][0] < 2 * math.log(2)
        assert history["train_real_probability"][0] > history["train_fake_probability"][0]
    else:
        assert history["train_wasserstein"][-1] > 0 and np.isfinite(history["train_gradient_penalty"]).all()


def test_spectral_norm_trains_with_the_gradient_penalty(digits):
    # the penalty's double backward runs through the spectral-norm parametrisation
    gan = ImageGAN((8, 8), loss="wgan-gp", spectral_norm=True, conditional=True, n_critic=2, **SMALL_DCGAN)
    gan.train(digits[0].subset(128, seed=0), max_epochs=2, batch_size=32, progress_bar=False)
    assert np.isfinite(gan.history["train_gradient_penalty"]).all()
    assert np.isfinite(gan.history["train_generator_loss"]).all()


def test_conditional_gan_draws_the_intended_class(digits):
    # a pixel-space logistic regression (~97 % on real digits) reads the class asked for: conditioning works
    from sklearn.linear_model import LogisticRegression

    train, _ = digits
    reader = LogisticRegression(max_iter=2000).fit(train.unit().reshape(-1, 64), train.labels)
    gan = ImageGAN((8, 8), conditional=True, seed=0, **SMALL_MLP)
    gan.train(train, max_epochs=15, batch_size=32, lr=2e-3, progress_bar=False)
    labels = np.repeat(np.arange(10), 30)
    samples = gan.sample(300, labels=labels, seed=0).reshape(300, -1)
    assert (reader.predict(samples) == labels).mean() > 0.6  # chance: 0.1


def test_seeded_training_is_reproducible_and_save_load_round_trips(digits, tmp_path):
    train, _ = digits
    subset = train.subset(256, seed=0)
    runs = []
    for _ in range(2):
        gan = ImageGAN((8, 8), spectral_norm=True, conditional=True, seed=5, **SMALL_DCGAN)
        runs.append(gan.train(subset, max_epochs=2, batch_size=64, progress_bar=False))
    a, b = (g.sample(20, seed=2) for g in runs)
    np.testing.assert_array_equal(a, b)
    assert runs[0].history["train_generator_loss"] == runs[1].history["train_generator_loss"]
    assert not np.array_equal(a, runs[0].sample(20, seed=3))
    runs[0].save(tmp_path / "gan")
    loaded = ImageGAN.load(tmp_path / "gan")
    np.testing.assert_array_equal(loaded.sample(20, seed=2), a)
    assert loaded.history == runs[0].history and loaded.is_trained and loaded.conditional
    assert json.loads((tmp_path / "gan" / "metadata.json").read_text())["hyperparameters"]["spectral_norm"]


def test_documented_errors(digits):
    train, _ = digits
    with pytest.raises(ValueError, match="architecture"):
        ImageGAN((8, 8), architecture="resnet")
    with pytest.raises(ValueError, match="loss"):
        ImageGAN((8, 8), loss="hinge")
    with pytest.raises(ValueError, match="vectors"):
        ImageGAN((64,))
    with pytest.raises(ValueError, match="n_critic"):
        ImageGAN((8, 8), n_critic=0)
    conditional, unconditional = ImageGAN((8, 8), conditional=True, **SMALL_MLP), ImageGAN((8, 8), **SMALL_MLP)
    with pytest.raises(ValueError, match="needs labels"):
        conditional.train(train.unit(), max_epochs=1)
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        conditional.sample(2, labels=[0, 10])
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.sample(2, labels=[0, 1])
    with pytest.raises(ValueError, match="early stopping"):
        unconditional.train(train, early_stopping=True)
    with pytest.raises(ValueError, match="expects intensities"):
        unconditional.train(train.images.astype(np.float32), max_epochs=1)


# ----------------------------------------------------------------------------- quality measures


def test_gaussian_baseline_matches_the_pixel_moments(digits):
    train, _ = digits
    x = train.unit()
    draws = gaussian_baseline_samples(x, 4000, seed=0)
    assert draws.shape == (4000, 8, 8) and draws.min() >= 0 and draws.max() <= 1
    # clipping moves the mean of near-0 pixels up a little; the correlation structure survives
    assert np.abs(draws.mean(0) - x.mean(0)).max() < 0.08
    cov_true, cov_draw = np.cov(x.reshape(len(x), -1).T), np.cov(draws.reshape(4000, -1).T)
    assert np.corrcoef(cov_true.ravel(), cov_draw.ravel())[0, 1] > 0.9
    per_class = gaussian_baseline_samples(x, 100, labels=train.labels, seed=0)
    means = np.stack([x[train.labels == c].mean(0) for c in range(10)])
    nearest = ((per_class.reshape(100, 1, 64) - means.reshape(1, 10, 64)) ** 2).sum(-1).argmin(-1)
    assert (nearest == np.arange(100) % 10).mean() > 0.8
    np.testing.assert_array_equal(per_class, gaussian_baseline_samples(x, 100, labels=train.labels, seed=0))


def test_generator_scores_of_real_images_against_themselves(digits):
    class PixelClassifier:  # a stand-in whose "features" are the pixels
        def predict_proba(self, x):
            p = np.full((len(x), 10), 0.05)
            p[:, 3] = 0.55
            return p

        def features(self, x):
            return np.asarray(x).reshape(len(x), -1)

    x = digits[0].unit()
    scores = generator_scores(PixelClassifier(), x, x, intended=np.full(len(x), 3))
    assert scores["frechet"] == pytest.approx(0.0, abs=1e-6)
    assert scores["accuracy"] == 1.0 and scores["confidence"] == pytest.approx(0.55) and scores["class_entropy"] == 0


def test_cli_on_digits(tmp_path, capsys):
    from sclatent.cli import main

    main(
        [
            "mnist-gan",
            "--dataset",
            "digits",
            "--n-train",
            "400",
            "--max-epochs",
            "2",
            "--classifier-epochs",
            "1",
            "--conditional",
            "--n-eval",
            "150",
            "--out",
            str(tmp_path),
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("frechet", "frechet_real", "frechet_baseline", "confidence", "class_entropy", "accuracy"):
        assert np.isfinite(summary[key])
    assert summary["n_eval"] == 150 and summary["epochs"] == 2 and summary["conditional"]
    for name in ("samples.png", "training.png", "model/model.pt"):
        assert (tmp_path / name).exists()
    assert "real vs real" in capsys.readouterr().out
