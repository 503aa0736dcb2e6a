"""Saved models and checkpoints that cannot be read back fail with sclatent's own error, naming the file and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sclatent
from sclatent import ModelLoadError
from sclatent.checkpoint import CHECKPOINT_FILE, CheckpointError
from sclatent.datasets import synthetic
from sclatent.images import ImageVAE
from sclatent.model import VAE


@pytest.fixture(scope="module")
def adata():
    data = synthetic(n_cells=80, n_genes=20, n_clusters=2, n_batches=1, seed=0)
    VAE.setup_anndata(data)
    return data


@pytest.fixture
def saved(adata, tmp_path):
    model = VAE(adata, n_hidden=8, n_latent=2).train(max_epochs=1, progress_bar=False)
    return model, model.save(tmp_path / "model")


def _zero_bytes(path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_zeroed_bytes_in_the_weights_raise_a_load_error_naming_the_file(adata, saved, where):
    _, folder = saved
    weights = folder / "model.pt"
    size = weights.stat().st_size
    _zero_bytes(weights, {"start": 0, "middle": size // 2, "end": size - 64}[where])
    with pytest.raises(ModelLoadError) as error:
        VAE.load(folder, adata)
    message = str(error.value)
    assert str(weights) in message and "save the model again" in message
    assert isinstance(error.value, ValueError)


def test_a_truncated_weights_file_raises_a_load_error(adata, saved):
    _, folder = saved
    weights = folder / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ModelLoadError, match=r"model\.pt"):
        VAE.load(folder, adata)


def test_damaged_metadata_raises_a_load_error(adata, saved):
    _, folder = saved
    meta = folder / "metadata.json"
    text = meta.read_bytes()
    meta.write_bytes(b"\xff\xfe" + text[: len(text) // 2])
    with pytest.raises(ModelLoadError, match=r"metadata\.json.*not valid JSON"):
        VAE.load(folder, adata)
    meta.write_text(json.dumps({"format_version": 1, "model_class": "VAE"}))
    with pytest.raises(ModelLoadError, match="lacks hyperparameters"):
        VAE.load(folder, adata)


def test_weights_of_another_architecture_are_refused_by_name(adata, saved, tmp_path):
    _, folder = saved
    other = VAE(adata, n_hidden=16, n_latent=2).save(tmp_path / "other")
    (folder / "model.pt").write_bytes((other / "model.pt").read_bytes())
    with pytest.raises(ModelLoadError, match="differ from the checksum"):
        VAE.load(folder, adata)
    # a folder saved before the checksum was recorded: the state dict's shapes still tell
    meta = folder / "metadata.json"
    metadata = json.loads(meta.read_text())
    del metadata["weights_sha256"]
    meta.write_text(json.dumps(metadata))
    with pytest.raises(ModelLoadError, match="do not fit the VAEModule"):
        VAE.load(folder, adata)


def test_an_intact_folder_still_loads(adata, saved):
    model, folder = saved
    loaded = VAE.load(folder, adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_image_models_share_the_load_path_and_its_errors(tmp_path):
    x = sclatent.datasets.digits("train").subset(40, seed=0)
    model = ImageVAE((8, 8), n_latent=2, n_hidden=8).train(x, max_epochs=1, progress_bar=False)
    folder = model.save(tmp_path / "image")
    loaded = ImageVAE.load(folder)
    np.testing.assert_array_equal(loaded.get_latent_representation(x), model.get_latent_representation(x))
    _zero_bytes(folder / "model.pt", 0)
    with pytest.raises(ModelLoadError, match=r"model\.pt"):
        ImageVAE.load(folder)


def test_a_truncated_checkpoint_raises_a_checkpoint_error(adata, tmp_path):
    directory = tmp_path / "ckpt"
    VAE(adata, n_hidden=8, n_latent=2).train(max_epochs=1, progress_bar=False, checkpoint_dir=directory)
    path = directory / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupted") as error:
        VAE(adata, n_hidden=8, n_latent=2).train(max_epochs=2, progress_bar=False, checkpoint_dir=directory)
    assert str(path) in str(error.value) and "Delete" in str(error.value)
