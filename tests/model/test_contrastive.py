"""Tests for the contrastive family: augmentations, NT-Xent, ContrastiveModel, CLI.

Covers each augmentation's documented rate (measured), NT-Xent against a direct loop and its
minimum when views coincide, cluster recovery on simulated data, persistence, reproducibility,
input validation and ``sclatent fit-contrastive``. The kNN neighbour table and its minibatches
(sclatent.data.neighbours) are tested in tests/data/test_neighbours.py. Models are tiny so the
file runs in well under a minute at one thread.
"""

from __future__ import annotations

import contextlib
import io
import math

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sclatent.cli import main
from sclatent.data import CellData, SetupError, get_registry
from sclatent.datasets import synthetic
from sclatent.metrics import leiden_scores
from sclatent.model import ContrastiveModel
from sclatent.modules.contrastive import ContrastiveModule, ProjectionHead, nt_xent
from sclatent.nn.augment import (
    CountAugmentation,
    binomial_thinning,
    gaussian_jitter,
    gene_masking,
    log_normalise,
    neighbour_mixing,
)

TRAIN = dict(accelerator="cpu", progress_bar=False)
EPOCHS = 30  # the recovery run: ARI is flat from ~20 epochs on (measured 0.87 at 30 and 50)
SIGMAS = 5.0  # tolerance of the empirical rates, in sampling standard deviations


def _clusters(n_cells: int = 600, n_genes: int = 100, n_batches: int = 1, seed: int = 3):
    return synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=4, n_batches=n_batches, seed=seed)


def _history(model) -> dict[str, list[float]]:
    return {k: v for k, v in model.history.items() if k != "seconds"}


@pytest.fixture(scope="module")
def trained():
    adata = _clusters()
    ContrastiveModel.setup_anndata(adata, labels_key="cell_type")
    model = ContrastiveModel(adata, seed=0)
    model.train(max_epochs=EPOCHS, **TRAIN)
    return adata, model


# --------------------------------------------------------------------------- augmentations


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9])
def test_thinning_keeps_the_documented_fraction_of_counts(keep):
    generator = torch.Generator().manual_seed(0)
    counts = torch.poisson(torch.full((300, 200), 6.0), generator=generator)
    out = binomial_thinning(counts, keep, generator=generator)
    assert out.shape == counts.shape and out.dtype == counts.dtype
    assert torch.equal(out, out.round()) and (out >= 0).all() and (out <= counts).all()  # a subsample
    # sum(out) ~ Binomial(sum(counts), keep): mean keep * N, sd sqrt(keep (1 - keep) N)
    total = counts.sum().item()
    assert abs(out.sum().item() - keep * total) < SIGMAS * math.sqrt(keep * (1 - keep) * total)
    # and entrywise: E[out | x] = keep * x for every count level, not only on average
    for level in (1.0, 6.0, 12.0):
        at = counts == level
        n = int(at.sum())
        assert abs(out[at].mean().item() - keep * level) < SIGMAS * math.sqrt(keep * (1 - keep) * level / n)
    assert torch.equal(binomial_thinning(counts, 1.0), counts)


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_masking_zeroes_the_documented_fraction_of_genes(rate):
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(400, 250, generator=generator) + 0.5  # strictly positive: zero means masked
    out = gene_masking(x, rate, generator=generator)
    hidden = out == 0
    assert abs(hidden.double().mean().item() - rate) < SIGMAS * math.sqrt(rate * (1 - rate) / x.numel())
    # every cell loses the same fraction of its genes (independent entries, no shared gene set)
    per_cell = hidden.double().mean(dim=1).numpy()
    assert np.abs(per_cell - rate).max() < 6 * math.sqrt(rate * (1 - rate) / x.shape[1])
    assert torch.equal(out[~hidden], x[~hidden])  # no rescaling of the kept genes
    assert torch.equal(gene_masking(x, 0.0), x)


@pytest.mark.parametrize("std", [0.1, 0.5])
def test_gaussian_noise_has_the_documented_std(std):
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(300, 200, generator=generator) * 4
    diff = (gaussian_jitter(x, std, generator=generator) - x).double()
    n = x.numel()
    assert abs(diff.std().item() - std) < SIGMAS * std / math.sqrt(2 * n)
    assert abs(diff.mean().item()) < SIGMAS * std / math.sqrt(n)
    assert torch.equal(gaussian_jitter(x, 0.0), x)


