"""Data-parallel SVI (pyro_livi.infer.distributed): shards, the ELBO's scaling, and 2 processes
on CPU (gloo) against one process at the same global batch size.

Exact comparisons need a loss that is a deterministic function of parameters and data: each
process draws the guide's Monte Carlo noise for its own cells, one process for all cells, so
with noise the two runs are two draws of the same stochastic optimisation. The exact tests
therefore replace every reparameterised Normal sample by its mean, in this process
(``monkeypatch``) and in the spawned ones (a ``sitecustomize`` on their ``PYTHONPATH``); every
other part (sharding, plate scaling, gradient all-reduce, optimiser, stages, validation,
early stopping, rank-0 outputs) runs as in production.
"""

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_livi.cli import main
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.data.loader import MinibatchLoader
from pyro_livi.errors import InputError
from pyro_livi.infer.distributed import SHARD_SCALE, ShardedLoader, _scaled, shard_of_step
from pyro_livi.infer.elbo import elbo_terms
from pyro_livi.run import build_model, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN_SAMPLES = '''import torch

def _mean_rsample(self, sample_shape=torch.Size()):
    return self.loc.expand(self._extended_shape(sample_shape))

torch.distributions.Normal.rsample = _mean_rsample
'''
TINY = ["--model", "livi", "--donor-key", "donor", "--n-cell-state", "3", "--n-dxc", "2", "--n-persistent", "1",
        "--encoder-hidden", "8", "--epochs-vae", "3", "--epochs", "4", "--patience", "2", "--batch-size", "63",
        "--train-size", "0.8", "--lr", "0.01", "--seed", "3"]


def _mean_rsample(self, sample_shape=torch.Size()):
    return self.loc.expand(self._extended_shape(sample_shape))


def _tiny_h5ad(folder, n_cells=200, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"donor": [f"d{i % 10}" for i in range(n_cells)]}, index=[f"c{i}" for i in range(n_cells)])
    x = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32) + 1
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs)
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    path = folder / "tiny.h5ad"
    adata.write_h5ad(path)
    return path


