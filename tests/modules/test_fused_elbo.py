"""The fused training objective of the count VAE (sclatent.modules.fused_elbo) against autograd.

The fused pass claims to be the module's own objective: the same loss, per-cell terms, gradient of
every parameter, BatchNorm running statistics and random draws as :meth:`VAEModule.loss`, the
autograd reference. Each test builds two identical modules, seeds torch's generator identically
before each call and compares the two paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sclatent
from sclatent.data import CellData, setup_anndata
from sclatent.modules import VAEModule
from sclatent.modules.fused_elbo import applies, fused_loss, fused_spec

pytestmark = [pytest.mark.needs_native, pytest.mark.usefixtures("two_torch_threads")]


@pytest.fixture(scope="module")
def data():
    adata = sclatent.datasets.synthetic(n_cells=300, n_genes=60, n_clusters=3, n_batches=3, seed=4)
    rng = np.random.default_rng(0)
    adata.obs["donor"] = rng.choice(["a", "b", "c", "d"], adata.n_obs)
    adata.obs["depth"] = rng.normal(size=adata.n_obs)
    return adata


def _cell_data(adata, continuous: bool = False) -> CellData:
    registry = setup_anndata(
        adata,
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["depth"] if continuous else None,
    )
    return CellData(adata, registry)


def _minibatch(cell_data: CellData, size: int = 64):
    generator = torch.Generator().manual_seed(0)
    return next(iter(cell_data.iterate(cell_data.nonempty_cells, size, shuffle=True, generator=generator)))


def _module(seed: int = 0, **options) -> VAEModule:
    arguments = dict(n_batch=3, n_cats_per_cov=[4], n_hidden=32, n_latent=5)
    arguments.update(options)
    torch.manual_seed(seed)
    return VAEModule(60, **arguments).train()


def _loss(module, batch, fused: bool, monkeypatch, kl_weight: float = 0.4):
    """The fused pass as one autograd node, or the autograd reference ``module.loss``."""
    monkeypatch.setenv("SCLATENT_FUSED", "1")
    torch.manual_seed(123)  # the dropout seed and the reparameterisation noise
    if fused:
        return fused_loss(fused_spec(module, batch), batch, kl_weight)
    return module.loss(batch, kl_weight=kl_weight)


def _assert_same_gradients(fused_module, reference_module):
    grads = dict(reference_module.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in grads.values() if p.grad is not None)
    for name, parameter in fused_module.named_parameters():
        expected = grads[name].grad
        if expected is None:  # frozen in both
            assert parameter.grad is None, name
            continue
        # the biases before a BatchNorm have zero gradient mathematically: both paths give rounding
        # noise there, hence the absolute tolerance relative to the largest gradient of the model
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"gene_likelihood": "nb"},
        {"encode_covariates": False},
        {"dropout_rate": 0.0},
        {"inject_covariates": False},
        {"n_batch": 1, "n_cats_per_cov": []},
    ],
    ids=["zinb", "nb", "decoder-covariates-only", "no-dropout", "no-injection", "no-covariates"],
)
@pytest.mark.parametrize("threads", [1, 2], ids=["torch-matmul", "side-by-side-matmul"])
def test_fused_loss_gradients_and_running_statistics_equal_autograd(data, options, threads, monkeypatch):
    torch.set_num_threads(threads)
    batch = _minibatch(_cell_data(data))
    if options.get("n_batch") == 1:
        batch.batch_index = torch.zeros_like(batch.batch_index)
    fused_module, reference_module = _module(**options), _module(**options)
    assert fused_spec(fused_module, batch) is not None
    fused = _loss(fused_module, batch, True, monkeypatch)
    reference = _loss(reference_module, batch, False, monkeypatch)
    torch.testing.assert_close(fused.loss, reference.loss, rtol=1e-5, atol=1e-4)
    rec, kl = "reconstruction", "kl"
    torch.testing.assert_close(fused.terms[rec], reference.terms[rec], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(fused.terms[kl], reference.terms[kl], rtol=1e-5, atol=1e-5)
    fused.loss.backward()
    reference.loss.backward()
    _assert_same_gradients(fused_module, reference_module)
    reference_buffers = dict(reference_module.named_buffers())
    for name, buffer in fused_module.named_buffers():
        torch.testing.assert_close(buffer, reference_buffers[name], rtol=1e-5, atol=1e-6, msg=name)


def _large_weights(module: VAEModule) -> list[torch.Tensor]:
    """The first layer's and the output layer's weights (the fused pass's two largest gradients)."""
    return [module.z_encoder.body.layers[0].linear.weight, module.decoder.out.weight]


@pytest.mark.parametrize("held", ["encoder", "decoder", "both"])
def test_held_batchnorm_is_fused_and_equals_autograd(data, held, monkeypatch):
    """A held BatchNorm (a frozen layer of a mapped query: running statistics in training too) keeps
    the fused pass: same loss, gradients and (unmoved) running statistics as autograd."""
    batch = _minibatch(_cell_data(data))
    modules = {True: _module(), False: _module()}
    for module in modules.values():
        with torch.no_grad():  # statistics away from the initial (0, 1), so that holding them matters
            for norm in (module.z_encoder.body.post[0][0], module.decoder.body.post[0][0]):
                norm.running_mean.copy_(torch.linspace(-0.5, 0.5, norm.num_features))
                norm.running_var.copy_(torch.linspace(2.0, 0.5, norm.num_features))
        layers = {"encoder": [module.z_encoder], "decoder": [module.decoder]}.get(
            held, [module.z_encoder, module.decoder]
        )
        for layer in layers:
            layer.body.post[0][0].hold()
        if held == "both":  # a mapped query: the two large weights frozen (the pass skips their gradients)
            for parameter in _large_weights(module):
                parameter.requires_grad_(False)
    statistics = {name: b.clone() for name, b in modules[True].named_buffers() if "running" in name}
    assert fused_spec(modules[True], batch) is not None
    outputs = {fused: _loss(module, batch, fused, monkeypatch) for fused, module in modules.items()}
    torch.testing.assert_close(outputs[True].loss, outputs[False].loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(outputs[True].terms["kl"], outputs[False].terms["kl"], rtol=1e-5, atol=1e-5)
    for out in outputs.values():
        out.loss.backward()
    _assert_same_gradients(modules[True], modules[False])
    reference_buffers = dict(modules[False].named_buffers())
    for name, buffer in modules[True].named_buffers():
        torch.testing.assert_close(buffer, reference_buffers[name], rtol=1e-5, atol=1e-6, msg=name)
        if name in statistics and (held == "both" or name.startswith({"encoder": "z_", "decoder": "decoder"}[held])):
            assert torch.equal(buffer, statistics[name]), f"held statistics {name} moved"


def test_fused_gradient_of_per_cell_terms_equals_autograd(data, monkeypatch):
    """Differentiating the per-cell outputs (not only the mean loss) weights each cell's terms apart."""
    batch = _minibatch(_cell_data(data))
    weights = torch.linspace(-1.0, 2.0, batch.size)
    modules = {True: _module(), False: _module()}
    for fused, module in modules.items():
        out = _loss(module, batch, fused, monkeypatch)
        terms = out.terms
        (0.5 * out.loss + (weights * terms["reconstruction"]).sum() + (weights.flip(0) * terms["kl"]).sum()).backward()
    _assert_same_gradients(modules[True], modules[False])


def test_fused_training_follows_the_autograd_path(data, monkeypatch):
    """Three epochs of seeded training through each path end at the same ELBO (to rounding)."""
    histories = {}
    for fused in (True, False):
        monkeypatch.setenv("SCLATENT_FUSED", "1" if fused else "0")
        model = sclatent.model.VAE(data.copy(), n_hidden=32, n_latent=5, seed=0)
        model.train(max_epochs=3, batch_size=64, progress_bar=False, seed=0)
        histories[fused] = model.history
    for key in ("train_elbo", "validation_elbo"):
        np.testing.assert_allclose(histories[True][key], histories[False][key], rtol=1e-3)
    assert histories[True]["train_elbo"][-1] > histories[True]["train_elbo"][0]


@pytest.mark.parametrize(
    "options",
    [
        {"prior": "planar"},
        {"posterior": "iaf"},
        {"use_observed_library": False},
        {"dispersion": "gene-batch"},
        {"dispersion": "gene-cell"},
        {"gene_likelihood": "poisson"},
        {"n_layers": 2},
    ],
    ids=lambda options: next(iter(options.items()))[0] + "=" + str(next(iter(options.values()))),
)
def test_other_configurations_take_the_autograd_path(data, options):
    batch = _minibatch(_cell_data(data))
    assert fused_spec(_module(**options), batch) is None
    assert not _module(**options).supports_direct_gradients()


def test_when_the_fused_path_is_not_taken(data, monkeypatch):
    cell_data = _cell_data(data)
    batch = _minibatch(cell_data)
    module = _module()
    assert fused_spec(module, batch) is not None
    with torch.no_grad():
        assert fused_spec(module, batch) is None
    assert fused_spec(module.eval(), batch) is None
    module.train()
    assert fused_spec(module, batch.select_rows(0, 1)) is None  # BatchNorm needs two cells
    monkeypatch.setenv("SCLATENT_FUSED", "0")
    assert fused_spec(module, batch) is None
    monkeypatch.delenv("SCLATENT_FUSED")
    assert fused_spec(module.double(), batch) is None
    continuous = _minibatch(_cell_data(data, continuous=True))
    assert fused_spec(_module(n_continuous=1), continuous) is None


def test_fused_backward_refuses_parameters_changed_since_the_forward(data, monkeypatch):
    batch = _minibatch(_cell_data(data))
    module = _module()
    out = _loss(module, batch, True, monkeypatch)
    with torch.no_grad():
        module.decoder.out.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_loss_and_gradients_writes_the_autograd_gradients(data, monkeypatch):
    """The trainer's direct path: gradients replace whatever ``.grad`` held, without a graph."""
    batch = _minibatch(_cell_data(data))
    direct, reference = _module(), _module()
    for parameter in direct.parameters():
        parameter.grad = torch.full_like(parameter, 7.0)  # stale values must not survive
    held = {name: parameter.grad for name, parameter in direct.named_parameters()}
    monkeypatch.setenv("SCLATENT_FUSED", "1")
    torch.manual_seed(123)
    out = direct.loss_and_gradients(batch, kl_weight=0.4)
    assert out.loss.grad_fn is None and out.terms["reconstruction"].grad_fn is None
    # written into the tensors .grad held (an optimiser's flat-buffer views stay live), the two
    # large weights' directly, the rest by copy
    for name, parameter in direct.named_parameters():
        assert parameter.grad is held[name], name
    expected = _loss(reference, batch, False, monkeypatch)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-4)
    _assert_same_gradients(direct, reference)


def test_what_the_pass_cannot_fuse_is_differentiated_by_autograd(data, monkeypatch):
    """A configuration outside the pass is not offered to the trainer's direct path; called anyway,
    ``loss_and_gradients`` writes autograd's gradients of :meth:`VAEModule.loss`."""
    batch = _minibatch(_cell_data(data))
    module, reference = _module(prior="planar"), _module(prior="planar")
    assert not module.supports_direct_gradients() and not applies(module)
    assert _module().supports_direct_gradients()
    torch.manual_seed(123)
    out = module.loss_and_gradients(batch, kl_weight=0.4)
    expected = _loss(reference, batch, False, monkeypatch)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss)
    _assert_same_gradients(module, reference)


