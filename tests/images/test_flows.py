"""Tests for the normalizing flows: Glow blocks, the multi-scale image flow, the 2-D energies and flows.

Every block and the whole image flow are checked in float64: ``f^-1(f(x)) == x`` and ``log |det J|``
against autograd's Jacobian (``torch.autograd.functional.jacobian`` + ``slogdet``) on ``(2, 4, 4, 4)``
images, with the zero-initialised layers perturbed so that no layer is the identity.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sclatent.cli import main
from sclatent.datasets import (
    ENERGIES,
    U1,
    U2,
    U3,
    U4,
    digits,
    energy,
    gaussian_mixture,
    log_normaliser,
    rings,
    two_moons,
)
from sclatent.images import DensityFlow, EnergyFlow, ImageFlow
from sclatent.images.flow import pixel_histogram_bits_per_dim
from sclatent.images.modules.density_flow import EnergyFlowModule
from sclatent.images.modules.flow import ImageFlowModule
from sclatent.images.nn.glow import ActNorm, AffineCoupling, FlowStep, InvertibleConv1x1, Squeeze

TRAIN = dict(accelerator="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def digit_sets():
    return digits("train"), digits("test")


def _perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    """Move every parameter off its initial value (zero-initialised couplings would be the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _jacobian_log_det(function, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``log |det d function(x_i) / d x_i|`` per item, from autograd's full Jacobian."""
    out = []
    for item in x:
        jac = torch.autograd.functional.jacobian(lambda v: function(v.unsqueeze(0)).flatten(), item)
        out.append(torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))[1])
    return torch.stack(out)


def _blocks():
    torch.manual_seed(0)
    blocks = {
        "actnorm": ActNorm(4),
        "conv1x1": InvertibleConv1x1(4),
        "squeeze": Squeeze(),
        "step": FlowStep(4, n_hidden=8),
    }
    for mask in ("channel", "checkerboard"):
        for parity in (0, 1):
            for scale in ("tanh", "sigmoid"):
                blocks[f"coupling-{mask}-{parity}-{scale}"] = AffineCoupling(4, mask, parity, n_hidden=8, scale=scale)
    return blocks


@pytest.mark.parametrize("name", list(_blocks()))
def test_block_inverse_and_log_det_match_autograd(name):
    block = _blocks()[name].double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    block.train()
    block(x)  # data-dependent initialisation where there is one
    _perturb(block)
    block.eval()
    y, log_det = block(x)
    assert y.shape == (2, 16, 2, 2) if name == "squeeze" else y.shape == x.shape
    assert log_det.shape == (2,)
    torch.testing.assert_close(block.inverse(y), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_det, _jacobian_log_det(lambda v: block(v)[0], x), atol=1e-10, rtol=0)


def test_couplings_start_as_identity():
    x = torch.randn(3, 4, 4, 4)
    for mask in ("channel", "checkerboard"):
        for scale in ("tanh", "sigmoid"):
            y, log_det = AffineCoupling(4, mask, 1, n_hidden=8, scale=scale)(x)
            torch.testing.assert_close(y, x)
            torch.testing.assert_close(log_det, torch.zeros(3))


def test_actnorm_data_dependent_init_and_persistence():
    layer = ActNorm(3)
    x = 5.0 + 3.0 * torch.randn(64, 3, 4, 4)
    assert not bool(layer.initialised)
    layer.train()
    y, _ = layer(x)
    assert bool(layer.initialised)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    before = layer.log_scale.detach().clone()
    layer(10 * x)  # a second batch does not re-initialise
    torch.testing.assert_close(layer.log_scale, before)
    fresh = ActNorm(3)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialised)


def test_lu_conv_weight_and_log_det():
    torch.manual_seed(0)
    conv = InvertibleConv1x1(5).double()
    _perturb(conv)
    eye = torch.eye(5, dtype=torch.float64)
    lower = torch.tril(conv.lower, -1) + eye
    upper = torch.triu(conv.upper, 1) + torch.diag(conv.sign_s * torch.exp(conv.log_s))
    torch.testing.assert_close(conv.weight(), conv.permutation @ lower @ upper)
    # P is a permutation and L unit-lower: only the masked entries of the parameters matter
    assert torch.all(conv.permutation.sum(0) == 1) and torch.all(conv.permutation.sum(1) == 1)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    _, log_det = conv(x)
    expected = 3 * 4 * torch.log(conv.log_s.exp()).sum()
    torch.testing.assert_close(log_det, expected.expand(2))
    torch.testing.assert_close(log_det[0], 3 * 4 * torch.linalg.slogdet(conv.weight())[1])


