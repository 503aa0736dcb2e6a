"""Tests for the denoising autoencoders: input noise, AutoencoderModule and sclatent.model.DenoisingAE.

Covers the corruption rates of the noise functions, the concatenated mask of the masking variant,
the linear autoencoder's equivalence with PCA, denoising against simulated true means, ``impute``,
input validation, persistence of every variant, reproducibility, the sparse and contractive
penalties and batch conditioning. Models are tiny so the file runs in well under a minute.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from sclatent.data import SetupError
from sclatent.datasets import synthetic
from sclatent.model import DenoisingAE
from sclatent.modules.autoencoder import AutoencoderModule, TiedLinear
from sclatent.nn.noise import InputNoise, gaussian_noise, masking_noise, salt_noise

TRAIN = dict(accelerator="cpu", progress_bar=False)
EPOCHS_LINEAR = 400  # full-batch steps of the linear AE (converged by ~200)
EPOCHS_DENOISE = 60
EPOCHS_PENALTY = 20
EPOCHS_BATCH = 30
SIGMAS = 5.0  # tolerance of the empirical rates, in binomial / sampling standard deviations


def _small(n_cells: int = 180, n_genes: int = 40, n_batches: int = 1, seed: int = 1, **kwargs):
    return synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=3, n_batches=n_batches, seed=seed, **kwargs)


def _comparable(history: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: v for k, v in history.items() if k != "seconds"}


def _first_batch(model: DenoisingAE, n_cells: int) -> object:
    return next(iter(model._batches(None, np.arange(n_cells), n_cells)))


def _log_normalised(adata) -> np.ndarray:
    """``log1p(x / library * 1e4)`` of the counts in ``X``, dense float64."""
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    x = x.astype(np.float64)
    library = np.maximum(x.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(x / library * 1e4)


# --------------------------------------------------------------------------- noise functions


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.8])
def test_salt_noise_hides_the_documented_fraction(rate):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(400, 300, generator=generator) + 0.5  # strictly positive: a zero is a hidden entry
    original = x.clone()
    out = salt_noise(x, rate, generator=generator)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, original)  # not in place
    hidden = out == 0
    sd = np.sqrt(rate * (1 - rate) / x.numel())
    assert abs(hidden.double().mean().item() - rate) < SIGMAS * sd
    # each row and column is hidden at the same rate (independent entries, not a shared mask)
    for axis, n in ((0, x.shape[0]), (1, x.shape[1])):
        fractions = hidden.double().mean(dim=axis).numpy()
        assert np.abs(fractions - rate).max() < 6 * np.sqrt(rate * (1 - rate) / n)
    # the kept entries are untouched: no inverted-dropout rescaling
    assert torch.equal(out[~hidden], x[~hidden])


def test_masking_noise_returns_the_mask_of_hidden_entries():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(300, 200, generator=generator) + 1.0
    out, mask = masking_noise(x, 0.25, generator=generator)
    assert out.shape == mask.shape == x.shape and mask.dtype == x.dtype
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out, x * (1 - mask))
    sd = np.sqrt(0.25 * 0.75 / x.numel())
    assert abs(mask.double().mean().item() - 0.25) < SIGMAS * sd
    # rate 0 hides nothing
    out0, mask0 = masking_noise(x, 0.0)
    assert torch.equal(out0, x) and not mask0.any()


@pytest.mark.parametrize("std", [0.1, 1.0])
def test_gaussian_noise_has_the_documented_std(std):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(300, 200, generator=generator) * 3.0
    out = gaussian_noise(x, std, generator=generator)
    diff = (out - x).double()
    n = x.numel()
    # sample std of n normals has sd ~ std / sqrt(2n); the sample mean has sd std / sqrt(n)
    assert abs(diff.std().item() - std) < SIGMAS * std / np.sqrt(2 * n)
    assert abs(diff.mean().item()) < SIGMAS * std / np.sqrt(n)
    assert (diff != 0).all()
    assert torch.equal(gaussian_noise(x, 0.0), x)


@pytest.mark.parametrize(
    ("kind", "rate"), [("gaussian", 0.5), ("salt", 0.4), ("masking", 0.4), ("none", 0.5), ("salt", 0.0)]
)
def test_input_noise_is_clean_in_eval_mode(kind, rate):
    x = torch.rand(64, 30) + 0.5
    noise = InputNoise(kind, rate)
    noise.eval()
    out = noise(x)
    if kind == "masking":
        assert out.shape == (64, 60)
        assert torch.equal(out[:, :30], x) and not out[:, 30:].any()
    else:
        assert torch.equal(out, x)
    # in training mode only the real corruptions change the input
    noise.train()
    torch.manual_seed(0)
    changed = not torch.equal(noise(x)[:, :30], x)
    assert changed == (kind != "none" and rate > 0)


@pytest.mark.parametrize(("kind", "rate"), [("gaussian", 0.3), ("salt", 0.3), ("masking", 0.3)])
def test_input_noise_training_rates(kind, rate):
    torch.manual_seed(3)
    x = torch.rand(400, 250) + 0.5
    out = InputNoise(kind, rate).train()(x)
    n = x.numel()
    if kind == "gaussian":
        assert abs((out - x).double().std().item() - rate) < SIGMAS * rate / np.sqrt(2 * n)
    else:
        zeroed = (out[:, :250] == 0).double().mean().item()
        assert abs(zeroed - rate) < SIGMAS * np.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize(
    ("kind", "rate", "match"),
    [
        ("dropout", 0.1, r"noise must be one of \('none', 'gaussian', 'salt', 'masking'\), got 'dropout'"),
        ("Gaussian", 0.1, "noise must be one of"),
        ("salt", 1.0, r"noise rate must be in \[0, 1\) for 'salt' noise, got 1.0"),
        ("masking", -0.1, r"noise rate must be in \[0, 1\) for 'masking' noise"),
        ("gaussian", -0.5, "standard deviation must be >= 0, got -0.5"),
    ],
)
def test_input_noise_rejects_bad_kinds_and_rates(kind, rate, match):
    with pytest.raises(ValueError, match=match):
        InputNoise(kind, rate)


def test_noise_functions_reject_bad_rates():
    x = torch.ones(3, 3)
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"noise rate must be in \[0, 1\)"):
            masking_noise(x, rate)
        with pytest.raises(ValueError, match=r"noise rate must be in \[0, 1\)"):
            salt_noise(x, rate)


# --------------------------------------------------------------------------- masking variant


def test_masking_concatenates_the_mask():
    torch.manual_seed(0)
    x = torch.poisson(torch.full((300, 50), 1.0))  # ~37 % observed zeros, which the mask tells apart
    noise = InputNoise("masking", 0.25).train()
    assert noise.output_width(50) == 100
    out = noise(x)
    assert out.shape == (300, 100)
    values, mask = out[:, :50], out[:, 50:]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    zeroed = (x != 0) & (values == 0)
    assert zeroed.sum() > 100
    assert torch.all(mask[zeroed] == 1)  # exactly 1 where a nonzero input was hidden
    assert torch.all(values[mask == 1] == 0)
    assert torch.equal(values[mask == 0], x[mask == 0])
    assert abs(mask.double().mean().item() - 0.25) < SIGMAS * np.sqrt(0.25 * 0.75 / mask.numel())


@pytest.mark.parametrize("tied", [False, True])
def test_masking_module_encoder_reads_input_and_mask(tied):
    n_genes = 40
    plain = AutoencoderModule(n_genes, noise="gaussian", n_hidden=16, n_latent=4, tied_weights=tied)
    masked = AutoencoderModule(n_genes, noise="masking", noise_rate=0.3, n_hidden=16, n_latent=4, tied_weights=tied)
    assert plain.encoder.layers[0].linear.in_features == n_genes
    assert masked.encoder.layers[0].linear.in_features == 2 * n_genes
    assert masked.encoder.layers[0].linear.weight.shape == (16, 2 * n_genes)

    # the model class builds the same, and the training loss feeds the encoder [corrupted u, mask]
    adata = _small(n_genes=n_genes)
    DenoisingAE.setup_anndata(adata)
    model = DenoisingAE(adata, noise="masking", noise_rate=0.3, n_hidden=16, n_latent=4, tied_weights=tied)
    module = model.module
    assert module.encoder.layers[0].linear.in_features == 2 * n_genes
    batch = _first_batch(model, 150)
    clean = module.normalised_input(batch)
    seen = []
    hook = module.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    try:
        module.train()
        torch.manual_seed(0)
        out = module.loss(batch)
        module.eval()
        module.loss(batch)
        heads = module.decode(torch.zeros(150, 4), batch)
    finally:
        hook.remove()
        module.eval()
    assert torch.isfinite(out.loss)
    assert heads["logits"].shape == (150, n_genes)
    train_input, eval_input = seen[:2]  # (eval also encodes once more for the masked-count score)
    assert train_input.shape == eval_input.shape == (150, 2 * n_genes)
    values, mask = train_input[:, :n_genes], train_input[:, n_genes:]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.all(values[mask == 1] == 0)
    assert torch.equal(values[mask == 0], clean[mask == 0])
    assert torch.all(mask[(clean != 0) & (values == 0)] == 1)
    assert abs(mask.double().mean().item() - 0.3) < SIGMAS * np.sqrt(0.3 * 0.7 / mask.numel())
    # evaluation: the clean input and an all-zero mask
    assert torch.equal(eval_input[:, :n_genes], clean) and not eval_input[:, n_genes:].any()


@pytest.mark.parametrize(
    ("noise", "rate"), [("gaussian", 0.1), ("salt", 0.2), ("masking", 0.2), ("none", 0.1), ("gaussian", 0.0)]
)
def test_training_loss_sees_the_corruption_and_evaluation_does_not(noise, rate):
    adata = _small(n_genes=30)
    DenoisingAE.setup_anndata(adata)
    model = DenoisingAE(adata, noise=noise, noise_rate=rate, n_hidden=16, n_latent=3, seed=0)
    module, batch = model.module, _first_batch(model, 100)
    module.train()
    try:
        first, second = (float(module.loss(batch).loss.detach()) for _ in range(2))
    finally:
        module.eval()
    assert (first != second) == (noise != "none" and rate > 0)
    assert torch.equal(module.loss(batch).loss, module.loss(batch).loss)
    np.testing.assert_array_equal(model.get_latent_representation(), model.get_latent_representation())
    np.testing.assert_array_equal(model.impute(return_matrix=True), model.impute(return_matrix=True))


# --------------------------------------------------------------------------- linear AE = PCA


def _decoder_basis(model: DenoisingAE) -> np.ndarray:
    """``(G, k)`` decoder matrix of a linear model: its columns span the reconstruction subspace."""
    module = model.module
    if isinstance(module.out, TiedLinear):
        return module.code.weight.detach().T.numpy().astype(np.float64)
    return module.out.weight.detach().numpy().astype(np.float64)


@pytest.fixture(scope="module")
def pca_data():
    """(adata, centred log-normalised matrix, PCA fit) of a 300 x 60 simulation with 5 clusters.

    Deep libraries and no zero inflation keep the noise floor low: the top 4 principal variances
    (between-cluster directions) are ~10x the 5th (measured 13.7, 8.2, 5.8, 5.5 | 0.54).
    """
    from sklearn.decomposition import PCA

    adata = synthetic(
        n_cells=300,
        n_genes=60,
        n_clusters=5,
        n_batches=1,
        n_latent=5,
        library_size=(5000, 10000),
        dispersion=20.0,
        zero_inflation=0.0,
        seed=4,
    )
    DenoisingAE.setup_anndata(adata)
    u = _log_normalised(adata)
    u -= u.mean(axis=0)
    return adata, u, PCA(n_components=10, svd_solver="full").fit(u)


@pytest.mark.parametrize("tied", [False, True])
def test_linear_ae_spans_the_pca_subspace(pca_data, tied):
    """Baldi & Hornik: at the optimum of the linear AE's squared error the decoder's columns span the
    top-k principal subspace of the centred log-normalised data.

    The eigen-gap l_4 / l_5 ~ 10 makes that subspace well-defined and quick to reach: full-batch Adam
    (lr 1e-2) gets the largest principal angle to ~0.05 deg (untied) / ~0.1 deg (tied) by 200 steps
    and stays there (measured), so 1 degree leaves a 10x margin; a random 4-dimensional subspace of
    R^60 is at ~80-90 degrees and PCA of the uncentred data misses by much more than 1 degree.
    """
    from scipy.linalg import subspace_angles

    adata, u, pca = pca_data
    k = 4
    variances = pca.explained_variance_
    assert variances[k - 1] / variances[k] > 5  # a well-defined top-k subspace
    model = DenoisingAE(adata, linear=True, n_latent=k, tied_weights=tied, seed=0)
    assert model.module.gene_likelihood == "gaussian" and model.module.noise.kind == "none"
    np.testing.assert_allclose(model.module.input_mean.numpy(), _log_normalised(adata).mean(0), rtol=1e-4, atol=1e-5)
    before = np.degrees(subspace_angles(_decoder_basis(model), pca.components_[:k].T)).max()
    model.train(max_epochs=EPOCHS_LINEAR, lr=1e-2, batch_size=adata.n_obs, train_size=1.0, weight_decay=0.0, **TRAIN)
    angles = np.degrees(subspace_angles(_decoder_basis(model), pca.components_[:k].T))
    assert before > 45, before  # the initial decoder is not already there
    assert angles.max() < 1.0, angles
    # the reconstruction error is PCA's: half the discarded variance per cell (measured ratio 1.0002)
    residual = u - (u @ pca.components_[:k].T) @ pca.components_[:k]
    pca_error = 0.5 * (residual**2).sum(axis=1).mean()
    assert model.get_reconstruction_error() == pytest.approx(pca_error, rel=2e-3)
    # the code is (up to an invertible k x k map) the PCA scores
    z = model.get_latent_representation().astype(np.float64)
    scores = u @ pca.components_[:k].T
    coef, *_ = np.linalg.lstsq(scores, z, rcond=None)
    assert np.abs(scores @ coef - z).max() < 0.02 * np.abs(z).max()


# --------------------------------------------------------------------------- denoising


@pytest.fixture(scope="module")
def trained():
    """(adata, model): ZINB DAE with Gaussian noise on 400 x 80 simulated counts with known means."""
    adata = synthetic(n_cells=400, n_genes=80, n_clusters=3, n_batches=1, zero_inflation=0.1, seed=2)
    DenoisingAE.setup_anndata(adata, layer="counts")
    model = DenoisingAE(adata, n_latent=5, n_hidden=64, seed=0)
    model.train(max_epochs=EPOCHS_DENOISE, lr=3e-3, batch_size=64, **TRAIN)
    return adata, model


def test_denoising_moves_counts_towards_the_true_means(trained):
    """The imputed NB means are closer to the simulated ``true_mean`` than the raw counts are.

    The raw counts carry NB noise (theta ~ 5) plus 10 % dropouts; a model that learnt the low-rank
    mean structure removes much of both. Compared on all entries (absolute error) and on the log
    scale (which weighs low and high expression alike). Measured after 60 epochs (seeds 0, 1):
    absolute error 0.62x the raw counts', log error 0.40-0.42x; 25 epochs give 0.74x / 0.52x.
    """
    adata, model = trained
    truth = adata.layers["true_mean"].astype(np.float64)
    raw = adata.layers["counts"].toarray().astype(np.float64)
    denoised = model.impute(return_matrix=True, layer_out=None).astype(np.float64)
    raw_error = np.abs(raw - truth).mean()
    denoised_error = np.abs(denoised - truth).mean()
    assert denoised_error < 0.75 * raw_error, (denoised_error, raw_error)
    log_raw = np.abs(np.log1p(raw) - np.log1p(truth)).mean()
    log_denoised = np.abs(np.log1p(denoised) - np.log1p(truth)).mean()
    assert log_denoised < 0.55 * log_raw, (log_denoised, log_raw)
    # training is what helps: the untrained network is worse than the raw counts
    untrained = DenoisingAE(adata, n_latent=5, n_hidden=64, seed=0)
    assert np.abs(untrained.impute(return_matrix=True, layer_out=None) - truth).mean() > denoised_error
    assert model.get_reconstruction_error() < untrained.get_reconstruction_error()


# --------------------------------------------------------------------------- impute


def _snapshot(adata) -> dict[str, object]:
    def copy(m):
        return m.copy() if not sp.issparse(m) else sp.csr_matrix(m, copy=True)

    return {
        "X": copy(adata.X),
        "layers": {k: copy(v) for k, v in adata.layers.items()},
        "obs": adata.obs.copy(),
        "obsm": {k: v.copy() for k, v in adata.obsm.items()},
    }


def _identical(a, b) -> bool:
    if sp.issparse(a) != sp.issparse(b):
        return False
    if sp.issparse(a):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a.indptr, b.indptr)
            and np.array_equal(a.indices, b.indices)
            and a.data.tobytes() == b.data.tobytes()
        )
    return a.dtype == b.dtype and a.shape == b.shape and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_impute_writes_only_its_layer(trained):
    adata, model = trained
    adata = adata.copy()
    adata.layers.pop("sclatent_denoised", None)
    before = _snapshot(adata)
    assert model.impute(adata) is None
    assert set(adata.layers) == set(before["layers"]) | {"sclatent_denoised"}
    denoised = adata.layers["sclatent_denoised"]
    assert isinstance(denoised, np.ndarray)
    assert denoised.shape == (adata.n_obs, adata.n_vars)
    assert denoised.dtype == np.float32
    assert np.isfinite(denoised).all() and (denoised >= 0).all()
    # expected counts at each cell's own library: rows sum to the observed totals
    totals = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    np.testing.assert_allclose(denoised.sum(axis=1), totals, rtol=1e-3)
    assert _identical(adata.X, before["X"])
    for key, value in before["layers"].items():
        assert _identical(adata.layers[key], value), key
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    for key, value in before["obsm"].items():
        assert _identical(adata.obsm[key], value), key

    returned = model.impute(adata, layer_out="other", return_matrix=True)
    np.testing.assert_array_equal(returned, denoised)
    np.testing.assert_array_equal(adata.layers["other"], denoised)
    only = model.impute(adata, layer_out=None, return_matrix=True, indices=[3, 0, 7])
    np.testing.assert_allclose(only, denoised[[3, 0, 7]], rtol=1e-5, atol=1e-6)


def test_impute_default_adata_is_the_training_one(trained):
    adata, model = trained
    matrix = model.impute(return_matrix=True)
    np.testing.assert_array_equal(adata.layers["sclatent_denoised"], matrix)


def test_impute_refuses_mismatched_genes(trained):
    adata, model = trained
    permuted = adata[:, adata.var_names[::-1]].copy()
    permuted.layers.pop("sclatent_denoised", None)  # written by other tests on the shared AnnData
    with pytest.raises(SetupError, match=r"genes must be the model's, in the same order.*layer_out=None"):
        model.impute(permuted)
    assert "sclatent_denoised" not in permuted.layers
    # the matrix itself is available for a permuted query, in the model's gene order
    matrix = model.impute(permuted, layer_out=None, return_matrix=True)
    np.testing.assert_allclose(matrix, model.impute(layer_out=None, return_matrix=True), rtol=1e-5, atol=1e-6)
    missing = adata[:, :70].copy()
    with pytest.raises(SetupError, match="lacks 10 of the model's 80 genes"):
        model.impute(missing, layer_out=None, return_matrix=True)
    with pytest.raises(ValueError, match="indices"):
        model.impute(adata.copy(), indices=[0, 1])
    with pytest.raises(ValueError, match="not X"):
        model.impute(adata.copy(), layer_out="X")


def test_impute_zero_inflation_lowers_the_mean(trained):
    _, model = trained
    mu = model.impute(layer_out=None, return_matrix=True)
    zinb_mean = model.impute(layer_out=None, return_matrix=True, include_zero_inflation=True)
    assert (zinb_mean <= mu).all()
    assert (zinb_mean < mu).mean() > 0.5
    assert (zinb_mean >= 0).all()


def test_impute_zero_inflation_is_a_no_op_without_zi():
    adata = _small()
    DenoisingAE.setup_anndata(adata)
    model = DenoisingAE(adata, gene_likelihood="nb", n_hidden=16, n_latent=3)
    np.testing.assert_array_equal(
        model.impute(layer_out=None, return_matrix=True),
        model.impute(layer_out=None, return_matrix=True, include_zero_inflation=True),
    )


# --------------------------------------------------------------------------- bad input


def _counts_with(value: float) -> np.ndarray:
    counts = np.random.default_rng(0).poisson(2.0, size=(30, 10)).astype(np.float32)
    counts[4, 2] = value
    return counts


SETUP_ERRORS = {
    "non_integer": (lambda: _counts_with(0.5), {}, ["non-integer", "raw counts", "allow_non_integer=True"]),
    "negative": (lambda: _counts_with(-2.0), {}, ["1 negative", "layer="]),
    "nan": (lambda: _counts_with(np.nan), {}, ["NaN", "finite", "raw count layer"]),
    "unknown_layer": (lambda: _counts_with(1.0), {"layer": "raw"}, ["'raw' not found", "layer=None"]),
}


@pytest.mark.parametrize("case", list(SETUP_ERRORS))
def test_setup_anndata_refuses_bad_counts(case):
    import anndata as ad

    build, kwargs, patterns = SETUP_ERRORS[case]
    adata = ad.AnnData(build())
    with pytest.raises(SetupError) as info:
        DenoisingAE.setup_anndata(adata, **kwargs)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    with pytest.raises(SetupError, match="not been set up"):
        DenoisingAE(adata)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(noise="dropout"), "noise must be one of"),
        (dict(gene_likelihood="gamma"), "gene_likelihood must be one of"),
        (dict(gene_likelihood="gaussian"), "linear=True"),
        (dict(noise="salt", noise_rate=1.0), r"noise rate must be in \[0, 1\)"),
        (dict(noise="gaussian", noise_rate=-1.0), "standard deviation must be >= 0"),
        (dict(sparsity=-1.0), "sparsity and contractive weights must be >= 0"),
        (dict(contractive=-0.1), "sparsity and contractive weights must be >= 0"),
    ],
)
def test_bad_options_raise(options, match):
    adata = _small(n_cells=20, n_genes=10)
    DenoisingAE.setup_anndata(adata)
    with pytest.raises(ValueError, match=match):
        DenoisingAE(adata, **options)


def test_query_with_bad_counts_is_refused(trained):
    adata, model = trained
    query = adata.copy()
    query.layers["counts"] = query.layers["counts"].toarray()
    query.layers["counts"][0, 0] = 0.5
    with pytest.raises(SetupError, match="non-integer"):
        model.impute(query, layer_out=None, return_matrix=True)


# --------------------------------------------------------------------------- variants: training and persistence

VARIANTS = {
    "zinb_gaussian": dict(),
    "nb_salt": dict(gene_likelihood="nb", noise="salt", noise_rate=0.2),
    "poisson_masking": dict(gene_likelihood="poisson", noise="masking", noise_rate=0.2),
    "plain_dropout": dict(noise="none", dropout_rate=0.1),
    "tied_two_layers": dict(tied_weights=True, n_layers=2),
    "tied_masking": dict(tied_weights=True, noise="masking", noise_rate=0.2),
    "sparse": dict(sparsity=0.5),
    "contractive": dict(contractive=1.0),
    "linear": dict(linear=True),
    "linear_tied": dict(linear=True, tied_weights=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_and_round_trips(variant, tmp_path):
    options = VARIANTS[variant]
    adata = _small(n_batches=2)
    DenoisingAE.setup_anndata(adata, batch_key="batch")
    model = DenoisingAE(adata, n_latent=4, n_hidden=32, seed=0, **options)
    model.train(max_epochs=12, batch_size=64, lr=3e-3, **TRAIN)
    history = model.history
    assert all(np.isfinite(v).all() for v in history.values())
    recon = np.asarray(history["train_reconstruction"])
    assert recon[-3:].mean() < recon[:3].mean(), recon
    if options.get("sparsity"):
        assert "train_l1" in history
    if options.get("contractive"):
        assert "train_contractive" in history and min(history["train_contractive"]) >= 0

    z = model.get_latent_representation()
    imputed = model.impute(return_matrix=True)
    assert z.shape == (adata.n_obs, 4) and np.isfinite(z).all()
    assert imputed.shape == (adata.n_obs, adata.n_vars) and (imputed >= 0).all()

    folder = model.save(tmp_path / variant)
    loaded = DenoisingAE.load(folder, adata=adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    np.testing.assert_array_equal(loaded.impute(return_matrix=True, layer_out=None), imputed)
    assert _comparable(loaded.history) == _comparable(history)
    assert loaded.hyperparameters == model.hyperparameters
    state, loaded_state = model.module.state_dict(), loaded.module.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    # without an AnnData, the outputs need one passed explicitly
    bare = DenoisingAE.load(folder)
    np.testing.assert_array_equal(bare.impute(adata, layer_out=None, return_matrix=True), imputed)
    with pytest.raises(SetupError, match="pass adata"):
        bare.impute()

    if options.get("linear"):
        assert loaded.module.input_mean.abs().sum() > 0
        assert torch.equal(loaded.module.input_mean, model.module.input_mean)
    if options.get("tied_weights"):
        # the tie survives loading: the decoder reads the encoder's weight, not a copy
        assert not any(key.startswith("out.weight") for key in loaded_state)
        source = loaded.module.code if options.get("linear") else loaded.module.encoder.layers[0].linear
        assert loaded.module.out._source is source
        with torch.no_grad():
            source.weight.mul_(2.0)
        assert not np.array_equal(loaded.impute(adata, layer_out=None, return_matrix=True), imputed)


def test_tied_weights_share_the_encoder_matrices():
    n_genes, n_hidden, n_latent = 30, 16, 4
    kwargs = dict(n_hidden=n_hidden, n_latent=n_latent, n_layers=2, noise="gaussian")
    tied = AutoencoderModule(n_genes, tied_weights=True, **kwargs)
    free = AutoencoderModule(n_genes, **kwargs)
    n_tied = sum(p.numel() for p in tied.parameters())
    n_free = sum(p.numel() for p in free.parameters())
    # the decoder's matrices (latent->hidden, hidden->hidden, hidden->genes) are not stored again
    assert n_free - n_tied == n_latent * n_hidden + n_hidden * n_hidden + n_hidden * n_genes
    x = torch.randn(5, n_latent)
    np.testing.assert_allclose(
        tied.decoder.layers[0].linear(x).detach().numpy(),
        (x @ tied.code.weight + tied.decoder.layers[0].linear.bias).detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    h = torch.randn(5, n_hidden)
    np.testing.assert_allclose(
        tied.out(h).detach().numpy(),
        (h @ tied.encoder.layers[0].linear.weight + tied.out.bias).detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_seeded_training_is_reproducible():
    adata = _small(n_batches=2)
    DenoisingAE.setup_anndata(adata, batch_key="batch")

    def fit(seed):
        model = DenoisingAE(
            adata, noise="masking", noise_rate=0.2, dropout_rate=0.1, n_hidden=16, n_latent=3, seed=seed
        )
        return model.train(max_epochs=3, batch_size=64, **TRAIN)

    first, second, other = fit(3), fit(3), fit(4)
    np.testing.assert_array_equal(first.get_latent_representation(), second.get_latent_representation())
    np.testing.assert_array_equal(first.impute(return_matrix=True), second.impute(return_matrix=True))
    assert _comparable(first.history) == _comparable(second.history)
    assert not np.array_equal(first.get_latent_representation(), other.get_latent_representation())


@pytest.fixture(scope="module")
def penalty_models():
    """Plain, sparse and contractive models at the same seed, on the same data and schedule."""
    adata = _small(n_cells=240, n_genes=50, seed=5)
    DenoisingAE.setup_anndata(adata)
    models = {}
    for name, options in {"plain": {}, "sparse": dict(sparsity=1.0), "contractive": dict(contractive=5.0)}.items():
        model = DenoisingAE(adata, n_latent=6, n_hidden=32, noise="gaussian", seed=0, **options)
        models[name] = model.train(max_epochs=EPOCHS_PENALTY, batch_size=60, lr=3e-3, **TRAIN)
    return adata, models


def test_sparse_code_is_sparser(penalty_models):
    """L1 on the code shrinks it: measured mean |code| 0.48 (sparsity 1) vs 0.83 (plain) after 20 epochs."""
    _, models = penalty_models
    plain = models["plain"].get_latent_representation()
    sparse = models["sparse"].get_latent_representation()
    assert np.abs(sparse).mean() < 0.75 * np.abs(plain).mean(), (np.abs(sparse).mean(), np.abs(plain).mean())
    history = models["sparse"].history["train_l1"]
    assert history[-1] < history[0]
    # at no cost in fit: the penalty is cheap to satisfy (see the scale-invariant test below)
    assert (
        models["sparse"].history["train_reconstruction"][-1]
        < 1.01 * models["plain"].history["train_reconstruction"][-1]
    )


def _hoyer(z: np.ndarray) -> float:
    """Mean Hoyer sparsity of the rows of ``z``: 0 for equal magnitudes, 1 for one nonzero; scale-invariant."""
    k = z.shape[1]
    ratio = np.abs(z).sum(axis=1) / np.maximum(np.linalg.norm(z, axis=1), 1e-12)
    return float(((np.sqrt(k) - ratio) / (np.sqrt(k) - 1)).mean())


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: the decoder's BatchNorm (and free decoder weights) absorb the code's scale, so "
    "the L1 penalty shrinks the code uniformly instead of sparsifying it (measured Hoyer sparsity 0.24 with "
    "sparsity=1 vs 0.35 plain)",
)
def test_sparse_code_is_sparser_scale_invariantly(penalty_models):
    _, models = penalty_models
    plain = _hoyer(models["plain"].get_latent_representation())
    sparse = _hoyer(models["sparse"].get_latent_representation())
    assert sparse > plain + 0.05, (sparse, plain)


def _encoder_jacobian_norm(model: DenoisingAE, n_cells: int = 8) -> float:
    """Mean squared Frobenius norm of d code / d u over a few cells, eval mode, exact (autograd)."""
    from torch.autograd.functional import jacobian

    module = model.module
    module.eval()
    batch = _first_batch(model, n_cells)
    u = module.noise(module.normalised_input(batch))
    norms = []
    for i in range(n_cells):
        one = batch.select_rows(i, i + 1)
        jac = jacobian(lambda row, one=one: module.encode(row, one), u[i : i + 1])
        norms.append(float((jac**2).sum()))
    return float(np.mean(norms))


def test_contractive_encoder_has_a_smaller_jacobian(penalty_models):
    """Exact ||d code / d u||_F^2 in eval mode: measured 0.15 (contractive=5) vs 0.51 (plain)."""
    _, models = penalty_models
    plain = _encoder_jacobian_norm(models["plain"])
    contractive = _encoder_jacobian_norm(models["contractive"])
    assert contractive < 0.5 * plain, (contractive, plain)


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: the penalty is met by shrinking the code (the decoder's BatchNorm restores its "
    "scale), not by flattening the encoder relative to the spread of the codes (measured Jacobian norm / code "
    "variance 0.20 contractive vs 0.22 plain)",
)
def test_contractive_encoder_is_flatter_relative_to_the_code_spread(penalty_models):
    _, models = penalty_models
    relative = {
        name: _encoder_jacobian_norm(models[name]) / models[name].get_latent_representation().var(axis=0).sum()
        for name in ("plain", "contractive")
    }
    assert relative["contractive"] < 0.7 * relative["plain"], relative


def test_hutchinson_estimate_matches_the_jacobian(penalty_models):
    """The training penalty (one Hutchinson probe per cell) estimates ||J||_F^2 without bias: averaged over
    20 probes x 200 cells it matches the exact training-mode Jacobian (autograd) to well within 5 %."""
    from torch.autograd.functional import jacobian

    _, models = penalty_models
    module = models["contractive"].module
    batch = _first_batch(models["contractive"], 200)
    module.train()
    try:
        torch.manual_seed(0)
        estimates = torch.stack([module.loss(batch).terms["contractive"].detach() for _ in range(20)]).mean()
        u = module.normalised_input(batch)
        # BatchNorm couples the cells in training mode; its cross-cell terms are O(1 / batch size)
        jac = jacobian(lambda inp: module.encode(inp, batch), u)  # (B, k, B, G)
        exact = torch.stack([(jac[i, :, i, :] ** 2).sum() for i in range(batch.size)]).mean()
    finally:
        module.eval()
    assert float(estimates) == pytest.approx(float(exact), rel=0.05)  # measured 0.0910 vs 0.0912


# --------------------------------------------------------------------------- batch conditioning


def test_batch_conditioning_learns_the_batch_effect():
    """Decoder conditioned on the batch: relabelling cells changes the imputation by the simulated
    per-gene batch shift, and (without batch in the encoder) leaves the code unchanged."""
    adata = synthetic(n_cells=400, n_genes=60, n_clusters=3, n_batches=2, batch_effect=0.7, seed=6)
    no_batch = synthetic(n_cells=400, n_genes=60, n_clusters=3, n_batches=2, batch_effect=0.0, seed=6)
    # same seed, same draws: log true_mean differs by the batch's per-gene shift plus a per-cell constant
    log_ratio = np.log(adata.layers["true_mean"]) - np.log(no_batch.layers["true_mean"])
    log_ratio -= log_ratio.mean(axis=1, keepdims=True)
    codes = adata.obs["batch"].cat.codes.to_numpy()
    true_shift = log_ratio[codes == 1].mean(0) - log_ratio[codes == 0].mean(0)

    DenoisingAE.setup_anndata(adata, batch_key="batch")
    model = DenoisingAE(adata, n_latent=6, n_hidden=32, encode_covariates=False, seed=0)
    assert model.module.n_batch == 2
    model.train(max_epochs=EPOCHS_BATCH, lr=3e-3, batch_size=64, **TRAIN)

    relabelled = {}
    for label in ("batch_0", "batch_1"):
        query = adata.copy()
        query.obs["batch"] = pd.Categorical([label] * adata.n_obs, categories=["batch_0", "batch_1"])
        relabelled[label] = query
    z0 = model.get_latent_representation(relabelled["batch_0"])
    z1 = model.get_latent_representation(relabelled["batch_1"])
    np.testing.assert_array_equal(z0, z1)
    mu0 = model.impute(relabelled["batch_0"], layer_out=None, return_matrix=True)
    mu1 = model.impute(relabelled["batch_1"], layer_out=None, return_matrix=True)
    estimated = (np.log(mu1) - np.log(mu0)).mean(0)
    estimated -= estimated.mean()
    assert np.corrcoef(estimated, true_shift)[0, 1] > 0.8  # measured 0.92

    query = adata.copy()
    query.obs["batch"] = pd.Categorical(["batch_9"] * adata.n_obs)
    with pytest.raises(SetupError, match="not trained on"):
        model.impute(query, layer_out=None, return_matrix=True)
    # with encode_covariates (the default) the encoder reads the batch too
    encoding = DenoisingAE(adata, n_latent=6, n_hidden=32, seed=0)
    assert not np.allclose(
        encoding.get_latent_representation(relabelled["batch_0"]),
        encoding.get_latent_representation(relabelled["batch_1"]),
    )


def test_early_stopping_on_masked_counts_restores_the_best_epoch():
    """The default training stops on the held-out cells' hidden-count likelihood and ends with the best
    epoch's parameters: re-scoring the final model gives the minimum of the recorded curve."""
    from sclatent.train import evaluate

    adata = _small(n_cells=200, n_genes=40, seed=2)
    DenoisingAE.setup_anndata(adata)
    model = DenoisingAE(adata, n_latent=4, n_hidden=16, seed=0)
    model.train(max_epochs=60, patience=3, batch_size=50, progress_bar=False, accelerator="cpu")
    curve = model.history["validation_masked_nll"]
    assert len(curve) == len(model.history["epoch"]) and len(model.validation_indices) == 20
    final = evaluate(model.module, model._data(), model.validation_indices)["masked_nll"]
    assert final == pytest.approx(min(curve), rel=1e-5)
    if len(curve) < 60:  # stopped early: patience epochs after the best one
        assert len(curve) - 1 - int(np.argmin(curve)) == 3


def test_masked_nll_scores_only_hidden_counts_and_is_deterministic():
    adata = _small(n_cells=80, n_genes=30, seed=3)
    DenoisingAE.setup_anndata(adata)
    model = DenoisingAE(adata, n_latent=3, n_hidden=8, seed=0)
    batch = next(iter(model._batches(None, None, 80)))
    first, again = model.module.masked_nll(batch), model.module.masked_nll(batch)
    assert torch.equal(first, again)  # same hidden entries every epoch
    assert (first >= 0).all() and (first > 0).any()
    assert torch.equal(model.module.masked_nll(batch, rate=0.0), torch.zeros(batch.size))
    more = model.module.masked_nll(batch, rate=0.5)
    assert more.sum() > first.sum()  # five times the hidden counts, each with a positive NLL


def test_unknown_early_stopping_monitor_is_refused():
    adata = _small(n_cells=60, n_genes=20, seed=4)
    DenoisingAE.setup_anndata(adata)
    model = DenoisingAE(adata, n_latent=2, n_hidden=8)
    with pytest.raises(KeyError, match="does not report"):
        model.train(max_epochs=2, monitor="no_such_term", progress_bar=False)
