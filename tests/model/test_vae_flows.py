"""Tests for the normalizing-flow priors: the transforms, the Monte Carlo KL, and ``VAE(prior=...)``.

Transforms are checked in float64 against autograd's Jacobian; the VAE with each prior is trained
briefly on simulated clusters; persistence, the marginal likelihood's use of the flow density, the
errors and the ``fit-flow`` command are checked on small models.
"""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from sclatent.cli import main
from sclatent.datasets import synthetic
from sclatent.model import VAE
from sclatent.modules.vae import VAEModule, gaussian_kl
from sclatent.nn.flows import FlowPrior, IAFPosterior, PlanarLayer, affine_coupling

TRAIN = dict(accelerator="cpu", progress_bar=False)
FLOW_PRIORS = ("planar", "realnvp")


def _randomise(flow: FlowPrior, scale: float = 0.3) -> FlowPrior:
    """Move every layer away from the identity (the default initialisation), reproducibly."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return flow


def _clusters_ari(model: VAE, adata: ad.AnnData) -> float:
    labels = adata.obs["cell_type"].to_numpy()
    z = model.get_latent_representation()
    return adjusted_rand_score(labels, KMeans(len(set(labels)), n_init=10, random_state=0).fit_predict(z))


@pytest.fixture(scope="module")
def clusters():
    """Simulated counts: 4 well-separated types, one batch, 400 cells x 200 genes."""
    adata = synthetic(n_cells=400, n_genes=200, n_clusters=4, n_batches=1, seed=0)
    VAE.setup_anndata(adata)
    return adata


@pytest.fixture(scope="module")
def trained(clusters):
    """One briefly trained VAE per prior on ``clusters`` (read-only)."""
    models = {}
    for prior in ("normal", *FLOW_PRIORS):
        model = VAE(clusters, n_latent=4, n_hidden=64, prior=prior, n_flows=4, flow_hidden=16, seed=0)
        models[prior] = model.train(max_epochs=30, **TRAIN)
    return models


# --------------------------------------------------------------------------- transforms


def _layers(kind: str, dim: int):
    if kind == "planar":
        return [PlanarLayer(dim, identity_init=False)]
    return [affine_coupling(dim, hidden=8, identity_init=False)]


@pytest.mark.parametrize("kind", FLOW_PRIORS)
@pytest.mark.parametrize("dim", [2, 5])
def test_single_layer_inverse_and_log_det(kind, dim):
    torch.manual_seed(dim)
    (layer,) = _layers(kind, dim)
    layer.double()
    if kind == "realnvp":  # the conditioner's last layer starts at zero in the flow; give it weights
        torch.nn.init.normal_(layer.nn.layers[-1].weight, std=0.3)
        torch.nn.init.normal_(layer.nn.layers[-1].bias, std=0.3)
    x = torch.randn(6, dim, dtype=torch.float64)
    y = layer(x)
    log_det = layer.log_abs_det_jacobian(x, y)
    assert not torch.allclose(y, x)  # a real transform, not the identity
    torch.testing.assert_close(layer._inverse(y), x, rtol=0, atol=1e-12)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(layer._call, x[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", FLOW_PRIORS)
def test_flow_prior_inverse_log_det_and_density(kind):
    """A 4-layer flow: generate(normalize(z)) == z, log|det| == autograd's, and log p(z) matches
    the change-of-variables formula computed from the Jacobian."""
    torch.manual_seed(0)
    flow = _randomise(FlowPrior(3, kind, n_flows=4, n_hidden=8).double())
    z = torch.randn(5, 3, dtype=torch.float64)
    u, log_det = flow.normalize(z)
    torch.testing.assert_close(flow.generate(u), z, rtol=0, atol=1e-10)
    log_p = flow.log_prob(z)
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: flow.normalize(v)[0], z[i])
        slogdet = torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(log_det[i], slogdet, rtol=0, atol=1e-9)
        expected = -0.5 * (u[i] @ u[i]) - 1.5 * math.log(2 * math.pi) + slogdet
        torch.testing.assert_close(log_p[i], expected, rtol=0, atol=1e-9)
    # leading sample axes broadcast: (K, B, d) -> (K, B)
    assert flow.log_prob(torch.randn(7, 5, 3, dtype=torch.float64)).shape == (7, 5)


@pytest.mark.parametrize("kind", FLOW_PRIORS)
def test_flow_starts_as_standard_normal(kind):
    flow = FlowPrior(4, kind, n_flows=3)
    z = torch.randn(10, 4)
    u, log_det = flow.normalize(z)
    assert torch.equal(u, z) and torch.equal(log_det, torch.zeros(10))
    torch.testing.assert_close(flow.log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))


# --------------------------------------------------------------------------- the Monte Carlo KL


@pytest.mark.parametrize("kind", FLOW_PRIORS)
def test_mc_kl_matches_analytic_kl_for_identity_flow(kind):
    """With identity layers the prior is N(0, I): the MC estimate -H[q] - log p(z) averaged over
    draws must agree with the analytic Gaussian KL within 4 Monte Carlo standard errors."""
    torch.manual_seed(0)
    module = VAEModule(n_genes=10, n_latent=3, prior=kind, n_flows=2)
    mean = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]])
    var = torch.tensor([[0.2, 1.5, 0.7], [1.0, 0.05, 3.0]])
    n = 20000
    z = mean + var.sqrt() * torch.randn(n, *mean.shape)
    estimates = module.kl_z({"qz_mean": mean, "qz_var": var, "z": z})  # (n, 2)
    analytic = gaussian_kl(mean, var)
    se = estimates.std(0) / math.sqrt(n)
    assert torch.all((estimates.mean(0) - analytic).abs() < 4 * se), (estimates.mean(0), analytic, se)
    assert torch.all(se < 0.05)  # the test has power: the SE is small next to the KL (1.5 - 4 nats)


# --------------------------------------------------------------------------- the VAE with a flow prior


def test_each_prior_recovers_clusters(clusters, trained):
    """Threshold: k-means with the true k (4 equal types) on the posterior means (Leiden at its
    default resolution over-splits these tight clusters, which says nothing about the latent).
    Merging two types (and so splitting another) caps ARI near 0.7 and a random embedding scores
    ~0; every prior scored >= 0.993 here on 3 model seeds (1.00 on 4 seeds at 600 cells x 200
    genes, 40 epochs), so ARI > 0.9 requires every type separated, with margin."""
    random = np.random.default_rng(0).standard_normal((clusters.n_obs, 4))
    labels = clusters.obs["cell_type"].to_numpy()
    assert abs(adjusted_rand_score(labels, KMeans(4, n_init=10, random_state=0).fit_predict(random))) < 0.05
    for prior, model in trained.items():
        assert _clusters_ari(model, clusters) > 0.9, prior


def test_flow_prior_is_learned(trained):
    """Training moves the flow away from the identity: the learned prior differs from N(0, I),
    and it fits the posterior means better than N(0, I) does (it is trained towards them)."""
    for prior in FLOW_PRIORS:
        model = trained[prior]
        z = model.get_latent_representation()
        standard = -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
        learned = model.get_prior_log_prob(z)
        assert np.abs(learned - standard).max() > 0.1, prior
        assert learned.mean() > standard.mean(), prior


def test_marginal_ll_uses_flow_density(clusters, trained):
    """Same encoder/decoder weights, different priors: the importance-sampled log p(x) must follow
    the prior. An identity flow reproduces the normal prior's value; a perturbed flow changes it."""
    normal = trained["normal"]
    cells = np.arange(20)
    reference = normal.get_marginal_ll(indices=cells, n_mc_samples=50, seed=3)
    flow = VAE(clusters, n_latent=4, n_hidden=64, prior="planar", n_flows=4, flow_hidden=16, seed=0)
    missing, unexpected = flow.module.load_state_dict(normal.module.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("prior_flow.") for k in missing)
    same = flow.get_marginal_ll(indices=cells, n_mc_samples=50, seed=3)
    assert same == pytest.approx(reference, abs=1e-4)
    with torch.no_grad():
        for layer in flow.module.prior_flow.layers:
            layer.u.fill_(0.5)
    assert abs(flow.get_marginal_ll(indices=cells, n_mc_samples=50, seed=3) - reference) > 0.01


