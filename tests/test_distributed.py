"""Tests for multi-process training under torchrun (:mod:`sclatent.distributed`, gloo on CPU).

The multi-process runs are real: this file doubles as the worker script. ``python -m
torch.distributed.run --standalone --nproc_per_node=2 tests/test_distributed.py OUTDIR`` (started
once per session by the ``two_rank_run`` fixture) makes each rank run the experiments of
:func:`_worker` and save what it saw to ``OUTDIR/rank<r>.pt``; the tests compare those records
with each other and with one-process runs made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from sclatent import distributed
from sclatent.contracts import LossOutput, Module
from sclatent.data import CellData, get_registry
from sclatent.data.neighbours import NeighbourData
from sclatent.datasets import synthetic
from sclatent.model import VAE, CellGAN
from sclatent.optim import FlatAdam
from sclatent.train import TrainingPlan, fit

WORLD_SIZE = 2

# The VAE experiment: 500 cells, 450 of them for training. 450 = 3 x 128 + 66 is not a multiple of
# the global minibatch (2 x 64 cells), so the last global minibatch is uneven (33 + 33 of 66).
N_CELLS, N_GENES, BATCH_SIZE, EPOCHS = 500, 100, 64, 25
VAE_SETTINGS = dict(n_hidden=32, n_latent=5)

# The gradient check: 4 x 8 cells = two global minibatches of 2 x 8 cells, no remainder.
TOY_CELLS, TOY_BATCH = 32, 8


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo), MPLBACKEND="Agg")
    # a launch of our own: no torchrun variables inherited from whatever started pytest
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(repo: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    # --standalone picks a free port for the rendezvous: parallel sessions do not collide
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
    return subprocess.run(
        [*command, *args], cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=timeout, check=False
    )


# --------------------------------------------------------------------- shared by worker and tests


def _adata():
    adata = synthetic(n_cells=N_CELLS, n_genes=N_GENES, seed=0)
    VAE.setup_anndata(adata, batch_key="batch")
    return adata


def _train_vae(batch_size: int, seed: int = 0) -> VAE:
    model = VAE(_adata(), seed=seed, **VAE_SETTINGS)
    model.train(max_epochs=EPOCHS, batch_size=batch_size, seed=seed, accelerator="cpu", progress_bar=False)
    return model


class _Toy(Module):
    """A deterministic module (no dropout, sampling or BatchNorm): a linear map of log counts,
    squared error per cell. Its gradient on a minibatch is a plain function of the cells."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(N_GENES, N_GENES)

    def loss(self, batch, kl_weight: float = 1.0) -> LossOutput:
        x = torch.log1p(batch.counts)
        per_cell = ((self.linear(x) - x.flip(-1)) ** 2).sum(-1)
        return LossOutput(loss=per_cell.mean(), terms={"squared_error": per_cell})


