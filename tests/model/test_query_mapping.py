"""Reference -> query mapping (scArches): ``prepare_query_anndata`` and ``load_query_data`` of the count VAEs.

A small VAE (and a semi-supervised VAE) is trained on two batches of simulated counts; the third
batch is the query. The reference models are shared read-only (every test checks it stays so
where it matters); each query model is its own.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sclatent.data import REGISTRY_KEY, SetupError, library_log_prior
from sclatent.datasets import synthetic
from sclatent.model import VAE, DenoisingAE, QueryFreezing, SemiSupervisedVAE
from sclatent.nn.blocks import BatchNorm1d, Dropout
from sclatent.steps import AutogradStep, DirectGradientStep, make_optimizers, make_step

TRAIN = dict(accelerator="cpu", progress_bar=False)
SMALL = dict(n_latent=3, n_hidden=16)


def _split(n_cells: int = 300, n_genes: int = 30, seed: int = 0):
    """(reference, query): batches 0 and 1 of simulated counts, and batch 2 (renamed ``"query_batch"``)."""
    adata = synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=3, n_batches=3, seed=seed)
    adata.obs["batch"] = adata.obs["batch"].astype(str).replace({"batch_2": "query_batch"})
    reference = adata[adata.obs["batch"] != "query_batch"].copy()
    query = adata[adata.obs["batch"] == "query_batch"].copy()
    return reference, query


def _state(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.module.state_dict().items()}


def _assert_same_state(before: dict[str, torch.Tensor], model) -> None:
    after = model.module.state_dict()
    assert before.keys() == after.keys()
    changed = [name for name, value in before.items() if not torch.equal(value, after[name])]
    assert not changed, f"the reference model changed: {changed}"


@pytest.fixture(scope="module")
def reference():
    """(reference adata, query adata, VAE trained on the reference, its state dict, its latents); read-only."""
    ref, query = _split()
    VAE.setup_anndata(ref, batch_key="batch")
    model = VAE(ref, seed=0, **SMALL)
    model.train(max_epochs=3, **TRAIN)
    return ref, query, model, _state(model), model.get_latent_representation()


@pytest.fixture(scope="module")
def mapped(reference):
    """(query model right after load_query_data, its parameters then, the same model after 3 epochs on the query).

    The query holds 30 cells of a reference batch besides its new batch: their gradients reach the
    reference's rows, which must still not move.
    """
    ref, query, model, _, _ = reference
    mixed = ad.concat([query, ref[ref.obs["batch"] == "batch_0"][:30]], merge="same")
    mixed.uns.pop(REGISTRY_KEY, None)
    query_model = VAE.load_query_data(mixed, model)
    before = {name: p.detach().clone() for name, p in query_model.module.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in query_model.module.named_buffers()}
    query_model.train(max_epochs=3, **TRAIN)
    return query_model, before, buffers


# --------------------------------------------------------------------------- genes


def _messy_query(query):
    """The query with its genes shuffled, three dropped and two extra ones added (X and a layer)."""
    rng = np.random.default_rng(0)
    keep = rng.permutation(query.n_vars)[3:]  # shuffled, 3 missing
    messy = query[:, keep].copy()
    extra = sp.csr_matrix(rng.poisson(1.0, size=(messy.n_obs, 2)).astype(np.float32))
    padding = ad.AnnData(X=extra, layers={"counts": extra.copy(), "true_mean": extra.toarray()})
    padding.obs_names, padding.var_names = messy.obs_names, ["extra_a", "extra_b"]
    out = ad.concat([messy, padding], axis=1, merge="first")
    out.obs = messy.obs.copy()
    return out


def test_prepare_query_anndata_pads_and_reorders(reference):
    ref, query, model, state, _ = reference
    messy = _messy_query(query)
    messy.uns[REGISTRY_KEY] = "a stale registry"
    snapshot = messy.copy()
    with pytest.warns(UserWarning, match=r"lacks 3 of the reference model's 30 genes \(10.0 %") as record:
        prepared = VAE.prepare_query_anndata(messy, model)
    assert "2 query genes the reference does not have are dropped" in str(record[0].message)
    assert list(prepared.var_names) == model.var_names
    assert prepared.shape == (query.n_obs, ref.n_vars)
    missing = [g for g in model.var_names if g not in messy.var_names]
    assert len(missing) == 3
    for key in (None, "counts", "true_mean"):
        got = prepared.X if key is None else prepared.layers[key]
        source = messy.X if key is None else messy.layers[key]
        assert sp.issparse(got) == sp.issparse(source)
        dense = got.toarray() if sp.issparse(got) else got
        source = source.toarray() if sp.issparse(source) else source
        for j, gene in enumerate(model.var_names):
            expected = 0.0 if gene in missing else source[:, messy.var_names.get_loc(gene)]
            np.testing.assert_array_equal(dense[:, j], expected)
    assert REGISTRY_KEY not in prepared.uns
    pd.testing.assert_frame_equal(prepared.obs, messy.obs)
    # the caller's AnnData is untouched
    assert list(messy.var_names) == list(snapshot.var_names)
    np.testing.assert_array_equal(messy.X.toarray(), snapshot.X.toarray())
    np.testing.assert_array_equal(messy.layers["true_mean"], snapshot.layers["true_mean"])
    assert messy.uns[REGISTRY_KEY] == "a stale registry"
    _assert_same_state(state, model)


def test_prepare_query_anndata_keeps_csc_and_dense(reference):
    _, query, model, _, _ = reference
    order = np.random.default_rng(1).permutation(query.n_vars)
    for matrix in (sp.csc_matrix(query.X), query.X.toarray()):
        shuffled = query[:, order].copy()
        shuffled.X = matrix[:, order]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing missing: no warning
            prepared = VAE.prepare_query_anndata(shuffled, model)
        assert type(prepared.X) is type(shuffled.X)
        dense = prepared.X.toarray() if sp.issparse(prepared.X) else prepared.X
        np.testing.assert_array_equal(dense, query.X.toarray())


def test_prepare_query_anndata_refuses_too_many_missing_genes(reference):
    _, query, model, _, _ = reference
    lacking = query[:, 9:].copy()  # 9 of 30 missing: 30 %
    with pytest.raises(SetupError, match=r"21 of the reference model's 30 genes: 9 \(30.0 %\) are missing") as error:
        VAE.prepare_query_anndata(lacking, model)
    assert "max_missing_fraction=0.2" in str(error.value) and "pass max_missing_fraction=" in str(error.value)
    with pytest.warns(UserWarning, match="lacks 9 of"):
        prepared = VAE.prepare_query_anndata(lacking, model, max_missing_fraction=0.5)
    assert list(prepared.var_names) == model.var_names
    names = VAE.prepare_query_anndata(lacking, model, return_reference_var_names=True)
    assert isinstance(names, pd.Index) and list(names) == model.var_names


def test_load_query_data_aligns_an_unprepared_query_on_a_copy(reference):
    _, query, model, state, _ = reference
    shuffled = query[:, np.random.default_rng(2).permutation(query.n_vars)].copy()
    shuffled.uns.pop(REGISTRY_KEY, None)  # (other tests map the fixture's query itself, which registers it)
    query_model = VAE.load_query_data(shuffled, model)
    assert query_model.adata is not shuffled and list(query_model.adata.var_names) == model.var_names
    assert REGISTRY_KEY not in shuffled.uns
    assert REGISTRY_KEY in query_model.adata.uns
    _assert_same_state(state, model)


# --------------------------------------------------------------------------- the mapped model


def test_query_registry_appends_the_new_batches(reference, mapped):
    _, _, model, _, _ = reference
    query_model, _, _ = mapped
    assert query_model.registry.batch_categories == [*model.registry.batch_categories, "query_batch"]
    assert query_model.registry.var_names == model.registry.var_names
    assert query_model.registry.n_cells == query_model.adata.n_obs
    assert isinstance(query_model.query_freezing, QueryFreezing)
    assert query_model.is_trained and query_model.history["epoch"] == [1, 2, 3]


def test_mapping_leaves_the_reference_model_bit_identical(reference, mapped):
    _, _, model, state, latents = reference
    _assert_same_state(state, model)
    assert np.array_equal(model.get_latent_representation(), latents)
    assert model.query_freezing is None
    assert all(p.requires_grad for p in model.module.parameters())


def test_reference_cells_keep_their_latent_positions(reference, mapped):
    ref, _, model, _, latents = reference
    query_model, _, _ = mapped
    assert np.array_equal(query_model.get_latent_representation(ref), latents)
    # the decoder is the reference's too (its BatchNorm held): same denoised expression of the reference cells
    np.testing.assert_array_equal(
        query_model.get_normalized_expression(ref, return_numpy=True),
        model.get_normalized_expression(ref, return_numpy=True),
    )
    z = query_model.get_latent_representation()
    assert z.shape == (query_model.adata.n_obs, SMALL["n_latent"]) and np.isfinite(z).all()


def test_only_the_new_batch_rows_train(mapped):
    query_model, before, buffers = mapped
    freezing = query_model.query_freezing
    masks = freezing.masks
    assert set(masks) == {"z_encoder.body.layers.0.embeddings.0.weight", "decoder.body.layers.0.embeddings.0.weight"}
    after = dict(query_model.module.named_parameters())
    for name, value in before.items():
        if name in masks:
            mask = masks[name]
            assert mask.shape == value.shape and mask[:2].logical_not().all() and mask[2:].all()
            assert torch.equal(after[name][~mask], value[~mask]), f"old rows of {name} moved"
            assert not torch.equal(after[name][mask], value[mask]), f"new rows of {name} did not train"
            assert after[name].requires_grad
        else:
            assert torch.equal(after[name], value), f"{name} moved"
            assert not after[name].requires_grad
    for name, value in query_model.module.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert torch.equal(value, buffers[name]), f"BatchNorm statistics {name} moved"
    assert freezing.held_batchnorm == ("z_encoder.body.post.0.0", "decoder.body.post.0.0")
    assert freezing.partly_trained["decoder.body.layers.0.embeddings.0.weight"] == "16 of 48"


def test_query_training_masks_gradients_in_the_step_without_weight_decay(mapped):
    query_model, _, _ = mapped
    optimizers = make_optimizers(query_model.module, 1e-3, 0.0, 0.01)
    try:
        # the gradient masks are the step's, not autograd hooks: the fused direct-gradient pass stays available
        step = make_step(query_model.module, optimizers)
        assert isinstance(step, DirectGradientStep if query_model.module.supports_direct_gradients() else AutogradStep)
        assert {id(p) for p, _ in step.masks} == {
            id(p) for n, p in query_model.module.named_parameters() if n in query_model.query_freezing.masks
        }
        assert optimizers["adam"].flat.numel() == sum(m.numel() for m in query_model.query_freezing.masks.values())
    finally:
        optimizers["adam"].release()
    assert query_model.query_freezing.weight_decay(None) == 0.0
    with pytest.raises(ValueError, match="weight_decay=1e-06 would move the frozen reference entries"):
        query_model.train(max_epochs=1, weight_decay=1e-6, **TRAIN)


def test_held_batchnorm_normalises_with_its_running_statistics_in_training():
    torch.manual_seed(0)
    layer = BatchNorm1d(4, momentum=0.5)
    layer.running_mean.normal_()
    layer.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 4) * 3 + 5
    layer.hold()
    layer.train()  # a model's train() does not release a held layer
    assert not layer.training
    statistics = (layer.running_mean.clone(), layer.running_var.clone())
    expected = (x - statistics[0]) / torch.sqrt(statistics[1] + layer.eps) * layer.weight + layer.bias
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(layer.running_mean, statistics[0]) and torch.equal(layer.running_var, statistics[1])
    layer.hold(False)
    layer.train()
    out = layer(x)  # released: the minibatch's statistics again
    torch.testing.assert_close(out.mean(0), layer.bias.expand(4), atol=1e-5, rtol=0)
    assert not torch.equal(layer.running_mean, statistics[0])


def test_a_one_batch_query_trains(reference):
    """Every query cell shares one new batch row: with train-mode BatchNorm its shift would be cancelled
    by the minibatch's own statistics and the row would get no gradient; held BatchNorms let it train."""
    _, query, model, state, _ = reference
    query_model = VAE.load_query_data(query, model)
    assert all(m.held for m in query_model.module.modules() if isinstance(m, BatchNorm1d)), "frozen BatchNorms are held"
    start = query_model.get_latent_representation()
    query_model.train(max_epochs=15, **TRAIN)
    moved = np.abs(query_model.get_latent_representation() - start).max()
    # measured: 0.015 held; 1.2e-07 (float rounding) with the BatchNorms released in training
    assert moved > 1e-3, f"the query latent moved only {moved:.2g}"
    _assert_same_state(state, model)


