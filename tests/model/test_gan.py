"""Tests for the conditional GAN (sclatent.model.CellGAN), its losses and the trainer's adversarial path.

Covers: the gradient penalty against a direct per-cell computation, the straight-through Poisson
draw, that each adversarial step updates only its own parameter group (and at the documented
rate), samples (integer counts, labels, genes, flag, type frequencies), per-type means of a GAN
trained on ``synthetic(...)``, save/load, reproducibility, input errors and ``sclatent fit-gan``.
The realism metrics the GAN is judged by are tested in tests/metrics/test_realism.py. Models are
tiny; the file runs in well under a minute.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sclatent.data import SetupError
from sclatent.datasets import synthetic
from sclatent.metrics.realism import log_normalise
from sclatent.model import CellGAN
from sclatent.modules.gan import Critic, GANModule, gradient_penalty, straight_through_poisson
from sclatent.steps import AdversarialStep, checked_parameter_groups

TRAIN = dict(accelerator="cpu", progress_bar=False)
SMALL = dict(n_noise=16, generator_hidden=(64, 128), critic_hidden=(64, 32))
# 300 epochs of 6 minibatches = 360 generator updates (~7 s here): per-type means have converged to
# r ~ 0.93-0.97 on the log scale by 200 epochs (measured), far above what ignoring the label gives.
EPOCHS = 300


def _data(seed: int = 3, n_cells: int = 360, n_genes: int = 50, n_clusters: int = 3):
    return synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=n_clusters, n_batches=1, seed=seed)


@pytest.fixture(scope="module")
def trained():
    adata = _data()
    CellGAN.setup_anndata(adata, labels_key="cell_type")
    model = CellGAN(adata, **SMALL)
    model.train(max_epochs=EPOCHS, batch_size=64, lr=1e-3, **TRAIN)
    return model


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


# --------------------------------------------------------------------------- losses


def test_gradient_penalty_matches_a_direct_per_cell_computation():
    torch.manual_seed(0)
    critic = Critic(n_genes=12, n_labels=3, n_hidden=(16, 8))
    real, fake = torch.rand(7, 12) * 3, torch.rand(7, 12) * 3
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    generator = torch.Generator().manual_seed(5)
    penalty = gradient_penalty(critic, real, fake, labels, generator=generator)
    # the same interpolation weights, then each cell's gradient by its own backward pass
    alpha = torch.rand(7, 1, generator=torch.Generator().manual_seed(5))
    expected = []
    for i in range(7):
        point = (alpha[i] * real[i] + (1 - alpha[i]) * fake[i]).unsqueeze(0).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(point, labels[i : i + 1]).sum(), point)
        expected.append((grad.norm() - 1) ** 2)
    torch.testing.assert_close(penalty, torch.stack(expected), rtol=1e-5, atol=1e-6)
    # the penalty is differentiable in the critic's weights (it trains the critic)
    penalty.mean().backward()
    assert critic.features[0].weight.grad is not None and critic.features[0].weight.grad.abs().sum() > 0


def test_gradient_penalty_of_a_linear_critic_is_closed_form():
    critic = Critic(n_genes=5, n_labels=1, n_hidden=())
    with torch.no_grad():
        critic.out.weight.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0, 0.0]]))
        critic.embedding.weight.zero_()
    penalty = gradient_penalty(critic, torch.rand(4, 5), torch.rand(4, 5), torch.zeros(4, dtype=torch.int64))
    torch.testing.assert_close(penalty, torch.full((4,), 16.0))  # (||w|| - 1)^2 = (5 - 1)^2


def test_straight_through_poisson_draws_integers_with_identity_gradient():
    mean = torch.rand(200, 30).mul(5).requires_grad_(True)
    draw = straight_through_poisson(mean, torch.Generator().manual_seed(0))
    assert torch.equal(draw, draw.round()) and (draw >= 0).all()
    (draw * torch.arange(30.0)).sum().backward()
    torch.testing.assert_close(mean.grad, torch.arange(30.0).expand(200, 30))
    # and it is Poisson: mean and variance of the draws match the mean (6,000 draws, 5 sd)
    big = straight_through_poisson(torch.full((6000,), 3.0), torch.Generator().manual_seed(1))
    assert abs(big.mean().item() - 3.0) < 5 * np.sqrt(3.0 / 6000)
    assert abs(big.var().item() - 3.0) < 0.3


def test_module_rejects_bad_settings_and_groups():
    with pytest.raises(ValueError, match="n_critic"):
        GANModule(n_genes=5, n_critic=0)
    with pytest.raises(ValueError, match="gradient_penalty_weight"):
        GANModule(n_genes=5, gradient_penalty_weight=-1)
    module = GANModule(n_genes=5)
    with pytest.raises(ValueError, match="group must be"):
        module.loss(None, group="encoder")


# --------------------------------------------------------------------------- the trainer's adversarial path


def test_each_adversarial_step_updates_only_its_group(monkeypatch):
    adata = _data(n_cells=120, n_genes=20)
    CellGAN.setup_anndata(adata, labels_key="cell_type")
    model = CellGAN(adata, n_critic=3, **SMALL)
    groups = model.module.parameter_groups()
    steps: list[str] = []
    original = AdversarialStep._update

    def spy(step, batch, name, kl_weight, before_update):
        before = {g: [p.detach().clone() for p in params] for g, params in groups.items()}
        out = original(step, batch, name, kl_weight, before_update)
        for g, params in groups.items():
            changed = any(not torch.equal(b, p.detach()) for b, p in zip(before[g], params))
            assert changed == (g == name), f"a {name} step {'changed' if changed else 'left'} the {g} parameters"
        assert all(p.requires_grad for params in groups.values() for p in params)  # unfrozen again
        steps.append(name)
        return out

    monkeypatch.setattr(AdversarialStep, "_update", spy)
    model.train(max_epochs=2, batch_size=20, **TRAIN)  # 6 minibatches per epoch, 12 in all
    # the critic on every minibatch, the generator after every third, critic first
    assert steps.count("critic") == 12 and steps.count("generator") == 4
    assert steps[:4] == ["critic", "critic", "critic", "generator"]
    history = model.history
    for key in ("train_critic_loss", "train_generator_loss", "train_wasserstein", "train_gradient_penalty"):
        assert len(history[key]) == 2 and np.isfinite(history[key]).all()
    # the parameters own their storage again after training (the flat buffers were released)
    assert all(p.grad is None for p in model.module.parameters())


def test_trainer_refuses_overlapping_groups():
    class Overlapping(GANModule):
        def parameter_groups(self):
            return {"critic": list(self.critic.parameters()), "all": list(self.parameters())}

    with pytest.raises(ValueError, match="shares parameters"):
        checked_parameter_groups(Overlapping(n_genes=4))


def test_held_out_cells_get_a_validation_wasserstein():
    adata = _data(n_cells=120, n_genes=20)
    CellGAN.setup_anndata(adata, labels_key="cell_type")
    model = CellGAN(adata, **SMALL).train(max_epochs=2, batch_size=32, train_size=0.8, **TRAIN)
    assert len(model.history["validation_wasserstein"]) == 2
    assert "validation_gradient_penalty" not in model.history  # no gradients in evaluation
    # the library bank holds the training cells only
    assert model.module.library_bank.numel() == len(model.train_indices)


# --------------------------------------------------------------------------- samples


def test_samples_are_integer_counts_with_labels_genes_and_flag(trained):
    fake = trained.sample(150, seed=0)
    x = _dense(fake.X)
    assert fake.shape == (150, trained.registry.n_genes)
    assert list(fake.var_names) == trained.var_names
    assert (x >= 0).all() and np.array_equal(x, np.round(x)) and x.sum(1).min() > 0
    assert fake.obs["synthetic"].all()
    assert list(fake.obs["cell_type"].cat.categories) == trained.cell_types
    only = trained.sample(40, cell_type="type_1", seed=0)
    assert (only.obs["cell_type"] == "type_1").all()
    # libraries come from the training cells of the same type (resampled, not generated)
    real_libraries = trained.module.library_bank.numpy()
    assert np.isin(only.obs["library_size"].to_numpy(), real_libraries).all()
    assert trained.sample(0).shape == (0, trained.registry.n_genes)


def test_cell_type_none_samples_training_frequencies():
    adata = _data(n_cells=300, n_genes=20)
    keep = np.r_[
        np.flatnonzero(adata.obs["cell_type"] == "type_0"), np.flatnonzero(adata.obs["cell_type"] != "type_0")[:60]
    ]
    adata = adata[np.sort(keep)].copy()  # 100 type_0 cells, 60 of the others
    CellGAN.setup_anndata(adata, labels_key="cell_type")
    model = CellGAN(adata, **SMALL).train(max_epochs=1, batch_size=64, **TRAIN)
    labels = model.sample(4000, seed=1).obs["cell_type"].to_numpy()
    share = (labels == "type_0").mean()
    assert abs(share - 100 / 160) < 5 * np.sqrt(0.625 * 0.375 / 4000)


def test_unknown_cell_type_lists_the_known_ones(trained):
    with pytest.raises(ValueError, match=r"Unknown cell_type 'T cell'.*type_0.*type_1.*type_2"):
        trained.sample(5, cell_type="T cell")


def test_sampling_an_untrained_model_is_refused():
    adata = _data(n_cells=60, n_genes=10)
    CellGAN.setup_anndata(adata, labels_key="cell_type")
    with pytest.raises(RuntimeError, match="not been trained"):
        CellGAN(adata, **SMALL).sample(3)


def test_per_type_means_match_the_real_ones(trained):
    adata = trained.adata
    real, labels = log_normalise(adata.X), adata.obs["cell_type"].astype(str).to_numpy()
    fake = trained.sample(900, seed=2)
    fake_x, fake_labels = log_normalise(fake.X), fake.obs["cell_type"].astype(str).to_numpy()
    types = trained.cell_types
    real_means = np.array([real[labels == t].mean(0) for t in types])
    fake_means = np.array([fake_x[fake_labels == t].mean(0) for t in types])
    corr = np.corrcoef(np.vstack([fake_means, real_means]))[: len(types), len(types) :]
    # what ignoring the label would reach: the pooled real mean against each type's (0.85-0.89 here)
    pooled = np.array([np.corrcoef(real.mean(0), m)[0, 1] for m in real_means])
    for k in range(len(types)):
        # measured 0.93-0.97 at 200 epochs; 0.90 leaves margin and stays above the pooled baseline
        assert corr[k, k] > 0.90, corr
        assert corr[k, k] > pooled[k], (corr[k, k], pooled[k])
        # conditioning works: each synthetic type is closest to its own real type
        assert corr[k, k] > np.delete(corr[k], k).max() + 0.1, corr


def test_synthetic_cells_carry_the_known_clusters(trained):
    """Train on synthetic, test on real: a classifier fitted to GAN cells alone must label the real
    cells, and the synthetic cells must cluster by their requested type."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import adjusted_rand_score

    real, labels = log_normalise(trained.adata.X), trained.adata.obs["cell_type"].astype(str).to_numpy()
    fake = trained.sample(900, seed=4)
    fake_x, fake_labels = log_normalise(fake.X), fake.obs["cell_type"].astype(str).to_numpy()
    classifier = LogisticRegression(max_iter=2000).fit(fake_x, fake_labels)
    # measured: 0.79-0.86 over three sampling seeds; the same classifier trained on half of the
    # real cells scores 0.89 on the other half (these clusters overlap), chance is 1/3
    assert (classifier.predict(real) == labels).mean() > 0.7
    pcs = PCA(n_components=10, random_state=0).fit(real).transform(fake_x)
    clusters = KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(pcs)
    # measured: 0.68-0.76 over three sampling seeds; k-means on the real cells' PCs scores 0.83
    assert adjusted_rand_score(fake_labels, clusters) > 0.6


