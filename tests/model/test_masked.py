"""Tests for masked-gene pretraining: the gene mask, MaskedGeneModule and sclatent.model.MaskedGeneModel.

Covers the mask's documented rate (exact per-cell count, zeros hidden as often as nonzeros), that
hidden counts never reach the encoder, cluster recovery on simulated data, fine-tuning and
prediction (on the training AnnData and on another one with the same genes), the labelled
subsets, persistence, reproducibility, the errors, and the ``fit-masked`` command. Models are
tiny so the file runs in well under a minute and a half on one thread.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sclatent.data import SetupError
from sclatent.datasets import synthetic
from sclatent.metrics import leiden_scores
from sclatent.model import MaskedGeneModel
from sclatent.model.masked import labelled_subset
from sclatent.modules.masked import MaskedGeneModule, draw_gene_mask, n_masked_genes

TRAIN = dict(accelerator="cpu", progress_bar=False)
FINE_TUNE = dict(accelerator="cpu", progress_bar=False)
EPOCHS = 30
SIGMAS = 5.0  # tolerance of the empirical rates, in binomial standard deviations


def _data(n_cells: int = 600, n_genes: int = 100, seed: int = 0):
    return synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=4, n_batches=1, seed=seed)


@pytest.fixture(scope="module")
def trained():
    adata = _data()
    MaskedGeneModel.setup_anndata(adata, labels_key="cell_type")
    model = MaskedGeneModel(adata, encoder="mlp", seed=0)
    model.train(max_epochs=EPOCHS, **TRAIN)
    return adata, model


@pytest.fixture(scope="module")
def fine_tuned(trained):
    adata, pretrained = trained
    model = MaskedGeneModel(adata, encoder="mlp", seed=0)
    model.module.load_state_dict(pretrained.module.state_dict())
    model.fine_tune(labels_key="cell_type", fraction_labelled=0.1, seed=0, **FINE_TUNE)
    return adata, model


# --------------------------------------------------------------------------- the mask


def test_mask_hides_the_documented_number_of_genes_per_cell():
    generator = torch.Generator().manual_seed(0)
    n_cells, n_genes, rate = 4000, 200, 0.15
    mask = draw_gene_mask(n_cells, n_genes, rate, generator)
    assert mask.shape == (n_cells, n_genes) and mask.dtype == torch.bool
    # exactly round(rate * G) genes per cell, not a Binomial(G, rate) number
    assert (mask.sum(1) == n_masked_genes(n_genes, rate)).all()
    assert n_masked_genes(n_genes, rate) == 30
    # every gene is hidden at the same rate (uniform subsets): per-gene frequency over the cells
    per_gene = mask.double().mean(0).numpy()
    assert np.abs(per_gene - rate).max() < SIGMAS * np.sqrt(rate * (1 - rate) / n_cells)
    # different cells get different subsets
    assert not torch.equal(mask[0], mask[1])
    # the count is clamped so that one gene is always hidden and one always visible
    assert n_masked_genes(10, 0.01) == 1 and n_masked_genes(10, 0.99) == 9


def test_training_mask_hides_zeros_as_often_as_nonzeros(trained):
    """The module's own mask, measured on real minibatches: ~15 % of the zero entries and of the
    nonzero entries are hidden (the mask ignores the counts)."""
    _, model = trained
    module = model.module
    module.train()
    torch.manual_seed(0)
    hidden_zero = hidden_nonzero = n_zero = n_nonzero = 0
    for _ in range(20):
        for batch in model._data().iterate(np.arange(600), 600):
            hidden = module.draw_mask(batch)
            assert (hidden.sum(1) == model.n_masked).all()
            zero = batch.counts == 0
            hidden_zero += int((hidden & zero).sum())
            hidden_nonzero += int((hidden & ~zero).sum())
            n_zero += int(zero.sum())
            n_nonzero += int((~zero).sum())
    module.eval()
    rate = model.n_masked / model.registry.n_genes
    assert n_zero > 10_000 and n_nonzero > 10_000  # both kinds of entries are plentiful here
    for hit, total in ((hidden_zero, n_zero), (hidden_nonzero, n_nonzero)):
        # entries of one cell are dependent (a fixed count per cell), which only lowers the variance
        assert abs(hit / total - rate) < SIGMAS * np.sqrt(rate * (1 - rate) / total)


def test_evaluation_mask_is_fixed_and_training_mask_is_not(trained):
    _, model = trained
    batch = next(iter(model._data().iterate(np.arange(64), 64)))
    model.module.eval()
    assert torch.equal(model.module.draw_mask(batch), model.module.draw_mask(batch))
    model.module.train()
    assert not torch.equal(model.module.draw_mask(batch), model.module.draw_mask(batch))
    model.module.eval()


@pytest.mark.parametrize("encoder", ["mlp", "transformer"])
def test_hidden_counts_never_reach_the_encoder(encoder):
    torch.manual_seed(0)
    module = MaskedGeneModule(n_genes=50, encoder=encoder, n_latent=8, n_hidden=16, n_tokens=16, d_model=16)
    module.eval()
    counts = torch.poisson(torch.full((32, 50), 2.0))
    hidden = draw_gene_mask(32, 50, 0.2, torch.Generator().manual_seed(1))
    changed = counts.clone()
    changed[hidden] = changed[hidden] * 7 + 3  # arbitrary new values at the hidden genes only
    assert torch.equal(module.encode(counts, hidden), module.encode(changed, hidden))
    # ... while the visible counts do matter
    visible_changed = counts.clone()
    visible_changed[~hidden] += 5
    assert not torch.allclose(module.encode(counts, hidden), module.encode(visible_changed, hidden))


def test_loss_scores_only_the_hidden_genes(trained):
    """The per-cell NLL equals the sum of the per-entry NB log-probabilities at the hidden genes,
    with the mean scaled by the visible library."""
    from sclatent.distributions import log_prob

    _, model = trained
    module = model.module
    module.eval()
    batch = next(iter(model._data().iterate(np.arange(50), 50)))
    hidden = module.draw_mask(batch)
    nll, z = module.masked_nll(batch, hidden)
    heads = module.decoder(z, *batch.covariates())
    counts = batch.counts
    library = (counts * ~hidden).sum(1, keepdim=True)
    mu = torch.softmax(heads["logits"], -1) * library
    per_entry = log_prob("nb", counts, mu, torch.exp(module.log_theta))
    expected = -(per_entry * hidden).sum(1)
    assert torch.allclose(nll, expected, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- training


def test_pretrained_embedding_recovers_the_clusters(trained):
    adata, model = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 32) and z.dtype == np.float32
    # measured: ARI 0.98 (30 epochs, seed 0); the untrained encoder gives 0.38 on these data. 0.8
    # leaves margin for platform noise while still failing if the objective stops shaping the embedding.
    scores = leiden_scores(z, adata.obs["cell_type"].astype(str).to_numpy())
    assert scores["ari"] > 0.8
    history = model.history
    assert history["validation_reconstruction"][-1] < history["validation_reconstruction"][0]
    assert model.get_masked_nll(indices=model.validation_indices) == pytest.approx(
        min(history["validation_reconstruction"]), rel=0.2
    )


def test_transformer_encoder_learns_the_masked_genes():
    adata = _data(n_cells=300, n_genes=60, seed=2)
    MaskedGeneModel.setup_anndata(adata)
    model = MaskedGeneModel(adata, encoder="transformer", n_tokens=32, d_model=32, seed=0)
    before = model.get_masked_nll()
    model.train(max_epochs=8, early_stopping=False, **TRAIN)
    # measured: 35.5 -> 33.4 nats per cell (8 epochs, under a second of CPU); half that gain is
    # a margin that still fails if the hidden genes are not learned
    assert model.get_masked_nll() < before - 1.0
    assert model.get_latent_representation().shape == (300, 32)


def test_seeded_training_is_reproducible():
    adata = _data(n_cells=200, n_genes=40, seed=3)
    MaskedGeneModel.setup_anndata(adata)
    latents = []
    for _ in range(2):
        model = MaskedGeneModel(adata, seed=5)
        model.train(max_epochs=3, **TRAIN)
        latents.append(model.get_latent_representation())
    np.testing.assert_array_equal(*latents)


# --------------------------------------------------------------------------- fine-tuning


def test_fine_tune_predicts_the_clusters(fine_tuned):
    adata, model = fine_tuned
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    assert model.classes == ["type_0", "type_1", "type_2", "type_3"]
    proba = model.predict_proba()
    assert proba.shape == (adata.n_obs, 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    predicted = model.predict()
    assert predicted.shape == (adata.n_obs,) and set(predicted) <= set(model.classes)
    np.testing.assert_array_equal(predicted, np.asarray(model.classes)[proba.argmax(1)])
    # 60 labelled cells (10 %), stratified: 15 per type
    assert len(model.labelled_indices) == 60
    assert set(np.unique(truth[model.labelled_indices], return_counts=True)[1]) == {15}
    # chance is 0.25; measured 0.985 on the 540 unlabelled cells, which are the ones scored
    unlabelled = np.setdiff1d(np.arange(adata.n_obs), model.labelled_indices)
    assert (predicted[unlabelled] == truth[unlabelled]).mean() > 0.85
    assert model.history["fine_tune_train_accuracy"][-1] > 0.9


def test_fine_tune_on_another_anndata_with_the_same_genes(trained):
    adata, pretrained = trained
    query = _data(n_cells=200, seed=0)[:, ::-1].copy()  # same genes, reversed order, other cells
    query.obs["kind"] = query.obs["cell_type"].astype(str)
    query.obs.loc[query.obs_names[:10], "kind"] = np.nan  # missing labels are never used
    before_obs, before_x = query.obs.copy(), query.X.copy()
    model = MaskedGeneModel(adata, seed=0)
    model.module.load_state_dict(pretrained.module.state_dict())
    candidates = np.arange(100)
    model.fine_tune(query, labels_key="kind", fraction_labelled=0.5, indices=candidates, **FINE_TUNE)
    assert model.adata is query  # the new data are now the model's
    used = model.labelled_indices
    assert len(used) == 45 and set(used) <= set(range(10, 100))
    predicted = model.predict()
    assert predicted.shape == (200,)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    assert (predicted[100:] == truth[100:]).mean() > 0.85
    # the user's AnnData is read, never written
    assert query.obs.equals(before_obs) and (query.X != before_x).nnz == 0
    assert "_sclatent_registry" not in query.uns


def test_frozen_encoder_fine_tune_changes_only_the_head(trained):
    adata, pretrained = trained
    model = MaskedGeneModel(adata, seed=0)
    model.module.load_state_dict(pretrained.module.state_dict())
    before = model.get_latent_representation()
    model.fine_tune(labels_key="cell_type", fraction_labelled=0.2, freeze_encoder=True, max_epochs=20, **FINE_TUNE)
    np.testing.assert_array_equal(before, model.get_latent_representation())
    # the decoder is never touched by fine-tuning
    for name, value in pretrained.module.state_dict().items():
        if name.startswith("decoder") or name == "log_theta":
            assert torch.equal(value, model.module.state_dict()[name])


def test_labelled_subset_fractions_and_strata():
    labels = np.repeat(["a", "b", "c", "d", "e"], [40, 30, 20, 6, 4])
    candidates = np.arange(0, 100, 1)
    ten = labelled_subset(labels, 0.1, seed=0, candidates=candidates)
    # stratified: each class in proportion (40/30/20 % -> 4/3/2 cells; d and e share the last one)
    drawn = dict(zip(*np.unique(labels[ten], return_counts=True), strict=True))
    assert len(ten) == 10 and (drawn["a"], drawn["b"], drawn["c"]) == (4, 3, 2)
    np.testing.assert_array_equal(ten, labelled_subset(labels, 0.1, seed=0, candidates=candidates))
    assert not np.array_equal(ten, labelled_subset(labels, 0.1, seed=1, candidates=candidates))
    three = labelled_subset(labels, 0.03, seed=0)  # 3 cells < 5 classes: uniform draw
    assert len(three) == 3
    np.testing.assert_array_equal(labelled_subset(labels, 1.0, candidates=candidates[:7]), np.arange(7))
    assert set(labelled_subset(labels, 0.5, seed=0, candidates=np.arange(50, 100))) <= set(range(50, 100))
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="fraction_labelled"):
            labelled_subset(labels, bad)


# --------------------------------------------------------------------------- persistence


def test_save_load_round_trip_after_fine_tune(fine_tuned, tmp_path):
    adata, model = fine_tuned
    model.save(tmp_path / "model")
    loaded = MaskedGeneModel.load(tmp_path / "model", adata=adata)
    np.testing.assert_array_equal(model.get_latent_representation(), loaded.get_latent_representation())
    np.testing.assert_array_equal(model.predict_proba(), loaded.predict_proba())
    np.testing.assert_array_equal(model.predict(), loaded.predict())
    assert loaded.classes == model.classes
    assert loaded.history["fine_tune_train_accuracy"] == model.history["fine_tune_train_accuracy"]


@pytest.mark.parametrize("encoder", ["mlp", "transformer"])
def test_save_load_round_trip_pretrained(encoder, tmp_path):
    adata = _data(n_cells=120, n_genes=30, seed=4)
    MaskedGeneModel.setup_anndata(adata)
    model = MaskedGeneModel(adata, encoder=encoder, n_tokens=16, d_model=16)
    model.train(max_epochs=2, **TRAIN)
    model.save(tmp_path / "m")
    loaded = MaskedGeneModel.load(tmp_path / "m", adata=adata)
    np.testing.assert_array_equal(model.get_latent_representation(), loaded.get_latent_representation())
    assert loaded.get_masked_nll() == model.get_masked_nll()
    with pytest.raises(RuntimeError, match="fine_tune"):
        loaded.predict()


# --------------------------------------------------------------------------- errors


def test_fine_tune_errors(trained):
    adata, _ = trained
    model = MaskedGeneModel(adata, seed=0)
    with pytest.raises(SetupError, match="'nope' not found"):
        model.fine_tune(labels_key="nope", **FINE_TUNE)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match=r"fraction_labelled must be in \(0, 1\]"):
            model.fine_tune(labels_key="cell_type", fraction_labelled=bad, **FINE_TUNE)
    one_class = adata.copy()
    one_class.obs["same"] = "x"
    with pytest.raises(SetupError, match="needs two"):
        model.fine_tune(one_class, labels_key="same", **FINE_TUNE)
    other_genes = _data(n_cells=50, n_genes=90)
    other_genes.obs["kind"] = other_genes.obs["cell_type"]
    with pytest.raises(SetupError, match="lacks 10 of the model's 100 genes"):
        model.fine_tune(other_genes, labels_key="kind", **FINE_TUNE)
    with pytest.raises(RuntimeError, match="fine_tune"):
        model.predict_proba()


def test_predict_on_mismatched_genes_is_refused(fine_tuned):
    _, model = fine_tuned
    other = _data(n_cells=50, n_genes=90)
    with pytest.raises(SetupError, match="lacks 10 of the model's 100 genes"):
        model.predict(other)
    with pytest.raises(SetupError, match="lacks"):
        model.get_latent_representation(other)


def test_bad_counts_and_options_are_refused():
    adata = _data(n_cells=60, n_genes=20)
    bad = adata.copy()
    bad.X = sp.csr_matrix(bad.X.toarray() + 0.5)
    with pytest.raises(SetupError, match="non-integer"):
        MaskedGeneModel.setup_anndata(bad)
    MaskedGeneModel.setup_anndata(adata)
    with pytest.raises(ValueError, match="encoder must be one of"):
        MaskedGeneModel(adata, encoder="cnn")
    for rate in (0.0, 1.0):
        with pytest.raises(ValueError, match="mask_rate"):
            MaskedGeneModel(adata, mask_rate=rate)
    with pytest.raises(ValueError, match="gene_likelihood"):
        MaskedGeneModel(adata, gene_likelihood="gaussian")
    with pytest.raises(ValueError, match="divisible"):
        MaskedGeneModel(adata, encoder="transformer", d_model=30, n_heads=4)


# --------------------------------------------------------------------------- command line


def test_fit_masked_command(tmp_path, capsys):
    import anndata as ad

    from sclatent.cli import main

    adata = _data(n_cells=200, n_genes=50, seed=6)
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    out = tmp_path / "out.h5ad"
    code = main(
        [
            "fit-masked",
            str(path),
            "--out",
            str(out),
            "--max-epochs",
            "3",
            "--labels-key",
            "cell_type",
            "--fine-tune-fraction",
            "0.5",
            "--no-progress",
            "--no-baseline",
        ]
    )
    assert code == 0
    result = ad.read_h5ad(out)
    assert result.obsm["X_sclatent_masked"].shape == (200, 32)
    assert "leiden_sclatent_masked" in result.obs and "X_umap" in result.obsm
    assert set(result.obs["sclatent_masked_prediction"].astype(str)) <= set(adata.obs["cell_type"].astype(str))
    for suffix in ("_umap.png", "_training.png"):
        assert (tmp_path / f"out{suffix}").read_bytes()[:4] == b"\x89PNG"
    # the saved model is the fine-tuned one: it reproduces the written predictions
    loaded = MaskedGeneModel.load(tmp_path / "out_model", adata=result)
    np.testing.assert_array_equal(loaded.predict(), result.obs["sclatent_masked_prediction"].astype(str).to_numpy())
    printed = capsys.readouterr().out
    assert "held-out NLL" in printed and "fine-tuned" in printed and "ARI" in printed