@pytest.mark.parametrize("preprocess", ["logit", "center"])
@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
def test_image_flow_inverse_and_log_det_match_autograd(preprocess, mask):
    torch.manual_seed(0)
    module = ImageFlowModule((4, 4, 4), levels=17, n_scales=2, n_steps=2, n_hidden=8, mask=mask, preprocess=preprocess)
    module = module.double()
    x = 0.05 + 0.9 * torch.rand(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    module.initialise(x)
    _perturb(module, scale=0.05)
    module.eval()
    zs, log_det, log_prior = module.encode(x)
    torch.testing.assert_close(module.decode(zs), x, atol=1e-11, rtol=0)
    torch.testing.assert_close(module.unflatten(module.flatten(zs))[0], zs[0])
    expected = _jacobian_log_det(lambda v: module.flatten(module.encode(v)[0]), x)
    torch.testing.assert_close(log_det, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(module.log_prob(x), log_det + log_prior)


def test_image_flow_standard_normal_prior_density():
    torch.manual_seed(0)
    module = ImageFlowModule((1, 4, 4), levels=4, n_scales=1, n_steps=1, n_hidden=4, learn_prior=False).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    zs, _, log_prior = module.encode(x)
    z = module.flatten(zs)
    torch.testing.assert_close(log_prior, -0.5 * (z**2).sum(1) - 8 * math.log(2 * math.pi))
    assert not module.top_mean.requires_grad


def test_image_flow_trains_on_digits(digit_sets):
    train, test = digit_sets
    flow = ImageFlow((8, 8), levels=17, n_steps=2, n_hidden=16, seed=0)
    flow.train(train, max_epochs=3, lr=3e-3, validation=test, **TRAIN)
    assert flow.module.initialised
    bpd = flow.history["validation_bits_per_dim"]
    assert bpd[-1] < bpd[0]
    assert flow.history["train_bits_per_dim"][-1] < flow.history["train_bits_per_dim"][0]
    test_bpd = flow.bits_per_dim(test)
    # better than uniform over the 17 levels (log2 17 = 4.09 bits); beating the independent per-pixel
    # histogram (2.42 bits here) takes ~10 epochs, left to the tutorial and benchmark
    assert test_bpd < 0.75 * math.log2(17)
    # bits/dim is the dequantised NLL (nats) converted: (NLL + D log K) / (D log 2)
    nll = -flow.log_prob(test)
    assert nll.shape == (len(test),) and nll.dtype == np.float64
    assert test_bpd == pytest.approx((nll.mean() + 64 * math.log(17)) / (64 * math.log(2)), rel=1e-9)
    history_bpd = (np.array(flow.history["train_nll"]) + 64 * math.log(17)) / (64 * math.log(2))
    np.testing.assert_allclose(flow.history["train_bits_per_dim"], history_bpd, rtol=1e-6)
    samples = flow.sample(10, temperature=0.7, seed=3)
    assert samples.shape == (10, 8, 8) and samples.dtype == np.float32
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    np.testing.assert_array_equal(samples, flow.sample(10, temperature=0.7, seed=3))
    assert not np.array_equal(samples, flow.sample(10, temperature=0.7, seed=4))


def test_image_flow_seeded_reproducibility_and_save_load(digit_sets, tmp_path):
    train, test = digit_sets
    small = train.subset(128, seed=0)
    runs = [ImageFlow((8, 8), levels=17, n_steps=1, n_hidden=8, seed=5).train(small, max_epochs=2, **TRAIN)]
    runs.append(ImageFlow((8, 8), levels=17, n_steps=1, n_hidden=8, seed=5).train(small, max_epochs=2, **TRAIN))
    assert runs[0].history["train_loss"] == runs[1].history["train_loss"]
    np.testing.assert_array_equal(runs[0].sample(4, seed=1), runs[1].sample(4, seed=1))
    model = runs[0]
    model.save(tmp_path / "flow")
    loaded = ImageFlow.load(tmp_path / "flow")
    assert loaded.module.initialised
    np.testing.assert_array_equal(loaded.log_prob(test, seed=2), model.log_prob(test, seed=2))
    # a loaded model trains on without re-running actnorm's initialisation
    scales = [s.actnorm.log_scale.detach().clone() for s in loaded.module.scales[0]]
    loaded.module.train()
    loaded.module.log_prob(loaded.module.dequantise(torch.ones(4, 8, 8)))
    torch.testing.assert_close(loaded.module.scales[0][0].actnorm.log_scale, scales[0])


def test_image_flow_errors(digit_sets):
    train, _ = digit_sets
    with pytest.raises(ValueError, match="divisible"):
        ImageFlow((8, 8), levels=17, n_scales=4)
    with pytest.raises(ValueError, match="grey levels"):
        ImageFlow((8, 8), levels=256).train(train, max_epochs=1, **TRAIN)
    with pytest.raises(ValueError, match="discrete images"):
        ImageFlow((8, 8), levels=17).log_prob(np.full((2, 8, 8), 0.03, dtype=np.float32))
    with pytest.raises(ValueError, match="mask"):
        ImageFlow((8, 8), levels=17, mask="stripes")
    with pytest.raises(ValueError, match="preprocess"):
        ImageFlow((8, 8), levels=17, preprocess="dither")
    with pytest.raises(ValueError, match="channel mask needs"):
        AffineCoupling(1, "channel")
    with pytest.raises(ValueError, match="even"):
        Squeeze()(torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="temperature"):
        ImageFlow((8, 8), levels=17).sample(2, temperature=-1)


# ----------------------------------------------------------------- 2-D densities


def test_toy_samplers_shapes_and_seeds():
    for sampler in (two_moons, rings, gaussian_mixture):
        x = sampler(101, seed=3)
        assert x.shape == (101, 2) and x.dtype == np.float32
        np.testing.assert_array_equal(x, sampler(101, seed=3))
        assert not np.array_equal(x, sampler(101, seed=4))
    radii = np.linalg.norm(rings(2000, radii=(1.0, 3.0), noise=0.0), axis=1)
    assert np.allclose(np.minimum(abs(radii - 1), abs(radii - 3)), 0, atol=1e-5)
    assert abs((radii > 2).mean() - 0.75) < 0.05  # points in proportion to circumference
    with pytest.raises(ValueError):
        two_moons(0)


def test_energies_match_table_1():
    z = torch.tensor([[0.5, -0.3], [2.0, 0.1]], dtype=torch.float64)
    z1, z2 = z[:, 0], z[:, 1]
    w1 = torch.sin(2 * math.pi * z1 / 4)
    w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 / (1 + torch.exp(-(z1 - 1) / 0.3))
    u1 = 0.5 * ((z.norm(dim=1) - 2) / 0.4) ** 2 - torch.log(
        torch.exp(-0.5 * ((z1 - 2) / 0.6) ** 2) + torch.exp(-0.5 * ((z1 + 2) / 0.6) ** 2)
    )
    u3 = -torch.log(torch.exp(-0.5 * ((z2 - w1) / 0.35) ** 2) + torch.exp(-0.5 * ((z2 - w1 + w2) / 0.35) ** 2))
    u4 = -torch.log(torch.exp(-0.5 * ((z2 - w1) / 0.4) ** 2) + torch.exp(-0.5 * ((z2 - w1 + w3) / 0.35) ** 2))
    torch.testing.assert_close(U1(z), u1)
    torch.testing.assert_close(U2(z), 0.5 * ((z2 - w1) / 0.4) ** 2)
    torch.testing.assert_close(U3(z), u3)
    torch.testing.assert_close(U4(z), u4)
    # the wall is zero inside the box and the normalisers are finite
    torch.testing.assert_close(energy("U2")(z), U2(z))
    assert energy("U2")(torch.tensor([6.0, 0.0])) > U2(torch.tensor([6.0, 0.0])) + 10
    assert log_normaliser("U1") == pytest.approx(log_normaliser("U1", bounded=False), abs=1e-8)
    assert all(math.isfinite(log_normaliser(name)) for name in ENERGIES)
    with pytest.raises(ValueError, match="normalisable"):
        log_normaliser("U2", bounded=False)
    with pytest.raises(ValueError, match="energy"):
        energy("U5")


def test_planar_energy_flow_log_det_and_density():
    torch.manual_seed(0)
    module = EnergyFlowModule(energy="U3", n_flows=4).double()
    _perturb(module, scale=0.5)
    u = torch.randn(3, 2, dtype=torch.float64)
    z, log_det = module(u)
    torch.testing.assert_close(log_det, _jacobian_log_det(lambda v: module(v)[0], u), atol=1e-10, rtol=0)
    torch.testing.assert_close(module.inverse(z), u, atol=1e-9, rtol=0)
    log_q = -0.5 * (u**2).sum(1) - math.log(2 * math.pi) - log_det
    torch.testing.assert_close(module.log_prob(z), log_q, atol=1e-8, rtol=0)


def test_planar_fit_to_u1_lowers_reverse_kl():
    flow = EnergyFlow(energy="U1", n_flows=8, seed=0)
    before = flow.reverse_kl(n_samples=20000)
    flow.train(n_samples=4096, max_epochs=4, **TRAIN)
    after = flow.reverse_kl(n_samples=20000)
    assert after < 0.5 * before
    assert after > -0.02  # a KL: non-negative up to Monte Carlo error
    # the trainer's ELBO is the bound -F on log Z; reverse_kl = log Z - ELBO
    history = flow.history
    assert history["validation_reverse_kl"][-1] == pytest.approx(
        log_normaliser("U1") - history["validation_elbo"][-1], abs=1e-6
    )
    assert history["validation_elbo"][-1] < log_normaliser("U1") + 0.02
    again = EnergyFlow(energy="U1", n_flows=8, seed=0).train(n_samples=4096, max_epochs=4, **TRAIN)
    np.testing.assert_array_equal(again.sample(5, seed=1), flow.sample(5, seed=1))
    with pytest.raises(ValueError, match="energy"):
        EnergyFlow(energy="U7")


def test_density_flow_maximum_likelihood_on_samples(tmp_path):
    x = two_moons(1024, seed=0)
    for kind in ("realnvp", "planar"):
        flow = DensityFlow((2,), kind=kind, n_flows=4, n_hidden=32, seed=0)
        before = -flow.log_prob(x).mean()
        flow.train(x, max_epochs=5, batch_size=128, lr=1e-2, **TRAIN)
        # a standard normal fits the moons at 2.49 nats; 40 steps gain a fraction of a nat
        assert -flow.log_prob(x).mean() < before - 0.1
    flow.save(tmp_path / "density")
    np.testing.assert_allclose(DensityFlow.load(tmp_path / "density").log_prob(x), flow.log_prob(x), rtol=1e-6)
    assert flow.sample(7, seed=0).shape == (7, 2)


def test_pixel_histogram_baseline_by_hand(digit_sets):
    train, test = digit_sets
    small_train, small_test = train.subset(20, seed=0), test.subset(5, seed=0)
    bits = pixel_histogram_bits_per_dim(small_train, small_test, smoothing=1.0)
    ref = 0.0
    for j in range(64):
        counts = np.bincount(small_train.images.reshape(20, -1)[:, j], minlength=17)
        p = (counts + 1.0) / (20 + 17)
        ref -= np.log2(p[small_test.images.reshape(5, -1)[:, j]]).sum()
    assert bits == pytest.approx(ref / (5 * 64))


# ----------------------------------------------------------------- command line


def test_cli_mnist_flow_on_digits_and_toy_flow(tmp_path):
    out = tmp_path / "flow"
    args = ["mnist-flow", "--dataset", "digits", "--n-train", "256", "--n-test", "64", "--max-epochs", "1"]
    assert main([*args, "--n-steps", "1", "--n-hidden", "8", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["test_bits_per_dim"] < 10 and summary["levels"] == 17
    assert (out / "samples_T0.7.png").exists() and (out / "model" / "model.pt").exists()
    toy = tmp_path / "toy"
    toy_args = ["toy-flow", "--energy", "U2", "--n-flows", "4", "--n-samples", "1024", "--max-epochs", "2"]
    assert main([*toy_args, "--out", str(toy)]) == 0
    summary = json.loads((toy / "summary.json").read_text())
    assert summary["reverse_kl"] < summary["reverse_kl_at_init"]
    assert (toy / "density.png").exists()