@pytest.mark.parametrize("prior", FLOW_PRIORS)
def test_save_load_round_trip(clusters, trained, prior, tmp_path):
    model = trained[prior]
    model.save(tmp_path / "m")
    loaded = VAE.load(tmp_path / "m", adata=clusters)
    assert loaded.hyperparameters["prior"] == prior
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    cells = model.validation_indices
    assert loaded.get_marginal_ll(indices=cells, n_mc_samples=30, seed=1) == model.get_marginal_ll(
        indices=cells, n_mc_samples=30, seed=1
    )
    z = model.get_latent_representation()[:10]
    np.testing.assert_array_equal(loaded.get_prior_log_prob(z), model.get_prior_log_prob(z))


def test_normal_prior_has_no_flow(trained):
    """The default keeps scVI's model: no flow parameters, analytic KL in the ELBO."""
    model = trained["normal"]
    assert model.hyperparameters["prior"] == "normal" and model.module.prior_flow is None
    assert not any(k.startswith("prior_flow") for k in model.module.state_dict())
    batch = next(iter(model._batches(None, np.arange(50), 50)))
    inf = model.module.inference(batch)
    torch.testing.assert_close(model.module.kl_z(inf), gaussian_kl(inf["qz_mean"], inf["qz_var"]))


def test_sample_prior_shapes(trained):
    for prior, model in trained.items():
        draws = model.module.sample_prior(7)
        assert draws.shape == (7, 4) and torch.isfinite(draws).all(), prior


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(prior="gaussian"), "prior must be one of"),
        (dict(prior="planar", n_flows=0), "n_flows must be >= 1"),
        (dict(prior="realnvp", n_latent=1), "RealNVP prior needs n_latent >= 2"),
    ],
)
def test_bad_prior_options_raise(clusters, options, match):
    with pytest.raises(ValueError, match=match):
        VAE(clusters, **options)


