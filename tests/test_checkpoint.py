"""Crash-safe training checkpoints: kill and resume, bit-identical results, refusals, atomicity, CLI.

A run killed with SIGKILL and run again must end with exactly the parameters of a run never
interrupted (same seed, CPU, one thread); a checkpoint that is unreadable, not sclatent's, of
another format version or of another run is refused with a ``CheckpointError`` naming the problem
and the fix, and nothing in it is unpickled beyond tensors and plain values.
"""

from __future__ import annotations

import io
import os
import pickle
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sclatent.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from sclatent.cli import main
from sclatent.cli._common import output_paths
from sclatent.datasets import synthetic
from sclatent.model import VAE, CellGAN
from sclatent.optim import FlatAdam

TRAIN = dict(accelerator="cpu", progress_bar=False)
SMALL_VAE = dict(n_latent=4, n_hidden=16)


def _vae_data(n_cells: int = 160, n_genes: int = 40):
    adata = synthetic(n_cells=n_cells, n_genes=n_genes, n_clusters=3, n_batches=2, seed=1)
    VAE.setup_anndata(adata, batch_key="batch")
    return adata


def _assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), f"{name} differs"


def _assert_same_history(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        if key != "seconds":  # wall-clock time is the one thing a resumed run may not repeat
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # NaN (a group that did not step) == NaN


def _epoch_of(directory: Path) -> int:
    return int(torch.load(directory / CHECKPOINT_FILE, weights_only=True)["epoch"])


# --------------------------------------------------------------------------- kill and resume

# Trains a small VAE with a checkpoint; prints the epoch it starts from and saves the final state.
# Enough epochs that the test can kill it well before it finishes; nothing in it slows it down.
_SCRIPT = """
import sys
from pathlib import Path

import torch


def main(argv):
    torch.set_num_threads(1)
    from sclatent.datasets import synthetic
    from sclatent.model import VAE

    checkpoint_dir, out, max_epochs = Path(argv[0]), Path(argv[1]), int(argv[2])
    adata = synthetic(n_cells=400, n_genes=60, n_clusters=3, n_batches=2, seed=1)
    VAE.setup_anndata(adata, batch_key="batch")
    model = VAE(adata, n_latent=4, n_hidden=32, seed=5)
    file = checkpoint_dir / "checkpoint.pt"
    start = int(torch.load(file, weights_only=True)["epoch"]) if file.exists() else 0
    print(f"START {start}", flush=True)
    model.train(
        max_epochs=max_epochs, batch_size=32, kl_warmup_epochs=10, early_stopping=True, patience=1000,
        restore_best=True, accelerator="cpu", progress_bar=False, checkpoint_dir=checkpoint_dir,
    )
    torch.save({"state": model.module.state_dict(), "history": model.history}, out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
"""


def test_killed_run_resumes_to_the_parameters_of_an_uninterrupted_run(tmp_path, capsys, repo):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    max_epochs = 30  # ~60 ms an epoch here: the kill lands at epoch 2-3, far from the end
    checkpoint_dir, interrupted_out = tmp_path / "ckpt", tmp_path / "interrupted.pt"

    # the first run in its own process, killed by SIGKILL (no handler, no cleanup) once at least
    # two epochs are checkpointed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    command = [sys.executable, str(script), str(checkpoint_dir), str(interrupted_out), str(max_epochs)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # importing sclatent alone takes seconds on a busy machine
    while True:
        try:
            if _epoch_of(checkpoint_dir) >= 2:
                break
        except FileNotFoundError:
            pass  # not written yet (a present checkpoint is always whole: it is renamed into place)
        if process.poll() is not None:
            pytest.fail(f"the training process ended before it could be killed: {process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "no checkpoint appeared within 120 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    killed_at = _epoch_of(checkpoint_dir)
    assert 2 <= killed_at < max_epochs and not interrupted_out.exists()

    # the same script run again (here in-process, to spare a second import of torch and sclatent)
    # resumes from the checkpoint; a third run in a fresh folder is the uninterrupted reference
    main = runpy.run_path(str(script), run_name="checkpoint_test_script")["main"]
    capsys.readouterr()
    main([str(checkpoint_dir), str(interrupted_out), str(max_epochs)])
    out = capsys.readouterr().out
    assert f"START {killed_at}\n" in out and "DONE" in out
    assert _epoch_of(checkpoint_dir) == max_epochs
    main([str(tmp_path / "fresh"), str(tmp_path / "straight.pt"), str(max_epochs)])
    assert "START 0\n" in capsys.readouterr().out

    a = torch.load(interrupted_out, weights_only=True)
    b = torch.load(tmp_path / "straight.pt", weights_only=True)
    assert list(a["state"]) == list(b["state"])
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), f"{name} differs after the resume"
    assert a["history"]["epoch"] == list(range(1, max_epochs + 1))  # the whole run, not the resumed part
    _assert_same_history(a["history"], b["history"])


# --------------------------------------------------------------------------- in-process resumes


def test_vae_resumed_with_more_epochs_equals_a_straight_run_with_early_stopping_state(tmp_path):
    adata = _vae_data()
    settings = dict(batch_size=32, lr=1e-4, kl_warmup_epochs=4, early_stopping=True, patience=3, restore_best=True)
    settings.update(train_size=0.8, **TRAIN)
    straight = VAE(adata, seed=2, **SMALL_VAE).train(max_epochs=30, **settings)
    # (measured) the held-out ELBO peaks at epoch 9 and early stopping ends the run at 12 with
    # epoch 9's parameters: a resume after epoch 10 must carry the best value, the epochs without
    # improvement and the best parameters across, as well as KL warm-up, optimiser and RNGs
    assert len(straight.history["epoch"]) == 12

    # the same model object trained in two calls: 10 epochs, then resumed to (at most) 30
    model = VAE(adata, seed=2, **SMALL_VAE)
    model.train(max_epochs=10, checkpoint_dir=tmp_path, **settings)
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["epoch"] == 10 and saved["early_stopping"]["epochs_without_improvement"] == 1
    model.train(max_epochs=30, checkpoint_dir=tmp_path, **settings)
    _assert_same_parameters(straight.module, model.module)
    _assert_same_history(straight.history, model.history)

    # a fresh object (as after a crash) rerunning the finished run trains nothing and ends the same
    again = VAE(adata, seed=2, **SMALL_VAE).train(max_epochs=30, checkpoint_dir=tmp_path, **settings)
    _assert_same_parameters(straight.module, again.module)
    _assert_same_history(straight.history, again.history)


def test_early_stopped_run_stays_stopped_when_rerun(tmp_path):
    adata = _vae_data()
    # a learning rate too small to beat the noise of the sampled validation ELBO: early stopping
    # ends the run after a few epochs
    settings = dict(batch_size=32, lr=1e-6, kl_warmup_epochs=0, early_stopping=True, patience=2, restore_best=True)
    settings.update(train_size=0.8, **TRAIN)
    model = VAE(adata, seed=2, **SMALL_VAE)
    model.train(max_epochs=20, checkpoint_dir=tmp_path, **settings)
    stopped_at = len(model.history["epoch"])
    assert stopped_at < 20 and torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["stopped"]
    rerun = VAE(adata, seed=2, **SMALL_VAE).train(max_epochs=20, checkpoint_dir=tmp_path, **settings)
    assert len(rerun.history["epoch"]) == stopped_at
    _assert_same_parameters(model.module, rerun.module)  # the best epoch restored both times


def test_adversarial_module_resumes_its_optimisers_and_global_step(tmp_path):
    adata = synthetic(n_cells=100, n_genes=20, n_clusters=2, n_batches=1, seed=3)
    CellGAN.setup_anndata(adata, labels_key="cell_type")
    small = dict(n_noise=8, generator_hidden=(16, 16), critic_hidden=(16, 8), n_critic=3)
    # 2 minibatches per epoch with n_critic 3: the generator's turn depends on the global step
    settings = dict(batch_size=40, lr=1e-3, train_size=0.8, **TRAIN)
    straight = CellGAN(adata, seed=4, **small).train(max_epochs=5, **settings)
    CellGAN(adata, seed=4, **small).train(max_epochs=2, checkpoint_dir=tmp_path, **settings)
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["global_step"] == 4 and set(saved["optimizers"]) == {"critic", "generator"}
    resumed = CellGAN(adata, seed=4, **small).train(max_epochs=5, checkpoint_dir=tmp_path, **settings)
    _assert_same_parameters(straight.module, resumed.module)
    _assert_same_history(straight.history, resumed.history)


@pytest.mark.parametrize("fallback", [False, True], ids=["flat", "torch-adam-fallback"])
def test_flat_adam_state_round_trip_continues_identically(fallback):
    def parameters():
        torch.manual_seed(0)
        first = torch.randn(5, 3, requires_grad=True)
        # a second dtype sends FlatAdam to its torch.optim.Adam fallback
        second = torch.randn(4, dtype=torch.float64 if fallback else torch.float32, requires_grad=True)
        return [first, second]

    def steps(optimizer, params, iterations):
        for i in iterations:
            optimizer.zero_grad()
            sum(((p - i) ** 2).sum() for p in params).backward()
            optimizer.step()

    reference_params = parameters()
    reference = FlatAdam(reference_params, lr=0.1, weight_decay=0.01)
    assert (reference._fallback is not None) == fallback
    steps(reference, reference_params, range(6))

    params = parameters()
    first = FlatAdam(params, lr=0.1, weight_decay=0.01)
    steps(first, params, range(3))
    state = first.state_dict()
    first.release()
    # through a file, as in a checkpoint: plain values and tensors only
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    second = FlatAdam(params, lr=0.1, weight_decay=0.01)
    second.load_state_dict(state)
    steps(second, params, range(3, 6))
    for p, q in zip(params, reference_params, strict=True):
        assert torch.equal(p, q)
    # the state of the other path (flat vs fallback) is refused, not misread
    other = parameters()[:1] if fallback else [*parameters(), torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    with pytest.raises(ValueError, match="cannot be loaded into a FlatAdam"):
        FlatAdam(other).load_state_dict(state)
    if not fallback:
        with pytest.raises(ValueError, match="does not hold 15 values"):
            FlatAdam(parameters()[:1]).load_state_dict(state)


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A one-epoch checkpoint of a small VAE, and the settings that resume it."""
    directory = tmp_path_factory.mktemp("run")
    adata = _vae_data(n_cells=60, n_genes=20)
    settings = dict(max_epochs=2, batch_size=32, kl_warmup_epochs=1, **TRAIN)
    VAE(adata, seed=0, **SMALL_VAE).train(checkpoint_dir=directory, **{**settings, "max_epochs": 1})
    return adata, settings, (directory / CHECKPOINT_FILE).read_bytes()


def _resume(adata, settings, directory, seed=0, model_kwargs=SMALL_VAE, **changes):
    return VAE(adata, seed=seed, **model_kwargs).train(checkpoint_dir=directory, **{**settings, **changes})


def _write(directory: Path, content: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CHECKPOINT_FILE).write_bytes(content)
    return directory


class _Payload:
    """Unpickling this would create a file: proof that nothing beyond plain values is unpickled."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_the_valid_checkpoint_resumes(saved_run, tmp_path):
    adata, settings, content = saved_run
    model = _resume(adata, settings, _write(tmp_path, content))
    assert model.history["epoch"] == [1, 2]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda content: content[: len(content) // 2],
        lambda content: b"",
        lambda content: os.urandom(4096),
        lambda content: b"\x80\x02" + os.urandom(200),  # looks like a pickle stream
    ],
    ids=["truncated", "empty", "random-bytes", "garbage-pickle"],
)
def test_unreadable_checkpoint_is_refused(saved_run, tmp_path, corrupt):
    adata, settings, content = saved_run
    directory = _write(tmp_path, corrupt(content))
    with pytest.raises(
        CheckpointError, match=r"Cannot read the checkpoint .*truncated, corrupted.*Delete .*checkpoint_dir"
    ):
        _resume(adata, settings, directory)


def test_checkpoint_with_a_foreign_object_is_refused_without_unpickling_it(saved_run, tmp_path):
    adata, settings, _ = saved_run
    sentinel = tmp_path / "unpickled"
    buffer = io.BytesIO()
    torch.save({"format": "sclatent_checkpoint", "format_version": 1, "payload": _Payload(str(sentinel))}, buffer)
    directory = _write(tmp_path / "ckpt", buffer.getvalue())
    with pytest.raises(CheckpointError, match="nothing else is unpickled"):
        _resume(adata, settings, directory)
    assert not sentinel.exists()
    # a plain pickle (not a torch file) of the same object is refused as well
    _write(directory, pickle.dumps(_Payload(str(sentinel)), protocol=2))
    with pytest.raises(CheckpointError, match="Cannot read the checkpoint"):
        load_checkpoint(directory, {})
    assert not sentinel.exists()


def test_torch_file_without_the_marker_or_of_another_version_is_refused(saved_run, tmp_path):
    adata, settings, content = saved_run
    state = torch.load(io.BytesIO(content), weights_only=True)
    without_history = {k: v for k, v in state.items() if k != "history"}
    for name, stored, message in [
        ("state-dict", state["module"], "a torch file but not a checkpoint of sclatent"),
        ("wrong-marker", {**state, "format": "other"}, "not a checkpoint of sclatent"),
        ("version", {**state, "format_version": 99}, "format version 99; this sclatent reads version 1"),
        ("incomplete", without_history, r"incomplete \(missing history\)"),
    ]:
        buffer = io.BytesIO()
        torch.save(stored, buffer)
        directory = _write(tmp_path / name, buffer.getvalue())
        with pytest.raises(CheckpointError, match=message):
            _resume(adata, settings, directory)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(seed=1), "seed: checkpoint 0, this run 1"),
        (dict(model_kwargs=dict(n_latent=4, n_hidden=8)), "state_dict"),
        (dict(lr=0.01), "plan.lr: checkpoint 0.004, this run 0.01"),
        (dict(batch_size=16), "plan.batch_size"),
        (dict(train_size=0.5), "train_cells"),
    ],
    ids=["seed", "architecture", "learning-rate", "batch-size", "split"],
)
def test_checkpoint_of_another_run_is_refused_naming_the_difference(saved_run, tmp_path, change, field):
    adata, settings, content = saved_run
    directory = _write(tmp_path, content)
    with pytest.raises(CheckpointError, match="belongs to another training run") as error:
        _resume(adata, settings, directory, **change)
    assert field in str(error.value)
    assert "Delete" in str(error.value) and "pass another checkpoint_dir" in str(error.value)


