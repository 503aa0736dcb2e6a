"""SimCLR on images: augmentations (shape, range, seeding, identity, adjacent overlap), the module, the model, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import sclatent
import sclatent.cli
from sclatent.images import SimCLR
from sclatent.images.data import ArrayBatch
from sclatent.images.metrics import labels_per_class, linear_probe_accuracy
from sclatent.images.modules import simclr
from sclatent.images.nn.augment import (
    ImageAugmentation,
    adjacent_boxes,
    adjacent_overlap,
    box_matrices,
    gaussian_blur,
    gaussian_noise,
    random_affine_matrices,
    random_crop_boxes,
    warp,
)
from sclatent.nn import contrastive

OFF = dict(
    crop_min_area=1.0,
    rotation=0.0,
    translation=0.0,
    scale=0.0,
    shear=0.0,
    blur_sigma=0.0,
    noise_std=0.0,
    adjacent_probability=0.0,
)


@pytest.fixture(scope="module")
def digits():
    return sclatent.datasets.digits("train"), sclatent.datasets.digits("test")


def _images(n=16, size=12, seed=0) -> torch.Tensor:
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("shape", [(8, 12, 12), (8, 1, 12, 12), (8, 3, 10, 14)])
def test_augmentation_keeps_shape_and_range(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    augment = ImageAugmentation(noise_std=0.5, noise_probability=1.0, blur_probability=1.0, crop_min_area=0.3)
    v1, v2 = augment.pair(x, torch.Generator().manual_seed(0))
    for view in (v1, v2, augment(x)):
        assert view.shape == x.shape and view.dtype == x.dtype
        assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0
    assert not torch.equal(v1, v2)  # two independent views


def test_augmentation_is_seeded():
    x, augment = _images(), ImageAugmentation()
    a = augment.pair(x, torch.Generator().manual_seed(3))
    b = augment.pair(x, torch.Generator().manual_seed(3))
    c = augment.pair(x, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])
    # the global generator (what training uses) is honoured too
    torch.manual_seed(5)
    d = augment(x)
    torch.manual_seed(5)
    assert torch.equal(d, augment(x))


def test_zero_strength_is_identity():
    x = _images()
    augment = ImageAugmentation(**OFF)
    v1, v2 = augment.pair(x)
    assert torch.equal(v1, x) and torch.equal(v2, x)
    assert torch.equal(gaussian_noise(x, 0.0), x)
    assert torch.equal(gaussian_blur(x, torch.zeros(len(x))), x)
    theta = random_affine_matrices(4)
    assert torch.equal(theta, box_matrices(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4, 4)))
    # the identity map through grid_sample reproduces the image (pixel centres, align_corners=False)
    assert torch.allclose(warp(x, box_matrices(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(x), 4))), x, atol=1e-5)


def test_crop_boxes_inside_image_with_documented_area():
    boxes = random_crop_boxes(4000, 0.4, (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(0))
    cx, cy, w, h = boxes.unbind(-1)
    assert bool((cx - w >= -1 - 1e-6).all() and (cx + w <= 1 + 1e-6).all())
    assert bool((cy - h >= -1 - 1e-6).all() and (cy + h <= 1 + 1e-6).all())
    area = w * h
    assert float(area.min()) >= 0.4 * 3 / 4 - 1e-6  # clipping a side at 1 can only shrink the area
    assert abs(float(area.mean()) - 0.7) < 0.03  # U(0.4, 1) before the rare clipping


def test_crop_content_is_the_box():
    # a crop of the left half, resampled to full size, shows only the left half's content
    x = torch.zeros(1, 8, 8)
    x[..., :4] = 1.0
    left = warp(x, box_matrices(torch.tensor([[-0.5, 0.0, 0.5, 1.0]])))
    right = warp(x, box_matrices(torch.tensor([[0.5, 0.0, 0.5, 1.0]])))
    assert torch.allclose(left[..., 1:-1], torch.ones(1, 8, 6))
    assert torch.allclose(right[..., 1:-1], torch.zeros(1, 8, 6))


def test_adjacent_crops_overlap_as_documented():
    generator = torch.Generator().manual_seed(0)
    boxes = random_crop_boxes(5000, 0.3, generator=generator)
    max_shift = 0.2
    moved = adjacent_boxes(boxes, max_shift, generator)
    # same size, centres within max_shift of the side (2 * max_shift normalised), inside the image
    assert torch.equal(moved[:, 2:], boxes[:, 2:])
    assert float((moved[:, :2] - boxes[:, :2]).abs().max()) <= 2 * max_shift + 1e-6
    assert bool(((moved[:, :2].abs() + moved[:, 2:]) <= 1 + 1e-6).all())
    overlap = adjacent_overlap(boxes, moved)
    bound = (1 - max_shift / boxes[:, 2]).clamp(min=0) * (1 - max_shift / boxes[:, 3]).clamp(min=0)
    assert bool((overlap >= bound - 1e-5).all())
    assert float(overlap.min()) > 0.0  # crops of >= 0.3 of the area always share content at this shift
    # independent crops, by contrast, sometimes do not overlap at all
    independent = random_crop_boxes(5000, 0.3, generator=generator)
    assert float(adjacent_overlap(boxes, independent).min()) < float(overlap.min())


def test_adjacent_views_with_zero_shift_are_the_same_crop():
    augment = ImageAugmentation(**{**OFF, "crop_min_area": 0.25, "adjacent_probability": 1.0, "adjacent_shift": 0.0})
    x = _images(64, 16)
    v1, v2 = augment.pair(x, torch.Generator().manual_seed(0))
    assert torch.equal(v1, v2)  # zero shift: the same crop twice


def test_blur_preserves_mass_inside_and_smooths():
    x = torch.zeros(2, 15, 15)
    x[:, 7, 7] = 1.0
    out = gaussian_blur(x, torch.tensor([0.0, 1.5]))
    assert torch.equal(out[0], x[0])
    assert abs(float(out[1].sum()) - 1.0) < 1e-5 and float(out[1].max()) < 0.2


def test_augmentation_errors():
    with pytest.raises(ValueError, match="min_area"):
        ImageAugmentation(crop_min_area=0.0)
    with pytest.raises(ValueError, match="probability"):
        ImageAugmentation(noise_probability=1.5)
    with pytest.raises(ValueError, match="scale"):
        ImageAugmentation(scale=1.0)
    with pytest.raises(ValueError, match="max_shift"):
        ImageAugmentation(adjacent_shift=2.0)
    with pytest.raises(ValueError, match="images"):
        ImageAugmentation()(torch.zeros(4, 5))


# ----------------------------------------------------------------------- module


def test_module_reuses_the_cell_nt_xent():
    # the image module imports the cell model's loss and head; it defines no copy of its own
    assert simclr.nt_xent is contrastive.nt_xent
    assert simclr.ProjectionHead is contrastive.ProjectionHead
    assert "def nt_xent" not in open(simclr.__file__).read()
    module = simclr.ImageSimCLRModule((8, 8), temperature=0.3)
    assert isinstance(module.projection, contrastive.ProjectionHead)
    # the loss equals nt_xent of the two views' projections (eval mode: fixed views)
    module.eval()
    x = torch.rand(10, 8, 8)
    batch = ArrayBatch(x, None, torch.arange(10))
    out = module.loss(batch)
    generator = torch.Generator().manual_seed(contrastive.EVALUATION_SEED)
    v1, v2 = module.views(x, generator)
    p1, p2 = module.projection(module.encoder(torch.cat([v1, v2]))).chunk(2)
    expected = contrastive.nt_xent(p1, p2, 0.3)
    assert torch.allclose(out.terms["nt_xent"], 0.5 * (expected[:10] + expected[10:]), atol=1e-5)
    assert float(out.loss.detach()) <= math.log(2 * 10 - 1) + 1.0  # a (2N-1)-way classification near chance


@pytest.mark.parametrize("encoder", ["conv", "mlp"])
def test_representation_shape_and_gradients(encoder):
    module = simclr.ImageSimCLRModule((1, 8, 8), n_representation=12, encoder=encoder)
    module.train()
    batch = ArrayBatch(torch.rand(6, 1, 8, 8), None, torch.arange(6))
    module.loss(batch).loss.backward()
    assert all(p.grad is not None for p in module.parameters())
    assert module.representation(torch.rand(5, 1, 8, 8)).shape == (5, 12)


# ----------------------------------------------------------------------- model


def test_loss_decreases_and_probe_beats_random_init(digits):
    train, test = digits
    model = SimCLR((8, 8), n_representation=32, seed=0)
    before = model.get_representation(train), model.get_representation(test)
    model.train(train, max_epochs=8, progress_bar=False, validation=test)
    history = model.history["train_nt_xent"]
    assert history[-1] < history[0] - 0.3
    assert model.history["validation_nt_xent"][-1] < model.history["validation_nt_xent"][0]
    h_train, h_test = model.get_representation(train), model.get_representation(test)
    assert h_train.shape == (len(train), 32) and h_train.dtype == np.float32
    trained = linear_probe_accuracy(h_train, train.labels, h_test, test.labels)
    few = labels_per_class(train.labels, 5, seed=0)
    assert trained > 0.9
    trained_few = linear_probe_accuracy(h_train[few], train.labels[few], h_test, test.labels)
    random_few = linear_probe_accuracy(before[0][few], train.labels[few], before[1], test.labels)
    assert trained_few > random_few


def test_seeded_reproducibility(digits):
    train, _ = digits
    x = train.unit()[:300]
    runs = [SimCLR((8, 8), seed=1).train(x, max_epochs=2, progress_bar=False) for _ in range(2)]
    assert runs[0].history["train_nt_xent"] == runs[1].history["train_nt_xent"]
    assert np.array_equal(runs[0].get_representation(x), runs[1].get_representation(x))
    other = SimCLR((8, 8), seed=2).train(x, max_epochs=2, progress_bar=False)
    assert not np.array_equal(other.get_representation(x), runs[0].get_representation(x))
    a, b = runs[0].views(x[:5], seed=0), runs[0].views(x[:5], seed=0)
    assert np.array_equal(a[0], b[0]) and a[0].shape == (5, 8, 8)


def test_save_load_round_trip(digits, tmp_path):
    train, _ = digits
    x = train.unit()[:200]
    augmentations = {"noise_std": 0.2, "crop_ratio": (0.8, 1.25)}
    model = SimCLR((8, 8), n_representation=16, augmentations=augmentations, encoder="mlp", n_hidden=32)
    model.train(x, max_epochs=1, progress_bar=False)
    model.save(tmp_path / "m")
    loaded = SimCLR.load(tmp_path / "m")
    assert np.array_equal(loaded.get_representation(x), model.get_representation(x))
    assert loaded.module.augment.noise_std == 0.2 and loaded.history == model.history
    assert loaded.get_projection(x).shape == (200, 32)


def test_errors():
    with pytest.raises(ValueError, match="temperature"):
        SimCLR((8, 8), temperature=0.0)
    with pytest.raises(ValueError, match="augmentation"):
        SimCLR((8, 8), augmentations={"colour_jitter": 0.4})
    with pytest.raises(ValueError, match="augmentations must be a dict"):
        SimCLR((8, 8), augmentations="strong")
    with pytest.raises(ValueError, match="encoder"):
        SimCLR((8, 8), encoder="resnet")
    model = SimCLR((8, 8))
    with pytest.raises(ValueError, match="batch_size"):
        model.train(np.zeros((10, 8, 8), np.float32), batch_size=1)
    with pytest.raises(ValueError, match="intensities"):
        model.get_representation(np.full((3, 8, 8), 16.0, np.float32))
    with pytest.raises(ValueError, match="n_per_class"):
        labels_per_class(np.array([0, 0, 1]), 2)


@pytest.mark.needs_data("MNIST")
def test_mnist_subset_trains():
    try:
        train = sclatent.datasets.mnist("train").subset(256, seed=0)
    except sclatent.datasets.DatasetUnavailableError:
        pytest.skip("MNIST files not available")
    model = SimCLR((28, 28), n_representation=16, widths=(8, 16)).train(train, max_epochs=1, progress_bar=False)
    assert model.get_representation(train).shape == (256, 16)
    assert np.isfinite(model.history["train_nt_xent"]).all()


def test_cli_on_digits(tmp_path):
    out = tmp_path / "run"
    args = ["mnist-simclr", "--dataset", "digits", "--max-epochs", "2", "--out", str(out)]
    assert sclatent.cli.main([*args, "--labels-per-class", "5", "--accelerator", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "probe_accuracy_simclr",
        "probe_accuracy_pca",
        "probe_accuracy_pixels",
        "probe_accuracy_simclr_5_per_class",
    ):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["probe_accuracy_simclr"] > 0.8
    for name in ("views.png", "training.png", "representation_pca.png", "model/model.pt"):
        assert (out / name).exists()
    assert SimCLR.load(out / "model").is_trained