def test_prior_log_prob_checks_shape(trained):
    with pytest.raises(ValueError, match=r"z must be \(n, 4\)"):
        trained["planar"].get_prior_log_prob(np.zeros((3, 2)))


# --------------------------------------------------------------------------- command line


def test_fit_flow_command(tmp_path, capsys):
    source = tmp_path / "in.h5ad"
    synthetic(n_cells=150, n_genes=40, n_clusters=3, n_batches=1, seed=2).write_h5ad(source)
    out = tmp_path / "out.h5ad"
    argv = ["fit-flow", str(source), "--out", str(out), "--max-epochs", "2", "--no-progress"]
    code = main([*argv, "--labels-key", "cell_type", "--n-mc-samples", "5", "--n-flows", "2", "--no-baseline"])
    assert code == 0
    text = capsys.readouterr().out
    assert "prior of z      realnvp flow, 2 layers" in text and "held-out LL" in text
    result = ad.read_h5ad(out)
    assert result.obsm["X_sclatent_flow"].shape == (150, 10)
    assert "leiden_sclatent_flow" in result.obs
    loaded = VAE.load(tmp_path / "out_model", adata=result)
    assert loaded.hyperparameters["prior"] == "realnvp" and loaded.hyperparameters["n_flows"] == 2
    for suffix in ("_umap.png", "_training.png"):
        assert (tmp_path / f"out{suffix}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_vae_accepts_prior(tmp_path, capsys):
    source = tmp_path / "in.h5ad"
    synthetic(n_cells=100, n_genes=30, n_clusters=2, n_batches=1, seed=3).write_h5ad(source)
    out = tmp_path / "vae.h5ad"
    argv = ["fit-vae", str(source), "--out", str(out), "--max-epochs", "1", "--no-progress", "--prior", "planar"]
    assert main([*argv, "--n-mc-samples", "5"]) == 0
    assert "X_sclatent_vae" in ad.read_h5ad(out).obsm
    assert VAE.load(tmp_path / "vae_model").hyperparameters["prior"] == "planar"


# --------------------------------------------------------------------------- IAF posterior


def _random_iaf(dim: int, context_dim: int, n_flows: int) -> IAFPosterior:
    torch.manual_seed(0)
    flow = IAFPosterior(dim, context_dim, n_flows=n_flows, n_hidden=8, identity_init=False).double()
    return flow


@pytest.mark.parametrize("n_flows", [1, 2, 3])
def test_iaf_inverse_and_log_det(n_flows):
    """float64: inverse(forward(z0)) == z0 and log|det| equals autograd's Jacobian's log-determinant."""
    flow = _random_iaf(3, 2, n_flows)
    z0 = torch.randn(6, 3, dtype=torch.float64)
    context = torch.randn(6, 2, dtype=torch.float64)
    z, log_det = flow(z0, context)
    assert not torch.allclose(z, z0)
    torch.testing.assert_close(flow.inverse(z, context), z0, rtol=0, atol=1e-10)
    for i in range(6):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: flow(v, context[i])[0], z0[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)
    # a sample axis in front broadcasts the (B, c) context
    z_s, log_det_s = flow(z0.expand(4, -1, -1), context)
    assert z_s.shape == (4, 6, 3) and log_det_s.shape == (4, 6)
    torch.testing.assert_close(log_det_s[2], log_det)


def test_iaf_starts_as_identity():
    flow = IAFPosterior(5, 10, n_flows=4, n_hidden=8)
    z0 = torch.randn(7, 5)
    z, log_det = flow(z0, torch.randn(7, 10))
    assert torch.equal(z, z0) and torch.equal(log_det, torch.zeros(7))


@pytest.mark.parametrize("prior", ["normal", "realnvp"])
def test_fresh_iaf_posterior_model_equals_normal_posterior(clusters, prior):
    """Identity-initialised IAF: same weights, same latents and the same marginal LL (identical draws);
    the ELBO differs only by the Monte Carlo KL's noise."""
    kwargs = dict(n_latent=4, n_hidden=64, prior=prior, n_flows=2, flow_hidden=16, seed=0)
    normal = VAE(clusters, **kwargs)
    iaf = VAE(clusters, posterior="iaf", n_posterior_flows=3, posterior_flow_hidden=16, **kwargs)
    ref = normal.module.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in iaf.module.state_dict().items() if k in ref)
    cells = np.arange(60)
    np.testing.assert_array_equal(iaf.get_latent_representation(), normal.get_latent_representation())
    assert iaf.get_marginal_ll(indices=cells, n_mc_samples=20, seed=3) == pytest.approx(
        normal.get_marginal_ll(indices=cells, n_mc_samples=20, seed=3), abs=1e-4
    )
    assert iaf.get_reconstruction_error(seed=1) == pytest.approx(normal.get_reconstruction_error(seed=1), abs=1e-3)
    # KL: the MC estimate's mean over 400 cells is within a few nats/sqrt(400) of the analytic one
    assert iaf.get_kl_divergence(seed=1) == pytest.approx(normal.get_kl_divergence(seed=1), abs=0.5)