def test_checkpoint_with_more_epochs_than_asked_is_refused(saved_run, tmp_path):
    adata, settings, content = saved_run
    directory = _write(tmp_path, content)
    _resume(adata, settings, directory)  # now two epochs
    with pytest.raises(CheckpointError, match="holds 2 trained epochs, more than max_epochs=1"):
        _resume(adata, settings, directory, max_epochs=1)


# --------------------------------------------------------------------------- atomicity


def test_a_stray_temporary_file_from_a_killed_write_does_not_break_resume(saved_run, tmp_path):
    adata, settings, content = saved_run
    directory = _write(tmp_path, content)
    stray = directory / f".{CHECKPOINT_FILE}.k1ll3d.tmp"
    stray.write_bytes(content[:100])
    model = _resume(adata, settings, directory)
    assert model.history["epoch"] == [1, 2] and not stray.exists()


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"fingerprint": {"run": "a"}, "epoch": 1})
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    def half_write(obj, handle):
        handle.write(b"PK\x03\x04 half of a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr("sclatent.checkpoint.torch.save", half_write)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, {"fingerprint": {"run": "a"}, "epoch": 2})
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # the partial file is gone
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 1 and state["format"] == "sclatent_checkpoint"


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    assert save_checkpoint(tmp_path / "ckpt", {"epoch": 1}) is None
    assert not (tmp_path / "ckpt").exists()
    # a resuming rank > 0 takes the shared minibatch order but keeps its own noise generator
    generator = torch.Generator().manual_seed(1)
    saved = {"torch": torch.Generator().manual_seed(7).get_state(), "generator": generator.get_state(), "cuda": None}
    generator.manual_seed(2)
    own = torch.get_rng_state()
    restore_rng_state(saved, torch.device("cpu"), generator)
    assert torch.equal(generator.get_state(), saved["generator"]) and torch.equal(torch.get_rng_state(), own)


# --------------------------------------------------------------------------- command line


def test_fit_vae_writes_a_checkpoint_and_resumes_from_it(tmp_path, capsys, monkeypatch):
    # neighbours, UMAP, Leiden and figures (tests/cli/test_commands.py) take a minute here and do not touch
    # the checkpoint: skipped
    def write_model_only(adata, model, family, labels_key, args):
        out, model_dir, umap_png, curves_png = output_paths(args)
        model.save(model_dir, overwrite=True)
        return out, model_dir, umap_png, curves_png

    monkeypatch.setattr("sclatent.cli._common.cluster_and_write", write_model_only)
    adata = synthetic(n_cells=80, n_genes=30, n_clusters=2, n_batches=1, seed=0)
    del adata.layers["true_mean"]
    source = tmp_path / "in.h5ad"
    adata.write_h5ad(source)
    checkpoint_dir = tmp_path / "ckpt"
    arguments = ["fit-vae", str(source), "--out", str(tmp_path / "out.h5ad"), "--max-epochs", "2"]
    arguments += ["--checkpoint-dir", str(checkpoint_dir), "--no-baseline", "--no-progress", "--accelerator", "cpu"]
    arguments += "--n-latent 3 --n-hidden 8 --n-mc-samples 2".split()
    assert main(arguments) == 0
    assert _epoch_of(checkpoint_dir) == 2
    assert "2 epochs" in capsys.readouterr().out
    # the same command again finds the run finished: it trains (and rewrites) nothing
    written = os.stat(checkpoint_dir / CHECKPOINT_FILE)
    assert main(arguments) == 0
    assert "2 epochs" in capsys.readouterr().out
    again = os.stat(checkpoint_dir / CHECKPOINT_FILE)
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
