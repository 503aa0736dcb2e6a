"""The semi-supervised VAE's hand-written training pass (sclatent.modules.fused_ssvae) against autograd.

The pass claims to be :meth:`SemiSupervisedVAEModule.loss` differentiated: the same loss, terms,
gradient of every parameter, BatchNorm running statistics and random draws. Each test builds two
identical modules, seeds torch's generator identically before each call and compares the paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sclatent
from sclatent.data import CellData
from sclatent.data.labelled import LabelledData
from sclatent.model import SemiSupervisedVAE
from sclatent.modules import SemiSupervisedVAEModule, fused_ssvae

pytestmark = [pytest.mark.needs_native, pytest.mark.usefixtures("two_torch_threads")]

N_GENES, N_LABELS = 50, 3


@pytest.fixture(scope="module")
def cells():
    adata = sclatent.datasets.synthetic(n_cells=300, n_genes=N_GENES, n_clusters=N_LABELS, n_batches=2, seed=0)
    rng = np.random.default_rng(0)
    adata.obs["partial"] = np.where(rng.random(adata.n_obs) < 0.5, adata.obs["cell_type"].astype(str), "Unknown")
    registry = SemiSupervisedVAE.setup_anndata(adata, labels_key="partial", batch_key="batch")
    return CellData(adata, registry)


def _minibatch(cells: CellData, labelled: bool = True, size: int = 64):
    """A training minibatch (half its cells labelled), with a labelled minibatch attached or not."""
    data = cells
    if labelled:
        data = LabelledData(cells, np.flatnonzero(cells.label_index.numpy() >= 0))
    generator = torch.Generator().manual_seed(0)
    return next(iter(data.iterate(np.arange(cells.n_cells), size, shuffle=True, generator=generator)))


def _module(**options) -> SemiSupervisedVAEModule:
    torch.manual_seed(0)
    arguments = {"n_batch": 2, "n_hidden": 32, "n_latent": 5, **options}
    return SemiSupervisedVAEModule(N_GENES, N_LABELS, **arguments).train()


def _run(module, batch, direct: bool, kl_weight: float = 0.7):
    """The direct pass, or ``loss`` then ``backward`` (autograd), from the same generator state."""
    for parameter in module.parameters():
        parameter.grad = None
    torch.manual_seed(123)
    if direct:
        specs = fused_ssvae.specs(module, batch)
        assert specs is not None
        return fused_ssvae.loss_and_gradients(module, *specs, batch, kl_weight)
    out = module.loss(batch, kl_weight=kl_weight)
    out.loss.backward()
    return out


def _assert_same(direct_module, reference_module, direct, reference):
    torch.testing.assert_close(direct.loss, reference.loss.detach(), rtol=1e-5, atol=1e-4)
    for name, term in reference.terms.items():
        torch.testing.assert_close(direct.terms[name], term.detach(), rtol=1e-4, atol=1e-3, msg=name)
    grads = {name: p.grad for name, p in reference_module.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads.values() if g is not None)
    for name, parameter in direct_module.named_parameters():
        if grads[name] is None:  # frozen in both
            assert parameter.grad is None, name
            continue
        # biases before a BatchNorm have zero gradient mathematically: both paths give rounding noise
        torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-3, atol=1e-5 * scale, msg=name)
    reference_buffers = dict(reference_module.named_buffers())
    for name, buffer in direct_module.named_buffers():
        torch.testing.assert_close(buffer, reference_buffers[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled-minibatch", "own-labels"])
@pytest.mark.parametrize("threads", [1, 2], ids=["torch-matmul", "side-by-side-matmul"])
@pytest.mark.parametrize("options", [{}, {"gene_likelihood": "nb", "dropout_rate": 0.0}], ids=["zinb", "nb-no-dropout"])
def test_direct_pass_equals_autograd(cells, labelled, threads, options):
    torch.set_num_threads(threads)
    batch = _minibatch(cells, labelled)
    assert (batch.labelled is not None) == labelled
    assert bool((batch.label_index >= 0).any()) and bool((batch.label_index < 0).any())
    modules = {direct: _module(**options) for direct in (True, False)}
    outputs = {direct: _run(module, batch, direct) for direct, module in modules.items()}
    _assert_same(modules[True], modules[False], outputs[True], outputs[False])
    # the generator moved as in autograd (the same draws in the same order)
    torch.manual_seed(123)
    _run(modules[True], batch, True)
    after_direct = torch.rand(3)
    torch.manual_seed(123)
    _run(modules[False], batch, False)
    assert torch.equal(after_direct, torch.rand(3))


def test_mapped_query_pass_equals_autograd(cells):
    """A mapped query's module (held BatchNorms, frozen reference weights, a few trained entries,
    unlabelled cells only): the same loss and gradients, and the held statistics do not move."""
    batch = _minibatch(cells, labelled=False)
    batch.label_index = torch.full_like(batch.label_index, -1)
    modules = {}
    for direct in (True, False):
        module = _module()
        with torch.no_grad():  # statistics away from (0, 1), so that holding them matters
            for norm in module.modules():
                if isinstance(norm, torch.nn.BatchNorm1d):
                    norm.running_mean.copy_(torch.linspace(-0.5, 0.5, norm.num_features))
                    norm.running_var.copy_(torch.linspace(2.0, 0.5, norm.num_features))
        masks = module.add_batch_categories(1)
        sclatent.model._query.freeze_for_query(module, masks)
        modules[direct] = module
    batch.batch_index = torch.full_like(batch.batch_index, 2)  # the new batch
    statistics = {name: b.clone() for name, b in modules[True].named_buffers() if "running" in name}
    assert fused_ssvae.applies(modules[True])
    outputs = {direct: _run(module, batch, direct) for direct, module in modules.items()}
    _assert_same(modules[True], modules[False], outputs[True], outputs[False])
    trained = [name for name, p in modules[True].named_parameters() if p.grad is not None]
    assert trained and all(name.startswith(("vae.", "classifier.")) for name in trained)
    for name, buffer in modules[True].named_buffers():
        if name in statistics:
            assert torch.equal(buffer, statistics[name]), f"held statistics {name} moved"


def test_direct_gradients_are_written_into_the_optimiser_views(cells):
    """``.grad`` is replaced in place (the flat optimiser's views stay live), a labelled minibatch's
    classification gradient added on top, as ``zero_grad()`` then ``backward()`` would leave it."""
    batch = _minibatch(cells)
    modules = {direct: _module() for direct in (True, False)}
    for module in modules.values():
        for parameter in module.parameters():
            parameter.grad = torch.full_like(parameter, 7.0)
    views = {name: p.grad for name, p in modules[True].named_parameters()}
    torch.manual_seed(123)
    direct = modules[True].loss_and_gradients(batch, kl_weight=0.7)
    for parameter in modules[False].parameters():
        parameter.grad.zero_()
    torch.manual_seed(123)
    reference = modules[False].loss(batch, kl_weight=0.7)
    reference.loss.backward()
    _assert_same(modules[True], modules[False], direct, reference)
    assert all(p.grad is views[name] for name, p in modules[True].named_parameters())
    assert not direct.loss.requires_grad


@pytest.mark.parametrize(
    "options",
    [{"classifier_n_layers": 0}, {"classifier_n_layers": 2}, {"use_observed_library": False}, {"n_layers": 2}],
    ids=["linear-classifier", "deep-classifier", "latent-library", "deep-vae"],
)
def test_other_configurations_train_through_autograd(cells, options):
    module = _module(**options)
    assert not module.supports_direct_gradients()
    assert fused_ssvae.specs(module, _minibatch(cells)) is None



def test_a_labelled_minibatch_the_pass_cannot_take_sends_the_step_to_autograd(cells):
    """The classification term's encoder pass is the fused one too: a one-cell labelled minibatch
    (a training BatchNorm cannot take it) must not reach it, the whole step takes autograd."""
    module = _module()
    batch = _minibatch(cells)
    assert fused_ssvae.specs(module, batch) is not None
    batch.labelled = cells.gather(torch.as_tensor([int(np.flatnonzero(cells.label_index.numpy() >= 0)[0])]))
    assert batch.labelled.size == 1
    assert fused_ssvae.specs(module, batch) is None

def test_training_follows_the_autograd_path(monkeypatch):
    """Three epochs of seeded semi-supervised training through each path end at the same ELBO."""
    adata = sclatent.datasets.synthetic(n_cells=240, n_genes=40, n_clusters=3, n_batches=2, seed=1)
    rng = np.random.default_rng(1)
    adata.obs["partial"] = np.where(rng.random(adata.n_obs) < 0.3, adata.obs["cell_type"].astype(str), "Unknown")
    histories = {}
    for direct in (True, False):
        monkeypatch.setenv("SCLATENT_FUSED", "1" if direct else "0")
        data = adata.copy()
        SemiSupervisedVAE.setup_anndata(data, labels_key="partial", batch_key="batch")
        model = SemiSupervisedVAE(data, n_hidden=32, n_latent=5, seed=0)
        assert model.module.supports_direct_gradients() == direct
        model.train(max_epochs=3, batch_size=64, progress_bar=False, seed=0)
        histories[direct] = model.history
    for key in ("train_elbo", "validation_elbo"):
        np.testing.assert_allclose(histories[True][key], histories[False][key], rtol=1e-3)
