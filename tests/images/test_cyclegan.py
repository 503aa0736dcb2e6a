"""Tests for the unpaired image domains and the CycleGAN (sclatent.images.CycleGAN).

Covers: the domain transforms (invert twice and four quarter turns give the images back, dilation
adds ink, erosion removes it), disjoint seeded halves, the generator and discriminator objectives
against hand computations (cycle, identity, least squares and cross-entropy GAN losses), that
each adversarial step updates only its own group, losses decreasing on the 8x8 digits, shapes and
ranges of translations, the evaluation's keys and baselines, seeded reproducibility, save/load,
input errors and ``sclatent mnist-cyclegan --dataset digits``. Models are tiny (8x8 digits).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sclatent.datasets import DOMAIN_KINDS, ImageSet, digits, domain_transform, unpaired_domains
from sclatent.datasets._domains import invert, rotate, thicken, thin
from sclatent.images import CycleGAN, evaluate_translation
from sclatent.images.cyclegan import domain_classifier
from sclatent.images.data import ArrayBatch
from sclatent.images.modules.cyclegan import CycleGANModule, discriminator_loss, generator_adversarial_loss
from sclatent.steps import AdversarialStep

TRAIN = dict(accelerator="cpu", progress_bar=False)
SMALL = dict(n_filters=4, n_residual_blocks=1)


@pytest.fixture(scope="module")
def images() -> ImageSet:
    return digits()


@pytest.fixture(scope="module")
def domains(images):
    return unpaired_domains(images.subset(400, seed=0), "invert", seed=0)


@pytest.fixture(scope="module")
def trained(domains):
    a, b = domains
    return CycleGAN((8, 8), seed=0, **SMALL).train(a, b, max_epochs=8, batch_size=32, lr=2e-3, **TRAIN)


# --------------------------------------------------------------------------- domains


def test_invert_twice_and_four_quarter_turns_are_the_identity(images):
    inverted = invert(images)
    assert inverted.images.dtype == np.uint8 and inverted.images.max() <= 16
    assert inverted.images[0, 0, 0] == 16 - images.images[0, 0, 0]
    np.testing.assert_array_equal(invert(inverted).images, images.images)
    turned = images
    for _ in range(4):
        turned = rotate(turned, 1)
    np.testing.assert_array_equal(turned.images, images.images)
    # one quarter turn anticlockwise: the top row becomes the left column, read bottom to top
    np.testing.assert_array_equal(rotate(images, 1).images[0][:, 0], images.images[0][0, ::-1])
    np.testing.assert_array_equal(rotate(images, 3).images, rotate(rotate(rotate(images, 1), 1), 1).images)


def test_thickening_adds_ink_and_thinning_removes_it(images):
    thick, slim = thicken(images), thin(images)
    assert (thick.images >= images.images).all() and (slim.images <= images.images).all()
    ink = images.images.sum((1, 2)).astype(float)
    assert (thick.images.sum((1, 2)) > 1.3 * ink).all()
    assert (slim.images.sum((1, 2)) < ink).all()
    # a single lit pixel grows into the 3x3 cross of radius 1 (and no further), and erodes away
    dot = ImageSet(np.zeros((1, 7, 7), np.uint8), np.zeros(1, np.int64), 17, "dot")
    dot.images[0, 3, 3] = 10
    cross = thicken(dot).images[0]
    assert cross.sum() == 50 and cross[2:5, 3].tolist() == [10, 10, 10] and cross[2, 2] == 0
    assert thin(dot).images.sum() == 0
    assert thicken(images, 2).images.sum() > thick.images.sum()


def test_domain_transform_names_and_errors(images):
    for kind in DOMAIN_KINDS:
        restyled = domain_transform(images, kind)
        assert restyled.images.shape == images.images.shape and restyled.images.dtype == np.uint8
        np.testing.assert_array_equal(restyled.labels, images.labels)
    with pytest.raises(ValueError, match="unknown domain kind 'blur'"):
        domain_transform(images, "blur")
    with pytest.raises(TypeError, match="ImageSet"):
        domain_transform(images.images, "invert")
    with pytest.raises(ValueError, match="square"):
        rotate(ImageSet(np.zeros((2, 4, 6), np.uint8), np.zeros(2, np.int64), 17, "x"), 1)
    with pytest.raises(ValueError, match="positive integer"):
        thicken(images, 0)


def test_unpaired_domains_are_disjoint_seeded_halves():
    # labels 0..N-1 identify every image, so disjointness is checked exactly
    n = 101
    rng = np.random.default_rng(0)
    numbered = ImageSet(rng.integers(0, 17, (n, 8, 8)).astype(np.uint8), np.arange(n), 17, "numbered")
    a, b = unpaired_domains(numbered, "invert", seed=3)
    assert len(a) == 51 and len(b) == 50
    assert not set(a.labels) & set(b.labels) and set(a.labels) | set(b.labels) == set(range(n))
    np.testing.assert_array_equal(a.images, numbered.images[a.labels])  # A as it is
    np.testing.assert_array_equal(b.images, 16 - numbered.images[b.labels])  # B restyled
    assert a.name == "numbered/A" and b.name == "numbered/B-invert"
    again, _ = unpaired_domains(numbered, "invert", seed=3)
    other, _ = unpaired_domains(numbered, "invert", seed=4)
    np.testing.assert_array_equal(again.labels, a.labels)
    assert not np.array_equal(other.labels, a.labels)
    with pytest.raises(ValueError, match="at least two"):
        unpaired_domains(numbered.subset(1), "invert")


# --------------------------------------------------------------------------- objectives


def test_gan_losses_have_the_documented_values():
    ones, zeros = torch.ones(3, 2, 2), torch.zeros(3, 2, 2)
    torch.testing.assert_close(generator_adversarial_loss(ones), torch.zeros(3))
    torch.testing.assert_close(generator_adversarial_loss(zeros), torch.ones(3))
    torch.testing.assert_close(generator_adversarial_loss(torch.full((1, 2, 2), 3.0)), torch.tensor([4.0]))
    torch.testing.assert_close(discriminator_loss(ones, zeros), torch.zeros(3))  # a perfect D
    torch.testing.assert_close(discriminator_loss(zeros, ones), torch.ones(3))  # a reversed D
    torch.testing.assert_close(discriminator_loss(zeros, zeros), torch.full((3,), 0.5))
    log2 = float(np.log(2.0))
    torch.testing.assert_close(generator_adversarial_loss(zeros, "bce"), torch.full((3,), log2))
    torch.testing.assert_close(discriminator_loss(zeros, zeros, "bce"), torch.full((3,), log2))


def test_generator_and_discriminator_objectives_match_a_hand_computation():
    torch.manual_seed(0)
    module = CycleGANModule((8, 8), lambda_cycle=7.0, lambda_identity=0.3, **SMALL).eval()
    x = torch.rand(5, 2, 8, 8)
    a, b = x[:, :1], x[:, 1:]
    batch = ArrayBatch(x, None, torch.arange(5))
    with torch.no_grad():
        out = module.loss(batch, group="generators")
        g, f = module.g_ab, module.g_ba
        cycle_a = (f(g(a)) - a).abs().mean((1, 2, 3))
        cycle_b = (g(f(b)) - b).abs().mean((1, 2, 3))
        identity_a, identity_b = (f(a) - a).abs().mean((1, 2, 3)), (g(b) - b).abs().mean((1, 2, 3))
        adversarial = ((module.d_b(g(a)) - 1) ** 2).mean((1, 2)) + ((module.d_a(f(b)) - 1) ** 2).mean((1, 2))
        expected = adversarial + 7.0 * (cycle_a + cycle_b) + 7.0 * 0.3 * (identity_a + identity_b)
        torch.testing.assert_close(out.terms["cycle_a"], cycle_a)
        torch.testing.assert_close(out.terms["cycle_b"], cycle_b)
        torch.testing.assert_close(out.terms["identity_a"], identity_a)
        torch.testing.assert_close(out.terms["identity_b"], identity_b)
        torch.testing.assert_close(out.loss, expected.mean())
        torch.testing.assert_close(module.cycle(a[:, 0], "a_to_b"), f(g(a))[:, 0])

        d_out = module.loss(batch, group="discriminators")
        d_a = 0.5 * (((module.d_a(a) - 1) ** 2).mean((1, 2)) + (module.d_a(f(b)) ** 2).mean((1, 2)))
        d_b = 0.5 * (((module.d_b(b) - 1) ** 2).mean((1, 2)) + (module.d_b(g(a)) ** 2).mean((1, 2)))
        torch.testing.assert_close(d_out.terms["discriminator_a"], d_a)
        torch.testing.assert_close(d_out.loss, (d_a + d_b).mean())
    # no identity terms at lambda_identity = 0
    module.lambda_identity = 0.0
    assert "identity_a" not in module.loss(batch, group="generators").terms


def test_generators_output_images_in_the_unit_interval():
    module = CycleGANModule((28, 28), **SMALL)
    x = torch.rand(3, 28, 28)
    for direction in ("a_to_b", "b_to_a"):
        y = module.translate(x, direction)
        assert y.shape == (3, 28, 28) and (y > 0).all() and (y < 1).all()
    assert module.d_a(x[:, None]).shape == (3, 7, 7)  # a 7x7 map of patch scores


def test_each_adversarial_step_updates_only_its_group(monkeypatch, domains):
    a, b = domains
    model = CycleGAN((8, 8), **SMALL)
    groups = model.module.parameter_groups()
    steps: list[str] = []
    original = AdversarialStep._update

    def spy(step, batch, name, kl_weight, before_update):
        before = {g: [p.detach().clone() for p in params] for g, params in groups.items()}
        out = original(step, batch, name, kl_weight, before_update)
        for g, params in groups.items():
            changed = any(not torch.equal(old, p.detach()) for old, p in zip(before[g], params))
            assert changed == (g == name), f"a {name} step {'changed' if changed else 'left'} the {g} parameters"
        steps.append(name)
        return out

    monkeypatch.setattr(AdversarialStep, "_update", spy)
    model.train(a.subset(60), b.subset(60), max_epochs=1, batch_size=20, **TRAIN)
    assert steps == ["generators", "discriminators"] * 3


# --------------------------------------------------------------------------- training and use


def test_losses_decrease_and_round_trips_improve(trained, domains):
    a, b = domains
    history = trained.history
    for key in ("train_cycle_a", "train_cycle_b", "train_identity_a", "train_generators_loss"):
        assert history[key][-1] < 0.7 * history[key][0], key
    untrained = CycleGAN((8, 8), seed=0, **SMALL)
    for images, direction in ((a, "a_to_b"), (b, "b_to_a")):
        assert trained.cycle_error(images, direction) < 0.7 * untrained.cycle_error(images, direction)
    # the discriminators learn too (from the 0.5 of an untrained least squares discriminator)
    assert history["train_discriminators_loss"][-1] < 0.7 * history["train_discriminators_loss"][0]


def test_translations_have_the_input_shape_and_range(trained, domains):
    a, _ = domains
    for method in (trained.translate, trained.cycle):
        out = method(a.unit()[:7], "b_to_a")
        assert out.shape == (7, 8, 8) and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert trained.translate(a).shape == (len(a), 8, 8)  # an ImageSet is accepted
    error = trained.cycle_error(a.unit()[:7])
    assert error == pytest.approx(np.abs(trained.cycle(a.unit()[:7]) - a.unit()[:7]).mean())


def test_evaluation_reports_translation_beside_identity_and_oracle(trained, images):
    test_a, test_b = unpaired_domains(digits("test"), "invert", seed=1)
    train = digits("train")
    classifier_a = domain_classifier(train, max_epochs=3, **TRAIN)
    classifier_b = domain_classifier(domain_transform(train, "invert"), max_epochs=3, **TRAIN)
    report = evaluate_translation(trained, test_a, test_b, "invert", classifier_a, classifier_b)
    for direction in ("a_to_b", "b_to_a"):
        for key in ("accuracy", "identity_accuracy", "oracle_accuracy"):
            assert 0 <= report[f"{key}_{direction}"] <= 1
        # inverted digits fool a classifier of the other domain; the exact transform does not
        assert report[f"oracle_accuracy_{direction}"] > 0.7 > report[f"identity_accuracy_{direction}"]
        assert report[f"frechet_oracle_{direction}"] < report[f"frechet_identity_{direction}"]
    assert report["cycle_error_a"] == pytest.approx(trained.cycle_error(test_a, "a_to_b"))
    # thickening has no exact inverse: no real-vs-real distance for B -> A
    thick_a, thick_b = unpaired_domains(digits("test"), "thicken", seed=1)
    report = evaluate_translation(trained, thick_a, thick_b, "thicken", classifier_a, classifier_a)
    assert np.isnan(report["frechet_oracle_b_to_a"]) and np.isfinite(report["frechet_oracle_a_to_b"])


def test_seeded_training_is_reproducible(domains):
    a, b = domains
    runs = [
        CycleGAN((8, 8), seed=5, **SMALL).train(a.subset(64), b.subset(64), max_epochs=2, batch_size=32, **TRAIN)
        for _ in range(2)
    ]
    assert runs[0].history["train_cycle_a"] == runs[1].history["train_cycle_a"]
    np.testing.assert_array_equal(runs[0].translate(a.unit()[:5]), runs[1].translate(a.unit()[:5]))
    other = CycleGAN((8, 8), seed=6, **SMALL).train(a.subset(64), b.subset(64), max_epochs=2, batch_size=32, **TRAIN)
    assert not np.array_equal(other.translate(a.unit()[:5]), runs[0].translate(a.unit()[:5]))


def test_unequal_domains_and_validation_are_handled(domains):
    a, b = domains
    model = CycleGAN((8, 8), **SMALL).train(
        a.subset(50),
        b.subset(30),
        max_epochs=1,
        batch_size=25,
        validation=(a.subset(20, seed=1), b.subset(20)),
        **TRAIN,
    )
    assert np.isfinite(model.history["validation_cycle_a"]).all()
    assert np.isfinite(model.history["validation_discriminators_loss"]).all()
    pairs = model._pairs(a.subset(5).unit(), b.subset(3).unit(), np.random.default_rng(0))
    assert pairs.shape == (5, 2, 8, 8)
    # every B image appears, none more than twice (the smaller domain is repeated in fresh orders)
    counts = [sum(np.array_equal(p, q) for p in pairs[:, 1]) for q in b.subset(3).unit()]
    assert min(counts) >= 1 and max(counts) <= 2


def test_save_load_round_trip(trained, tmp_path, domains):
    a, _ = domains
    trained.save(tmp_path / "cyclegan")
    loaded = CycleGAN.load(tmp_path / "cyclegan")
    np.testing.assert_array_equal(loaded.translate(a.unit()[:9]), trained.translate(a.unit()[:9]))
    np.testing.assert_array_equal(loaded.cycle(a.unit()[:9], "b_to_a"), trained.cycle(a.unit()[:9], "b_to_a"))
    assert loaded.hyperparameters == trained.hyperparameters and loaded.history == trained.history
    assert "trained for 8 epochs" in repr(loaded)


def test_bad_arguments_are_refused(trained, domains):
    a, b = domains
    with pytest.raises(ValueError, match="direction must be one of"):
        trained.translate(a.unit()[:2], "sideways")
    with pytest.raises(ValueError, match="built for"):
        trained.translate(np.zeros((2, 9, 9), np.float32))
    with pytest.raises(ValueError, match=r"in \[0.0, 1.0\]"):
        trained.translate(np.full((2, 8, 8), 3.0, np.float32))
    with pytest.raises(ValueError, match="gan_loss must be one of"):
        CycleGAN((8, 8), gan_loss="wgan")
    with pytest.raises(ValueError, match="loss weights must be >= 0"):
        CycleGAN((8, 8), lambda_cycle=-1.0)
    with pytest.raises(ValueError, match="at least 8x8"):
        CycleGAN((6, 6))
    with pytest.raises(ValueError, match="grey-scale"):
        CycleGAN((3, 8, 8))
    with pytest.raises(ValueError, match="validation must be a tuple"):
        CycleGAN((8, 8), **SMALL).train(a, b, max_epochs=1, validation=a, **TRAIN)
    with pytest.raises(ValueError, match=r"\(B, 2, 8, 8\)"):
        trained.module.loss(ArrayBatch(torch.rand(2, 8, 8), None, torch.arange(2)))
    with pytest.raises(ValueError, match="group must be"):
        trained.module.loss(ArrayBatch(torch.rand(2, 2, 8, 8), None, torch.arange(2)), group="critic")


def test_bce_variant_trains(domains):
    a, b = domains
    model = CycleGAN((8, 8), gan_loss="bce", **SMALL).train(a.subset(64), b.subset(64), max_epochs=2, **TRAIN)
    assert np.isfinite(model.history["train_generators_loss"]).all()


def test_cli_mnist_cyclegan_on_digits(tmp_path, capsys):
    from sclatent.cli import main

    out = tmp_path / "run"
    arguments = ["mnist-cyclegan", "--dataset", "digits", "--domain", "invert", "--max-epochs", "1"]
    arguments += ["--n-filters", "4", "--n-residual-blocks", "1", "--n-train", "300", "--no-progress"]
    code = main([*arguments, "--accelerator", "cpu", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["domain"] == "invert" and summary["n_a"] == 150 and summary["epochs"] == 1
    for key in ("cycle_error_a", "accuracy_a_to_b", "identity_accuracy_b_to_a", "oracle_accuracy_a_to_b"):
        assert key in summary
    for name in ("translations.png", "training.png", "model/model.pt"):
        assert (out / name).exists()
    assert "identity map / CycleGAN / oracle" in capsys.readouterr().out
