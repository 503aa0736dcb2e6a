"""Image autoencoders (PCA-as-AE, bottleneck, sparse, contractive, tied, denoising) and the masked image AE.

All on scikit-learn's 8x8 digits: PCA's subspace recovered by the linear AE, corruption rates,
the contractive penalty against an exact Jacobian, tied storage, the masked-patch loss, seeded
reproducibility, save/load, errors and the two CLI commands.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from sclatent.datasets import digits
from sclatent.images import ImageAutoencoder, MaskedImageAutoencoder
from sclatent.images.data import ArrayBatch
from sclatent.images.modules.autoencoder import ImageAutoencoderModule
from sclatent.images.modules.masked import MaskedImageAutoencoderModule, masked_patch_loss, n_masked_patches
from sclatent.nn.regularisers import contractive_penalty

QUIET = dict(progress_bar=False)


@pytest.fixture(scope="module")
def data():
    return digits("train", seed=0), digits("test", seed=0)


def _flat(images) -> np.ndarray:
    x = images.unit()
    return x.reshape(len(x), -1).astype(np.float64)


# --------------------------------------------------------------------------- PCA as an autoencoder


@pytest.mark.parametrize("tied", [False, True])
def test_linear_ae_spans_the_top_principal_subspace(data, tied):
    """Baldi & Hornik (1989): the squared-error optimum of a linear AE spans PCA's top-k subspace.

    The digits' eigen-gaps are small (l_k / l_{k+1} ~ 1.1-1.45), so full-batch Adam (lr 1e-2) needs
    a few hundred steps: at k = 4 (gap 1.45) 600 steps reach a largest principal angle of 7e-5 deg
    (untied) / 1e-3 deg (tied) (measured); 0.5 deg leaves a wide margin, against ~50-90 deg at start.
    """
    train, _ = data
    x = _flat(train)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = 4
    model = ImageAutoencoder((8, 8), kind="linear", n_latent=k, tied_weights=tied, seed=0)
    assert model.module.likelihood == "gaussian" and model.module.noise.kind == "none"
    before = np.degrees(subspace_angles(model.decoder_basis(), vt[:k].T)).max()
    model.train(train, max_epochs=600, batch_size=len(train), lr=1e-2, **QUIET)
    np.testing.assert_allclose(model.module.input_mean.numpy(), x.mean(0), atol=1e-6)
    angles = np.degrees(subspace_angles(model.decoder_basis(), vt[:k].T))
    assert before > 30, before
    assert angles.max() < 0.5, angles
    # its reconstruction error is PCA's: the discarded variance per pixel
    pca_mse = (s[k:] ** 2).sum() / centred.size
    assert model.reconstruction_error(train).mean() == pytest.approx(pca_mse, rel=1e-3)


# --------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("noise", ["salt", "masking"])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_salt_and_masking_hide_the_documented_fraction(data, noise, rate):
    train, _ = data
    model = ImageAutoencoder((8, 8), kind="denoising", noise=noise, noise_rate=rate, n_hidden=16, seed=0)
    corrupted, mask = model.corrupt(train)
    clean = train.unit()
    # 92,032 entries: the binomial sd of the hidden fraction is < 0.002
    assert abs(mask.mean() - rate) < 0.01
    assert np.all(corrupted[mask == 1] == 0) and np.array_equal(corrupted[mask == 0], clean[mask == 0])
    # seeded: the same corruption for the same seed, another for another
    again, _ = model.corrupt(train)
    assert np.array_equal(corrupted, again)
    assert not np.array_equal(mask, model.corrupt(train, seed=1)[1])


def test_gaussian_noise_has_the_documented_std(data):
    train, _ = data
    model = ImageAutoencoder((8, 8), kind="denoising", noise="gaussian", noise_rate=0.3, n_hidden=16, seed=0)
    corrupted, mask = model.corrupt(train)
    assert (corrupted - train.unit()).std() == pytest.approx(0.3, rel=0.02)
    assert not mask.any()


def test_masking_doubles_the_encoder_input_and_the_decoder_mirrors_the_image_columns():
    d = 64
    masking = ImageAutoencoderModule((8, 8), noise="masking", noise_rate=0.2, n_hidden=16, tied_weights=True)
    salt = ImageAutoencoderModule((8, 8), noise="salt", noise_rate=0.2, n_hidden=16)
    assert masking.encoder.layers[0].linear.in_features == 2 * d
    assert salt.encoder.layers[0].linear.in_features == d
    assert masking(torch.rand(3, 8, 8)).shape == (3, 8, 8)


@pytest.mark.parametrize("noise", ["gaussian", "salt", "masking"])
def test_training_loss_sees_the_corruption_and_evaluation_does_not(data, noise):
    train, _ = data
    module = ImageAutoencoderModule((8, 8), noise=noise, noise_rate=0.4, n_hidden=16, n_latent=4)
    x = torch.as_tensor(train.unit()[:200])
    batch = ArrayBatch(x, None, torch.arange(200))
    module.eval()
    clean_loss = module.loss(batch).terms["reconstruction"]
    with torch.no_grad():
        expected = torch.nn.functional.binary_cross_entropy_with_logits(
            module.decode(module.encode(x.reshape(200, -1))), x.reshape(200, -1), reduction="none"
        ).sum(-1)
    torch.testing.assert_close(clean_loss, expected)
    torch.testing.assert_close(module.loss(batch).terms["reconstruction"], clean_loss)  # eval is deterministic
    module.train()
    torch.manual_seed(0)
    assert not torch.allclose(module.loss(batch).terms["reconstruction"], clean_loss)


def test_denoising_model_denoises_better_than_a_plain_one(data):
    """Gaussian noise of sd 0.5 on the test digits: measured MSE to the clean images 0.040 (denoising
    AE trained with that noise) vs 0.051 (plain bottleneck trained on clean images), 40 epochs; the
    plain one is better on clean images (0.022 vs 0.028). (Salt at 0.4: 0.038 vs 0.042, a thinner
    margin on 8x8 digits where a hidden pixel is a large part of a stroke.)"""
    train, test = data
    options = dict(n_latent=16, n_hidden=64, seed=0)
    dae = ImageAutoencoder((8, 8), kind="denoising", noise="gaussian", noise_rate=0.5, **options)
    plain = ImageAutoencoder((8, 8), kind="bottleneck", **options)
    for model in (dae, plain):
        model.train(train, max_epochs=40, **QUIET)
    denoised = dae.reconstruction_error(test, noise="gaussian", noise_rate=0.5).mean()
    plain_error = plain.reconstruction_error(test, noise="gaussian", noise_rate=0.5).mean()
    assert denoised < 0.9 * plain_error, (denoised, plain_error)
    assert plain.reconstruction_error(test).mean() < dae.reconstruction_error(test).mean()
    # denoise() of the corrupted images is what reconstruct(noise=...) computes
    corrupted, _ = dae.corrupt(test, "salt", 0.4)
    np.testing.assert_allclose(dae.denoise(corrupted), dae.reconstruct(test, noise="salt", noise_rate=0.4), atol=1e-6)
    errors = dae.reconstruction_error(test, noise="salt", noise_rate=0.4)
    np.testing.assert_allclose(errors, ((dae.denoise(corrupted) - test.unit()) ** 2).mean((1, 2)), rtol=1e-5)


def test_masking_model_is_given_the_mask(data):
    train, test = data
    model = ImageAutoencoder((8, 8), kind="denoising", noise="masking", noise_rate=0.3, n_hidden=32, seed=0)
    model.train(train, max_epochs=5, **QUIET)
    corrupted, mask = model.corrupt(test)
    with_mask = model.denoise(corrupted, mask)
    np.testing.assert_allclose(with_mask, model.reconstruct(test, noise="masking"), atol=1e-6)
    assert not np.allclose(with_mask, model.denoise(corrupted))  # an all-zero mask reads differently


# --------------------------------------------------------------------------- regularisers


def test_contractive_penalty_matches_the_exact_jacobian():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    x = torch.randn(4, 5, requires_grad=True)
    code = net(x)
    exact = torch.stack([(torch.autograd.functional.jacobian(net, x[b]) ** 2).sum() for b in range(4)])
    # the basis probes e_k sum to the exact norm
    by_basis = sum(contractive_penalty(code, x, torch.eye(3)[k].expand(4, 3)) for k in range(3))
    torch.testing.assert_close(by_basis, exact.detach())
    # one Gaussian probe per item is unbiased: 4,000 draws average within 10 % (sd of the mean < 3 %)
    estimates = torch.stack([contractive_penalty(code, x).detach() for _ in range(4000)])
    torch.testing.assert_close(estimates.mean(0), exact.detach(), rtol=0.1, atol=0.0)
    # differentiable (it is a training penalty)
    contractive_penalty(code, x).sum().backward()
    assert net[0].weight.grad is not None and torch.isfinite(net[0].weight.grad).all()
    with pytest.raises(ValueError, match="require gradients"):
        contractive_penalty(code, torch.randn(4, 5))


def test_module_contractive_term_is_the_encoder_jacobian_norm(data):
    train, _ = data
    module = ImageAutoencoderModule((8, 8), contractive=1.0, n_hidden=16, n_latent=3)
    module.train()
    x = torch.as_tensor(train.unit()[:3])
    batch = ArrayBatch(x, None, torch.arange(3))
    estimates = []
    for seed in range(1500):
        torch.manual_seed(seed)
        estimates.append(module.loss(batch).terms["contractive"].detach())
    exact = torch.stack(
        [(torch.autograd.functional.jacobian(module.encode, x[b].reshape(1, -1)) ** 2).sum() for b in range(3)]
    )
    torch.testing.assert_close(torch.stack(estimates).mean(0), exact, rtol=0.12, atol=0.0)


def test_tied_weights_share_storage(tmp_path):
    n_hidden, n_latent, d = 16, 4, 64
    options = dict(n_hidden=n_hidden, n_latent=n_latent, n_layers=2)
    tied = ImageAutoencoderModule((8, 8), tied_weights=True, **options)
    free = ImageAutoencoderModule((8, 8), **options)
    n_tied = sum(p.numel() for p in tied.parameters())
    n_free = sum(p.numel() for p in free.parameters())
    assert n_free - n_tied == n_latent * n_hidden + n_hidden * n_hidden + n_hidden * d
    assert tied.out._source is tied.encoder.layers[0].linear
    assert tied.decoder.layers[0].linear._source is tied.code
    h = torch.randn(5, n_hidden)
    torch.testing.assert_close(tied.out(h), h @ tied.encoder.layers[0].linear.weight + tied.out.bias)
    # still shared after save/load: changing the encoder matrix changes the decoder
    model = ImageAutoencoder((8, 8), kind="tied", **options)
    loaded = ImageAutoencoder.load(model.save(tmp_path / "tied"))
    source = loaded.module.encoder.layers[0].linear.weight
    assert loaded.module.out._source.weight.data_ptr() == source.data_ptr()
    before = loaded.reconstruct(np.full((1, 8, 8), 0.5, np.float32))
    with torch.no_grad():
        source.mul_(2.0)
    assert not np.allclose(before, loaded.reconstruct(np.full((1, 8, 8), 0.5, np.float32)))


def test_sparse_penalty_shrinks_the_code(data):
    train, _ = data
    l1 = {}
    for kind in ("bottleneck", "sparse"):
        model = ImageAutoencoder((8, 8), kind=kind, n_latent=8, n_hidden=32, seed=0).train(
            train, max_epochs=15, **QUIET
        )
        l1[kind] = np.abs(model.encode(train)).sum(1).mean()
    assert l1["sparse"] < 0.5 * l1["bottleneck"], l1


# --------------------------------------------------------------------------- training, persistence, errors


@pytest.mark.parametrize("kind", ["linear", "bottleneck", "sparse", "contractive", "tied", "denoising"])
def test_every_kind_trains_reproducibly_and_round_trips(data, kind, tmp_path):
    train, test = data

    def fit():
        return ImageAutoencoder((8, 8), kind=kind, n_latent=6, n_hidden=32, seed=3).train(
            train, max_epochs=6, validation=test, **QUIET
        )

    model = fit()
    history = model.history
    assert history["train_reconstruction"][-1] < history["train_reconstruction"][0]
    assert np.isfinite(history["validation_mse"]).all()
    if kind == "sparse":
        assert "train_l1" in history
    if kind == "contractive":
        assert min(history["train_contractive"]) >= 0
    codes = model.encode(test)
    assert codes.shape == (len(test), 6) and codes.dtype == np.float32
    recon = model.reconstruct(test)
    assert recon.shape == (len(test), 8, 8)
    if kind != "linear":
        assert recon.min() >= 0 and recon.max() <= 1
    assert np.array_equal(codes, fit().encode(test))
    loaded = ImageAutoencoder.load(model.save(tmp_path / kind))
    assert loaded.hyperparameters == model.hyperparameters
    np.testing.assert_array_equal(loaded.encode(test), codes)
    np.testing.assert_array_equal(loaded.reconstruction_error(test), model.reconstruction_error(test))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(kind="pca"), "kind must be one of"),
        (dict(kind="linear", noise="salt"), "PCA as an autoencoder"),
        (dict(kind="linear", sparsity=1.0), "PCA as an autoencoder"),
        (dict(kind="denoising", noise="none"), "needs a corruption"),
        (dict(noise="dropout"), "noise must be one of"),
        (dict(noise="salt", noise_rate=1.0), r"\[0, 1\)"),
        (dict(sparsity=-1.0), "must be >= 0"),
        (dict(likelihood="poisson"), "likelihood must be one of"),
        (dict(n_latent=100), "must not exceed"),
    ],
)
def test_autoencoder_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        ImageAutoencoder((8, 8), **options)


def test_autoencoder_refuses_bad_inputs(data):
    model = ImageAutoencoder((8, 8), n_hidden=8)
    with pytest.raises(ValueError, match="intensities in"):
        model.train(np.full((10, 8, 8), 16.0), **QUIET)
    with pytest.raises(ValueError, match="built for"):
        model.encode(np.zeros((3, 7, 7)))
    with pytest.raises(ValueError, match="noise must be one of"):
        model.reconstruction_error(data[1], noise="blur")
    with pytest.raises(ValueError, match="kind='linear' only"):
        model.decoder_basis()
    # a Gaussian-likelihood model takes any finite vectors
    ImageAutoencoder((3,), kind="linear", n_latent=1).train(
        np.random.default_rng(0).normal(size=(20, 3)), max_epochs=1, **QUIET
    )


# --------------------------------------------------------------------------- masked image autoencoder


@pytest.mark.parametrize("ratio, patch", [(0.75, 2), (0.5, 2), (0.75, 4), (0.3, 4)])
def test_masked_patch_count_is_round_ratio_times_patches(ratio, patch):
    module = MaskedImageAutoencoderModule((8, 8), patch_size=patch, mask_ratio=ratio, n_hidden=8, n_latent=4)
    n_patches = (8 // patch) ** 2
    assert module.n_patches == n_patches
    expected = min(n_patches - 1, max(1, round(ratio * n_patches)))
    assert module.n_masked == expected == n_masked_patches(n_patches, ratio)
    mask = module.draw_mask(500, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and torch.all(mask.sum(1) == expected)
    pixels = module.pixel_mask(mask)
    assert torch.all(pixels.sum(1) == expected * patch**2)
    # each hidden patch is a whole patch: the pixel mask is constant on every patch
    blocks = pixels.reshape(500, 8 // patch, patch, 8 // patch, patch)
    assert torch.all(blocks.amax((2, 4)) == blocks.amin((2, 4)))
    # every patch gets hidden sometimes (uniform placement)
    assert torch.all(mask.float().mean(0) > 0.5 * expected / n_patches)


def test_masked_loss_ignores_visible_pixels(data):
    train, _ = data
    module = MaskedImageAutoencoderModule((8, 8), patch_size=2, n_hidden=16, n_latent=4)
    x = torch.as_tensor(train.unit()[:20]).reshape(20, -1)
    mask = module.pixel_mask(module.draw_mask(20, torch.Generator().manual_seed(0)))
    output = torch.randn(20, 64, requires_grad=True)
    loss = masked_patch_loss(output, x, mask)
    changed = output.detach() + 5.0 * (1 - mask) * torch.randn(20, 64)  # visible predictions only
    torch.testing.assert_close(masked_patch_loss(changed, x, mask), loss.detach())
    assert not torch.allclose(masked_patch_loss(output.detach() + mask, x, mask), loss.detach())
    loss.sum().backward()
    assert torch.all(output.grad[mask == 0] == 0) and torch.all(output.grad[mask == 1] != 0)
    # and the module's visible input really hides the masked pixels: changing them leaves the code alone
    patch_mask = module.draw_mask(20, torch.Generator().manual_seed(1))
    pixel_mask = module.pixel_mask(patch_mask).reshape(20, 8, 8)
    images = x.reshape(20, 8, 8)
    scribbled = images + pixel_mask * torch.rand(20, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(module.represent(scribbled, patch_mask), module.represent(images, patch_mask))


@pytest.mark.parametrize("encoder", ["conv", "mlp"])
def test_masked_autoencoder_trains_reproducibly_and_round_trips(data, encoder, tmp_path):
    train, test = data

    def fit():
        return MaskedImageAutoencoder((8, 8), patch_size=2, n_latent=16, n_hidden=64, encoder=encoder, seed=1).train(
            train, max_epochs=8, validation=test, **QUIET
        )

    model = fit()
    history = model.history
    assert history["train_reconstruction"][-1] < 0.8 * history["train_reconstruction"][0]
    assert np.isfinite(history["validation_masked_mse"]).all()
    features = model.get_representation(test)
    assert features.shape == (len(test), 16) and features.dtype == np.float32
    np.testing.assert_array_equal(features, fit().get_representation(test))
    reconstruction, mask = model.reconstruct(test, mask_seed=3)
    assert reconstruction.shape == mask.shape == (len(test), 8, 8)
    assert np.all(mask.reshape(len(test), -1).sum(1) == 12 * 4)  # 12 of 16 patches of 4 pixels
    # visible pixels are pasted from the input; hidden ones are predictions in [0, 1]
    np.testing.assert_array_equal(reconstruction[mask == 0], test.unit()[mask == 0])
    assert reconstruction.min() >= 0 and reconstruction.max() <= 1
    np.testing.assert_array_equal(model.reconstruct(test, mask_seed=3)[1], mask)
    assert not np.array_equal(model.reconstruct(test, mask_seed=4)[1], mask)
    loaded = MaskedImageAutoencoder.load(model.save(tmp_path / "mae"))
    np.testing.assert_array_equal(loaded.get_representation(test), features)
    np.testing.assert_array_equal(loaded.masked_error(test), model.masked_error(test))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(patch_size=3), "must divide"),
        (dict(mask_ratio=1.0), r"mask_ratio must be in \(0, 1\)"),
        (dict(mask_ratio=0.0), r"mask_ratio must be in \(0, 1\)"),
        (dict(patch_size=8), "one patch"),
        (dict(encoder="vit"), "encoder must be one of"),
    ],
)
def test_masked_autoencoder_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        MaskedImageAutoencoder((8, 8), **options)
    with pytest.raises(ValueError, match="grey-scale"):
        MaskedImageAutoencoder((3, 8, 8))


# --------------------------------------------------------------------------- command line


def test_cli_commands_on_digits(tmp_path):
    from sclatent.cli import main

    common = ["--dataset", "digits", "--max-epochs", "2"]
    main(
        [
            "mnist-ae",
            *common,
            "--kind",
            "denoising",
            "--noise",
            "masking",
            "--n-latent",
            "6",
            "--out",
            str(tmp_path / "ae"),
        ]
    )
    summary = json.loads((tmp_path / "ae" / "summary.json").read_text())
    assert summary["noise"] == "masking" and summary["test_mse_corrupted"] > 0 and summary["pca_test_mse"] > 0
    assert (tmp_path / "ae" / "reconstructions.png").exists() and (tmp_path / "ae" / "model" / "model.pt").exists()
    main(["mnist-ae", *common, "--kind", "linear", "--n-latent", "4", "--out", str(tmp_path / "linear")])
    summary = json.loads((tmp_path / "linear" / "summary.json").read_text())
    assert 0 <= summary["max_principal_angle_deg"] <= 90
    main(["mnist-mae", *common, "--patch-size", "2", "--n-latent", "8", "--out", str(tmp_path / "mae")])
    summary = json.loads((tmp_path / "mae" / "summary.json").read_text())
    assert summary["n_masked_patches"] == 12
    assert 0.1 < summary["linear_probe_accuracy"] <= 1 and 0.5 < summary["raw_pixel_linear_probe_accuracy"] <= 1
    assert (tmp_path / "mae" / "reconstructions.png").exists()