def test_saved_query_model_round_trips(reference, mapped, tmp_path):
    ref, query, model, _, latents = reference
    query_model, _, _ = mapped
    query_model.save(tmp_path / "query")
    loaded = VAE.load(tmp_path / "query", query_model.adata)
    assert loaded.registry.batch_categories == query_model.registry.batch_categories
    assert np.array_equal(loaded.get_latent_representation(), query_model.get_latent_representation())
    assert np.array_equal(loaded.get_latent_representation(ref), latents)
    assert loaded.query_freezing is None  # training-time state: a loaded query model trains like any model
    # the reference may also be given as its folder
    model.save(tmp_path / "reference")
    from_folder = VAE.load_query_data(query, tmp_path / "reference")
    assert np.array_equal(from_folder.get_latent_representation(ref), latents)


def test_single_batch_reference_gets_a_zero_row(tmp_path):
    ref, query = _split(n_cells=240, seed=3)
    ref = ref[ref.obs["batch"] == "batch_0"].copy()
    VAE.setup_anndata(ref, batch_key="batch")
    model = VAE(ref, seed=0, dispersion="gene-batch", use_observed_library=False, **SMALL)
    model.train(max_epochs=2, **TRAIN)
    assert len(model.module.decoder.body.layers[0].embeddings) == 0  # one batch: no embedding
    latents, state = model.get_latent_representation(), _state(model)
    query_model = VAE.load_query_data(query, model)
    embedding = query_model.module.decoder.body.layers[0].embeddings[0].weight
    assert embedding.shape == (2, SMALL["n_hidden"]) and not embedding[0].any()
    means, _ = library_log_prior(query, query_model.registry)
    assert torch.equal(query_model.module.library_log_means[1:], torch.as_tensor(means[1:], dtype=torch.float32))
    assert torch.equal(query_model.module.library_log_vars[:1], model.module.library_log_vars)
    assert set(query_model.query_freezing.masks) >= {"log_theta", "l_encoder.body.layers.0.embeddings.0.weight"}
    theta = query_model.module.log_theta.detach().clone()
    query_model.train(max_epochs=2, **TRAIN)
    assert not query_model.module.decoder.body.layers[0].embeddings[0].weight[0].any()
    log_theta = query_model.module.log_theta
    assert torch.equal(log_theta[0], theta[0]) and not torch.equal(log_theta[1], theta[1])
    assert np.array_equal(query_model.get_latent_representation(ref), latents)
    _assert_same_state(state, model)
    query_model.save(tmp_path / "q")
    loaded = VAE.load(tmp_path / "q", query_model.adata)
    assert np.array_equal(loaded.get_latent_representation(), query_model.get_latent_representation())