def _toy_gradients(context: distributed.DistributedContext | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The flat gradient of every optimiser step of one toy epoch, and the final flat parameters.

    Raises AssertionError if a parameter's ``.grad`` is not (any more) a view into the optimiser's
    flat gradient when it steps: the reduced gradient must land where FlatAdam reads it.
    """
    adata = _adata()
    data = CellData(adata, get_registry(adata))
    torch.manual_seed(0)
    module = _Toy()
    seen: list[torch.Tensor] = []
    step = FlatAdam.step

    def recording_step(self: FlatAdam) -> None:
        flat = self.grad.untyped_storage().data_ptr()
        assert all(p.grad.untyped_storage().data_ptr() == flat for p in self.parameters)
        seen.append(self.grad.clone())
        step(self)

    FlatAdam.step = recording_step
    try:
        batch_size = TOY_BATCH if context is not None else WORLD_SIZE * TOY_BATCH
        plan = TrainingPlan(max_epochs=1, batch_size=batch_size)
        fit(
            module,
            data,
            np.arange(TOY_CELLS),
            np.zeros(0, dtype=np.int64),
            plan,
            progress_bar=False,
            distributed=context,
        )
    finally:
        FlatAdam.step = step
    return seen, torch.cat([p.detach().reshape(-1) for p in module.parameters()])


# --------------------------------------------------------------------- the worker (one per rank)


def _worker(out_dir: Path) -> None:
    context = distributed.context("cpu")
    assert context.world_size == WORLD_SIZE, context
    record: dict = {"rank": context.rank}

    # which path reduced the gradients: calls of DDP's forward and of the flat all-reduce, per run
    calls = {"ddp": 0, "all_reduce": 0}
    ddp_forward, sum_gradients = DistributedDataParallel.forward, distributed.DistributedContext.sum_gradients_

    def counting_forward(self, *args, **kwargs):
        calls["ddp"] += 1
        return ddp_forward(self, *args, **kwargs)

    def counting_sum(self, *args, **kwargs):
        calls["all_reduce"] += 1
        return sum_gradients(self, *args, **kwargs)

    DistributedDataParallel.forward, distributed.DistributedContext.sum_gradients_ = counting_forward, counting_sum
    try:
        record["toy_gradients"], record["toy_parameters"] = _toy_gradients(context)
    finally:
        DistributedDataParallel.forward, distributed.DistributedContext.sum_gradients_ = ddp_forward, sum_gradients
    record["toy_calls"] = dict(calls)

    # which cells each rank trains on: record every training pass (the one with explicit batch_sizes)
    epochs: list[list[int]] = []
    iterate = CellData.iterate

    def recording_iterate(self, cells, batch_size, *args, batch_sizes=None, **kwargs):
        if batch_sizes is not None:
            epochs.append(torch.as_tensor(cells).tolist())
        return iterate(self, cells, batch_size, *args, batch_sizes=batch_sizes, **kwargs)

    CellData.iterate = recording_iterate
    calls.update(ddp=0, all_reduce=0)
    DistributedDataParallel.forward, distributed.DistributedContext.sum_gradients_ = counting_forward, counting_sum
    try:
        model = _train_vae(BATCH_SIZE)
    finally:
        CellData.iterate = iterate
        DistributedDataParallel.forward, distributed.DistributedContext.sum_gradients_ = ddp_forward, sum_gradients
    record["vae_calls"] = dict(calls)
    record["epochs"] = epochs
    record["train_indices"] = model.train_indices.tolist()
    record["history"] = json.dumps(model.history)  # exact floats, compared as text
    record["state"] = {k: v.clone() for k, v in model.module.state_dict().items()}

    # the adversarial path: one FlatAdam per player, each step's gradient reduced separately
    gan_adata = synthetic(n_cells=120, n_genes=30, n_batches=1, seed=1)
    CellGAN.setup_anndata(gan_adata, labels_key="cell_type")
    gan = CellGAN(gan_adata, n_noise=8, generator_hidden=(16,), critic_hidden=(16,), n_critic=2)
    calls.update(ddp=0, all_reduce=0)
    DistributedDataParallel.forward, distributed.DistributedContext.sum_gradients_ = counting_forward, counting_sum
    try:
        gan.train(max_epochs=3, batch_size=16, accelerator="cpu", progress_bar=False)
    finally:
        DistributedDataParallel.forward, distributed.DistributedContext.sum_gradients_ = ddp_forward, sum_gradients
    record["gan_calls"] = dict(calls)

    # a module with a parameter its loss never uses (the Poisson VAE's log_theta): DDP must not stall
    poisson = VAE(_adata(), seed=0, gene_likelihood="poisson", **VAE_SETTINGS)
    poisson.train(max_epochs=2, batch_size=BATCH_SIZE, accelerator="cpu", progress_bar=False)
    record["poisson_history"] = json.dumps(poisson.history)
    record["gan_history"] = json.dumps(gan.history)
    record["gan_state"] = {k: v.clone() for k, v in gan.module.state_dict().items()}

    # checkpoints: 2 epochs with a checkpoint, then a new call for 4 epochs resumes from it; it must end
    # where 4 epochs straight end, on every rank (each rank's own noise generators come back)
    def vae_run(max_epochs: int, checkpoint_dir: Path | None = None) -> VAE:
        model = VAE(_adata(), seed=0, **VAE_SETTINGS)
        model.train(
            max_epochs=max_epochs,
            kl_warmup_epochs=1,  # fixed: the default depends on max_epochs, which would make another run
            batch_size=BATCH_SIZE,
            accelerator="cpu",
            progress_bar=False,
            checkpoint_dir=checkpoint_dir,
        )
        return model

    straight = vae_run(4).module.state_dict()
    interrupted = vae_run(2, out_dir / "checkpoint")
    resumed = vae_run(4, out_dir / "checkpoint")
    record["resume_mismatch"] = [k for k, v in straight.items() if not torch.equal(v, resumed.module.state_dict()[k])]
    record["resume_seconds"] = (interrupted.history["seconds"], resumed.history["seconds"])
    torch.save(record, out_dir / f"rank{context.rank}.pt")
    distributed.teardown()


# --------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, repo) -> list[dict]:
    """The records of both ranks of one 2-process gloo run of :func:`_worker`."""
    out = tmp_path_factory.mktemp("distributed")
    done = _torchrun(repo, str(Path(__file__).resolve()), str(out), timeout=240)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def test_global_step_sizes_cover_every_cell_with_equal_step_counts():
    # 450 cells, 2 ranks x 64: three full global minibatches and an uneven last one of 66
    sizes = distributed.global_step_sizes(450, 64, 2)
    assert sizes.tolist() == [[64, 64]] * 3 + [[33, 33]]
    # a remainder too small to give every rank two cells is folded into the previous minibatch
    folded = distributed.global_step_sizes(131, 64, 2)
    assert folded.tolist() == [[66, 65]] and folded.sum() == 131
    assert distributed.global_step_sizes(133, 64, 2).tolist() == [[64, 64], [3, 2]]
    with pytest.raises(ValueError, match="two cells per minibatch"):
        distributed.global_step_sizes(3, 64, 2)


def test_rank_minibatches_partition_each_global_minibatch():
    order = torch.randperm(133, generator=torch.Generator().manual_seed(0))
    sizes = distributed.global_step_sizes(133, 16, 3)
    parts = [distributed.rank_minibatches(order, sizes, r) for r in range(3)]
    assert all(len(b) == len(sizes) for _, b in parts)  # the same number of steps on every rank
    begin = 0
    for step, row in enumerate(sizes):
        global_batch = order[begin : begin + row.sum()]
        begin += row.sum()
        mine = []
        for cells, batch_sizes in parts:
            offset = sum(batch_sizes[:step])
            mine.append(cells[offset : offset + batch_sizes[step]])
        assert torch.equal(torch.cat(mine), global_batch)


def test_iterate_with_explicit_batch_sizes():
    adata = _adata()
    data = CellData(adata, get_registry(adata))
    cells = torch.arange(20)
    batches = list(data.iterate(cells, 128, batch_sizes=[5, 1, 14]))
    assert [b.size for b in batches] == [5, 1, 14]
    assert torch.equal(torch.cat([b.cell_index for b in batches]), cells)
    reference = data.gather(cells[5:6])
    assert torch.equal(batches[1].counts, reference.counts)
    with pytest.raises(ValueError, match="sum to the number of cells"):
        list(data.iterate(cells, 128, batch_sizes=[5, 5]))
    # epoch_order is the order of a shuffled iterate
    generator = torch.Generator().manual_seed(3)
    order = data.epoch_order(np.arange(20), generator)
    shuffled = list(data.iterate(np.arange(20), 20, shuffle=True, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(shuffled[0].cell_index, order)


def test_neighbour_data_with_explicit_batch_sizes_draws_from_the_given_generator():
    adata = _adata()
    data = CellData(adata, get_registry(adata))
    table = np.stack([(np.arange(N_CELLS) + k) % N_CELLS for k in (1, 2, 3)], axis=1)
    wrapped = NeighbourData(data, table)
    cells = wrapped.epoch_order(np.arange(40), torch.Generator().manual_seed(1))
    assert torch.equal(cells, data.epoch_order(np.arange(40), torch.Generator().manual_seed(1)))

    def neighbours(seed: int) -> torch.Tensor:
        batches = list(wrapped.iterate(cells, 128, generator=torch.Generator().manual_seed(seed), batch_sizes=[30, 10]))
        assert [b.size for b in batches] == [30, 10]
        return torch.cat([b.neighbour.cell_index for b in batches])

    picked = neighbours(0)
    offsets = (picked - cells) % N_CELLS
    assert set(offsets.tolist()) <= {1, 2, 3}
    assert torch.equal(picked, neighbours(0)) and not torch.equal(picked, neighbours(1))  # a training pass


def test_one_process_context_outside_torchrun(monkeypatch):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    context = distributed.context("cpu")
    assert (context.rank, context.world_size, context.enabled, context.is_main) == (0, 1, False, True)
    assert distributed.is_main_process()
    assert not torch.distributed.is_initialized()


def test_gradients_equal_the_global_minibatch_gradient(two_rank_run):
    """Every step of 2 ranks x 8 cells sums to the gradient of the same 16 cells in one process."""
    reference, parameters = _toy_gradients(None)
    for record in two_rank_run:
        assert len(record["toy_gradients"]) == len(reference) == 2
        for got, want in zip(record["toy_gradients"], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(record["toy_parameters"], parameters, rtol=1e-5, atol=1e-6)


def test_one_objective_path_uses_ddp_and_adversarial_the_flat_all_reduce(two_rank_run):
    """The toy (one objective, autograd) steps through DDP's forward once per step and never calls the
    flat all-reduce; the GAN (frozen parameter groups) and the VAE's direct-gradient pass do the
    opposite. The toy's DDP-reduced gradients, read from FlatAdam's flat gradient, are the global
    minibatch's (test above)."""
    for record in two_rank_run:
        assert record["toy_calls"] == {"ddp": len(record["toy_gradients"]), "all_reduce": 0}
        assert record["gan_calls"]["ddp"] == 0 and record["gan_calls"]["all_reduce"] > 0
        # the VAE's direct-gradient (fused) pass has no autograd graph for DDP: one flat all-reduce per step
        steps = sum(len(epoch) > 0 for epoch in record["epochs"])
        assert record["vae_calls"]["ddp"] == 0 and record["vae_calls"]["all_reduce"] >= steps
    # unused parameters (Poisson VAE's dispersion) are handled: both epochs ran, ranks agree
    first, second = [json.loads(record["poisson_history"]) for record in two_rank_run]
    del first["seconds"], second["seconds"]
    assert first == second and first["epoch"] == [1, 2] and np.isfinite(first["train_elbo"]).all()


def test_each_cell_seen_once_per_epoch_across_ranks(two_rank_run):
    first, second = two_rank_run
    train = sorted(first["train_indices"])
    assert first["train_indices"] == second["train_indices"]
    assert len(train) % (WORLD_SIZE * BATCH_SIZE) != 0
    assert len(first["epochs"]) == len(second["epochs"]) == EPOCHS
    for mine, theirs in zip(first["epochs"], second["epochs"], strict=True):
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == train


def test_ranks_end_identical(two_rank_run):
    first, second = [json.loads(record["history"]) for record in two_rank_run]
    del first["seconds"], second["seconds"]  # wall-clock time, the one per-rank entry
    assert first == second  # exact: early stopping and divergence checks decide alike
    first, second = two_rank_run
    assert first["state"].keys() == second["state"].keys()
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key


def test_adversarial_ranks_end_identical(two_rank_run):
    first, second = two_rank_run
    histories = [json.loads(record["gan_history"]) for record in two_rank_run]
    for history in histories:
        del history["seconds"]
    assert histories[0] == histories[1] and len(histories[0]["epoch"]) == 3
    assert all(np.isfinite(histories[0]["train_loss"]))
    for key, value in first["gan_state"].items():
        assert torch.equal(value, second["gan_state"][key]), key


def test_distributed_resume_from_a_checkpoint_equals_an_uninterrupted_run(two_rank_run):
    written_by_rank_0 = two_rank_run[0]["resume_seconds"][0]
    for record in two_rank_run:
        after = record["resume_seconds"][1]
        # epochs 1-2 came from the checkpoint (their wall-clock times are rank 0's of the first call), 3-4 were
        # trained: a run that silently started over would end equal too, but with other times
        assert len(after) == 4 and after[:2] == written_by_rank_0
        assert record["resume_mismatch"] == []  # bit-identical parameters on every rank


def test_two_processes_match_one_process_with_the_global_batch(two_rank_run):
    """Final ELBOs of 2 x 64 cells per step vs 1 x 128 cells per step, same seed.

    The runs differ in their noise (each rank draws its own dropout masks and latent samples) and
    in BatchNorm (statistics of 64 cells per rank rather than 128), so they agree closely, not bit
    for bit. Measured on this set (25 epochs, seeds 0-4): the 2-process run is within 0.03-0.74
    nats/cell of the one-process run of the same seed on the training cells and 0.4-2.0 on the 50
    validation cells; one process spreads over 4.9 nats/cell (training) between seeds, and a
    one-process run with 64 cells per step (twice the steps, what an unweighted or doubled
    reduction would approach) ends ~12 nats/cell higher. Tolerances: 3 nats/cell (training) and
    4 (validation), about 1 % of the ELBO.
    """
    history = json.loads(two_rank_run[0]["history"])
    single = _train_vae(WORLD_SIZE * BATCH_SIZE)
    for key, tolerance in (("train_elbo", 3.0), ("validation_elbo", 4.0)):
        two, one = history[key][-1], single.history[key][-1]
        assert abs(two - one) < tolerance, (key, two, one)
    assert len(history["epoch"]) == len(single.history["epoch"]) == EPOCHS


def test_torchrun_cli_writes_files_once(tmp_path, repo):
    out = tmp_path / "pbmc.h5ad"
    done = _torchrun(
        repo,
        "-m",
        "sclatent",
        "fit-vae",
        "--out",
        str(out),
        "--max-epochs",
        "2",
        "--no-baseline",
        "--no-progress",
        "--n-mc-samples",
        "5",
        timeout=300,
    )
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    # rank 0 alone reads the header out, prints the summary and writes; rank 1 exits after training
    assert done.stdout.count("sclatent fit-vae:") == 1 and done.stdout.count("Summary") == 1
    assert out.exists() and (tmp_path / "pbmc_model").is_dir()
    assert (tmp_path / "pbmc_umap.png").exists() and (tmp_path / "pbmc_training.png").exists()
    model = VAE.load(tmp_path / "pbmc_model")
    assert model.history["epoch"] == [1, 2]


if __name__ == "__main__":  # one rank of the two_rank_run fixture's torchrun launch
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]))