@pytest.mark.parametrize("max_weight", [0.3, 0.5])
def test_neighbour_mixing_weight_is_uniform_up_to_the_documented_maximum(max_weight):
    generator = torch.Generator().manual_seed(3)
    n = 4000
    x = torch.rand(n, 20, generator=generator)
    neighbour = torch.rand(n, 20, generator=generator) + 2.0  # never equal to x
    out, w = neighbour_mixing(x, neighbour, max_weight, generator=generator)
    # the weight read back from the output is the one returned, the same for every gene of a cell
    recovered = (out - x) / (neighbour - x)
    assert torch.allclose(recovered, w.unsqueeze(-1).expand_as(recovered), atol=1e-5)
    assert w.min() >= 0 and w.max() <= max_weight
    # U(0, m): mean m / 2 (sd of the mean m / sqrt(12 n)), variance m^2 / 12
    assert abs(w.mean().item() - max_weight / 2) < SIGMAS * max_weight / math.sqrt(12 * n)
    assert w.var().item() == pytest.approx(max_weight**2 / 12, rel=0.1)
    unchanged, w0 = neighbour_mixing(x, neighbour, 0.0)
    assert torch.equal(unchanged, x) and not w0.any()


def test_augmentation_pipeline_composes_the_steps():
    generator = torch.Generator().manual_seed(4)
    counts = torch.poisson(torch.full((50, 30), 3.0), generator=generator)
    rows, cols = counts.nonzero(as_tuple=True)
    values = counts[rows, cols]
    # every step off: the clean log-normalised cell
    identity = CountAugmentation(thinning_keep=1.0, mask_rate=0.0, noise_std=0.0, mix_max_weight=0.0)
    assert torch.allclose(identity(rows, cols, values, 50, 30), log_normalise(counts))
    # mixing only, at the largest weight of 1/2 or less: between the cell and its neighbour
    neighbour = torch.poisson(torch.full((50, 30), 3.0), generator=generator)
    mixing = CountAugmentation(thinning_keep=1.0, mask_rate=0.0, noise_std=0.0, mix_max_weight=0.5)
    mixed = mixing(rows, cols, values, 50, 30, neighbour_counts=neighbour, generator=generator)
    lo = torch.minimum(log_normalise(counts), log_normalise(neighbour))
    hi = torch.maximum(log_normalise(counts), log_normalise(neighbour))
    assert ((mixed >= lo - 1e-6) & (mixed <= hi + 1e-6)).all()
    assert not torch.allclose(mixed, log_normalise(counts))
    # masking only: the documented fraction of the cell's expressed genes reads zero
    masking = CountAugmentation(thinning_keep=1.0, mask_rate=0.3, noise_std=0.0, mix_max_weight=0.0)
    big = torch.poisson(torch.full((400, 100), 3.0), generator=generator)
    r, c = big.nonzero(as_tuple=True)
    view = masking(r, c, big[r, c], 400, 100, generator=generator)
    zeroed = (view[r, c] == 0).double().mean().item()
    assert abs(zeroed - 0.3) < SIGMAS * math.sqrt(0.3 * 0.7 / r.numel())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(thinning_keep=0.0), r"keep fraction must be in \(0, 1\]"),
        (dict(thinning_keep=1.5), r"keep fraction must be in \(0, 1\]"),
        (dict(mask_rate=1.0), r"masking rate must be in \[0, 1\)"),
        (dict(noise_std=-0.1), "standard deviation must be >= 0"),
        (dict(mix_max_weight=1.2), r"mixing weight must be in \[0, 1\]"),
    ],
)
def test_bad_augmentation_strengths_raise(options, match):
    with pytest.raises(ValueError, match=match):
        CountAugmentation(**options)
    adata = _clusters(n_cells=20, n_genes=10)
    ContrastiveModel.setup_anndata(adata)
    with pytest.raises(ValueError, match=match):
        ContrastiveModel(adata, **options)


# --------------------------------------------------------------------------- NT-Xent


def _nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's definition written out anchor by anchor (float64)."""
    views = [v / v.norm() for v in [*z1.double(), *z2.double()]]
    n = z1.shape[0]
    losses = []
    for i in range(2 * n):
        partner = i + n if i < n else i - n
        denominator = sum(math.exp(float(views[i] @ views[k]) / temperature) for k in range(2 * n) if k != i)
        losses.append(-math.log(math.exp(float(views[i] @ views[partner]) / temperature) / denominator))
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_a_direct_loop(temperature):
    generator = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator) * 3.0
    loss = nt_xent(z1, z2, temperature)
    assert loss.shape == (12,)
    assert torch.allclose(loss.double(), _nt_xent_loop(z1, z2, temperature), atol=1e-4)
    # invariant to the scale of each projection (cosine similarity)
    assert torch.allclose(nt_xent(2.0 * z1, 0.5 * z2, temperature), loss, atol=1e-5)