def test_options_unfreeze_parts(reference):
    _, query, model, state, _ = reference
    free = VAE.load_query_data(query, model, freeze=False)
    assert free.query_freezing is None
    assert all(p.requires_grad for p in free.module.parameters())
    assert all(m.momentum == 0.01 for m in free.module.modules() if isinstance(m, torch.nn.BatchNorm1d))
    partly = VAE.load_query_data(
        query, model, freeze_expression=False, freeze_batchnorm_encoder=False, freeze_dropout=True
    )
    trainable = set(partly.query_freezing.trainable)
    assert {"z_encoder.body.layers.0.linear.weight", "z_encoder.body.post.0.0.weight"} <= trainable
    assert not any(name.startswith("decoder.") for name in trainable)
    assert partly.module.z_encoder.body.post[0][0].momentum == 0.01
    assert partly.module.decoder.body.post[0][0].momentum == 0.0
    assert all(m.p == 0.0 for m in partly.module.modules() if isinstance(m, Dropout))
    assert any(isinstance(m, Dropout) for m in partly.module.modules())
    _assert_same_state(state, model)


# --------------------------------------------------------------------------- refusals


def test_refusals_name_the_fix(reference):
    ref, query, model, state, _ = reference
    no_column = query.copy()
    del no_column.obs["batch"]
    with pytest.raises(SetupError, match=r"no adata.obs\['batch'\] column.*query.obs\['batch'\] = 'query'"):
        VAE.load_query_data(no_column, model)
    known = query.copy()
    known.obs["batch"] = "batch_0"
    known.uns.pop(REGISTRY_KEY, None)
    with pytest.raises(SetupError, match="no new batch to learn"):
        VAE.load_query_data(known, model)
    assert REGISTRY_KEY not in known.uns  # a refused query's uns is left as it was
    unbatched = ref.copy()
    VAE.setup_anndata(unbatched)
    plain = VAE(unbatched, seed=0, **SMALL)
    with pytest.raises(SetupError, match=r"set up without a batch_key.*batch_key=\.\.\.") as error:
        VAE.load_query_data(query, plain)
    assert "get_latent_representation" in str(error.value)
    DenoisingAE.setup_anndata(unbatched, batch_key="batch")
    with pytest.raises(SetupError, match="DenoisingAE cannot map query data"):
        DenoisingAE.load_query_data(query, DenoisingAE(unbatched))
    with pytest.raises(TypeError, match="maps onto a trained SemiSupervisedVAE, got VAE"):
        SemiSupervisedVAE.load_query_data(query, model)
    _assert_same_state(state, model)