def test_history_shows_the_critic_distance_falling(trained):
    w = np.asarray(trained.history["train_wasserstein"])
    # after the critic's first epochs the estimate peaks, then falls as the generator catches up
    assert w[-20:].mean() < 0.8 * w[5:30].max()


# --------------------------------------------------------------------------- latent, persistence, errors


def test_latent_is_the_critic_features(trained):
    latent = trained.get_latent_representation()
    assert latent.shape == (trained.adata.n_obs, 32) and latent.dtype == np.float32
    batch = next(iter(trained._batches(None, np.arange(5), 5)))
    with torch.no_grad():
        expected = trained.module.critic.features(torch.log1p(batch.counts / batch.counts.sum(1, keepdim=True) * 1e4))
    np.testing.assert_allclose(latent[:5], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_save_load_gives_identical_samples_and_latents(trained, tmp_path):
    trained.save(tmp_path / "gan")
    loaded = CellGAN.load(tmp_path / "gan", adata=trained.adata)
    a, b = trained.sample(50, seed=7), loaded.sample(50, seed=7)
    assert np.array_equal(_dense(a.X), _dense(b.X))
    assert a.obs["cell_type"].equals(b.obs["cell_type"])
    np.testing.assert_array_equal(trained.get_latent_representation(), loaded.get_latent_representation())
    assert loaded.history == trained.history
    # a different seed gives different cells
    assert not np.array_equal(_dense(a.X), _dense(trained.sample(50, seed=8).X))


def test_seeded_training_is_reproducible():
    adata = _data(n_cells=100, n_genes=15)
    CellGAN.setup_anndata(adata, labels_key="cell_type")
    runs = [CellGAN(adata, seed=4, **SMALL).train(max_epochs=3, batch_size=32, **TRAIN) for _ in range(2)]
    for key in ("train_critic_loss", "train_generator_loss", "train_wasserstein"):
        assert runs[0].history[key] == runs[1].history[key]
    assert np.array_equal(_dense(runs[0].sample(20).X), _dense(runs[1].sample(20).X))


@pytest.mark.parametrize(("value", "match"), [(-1.0, "negative"), (np.nan, "NaN"), (0.5, "non-integer")])
def test_setup_anndata_refuses_bad_counts(value, match):
    adata = _data(n_cells=30, n_genes=10)
    x = adata.X.toarray()
    x[0, 0] = value
    adata.X = sp.csr_matrix(x)
    with pytest.raises(SetupError, match=match):
        CellGAN.setup_anndata(adata, labels_key="cell_type")


def test_query_with_missing_genes_is_refused(trained):
    query = trained.adata[:, trained.var_names[:-3]].copy()
    with pytest.raises(SetupError, match="gene"):
        trained.get_latent_representation(query)


def test_batch_key_is_refused():
    adata = synthetic(n_cells=60, n_genes=10, n_clusters=2, n_batches=2, seed=0)
    CellGAN.setup_anndata(adata, labels_key="cell_type", batch_key="batch")
    with pytest.raises(SetupError, match="batch_key"):
        CellGAN(adata)


def test_unconditional_gan_refuses_a_cell_type():
    adata = _data(n_cells=60, n_genes=10)
    CellGAN.setup_anndata(adata)
    model = CellGAN(adata, **SMALL).train(max_epochs=1, batch_size=32, **TRAIN)
    fake = model.sample(10)
    assert "cell_type" not in fake.obs and fake.obs["synthetic"].all()
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(3, cell_type="type_0")


# --------------------------------------------------------------------------- CLI


def test_cli_fit_gan(tmp_path, capsys):
    from sclatent.cli import main

    adata = _data(n_cells=120, n_genes=20)
    adata.write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out.h5ad"
    code = main(
        [
            "fit-gan",
            str(tmp_path / "in.h5ad"),
            "--out",
            str(out),
            "--labels-key",
            "cell_type",
            "--max-epochs",
            "2",
            "--n-synthetic",
            "30",
            "--no-progress",
            "--no-baseline",
        ]
    )
    assert code == 0
    import anndata as ad

    result = ad.read_h5ad(out)
    assert result.obsm["X_sclatent_gan"].shape[0] == 120
    synthetic_cells = ad.read_h5ad(tmp_path / "out_synthetic.h5ad")
    assert synthetic_cells.n_obs == 30 and synthetic_cells.obs["synthetic"].all()
    for suffix in ("_umap.png", "_training.png"):
        assert (tmp_path / f"out{suffix}").exists()
    assert (tmp_path / "out_model" / "model.pt").exists()
    printed = capsys.readouterr().out
    assert "classifier AUROC" in printed