def test_nt_xent_is_minimal_when_the_views_coincide():
    generator = torch.Generator().manual_seed(6)
    n, d, tau = 8, 5, 0.2
    z1 = torch.randn(n, d, generator=generator)
    at_coincidence = nt_xent(z1, z1.clone(), tau)
    # anchor i's loss, its negatives held fixed, is smallest when its partner equals it: every
    # other partner (random, or z1 perturbed) scores higher
    for trial in range(50):
        z2 = z1.clone()
        i = trial % n
        z2[i] = torch.randn(d, generator=generator) if trial % 2 else z1[i] + 0.3 * torch.randn(d, generator=generator)
        assert nt_xent(z1, z2, tau)[i] > at_coincidence[i]
    # and coinciding views beat mismatched ones for the whole batch
    shuffled = z1[torch.roll(torch.arange(n), 1)]
    assert nt_xent(z1, z1, tau).mean() < nt_xent(z1, shuffled, tau).mean()
    # the floor: partner similarity 1/tau against 2n - 2 negatives of similarity >= -1/tau
    floor = -math.log(1.0 / (1.0 + (2 * n - 2) * math.exp(-2.0 / tau)))
    assert (at_coincidence >= floor - 1e-5).all()


def test_nt_xent_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent(torch.ones(3, 2), torch.ones(3, 2), temperature=0.0)


def test_projection_head_is_generic():
    head = ProjectionHead(7, n_out=3, n_hidden=11)
    assert head(torch.randn(5, 7)).shape == (5, 3)


# --------------------------------------------------------------------------- the module


def test_module_loss_uses_augmented_views_in_training_and_fixed_ones_in_evaluation():
    adata = _clusters(n_cells=64, n_genes=30)
    ContrastiveModel.setup_anndata(adata)
    batch = next(CellData(adata, get_registry(adata)).iterate(np.arange(64), 64))
    module = ContrastiveModule(n_genes=30, n_latent=8, n_hidden=16, n_projection=8, n_projection_hidden=16)
    module.eval()
    first, second = module.loss(batch), module.loss(batch)
    assert torch.equal(first.terms["nt_xent"], second.terms["nt_xent"])  # fixed evaluation views
    assert first.terms["nt_xent"].shape == (64,) and torch.equal(first.loss, first.terms["nt_xent"].mean())
    assert set(first.terms) == {"nt_xent"} and not first.has_elbo  # no likelihood: no KL, no ELBO
    # the two training views differ, and differ from the clean input
    module.train()
    v1, v2 = module.views(batch)
    clean = log_normalise(batch.counts)
    assert not torch.allclose(v1, v2) and not torch.allclose(v1, clean)
    # the embedding reads the clean cell and skips the projection head
    module.eval()
    assert torch.equal(module.embedding(batch), module.embed(module.encoder(clean)))
    assert module.embedding(batch).shape == (64, 8)


# --------------------------------------------------------------------------- the model


def test_latent_recovers_clusters(trained):
    adata, model = trained
    labels = adata.obs["cell_type"].to_numpy()
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 32) and latent.dtype == np.float32
    scores = leiden_scores(latent, labels)
    random = leiden_scores(np.random.default_rng(0).standard_normal((adata.n_obs, 32)).astype(np.float32), labels)
    assert abs(random["ari"]) < 0.05
    # Threshold as for the VAE: with 4 equal types, splitting two of them in halves still scores ARI
    # 0.82, merging any two drops it to 0.71, so ARI > 0.75 demands every type separated. Measured:
    # 0.87 at 30 epochs (scanpy PCA on the same cells: 0.80).
    assert scores["ari"] > 0.75, scores
    assert scores["nmi"] > random["nmi"] + 0.5
    # training lowered the contrastive loss on held-out cells
    history = model.history["validation_nt_xent"]
    assert history[-1] < history[0] - 0.5


def test_save_load_round_trip_gives_identical_latents(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "model")
    fresh = adata.copy()
    del fresh.uns["_sclatent_registry"]
    loaded = ContrastiveModel.load(tmp_path / "model", adata=fresh)
    assert np.array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    assert loaded.hyperparameters == model.hyperparameters and loaded.history == model.history
    # genes in another order are matched by name
    shuffled = adata[:, adata.var_names[::-1]].copy()
    assert np.allclose(model.get_latent_representation(shuffled), model.get_latent_representation(), atol=1e-5)
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "model")
    with pytest.raises(TypeError, match="holds a ContrastiveModel"):
        from sclatent.model import VAE

        VAE.load(tmp_path / "model", adata=fresh)


def test_seeded_training_is_reproducible():
    adata = _clusters(n_cells=120, n_genes=30)
    ContrastiveModel.setup_anndata(adata)
    runs = []
    for seed in (0, 0, 1):
        model = ContrastiveModel(adata, n_latent=8, n_hidden=32, seed=seed)
        model.train(max_epochs=3, batch_size=32, **TRAIN)
        runs.append((_history(model), model.get_latent_representation()))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][1], runs[2][1])