@pytest.fixture(scope="module")
def trained_iaf(clusters):
    model = VAE(
        clusters, n_latent=4, n_hidden=64, posterior="iaf", n_posterior_flows=2, posterior_flow_hidden=16, seed=0
    )
    return model.train(max_epochs=30, **TRAIN)


def test_iaf_posterior_recovers_clusters_and_is_learned(clusters, trained_iaf):
    """Same check and threshold as :func:`test_each_prior_recovers_clusters`."""
    assert _clusters_ari(trained_iaf, clusters) > 0.9
    z0 = torch.randn(5, 4)
    z, log_det = trained_iaf.module.posterior_flow(z0, torch.randn(5, 8))
    assert not torch.allclose(z, z0) and log_det.abs().max() > 0  # training moved the flow


def test_iaf_save_load_round_trip(clusters, trained_iaf, tmp_path):
    trained_iaf.save(tmp_path / "m")
    loaded = VAE.load(tmp_path / "m", clusters)
    assert loaded.hyperparameters["posterior"] == "iaf" and loaded.hyperparameters["n_posterior_flows"] == 2
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained_iaf.get_latent_representation())
    cells = np.arange(50)
    assert loaded.get_marginal_ll(indices=cells, n_mc_samples=30, seed=1) == trained_iaf.get_marginal_ll(
        indices=cells, n_mc_samples=30, seed=1
    )


def test_old_models_load_with_normal_posterior(clusters, trained, tmp_path):
    """Metadata written before the IAF existed (no posterior keys) loads as ``posterior="normal"``.

    (Every hyperparameter is saved now, declared once in ``VAEHyperparameters``; the old files are
    made here by deleting the posterior keys from a saved model's metadata.)"""
    model = trained["normal"]
    assert model.hyperparameters["posterior"] == "normal" and model.module.posterior_flow is None
    assert not any(k.startswith("posterior_flow") for k in model.module.state_dict())
    model.save(tmp_path / "old")
    path = tmp_path / "old" / "metadata.json"
    metadata = json.loads(path.read_text())
    for key in ("posterior", "n_posterior_flows", "posterior_flow_hidden"):
        del metadata["hyperparameters"][key]
    path.write_text(json.dumps(metadata))
    loaded = VAE.load(tmp_path / "old", clusters)
    assert loaded.module.posterior == "normal" and loaded.module.posterior_flow is None
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


@pytest.mark.parametrize(
    "options, match",
    [({"posterior": "planar"}, "posterior must be one of"), ({"posterior": "iaf", "n_posterior_flows": 0}, ">= 1")],
)
def test_bad_posterior_options_raise(clusters, options, match):
    with pytest.raises(ValueError, match=match):
        VAE(clusters, **options)