# --------------------------------------------------------------------------- the semi-supervised model


@pytest.fixture(scope="module")
def ss_reference():
    """(reference adata with a third of its labels 'Unknown', query adata, trained SemiSupervisedVAE); read-only."""
    ref, query = _split(seed=4)
    ref.obs["label"] = ref.obs["cell_type"].astype(str)
    ref.obs.loc[ref.obs_names[::3], "label"] = "Unknown"
    SemiSupervisedVAE.setup_anndata(ref, labels_key="label", batch_key="batch")
    model = SemiSupervisedVAE(ref, seed=0, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few labelled held-out cells for the temperature: not the point here
        model.train(max_epochs=3, **TRAIN)
    return ref, query, model


SHIFTS = "classifier.0.layers.0.linear.bias"  # the classifier's hidden-layer shifts


def test_semi_supervised_query_without_labels_predicts(ss_reference):
    """The default mapping: the classifier frozen but for its hidden-layer shifts, which adapt to
    the query (and so move the query model's predictions, not its latents); the reference's
    temperature is kept and the reference model is untouched."""
    ref, query, model = ss_reference
    state, latents, proba = _state(model), model.get_latent_representation(), model.predict(ref, soft=True)
    assert "label" not in query.obs
    query_model = SemiSupervisedVAE.load_query_data(query, model)
    freezing = query_model.query_freezing
    assert freezing.freeze_classifier and freezing.trainable == (SHIFTS,)
    trains = {name for name, p in query_model.module.classifier.named_parameters() if p.requires_grad}
    assert trains == {"0.layers.0.linear.bias"}
    assert set(freezing.masks) == {
        "vae.z_encoder.body.layers.0.embeddings.0.weight",
        "vae.decoder.body.layers.0.embeddings.0.weight",
    }
    before = {name: p.detach().clone() for name, p in query_model.module.classifier.named_parameters()}
    query_model.train(max_epochs=2, **TRAIN)  # no labelled cells: no calibration warning, temperature kept
    assert query_model.temperature == model.temperature
    after = dict(query_model.module.classifier.named_parameters())
    moved = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert moved == {"0.layers.0.linear.bias"}
    predicted = query_model.predict()
    assert predicted.shape == (query.n_obs,) and set(predicted) <= set(model.classes)
    soft = query_model.predict(soft=True)
    assert list(soft.columns) == model.classes and np.allclose(soft.sum(1), 1.0)
    assert np.array_equal(query_model.get_latent_representation(ref), latents)
    assert not np.array_equal(query_model.predict(ref, soft=True).to_numpy(), proba.to_numpy())
    _assert_same_state(state, model)


def test_semi_supervised_query_with_the_whole_classifier_frozen(ss_reference):
    """``adapt_classifier=False``: no classifier parameter trains, so the query model predicts the
    reference cells exactly as the reference model does."""
    ref, query, model = ss_reference
    state, proba = _state(model), model.predict(ref, soft=True)
    query_model = SemiSupervisedVAE.load_query_data(query, model, adapt_classifier=False)
    assert query_model.query_freezing.trainable == ()
    assert not any(p.requires_grad for p in query_model.module.classifier.parameters())
    query_model.train(max_epochs=2, **TRAIN)
    assert query_model.temperature == model.temperature
    np.testing.assert_array_equal(query_model.predict(ref, soft=True).to_numpy(), proba.to_numpy())
    _assert_same_state(state, model)


def test_a_linear_classifier_has_no_shifts_to_adapt():
    ref, query = _split(seed=4)
    ref.obs["label"] = ref.obs["cell_type"].astype(str)
    SemiSupervisedVAE.setup_anndata(ref, labels_key="label", unlabeled_category=None, batch_key="batch")
    model = SemiSupervisedVAE(ref, seed=0, classifier_n_layers=0, **SMALL)
    assert model.module.classifier_shifts() == []
    query_model = SemiSupervisedVAE.load_query_data(query, model)
    assert query_model.query_freezing.trainable == ()
    assert not any(p.requires_grad for p in query_model.module.classifier.parameters())


def test_semi_supervised_query_labels_unknown_or_refused(ss_reference):
    _, query, model = ss_reference
    unknown = query.copy()
    unknown.obs["label"] = "Unknown"
    query_model = SemiSupervisedVAE.load_query_data(unknown, model)
    assert (query_model._data().label_index == -1).all()
    assert query_model.predict().shape == (query.n_obs,)
    foreign = query.copy()
    foreign.obs["label"] = np.where(np.arange(query.n_obs) % 2, "Unknown", "a_new_cell_type")
    with pytest.raises(SetupError, match=r"has labels the model does not know: \['a_new_cell_type'\]"):
        SemiSupervisedVAE.load_query_data(foreign, model)