def test_training_without_neighbour_mixing_builds_no_table():
    adata = _clusters(n_cells=80, n_genes=20)
    ContrastiveModel.setup_anndata(adata)
    model = ContrastiveModel(adata, n_latent=4, n_hidden=16, mix_max_weight=0.0)
    data = model._data()
    assert model._training_data(data, 0) is data
    model.train(max_epochs=2, batch_size=32, **TRAIN)
    assert len(model.history["train_nt_xent"]) == 2


def test_empty_cells_are_not_trained_on_but_embedded():
    adata = _clusters(n_cells=80, n_genes=20)
    counts = adata.X.toarray()
    counts[5] = 0
    adata.X = sp.csr_matrix(counts)
    with pytest.warns(UserWarning, match="1 of 80 cells have zero total counts"):
        ContrastiveModel.setup_anndata(adata)
    model = ContrastiveModel(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=32, **TRAIN)
    assert 5 not in model.train_indices and 5 not in model.validation_indices
    latent = model.get_latent_representation()
    assert latent.shape == (80, 4) and np.isfinite(latent).all()


def _counts_with(value: float) -> np.ndarray:
    counts = np.random.default_rng(0).poisson(2.0, size=(30, 10)).astype(np.float32)
    counts[4, 2] = value
    return counts


@pytest.mark.parametrize(
    ("value", "kwargs", "patterns"),
    [
        (0.5, {}, ["non-integer", "allow_non_integer=True"]),
        (-2.0, {}, ["negative"]),
        (np.nan, {}, ["NaN"]),
        (1.0, {"layer": "raw"}, ["'raw' not found"]),
    ],
)
def test_setup_anndata_refuses_bad_counts(value, kwargs, patterns):
    adata = ad.AnnData(_counts_with(value))
    with pytest.raises(SetupError) as info:
        ContrastiveModel.setup_anndata(adata, **kwargs)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    with pytest.raises(SetupError, match="not been set up"):
        ContrastiveModel(adata)


def test_query_data_are_validated(trained):
    adata, model = trained
    with pytest.raises(SetupError, match="lacks 10 of the model's 100 genes"):
        model.get_latent_representation(adata[:, 10:].copy())
    query = adata.copy()
    query.X = query.X.toarray()
    query.X[0, 0] = 0.5
    with pytest.raises(SetupError, match="non-integer"):
        model.get_latent_representation(query)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(n_neighbors=0), "n_neighbors must be >= 1"),
        (dict(n_latent=0), "must be >= 1"),
    ],
)
def test_bad_options_raise(options, match):
    adata = _clusters(n_cells=20, n_genes=10)
    ContrastiveModel.setup_anndata(adata)
    with pytest.raises(ValueError, match=match):
        ContrastiveModel(adata, **options)


def test_user_anndata_is_not_modified_beyond_the_registry():
    adata = _clusters(n_cells=80, n_genes=20)
    before = adata.copy()
    ContrastiveModel.setup_anndata(adata)
    model = ContrastiveModel(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=32, **TRAIN)
    model.get_latent_representation()
    assert set(adata.uns) - set(before.uns) == {"_sclatent_registry"}
    assert (adata.X != before.X).nnz == 0 and list(adata.obsm) == list(before.obsm)
    assert list(adata.layers) == list(before.layers) and adata.obs.equals(before.obs)


# --------------------------------------------------------------------------- command line


def test_cli_fit_contrastive(tmp_path):
    adata = _clusters(n_cells=200, n_genes=40)
    adata.X = sp.csr_matrix(adata.X)
    source = tmp_path / "cells.h5ad"
    adata.write_h5ad(source)
    out = tmp_path / "out.h5ad"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        arguments = ["fit-contrastive", str(source), "--out", str(out), "--labels-key", "cell_type"]
        code = main([*arguments, "--max-epochs", "3", "--no-progress", "--batch-size", "64", "--n-neighbors", "5"])
    assert code == 0
    text = stdout.getvalue()
    assert "fit-contrastive: 200 cells x 40 genes" in text and "scanpy PCA baseline: ARI" in text
    assert "3 epochs" in text and "NT-Xent" in text
    result = ad.read_h5ad(out)
    assert result.obsm["X_sclatent_contrastive"].shape == (200, 32)
    assert "leiden_sclatent_contrastive" in result.obs and "X_umap" in result.obsm
    for png in (tmp_path / "out_umap.png", tmp_path / "out_training.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = ContrastiveModel.load(tmp_path / "out_model", adata=result)
    assert np.allclose(loaded.get_latent_representation(), result.obsm["X_sclatent_contrastive"], atol=1e-6)
    # a missing input file is reported, not a traceback
    with pytest.raises(SystemExit, match="does not exist"):
        main(["fit-contrastive", str(tmp_path / "missing.h5ad"), "--out", str(out)])