def _deterministic_children(tmp_path, monkeypatch):
    """Guide samples are their means here and in the processes started from here."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(MEAN_SAMPLES)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    monkeypatch.setattr(torch.distributions.Normal, "rsample", _mean_rsample)


# ------------------------------------------------------------------------------ shards
@pytest.mark.parametrize("n_cells,batch,world", [(200, 63, 2), (200, 63, 3), (10, 4, 3), (65, 32, 4), (7, 7, 8)])
def test_shards_are_disjoint_and_their_union_is_the_single_process_minibatch(n_cells, batch, world):
    class Cells:  # the loader needs only n_cells and batch()
        def __init__(self, n):
            self.n_cells, self.source = n, "<cells>"

        def batch(self, positions):
            from pyro_livi.data.batch import Batch
            return Batch(index=torch.as_tensor(positions), n_cells=self.n_cells, x={}, size_factor={}, present={},
                         donor=None, covariates=torch.zeros(len(positions), 0, dtype=torch.long))

    cells = Cells(n_cells)
    single = MinibatchLoader(cells, batch_size=batch, shuffle=True, seed=5)
    ranks = [ShardedLoader(cells, batch, rank, world, shuffle=True, seed=5) for rank in range(world)]
    for epoch in (0, 1, 4):
        single.set_epoch(epoch)
        for loader in ranks:
            loader.set_epoch(epoch)
        steps = [list(loader) for loader in ranks]
        assert all(len(s) == len(single) for s in steps)  # the same number of steps on every rank
        for k, whole in enumerate(single):
            parts = [s[k] for s in steps]
            real = [p for p in parts if p.extra[SHARD_SCALE] > 0]
            joined = torch.cat([p.index for p in real])
            assert torch.equal(joined, whole.index)  # disjoint, in order, union = the minibatch
            sizes = [p.size for p in real]
            assert max(sizes) - min(sizes) <= 1
            # each factor b_r W / B turns the plate's N / b_r into N W / B
            for p in real:
                assert p.extra[SHARD_SCALE] == pytest.approx(p.size * world / whole.size)
            assert len(parts) - len(real) == max(0, world - whole.size)  # padded ranks only when B < W
            assert all(p.size == 1 for p in parts if p.extra[SHARD_SCALE] == 0)
    first = [pos for loader in ranks for pos, f in loader.shards(0) if f > 0]
    assert sorted(np.concatenate(first).tolist()) == list(range(n_cells))  # each cell once per epoch
    with pytest.raises(InputError, match="rank"):
        ShardedLoader(cells, batch, world, world)


def test_shard_of_step_pads_a_rank_without_cells_with_weight_zero():
    step = np.array([7, 3])
    assert [shard_of_step(step, r, 3)[1] for r in range(3)] == [1.5, 1.5, 0.0]
    assert shard_of_step(step, 2, 3)[0].tolist() == [7]


# ------------------------------------------------------------------ the ELBO's scaling
@pytest.mark.parametrize("step_size,world", [(8, 2), (7, 3), (2, 3)])
def test_rank_average_of_rescaled_shards_equals_the_global_minibatch(monkeypatch, tmp_path, step_size, world):
    """Per step: the mean over ranks of the shards' loss terms and gradients equals one process's
    terms and gradients on the whole minibatch (even, uneven, and fewer cells than ranks)."""
    monkeypatch.setattr(torch.distributions.Normal, "rsample", _mean_rsample)
    spec = DatasetSpec(modalities={"rna": None}, donor_key="donor")
    dataset = read_dataset(str(_tiny_h5ad(tmp_path, n_cells=40)), spec)
    torch.manual_seed(0)
    net = build_model("livi", dataset, n_cell_state=3, n_dxc=2, n_persistent=1, encoder_hidden=(8,))
    net.components = set(net.components_all)  # cell-plate sites and the donor-level sites D, V
    params = dict(net.named_parameters())
    step = np.random.default_rng(1).permutation(dataset.n_cells)[:step_size]

    def run(model, guide, batch):
        net.zero_grad(set_to_none=True)
        terms = elbo_terms(model, guide, batch)
        sum(terms.values()).backward()
        return ({k: v.item() for k, v in terms.items()},
                {n: p.grad.clone() for n, p in params.items() if p.grad is not None})

    one_terms, one_grads = run(net.model, net.guide, dataset.batch(step))
    mean_terms, mean_grads = {}, {}
    for rank in range(world):
        positions, factor = shard_of_step(step, rank, world)
        batch = dataset.batch(positions)
        batch.extra[SHARD_SCALE] = factor
        terms, grads = run(lambda *a, **k: _scaled(net.model, a, k), lambda *a, **k: _scaled(net.guide, a, k), batch)
        for key, value in terms.items():
            mean_terms[key] = mean_terms.get(key, 0.0) + value / world
        for name, g in grads.items():
            mean_grads[name] = mean_grads.get(name, 0.0) + g / world
    assert set(one_terms) == set(mean_terms) and {"nll_obs_rna", "kl_c", "kl_D", "kl_V"} <= set(one_terms)
    for key in one_terms:
        assert mean_terms[key] == pytest.approx(one_terms[key], rel=1e-5, abs=1e-4), key
    assert set(one_grads) == set(mean_grads)
    for name, g in one_grads.items():
        torch.testing.assert_close(mean_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    # without the rescaling the shards would be weighted by their own size: uneven shards differ
    if step_size % world:
        positions, _ = shard_of_step(step, 0, world)
        plain, _ = run(net.model, net.guide, dataset.batch(positions))
        assert plain["nll_obs_rna"] != pytest.approx(mean_terms["nll_obs_rna"], rel=1e-3)


# ------------------------------------------------------------------- two processes, gloo
def _tables(run_dir):
    return {p.name: p for p in sorted(run_dir.iterdir()) if p.is_file()}


def test_fit_nproc_2_writes_the_outputs_of_one_process(tmp_path, monkeypatch):
    """`pyro-livi fit --nproc 2` (gloo, 2 processes, global batch 63: shards 32/31, a last step of
    34 cells; 160 training and 40 validation cells; LIVI's VAE and donor stages with early
    stopping) writes what one process writes at the same seed and batch size: the same files,
    the same per-epoch loss terms and validation loss, tables and parameters to float tolerance."""
    _deterministic_children(tmp_path, monkeypatch)
    data = _tiny_h5ad(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["fit", "--data", str(data), *TINY, "--out", str(one)]) == 0
    assert main(["fit", "--data", str(data), *TINY, "--nproc", "2", "--out", str(two)]) == 0

    files_one, files_two = _tables(one), _tables(two)
    assert list(files_one) == list(files_two)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["checkpoint.pt"]  # rank 0 only
    assert json.loads((one / "run.json").read_text()) == json.loads((two / "run.json").read_text())

    h1 = pd.read_csv(one / "history.tsv", sep="\t")
    h2 = pd.read_csv(two / "history.tsv", sep="\t")
    assert list(h1.columns) == list(h2.columns) and len(h1) == len(h2) >= 5
    assert list(h1["stage"]) == list(h2["stage"]) == ["vae"] * 3 + ["donor"] * (len(h1) - 3)
    numeric = [c for c in h1.columns if c not in ("stage", "cells_per_s") and h1[c].dtype.kind == "f"]
    assert {"loss", "validation_loss", "nll_obs_rna", "kl_c"} <= set(numeric)
    for column in numeric:
        np.testing.assert_allclose(h2[column], h1[column], rtol=1e-5, atol=1e-5, err_msg=column)
    assert (h2["loss"].diff().abs().iloc[1:] > 1e-4).any()  # the loss moves: a trajectory, not a constant

    for name in files_one:
        if name.endswith(".tsv") and name != "history.tsv":
            t1 = pd.read_csv(one / name, sep="\t", index_col=0)
            t2 = pd.read_csv(two / name, sep="\t", index_col=0)
            pd.testing.assert_frame_equal(t2, t1, rtol=1e-4, atol=1e-5, obj=name)
    s1 = torch.load(one / "model.pt", weights_only=False)["state"]
    s2 = torch.load(two / "model.pt", weights_only=False)["state"]
    assert list(s1) == list(s2)
    for name in s1:
        torch.testing.assert_close(s2[name], s1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_nproc_is_checked_before_any_process_starts(tmp_path):
    with pytest.raises(InputError, match="nproc"):
        fit(str(tmp_path / "absent.h5ad"), nproc=0)
    with pytest.raises(InputError, match="n_latent"):
        fit(str(tmp_path / "absent.h5ad"), model="livi", n_latent=3, nproc=2)
    assert main(["fit", "--data", "x.h5ad", "--out", str(tmp_path / "o"), "--nproc", "0"]) != 0


# ----------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_stochastic_two_process_run_follows_the_single_process_run(tmp_path):
    """With the guide's Monte Carlo noise (each rank its own draws): the run completes with equal
    parameters on both ranks (checked by the trainer at the end) and its loss trajectory stays
    within Monte Carlo noise of one process's."""
    data = str(_tiny_h5ad(tmp_path, n_cells=400))
    kw = dict(model="livi", donor_key="donor", n_cell_state=3, n_dxc=2, n_persistent=1, encoder_hidden=(8,),
              epochs_vae=8, epochs=8, patience=None, batch_size=64, lr=0.01, seed=1, progress=False)
    one = fit(data, **kw).history
    two = fit(data, nproc=2, out=tmp_path / "two", **kw).history
    assert len(one) == len(two) == 16
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=0.02)
    assert two["loss"].iloc[-1] < two["loss"].iloc[0]


