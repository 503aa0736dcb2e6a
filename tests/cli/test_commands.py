"""Tests for the ``sclatent fit-vae`` command line."""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from sclatent.cli import main
from sclatent.datasets import synthetic
from sclatent.model import VAE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pbmc_run(tmp_path_factory):
    """One ``fit-vae`` run on the embedded PBMC default: (return code, output path, stdout, stderr)."""
    out = tmp_path_factory.mktemp("cli") / "pbmc.h5ad"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["fit-vae", "--out", str(out), "--max-epochs", "3", "--no-progress", "--n-mc-samples", "10"])
    return code, out, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def pbmc_output(pbmc_run):
    return ad.read_h5ad(pbmc_run[1])


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_fit_vae_writes_annotated_h5ad(pbmc_run, pbmc_output):
    code, out, _, _ = pbmc_run
    assert code == 0
    assert out.exists()
    adata = pbmc_output
    assert adata.shape == (700, 765)
    latent = adata.obsm["X_sclatent_vae"]
    assert latent.shape == (700, 10)
    assert np.isfinite(latent).all()
    umap = np.asarray(adata.obsm["X_umap"])
    assert umap.shape == (700, 2) and np.isfinite(umap).all()
    clusters = adata.obs["leiden_sclatent_vae"]
    assert clusters.notna().all()
    assert 2 <= clusters.nunique() < 700
    # the counts are written back unchanged
    assert sp.issparse(adata.X)
    np.testing.assert_array_equal(adata.X.data, np.rint(adata.X.data))