def test_trainer_takes_the_direct_path_unless_a_hook_needs_the_backward(data, monkeypatch):
    from sclatent.modules import vae as vae_module
    from sclatent.train import TrainingPlan, fit

    calls = {"direct": 0}
    original = vae_module.VAEModule.loss_and_gradients

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["direct"] += out is not None
        return out

    monkeypatch.setattr(vae_module.VAEModule, "loss_and_gradients", counting)
    cell_data = _cell_data(data)
    cells, plan = cell_data.nonempty_cells, TrainingPlan(max_epochs=1, batch_size=64)
    steps = -(-len(cells) // 64)
    module = _module()
    fit(module, cell_data, cells, cells[:0], plan, progress_bar=False)
    assert calls["direct"] == steps

    calls["direct"] = 0
    seen = []
    module.decoder.out.weight.register_hook(lambda grad: seen.append(grad.shape))
    fit(module, cell_data, cells, cells[:0], plan, progress_bar=False)
    assert calls["direct"] == 0 and len(seen) == steps


def test_side_by_side_products_equal_torch_matmul():
    """The output layer's products, run as two single-threaded MKL calls at once, are torch's."""
    from sclatent.modules.fused_elbo import _gemm_pair

    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(16, 8, generator=generator), torch.randn(30, 8, generator=generator)
    grad = torch.randn(16, 30, generator=generator)
    out = torch.randn(30, generator=generator).expand(16, -1).contiguous()
    expected_out = out + hidden @ weight.t()
    if not _gemm_pair(
        (out[:, :15], hidden, False, weight[:15], True, 1.0, 1.0),
        (out[:, 15:], hidden, False, weight[15:], True, 1.0, 1.0),
    ):
        pytest.skip("torch's MKL is not reachable here: the fused pass uses torch's matmul")
    torch.testing.assert_close(out, expected_out)
    grad_weight, grad_hidden = torch.empty(30, 8), torch.empty(16, 8)
    assert _gemm_pair(
        (grad_weight, grad, True, hidden, False, 2.0, 0.0), (grad_hidden, grad, False, weight, False, 1.0, 0.0)
    )
    torch.testing.assert_close(grad_weight, 2.0 * grad.t() @ hidden)
    torch.testing.assert_close(grad_hidden, grad @ weight)
    # a user who allows torch one thread gets no second one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job = (grad_hidden, grad, False, weight, False, 1.0, 0.0)
        assert not _gemm_pair(job, job)
    finally:
        torch.set_num_threads(before)


def test_a_layer_replaced_after_the_first_step_is_seen(data, monkeypatch):
    """The fused pass caches what it reads from the module; a new output layer must not be missed."""
    batch = _minibatch(_cell_data(data))
    module, reference = _module(), _module()
    _loss(module, batch, True, monkeypatch)
    for target in (module, reference):
        torch.manual_seed(5)
        target.decoder.out = torch.nn.Linear(32, 120)
    fused = _loss(module, batch, True, monkeypatch)
    expected = _loss(reference, batch, False, monkeypatch)
    torch.testing.assert_close(fused.loss, expected.loss, rtol=1e-5, atol=1e-4)