@pytest.mark.slow
def test_torchrun_launch_writes_the_outputs_of_one_process(tmp_path, monkeypatch):
    """`torchrun --standalone --nproc-per-node 2 -m pyro_livi.cli fit ...`: the processes find
    RANK/WORLD_SIZE in their environment and train together; same outputs as one process."""
    _deterministic_children(tmp_path, monkeypatch)
    data = _tiny_h5ad(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["fit", "--data", str(data), *TINY, "--out", str(one)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pyro_livi.cli", "fit", "--data", str(data), *TINY, "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fitted livi") == 1  # rank 0 reports
    h1 = pd.read_csv(one / "history.tsv", sep="\t")
    h2 = pd.read_csv(two / "history.tsv", sep="\t")
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-5)
    np.testing.assert_allclose(h2["validation_loss"], h1["validation_loss"], rtol=1e-5)
    d1 = pd.read_csv(one / "D.tsv", sep="\t", index_col=0)
    d2 = pd.read_csv(two / "D.tsv", sep="\t", index_col=0)
    pd.testing.assert_frame_equal(d2, d1, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_an_error_in_a_process_is_raised_in_the_caller(tmp_path):
    """Rank 0 refuses a run directory that holds another run: the caller gets the same
    RunDirectoryError, and the other process is stopped."""
    from pyro_livi.errors import RunDirectoryError

    data = str(_tiny_h5ad(tmp_path))
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    with pytest.raises(RunDirectoryError, match="already holds"):
        fit(data, model="livi", donor_key="donor", epochs=1, epochs_vae=1, progress=False, out=out, nproc=2)