def test_fit_vae_model_folder_loads(pbmc_run, pbmc_output):
    _, out, _, _ = pbmc_run
    folder = out.parent / "pbmc_model"
    assert (folder / "model.pt").exists() and (folder / "metadata.json").exists()
    model = VAE.load(folder, adata=pbmc_output)
    assert model.is_trained
    assert model.history["epoch"] == [1, 2, 3]
    assert model.var_names == list(pbmc_output.var_names)
    # the saved model reproduces the latent written to the h5ad
    np.testing.assert_allclose(
        model.get_latent_representation(), pbmc_output.obsm["X_sclatent_vae"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("suffix", ["_umap.png", "_training.png"])
def test_fit_vae_figures_are_pngs(pbmc_run, suffix):
    _, out, _, _ = pbmc_run
    path = out.parent / f"pbmc{suffix}"
    assert path.exists()
    assert path.stat().st_size > 10_000  # a real figure, not an empty canvas
    width, height = _png_size(path)
    assert width > 200 and height > 200


def test_fit_vae_summary(pbmc_run, pbmc_output):
    _, _, stdout, _ = pbmc_run
    assert "700 cells x 765 genes" in stdout
    for text in ("ARI", "NMI", "held-out LL", "PCA baseline", "3 epochs"):
        assert text in stdout, text
    number = r"(-?\d+\.\d+)"
    match = re.search(rf"ARI {number}, NMI {number} \(scanpy PCA baseline: ARI {number}, NMI {number}\)", stdout)
    assert match, stdout
    ari, nmi, pca_ari, pca_nmi = (float(v) for v in match.groups())
    labels = pbmc_output.obs["bulk_labels"].astype(str).to_numpy()
    clusters = pbmc_output.obs["leiden_sclatent_vae"].to_numpy()
    # the printed scores are those of the written clustering
    assert ari == pytest.approx(adjusted_rand_score(labels, clusters), abs=6e-4)
    assert nmi == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=6e-4)
    assert -1 <= pca_ari <= 1 and 0 <= pca_nmi <= 1
    held_out = re.search(r"held-out LL\s+(-?\d+\.\d+) nats/cell \((\d+) cells, (\d+) importance samples\)", stdout)
    assert held_out, stdout
    assert np.isfinite(float(held_out.group(1))) and float(held_out.group(1)) < 0
    assert int(held_out.group(2)) == 700 - int(np.ceil(0.9 * 700))
    assert held_out.group(3) == "10"


def test_fit_vae_on_input_file(tmp_path, capsys):
    """An h5ad input with log-normalised X and counts in a layer, batch and labels, custom model folder."""
    adata = synthetic(n_cells=150, n_genes=40, n_clusters=3, n_batches=2, seed=0)
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    del adata.layers["true_mean"]
    source = tmp_path / "in.h5ad"
    adata.write_h5ad(source)
    out = tmp_path / "result" / "out.h5ad"
    model_dir = tmp_path / "my_model"
    options = (
        "--layer counts --batch-key batch --labels-key cell_type --max-epochs 2 --n-latent 4 --n-hidden 16 "
        "--gene-likelihood nb --no-baseline --no-progress --n-mc-samples 5 --max-kl-weight 1.5"
    ).split()
    code = main(["fit-vae", str(source), "--out", str(out), "--model-dir", str(model_dir), *options])
    stdout = capsys.readouterr().out
    assert code == 0
    result = ad.read_h5ad(out)
    assert result.obsm["X_sclatent_vae"].shape == (150, 4)
    assert "ARI" in stdout and "PCA baseline" not in stdout
    model = VAE.load(model_dir, adata=result)
    assert model.registry.layer == "counts" and model.registry.batch_key == "batch"
    assert model.hyperparameters["gene_likelihood"] == "nb"
    # two epochs leave no warm-up (max_epochs // 3 == 0): the KL weight is --max-kl-weight throughout
    assert model.history["kl_weight"] == [1.5, 1.5]
    # the input file is left as it was
    np.testing.assert_array_equal(ad.read_h5ad(source).X.toarray(), adata.X.toarray())


def test_missing_input_file(tmp_path, capsys):
    missing = tmp_path / "no_such_file.h5ad"
    try:
        code = main(["fit-vae", str(missing), "--out", str(tmp_path / "o.h5ad"), "--no-progress"])
    except SystemExit as exit_:
        message = str(exit_.code)
        assert exit_.code not in (0, None)
    else:
        assert code != 0
        message = capsys.readouterr().err
    assert str(missing) in message and "does not exist" in message
    assert not (tmp_path / "o.h5ad").exists()


def test_non_integer_input_is_refused_with_the_fix(tmp_path, capsys):
    rng = np.random.default_rng(0)
    values = rng.poisson(3.0, size=(30, 12)).astype(np.float32) + 0.5
    path = tmp_path / "normalised.h5ad"
    ad.AnnData(values).write_h5ad(path)
    code = main(["fit-vae", str(path), "--out", str(tmp_path / "o.h5ad"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "non-integer" in err
    assert "allow_non_integer" in err and "layer" in err
    assert not (tmp_path / "o.h5ad").exists()


@pytest.mark.parametrize("extra, expected", [(["--layer", "missing"], "missing"), (["--labels-key", "nope"], "nope")])
def test_setup_errors_return_2(tmp_path, capsys, extra, expected):
    path = tmp_path / "counts.h5ad"
    ad.AnnData(np.random.default_rng(0).poisson(3.0, size=(30, 12)).astype(np.float32)).write_h5ad(path)
    code = main(["fit-vae", str(path), "--out", str(tmp_path / "o.h5ad"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and expected in err


def _run_module(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    return subprocess.run(
        [sys.executable, "-m", "sclatent", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )


def test_module_entry_point_help(repo):
    result = _run_module(repo, "fit-vae", "--help")
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "--max-epochs" in result.stdout


def test_module_entry_point_needs_a_command(repo):
    result = _run_module(repo)
    assert result.returncode == 2
    assert "fit-vae" in result.stderr


# --------------------------------------------------------------------------- fit-dae


@pytest.fixture(scope="module")
def dae_run(tmp_path_factory):
    """One ``fit-dae`` run on the embedded PBMC default."""
    out = tmp_path_factory.mktemp("cli_dae") / "pbmc_dae.h5ad"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["fit-dae", "--out", str(out), "--max-epochs", "3", "--no-progress", "--noise", "masking"])
    return code, out, stdout.getvalue()


def test_fit_dae_writes_code_denoised_layer_clusters_model_and_figures(dae_run):
    code, out, stdout = dae_run
    assert code == 0
    adata = ad.read_h5ad(out)
    assert adata.obsm["X_sclatent_dae"].shape == (adata.n_obs, 32)
    assert np.isfinite(adata.obsm["X_sclatent_dae"]).all()
    denoised = adata.layers["sclatent_denoised"]
    assert denoised.shape == adata.shape and (np.asarray(denoised) >= 0).all()
    # denoised counts keep each cell's depth: rows sum to the observed totals of the raw counts
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    np.testing.assert_allclose(np.asarray(denoised).sum(1), totals, rtol=1e-3)
    assert adata.obs["leiden_sclatent_dae"].nunique() > 1
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    stem = out.with_suffix("")
    for png in (Path(f"{stem}_umap.png"), Path(f"{stem}_training.png")):
        assert min(_png_size(png)) > 100
    from sclatent.model import DenoisingAE

    loaded = DenoisingAE.load(Path(f"{stem}_model"), adata=adata)
    assert loaded.hyperparameters["noise"] == "masking"
    np.testing.assert_allclose(loaded.get_latent_representation(), adata.obsm["X_sclatent_dae"], rtol=1e-5, atol=1e-6)
    assert "Leiden vs 'bulk_labels'" in stdout and "scanpy PCA baseline" in stdout
    assert re.search(r"held-out NLL\s+[0-9.]+ nats/cell", stdout)


def test_fit_dae_reports_bad_input_without_a_traceback(tmp_path):
    bad = synthetic(n_cells=60, n_genes=30, seed=0)
    bad.X = bad.X.astype(np.float32) * 0.5  # fractional counts
    path = tmp_path / "bad.h5ad"
    bad.write_h5ad(path)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["fit-dae", str(path), "--out", str(tmp_path / "o.h5ad"), "--max-epochs", "1", "--no-progress"])
    assert code == 2
    assert "allow-non-integer" in stderr.getvalue() or "allow_non_integer" in stderr.getvalue()
