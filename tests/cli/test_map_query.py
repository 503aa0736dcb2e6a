"""``sclatent map-query``: a query mapped onto a saved reference, from the command line."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest

import sclatent
from sclatent.cli import main


@pytest.fixture(scope="module")
def reference_and_query(tmp_path_factory):
    """A semi-supervised reference on batches 0-1 (30 % labels), its cells, and batch 2 as the query."""
    folder = tmp_path_factory.mktemp("map_query")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cells = sclatent.datasets.synthetic(n_cells=450, n_genes=40, n_clusters=3, n_batches=3, seed=2)
    del cells.layers["true_mean"]
    batch = cells.obs["batch"].astype(str)
    reference, query = cells[batch != "batch_2"].copy(), cells[batch == "batch_2"].copy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    reference.obs["partial"] = np.where(
        rng.random(reference.n_obs) < 0.3, reference.obs["cell_type"].astype(str), "Unknown"
    )
    sclatent.model.VAE.setup_anndata(reference, batch_key="batch")
    vae = sclatent.model.VAE(reference, n_latent=4, n_hidden=32).train(max_epochs=30, progress_bar=False)
    model = sclatent.model.SemiSupervisedVAE.from_vae(vae, labels_key="partial").train(progress_bar=False)
    model.save(folder / "reference_model")
    vae.save(folder / "vae_model")
    reference.write_h5ad(folder / "reference.h5ad")
    del query.obs["cell_type"]
    query = query[:, ::-1].copy()  # any gene order: map-query aligns it
    query.write_h5ad(folder / "query.h5ad")
    return folder, truth


def test_map_query_writes_latent_labels_umap_and_model(reference_and_query, capsys):
    folder, truth = reference_and_query
    out = folder / "mapped.h5ad"
    arguments = ["map-query", str(folder / "reference_model"), str(folder / "query.h5ad"), "--out", str(out)]
    arguments += ["--reference-data", str(folder / "reference.h5ad"), "--max-epochs", "10", "--no-progress"]
    assert main(arguments) == 0
    stdout = capsys.readouterr().out
    mapped = ad.read_h5ad(out)
    assert mapped.obsm["X_sclatent_ssvae"].shape == (len(truth), 4)
    assert mapped.obsm["X_umap"].shape == (len(truth), 2)
    probability = mapped.obs["sclatent_prediction_probability"].to_numpy()
    assert ((probability > 0) & (probability <= 1)).all()
    # the simulated clusters are easy: the mapped query is labelled far above chance (1/3)
    assert (mapped.obs["sclatent_prediction"].astype(str).to_numpy() == truth).mean() > 0.8
    assert (folder / "mapped_umap.png").stat().st_size > 10_000
    loaded = sclatent.model.SemiSupervisedVAE.load(folder / "mapped_model", mapped)
    np.testing.assert_allclose(loaded.get_latent_representation(), mapped.obsm["X_sclatent_ssvae"], atol=1e-6)
    assert "batch_2" in stdout and "kNN entropy" in stdout


def test_map_query_onto_a_vae_writes_no_labels(reference_and_query):
    folder, truth = reference_and_query
    out = folder / "mapped_vae.h5ad"
    arguments = ["map-query", str(folder / "vae_model"), str(folder / "query.h5ad"), "--out", str(out)]
    assert main([*arguments, "--max-epochs", "3", "--no-progress"]) == 0
    mapped = ad.read_h5ad(out)
    assert mapped.obsm["X_sclatent_vae"].shape == (len(truth), 4)
    assert "sclatent_prediction" not in mapped.obs


def test_map_query_refuses_what_it_cannot_map(reference_and_query, tmp_path, capsys):
    folder, _ = reference_and_query
    cells = ad.read_h5ad(folder / "reference.h5ad")
    sclatent.model.DenoisingAE.setup_anndata(cells)
    sclatent.model.DenoisingAE(cells).save(tmp_path / "dae")
    query = str(folder / "query.h5ad")
    assert main(["map-query", str(tmp_path / "dae"), query, "--out", str(tmp_path / "o.h5ad")]) == 2
    assert "VAE or a SemiSupervisedVAE" in capsys.readouterr().err
    assert main(["map-query", str(tmp_path / "nothing"), query, "--out", str(tmp_path / "o.h5ad")]) == 2
    assert "does not hold a saved sclatent model" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()
