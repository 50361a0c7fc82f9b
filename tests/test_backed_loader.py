"""Backed data at scale: the chunked, buffered shuffle, block reads from disk, the streaming
simulator, and ``fit(backed=True)``."""

from __future__ import annotations

import json
import tracemalloc
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_livi.data import MinibatchLoader, read_dataset
from pyro_livi.data.expression import SPAN_GAP_ROWS, _CountMatrix, _row_spans
from pyro_livi.data.loader import DEFAULT_CHUNK_SIZE, chunked_order
from pyro_livi.errors import InputError
from pyro_livi.infer.distributed import ShardedLoader
from pyro_livi.simulate import SimulationConfig, simulate, write_h5ad_streaming

SPEC = {"modalities": {"rna": None}, "donor_key": "donor"}
N_CELLS, N_GENES = 1003, 12


@pytest.fixture(scope="module")
def h5ad_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.poisson(0.4, size=(N_CELLS, N_GENES)).astype(np.float32)
    x[:, 0] += 1  # no empty cell
    obs = pd.DataFrame({"donor": [f"d{i // 50}" for i in range(N_CELLS)]},
                       index=[f"c{i}" for i in range(N_CELLS)])
    path = tmp_path_factory.mktemp("backed") / "cells.h5ad"
    ad.AnnData(X=sp.csr_matrix(x), obs=obs).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def backed(h5ad_path):
    return read_dataset(h5ad_path, SPEC, backed=True)


@pytest.fixture(scope="module")
def in_memory(h5ad_path):
    return read_dataset(h5ad_path, SPEC)


def epoch_indices(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return [b.index.numpy().copy() for b in loader]


# ----------------------------------------------------------------------------- the order


def test_chunked_order_is_a_permutation_of_whole_chunks_per_buffer():
    n, c, buf = 1003, 16, 128
    order = chunked_order(n, c, buf, np.random.default_rng(5))
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))
    chunk_of = order // c
    # buffers are consecutive runs of the shuffled chunk sequence: each buffer's cells are whole
    # chunks, except a chunk cut by a buffer boundary, whose two parts sit in adjacent buffers
    for s in range(0, n, buf):
        cells = order[s:s + buf]
        cut = [k for k in np.unique(chunk_of[s:s + buf])
               if not np.isin(np.arange(k * c, min(n, (k + 1) * c)), cells).all()]
        assert len(cut) <= 2  # at most the chunks at its two boundaries are shared
        # cells are shuffled inside the buffer: not grouped by chunk
        assert np.count_nonzero(np.diff(chunk_of[s:s + buf])) > len(np.unique(chunk_of[s:s + buf]))
    # the number of chunks that straddle buffers is at most one per boundary
    straddle = sum(len(set(chunk_of[s:s + buf]) & set(chunk_of[s + buf:s + 2 * buf]))
                   for s in range(0, n - buf, buf))
    assert straddle <= -(-n // buf) - 1


def test_backed_default_is_chunked_and_memory_default_unchanged(backed, in_memory):
    loader = MinibatchLoader(backed, batch_size=100, seed=3)
    assert loader.chunk_size == DEFAULT_CHUNK_SIZE and loader.buffered
    mem = MinibatchLoader(in_memory, batch_size=100, seed=3)
    assert mem.chunk_size == 1 and not mem.buffered
    for e in (0, 4):  # the in-memory order is the permutation it always was
        assert np.array_equal(mem.order(e), np.random.default_rng([3, e]).permutation(N_CELLS))
    assert not np.array_equal(loader.order(0), mem.order(0))


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_cell_once_per_epoch_and_same_order_for_same_seed_epoch(backed, drop_last):
    kw = dict(batch_size=64, seed=7, chunk_size=16, buffer_batches=3, drop_last=drop_last)
    a, b = MinibatchLoader(backed, **kw), MinibatchLoader(backed, **kw)
    assert len(a) == (N_CELLS // 64 if drop_last else -(-N_CELLS // 64))
    first = epoch_indices(a, 2)
    seen = np.concatenate(first)
    if drop_last:
        assert [x.size for x in first] == [64] * (N_CELLS // 64)
        assert np.array_equal(seen, a.order(2)[:seen.size])  # only the last partial batch is left out
        assert np.unique(seen).size == seen.size == (N_CELLS // 64) * 64
    else:
        assert np.array_equal(np.sort(seen), np.arange(N_CELLS))
    for x, y in zip(first, epoch_indices(b, 2), strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(np.concatenate(epoch_indices(a, 3)), seen)
    assert not np.array_equal(MinibatchLoader(backed, **{**kw, "seed": 8}).order(2), a.order(2))


def test_resumed_loader_sees_the_same_batches(backed):
    kw = dict(batch_size=50, seed=1, chunk_size=32, buffer_batches=4)
    loader = MinibatchLoader(backed, **kw)
    run = [epoch_indices(loader) for _ in range(3)]
    resumed = MinibatchLoader(backed, **kw)
    resumed.set_epoch(2)
    for x, y in zip(run[2], epoch_indices(resumed), strict=True):
        assert np.array_equal(x, y)


def test_backed_batches_equal_in_memory_batches_of_the_same_cells(backed, in_memory):
    kw = dict(batch_size=100, seed=2, chunk_size=24, buffer_batches=2)
    for a, b in zip(MinibatchLoader(backed, **kw), MinibatchLoader(in_memory, **kw), strict=True):
        assert torch.equal(a.index, b.index)
        assert torch.equal(a.x["rna"], b.x["rna"]) and torch.equal(a.donor, b.donor)
        assert torch.equal(a.size_factor["rna"], b.size_factor["rna"])
        ref = in_memory.batch(a.index.numpy())  # the rows of the cells it names
        assert torch.equal(a.x["rna"], ref.x["rna"])


def test_subset_of_backed_data_reads_the_right_rows(backed, in_memory):
    idx = np.random.default_rng(4).choice(N_CELLS, size=700, replace=False)  # a training split
    kw = dict(batch_size=128, seed=0, chunk_size=16, buffer_batches=2)
    for a, b in zip(MinibatchLoader(backed.subset(idx), **kw), MinibatchLoader(in_memory.subset(idx), **kw),
                    strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.x["rna"], b.x["rna"])


def test_buffers_stay_sparse_and_only_minibatches_become_dense(backed, monkeypatch):
    """One read per buffer, kept as CSR; every dense array made has at most batch_size rows."""
    loader = MinibatchLoader(backed, batch_size=40, seed=0, chunk_size=16, buffer_batches=5)
    blocks, dense_rows = [], []
    prefetch = type(backed).prefetch

    def spy_prefetch(self, idx):
        block = prefetch(self, idx)
        blocks.append(block)
        return block

    toarray = sp.csr_matrix.toarray

    def spy_toarray(self, *args, **kwargs):
        dense_rows.append(self.shape[0])
        return toarray(self, *args, **kwargs)

    def no_row_reads(self, rows):
        raise AssertionError("a buffered minibatch read rows of its own")

    monkeypatch.setattr(type(backed), "prefetch", spy_prefetch)
    monkeypatch.setattr(sp.csr_matrix, "toarray", spy_toarray)
    monkeypatch.setattr(_CountMatrix, "read", no_row_reads)
    batches = list(loader)
    assert len(blocks) == -(-N_CELLS // loader.buffer_cells)
    assert all(sp.issparse(b.matrices["rna"]) and b.matrices["rna"].format == "csr" for b in blocks)
    assert sum(len(b) for b in blocks) == N_CELLS
    assert dense_rows and max(dense_rows) <= 40
    assert all(b.x["rna"].shape == (b.size, N_GENES) for b in batches)


def test_block_reads_from_disk_equal_the_stored_rows(backed, in_memory):
    matrix = backed._matrices["rna"]
    stored = in_memory._matrices["rna"].matrix
    rng = np.random.default_rng(9)
    cases = [np.arange(0, 40), np.array([3]), np.array([0, N_CELLS - 1]),
             np.sort(rng.choice(N_CELLS, 300, replace=False)),  # runs with small and large gaps
             np.concatenate([np.arange(10, 30), np.arange(30 + SPAN_GAP_ROWS + 5, 80)])]
    for rows in cases:
        block = matrix.read_block(rows)
        assert sp.issparse(block) and (block != stored[rows]).nnz == 0
        assert np.array_equal(matrix.read(rows[::-1]), stored[rows[::-1]].toarray())
    spans = _row_spans(np.array([1, 2, 3, 3 + SPAN_GAP_ROWS + 1, 100]), SPAN_GAP_ROWS)
    assert spans.tolist() == [[1, 3 + SPAN_GAP_ROWS + 2], [100, 101]]


def test_sharded_loader_keeps_the_chunked_global_batches(backed):
    kw = dict(shuffle=True, seed=3, chunk_size=16, buffer_batches=2)
    single = MinibatchLoader(backed, batch_size=90, **kw)
    single.set_epoch(1)
    ranks = [ShardedLoader(backed, 90, r, 2, **kw) for r in range(2)]
    for loader in ranks:
        loader.set_epoch(1)
    for whole, *parts in zip(single, *ranks, strict=True):
        assert torch.equal(torch.cat([p.index for p in parts]), whole.index)
        assert torch.equal(torch.cat([p.x["rna"] for p in parts]), whole.x["rna"])


def test_bad_chunk_settings(backed):
    for kw in (dict(chunk_size=0), dict(buffer_batches=0), dict(chunk_size=2.5)):
        with pytest.raises(InputError, match="chunk_size|buffer_batches"):
            MinibatchLoader(backed, batch_size=10, **kw)


# -------------------------------------------------------------------------- the simulator


def small_config(**kw):
    return SimulationConfig(**{**dict(n_donors=6, cells_per_donor=1500.0, n_genes=30, n_snps=60, k_c=4, k_dxc=2,
                                      k_v=1, n_cell_types=3), **kw})


@pytest.mark.parametrize("vary", [True, False])
def test_streamed_dataset_equals_the_in_memory_simulation(tmp_path, vary):
    """write_simulation_streaming (and write_h5ad_streaming for the counts alone) write what
    write_simulation writes for the same config and seed: counts, genotypes and every truth table."""
    from bed_reader import open_bed

    from pyro_livi.simulate import write_simulation, write_simulation_streaming

    cfg = small_config(vary_cells_per_donor=vary)
    paths, info = write_simulation_streaming(tmp_path / "streamed", cfg, seed=11)
    counts_only = write_h5ad_streaming(tmp_path / "x.h5ad", cfg, seed=11)
    sim = simulate(cfg, seed=11)
    plain = write_simulation(sim, tmp_path / "plain")
    assert info["n_cells"] == counts_only["n_cells"] == sim.adata.n_obs > 4096 * 2  # several blocks, the last partial
    for path in (paths["expression"], counts_only["path"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streamed = ad.read_h5ad(path, backed="r")
        assert streamed.shape == sim.adata.shape and info["nnz"] == counts_only["nnz"] == sim.adata.X.nnz
        assert isinstance(streamed.X, ad.abc.CSRDataset) and streamed.X.group["indptr"].dtype == np.int64
        X = streamed.X[:]
        assert X.dtype == np.int32 and (X != sim.adata.X).nnz == 0
        pd.testing.assert_frame_equal(streamed.obs.copy(), sim.adata.obs)
        assert streamed.var_names.equals(sim.adata.var_names)
        assert json.loads(streamed.uns["simulation"]["config"]) == cfg.to_dict()
        # and it is valid input for the LIVI data spec, backed
        ds = read_dataset(path, SPEC, backed=True)
        assert ds.backed and len(ds.donor_index) == cfg.n_donors
    # the same files, and every truth table, the genotypes, README and config equal
    assert {k: p.relative_to(tmp_path / "streamed") for k, p in paths.items()} == \
        {k: p.relative_to(tmp_path / "plain") for k, p in plain.items()}
    tables = [k for k, p in plain.items() if p.suffix == ".tsv"]
    assert len(tables) == 9 and "cell_state" in tables
    for name in tables:
        pd.testing.assert_frame_equal(pd.read_csv(paths[name], sep="\t", index_col=None),
                                      pd.read_csv(plain[name], sep="\t", index_col=None), obj=name)
    with open_bed(paths["bed"], num_threads=1) as a, open_bed(plain["bed"], num_threads=1) as b:
        np.testing.assert_array_equal(a.read(dtype="int8"), b.read(dtype="int8"))
        for field in ("iid", "fid", "sid", "chromosome", "bp_position", "allele_1", "allele_2"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert paths["readme"].read_text() == plain["readme"].read_text()
    summary = json.loads(paths["config"].read_text())
    assert summary.pop("streamed") is True and summary == json.loads(plain["config"].read_text())


def test_streaming_memory_does_not_grow_with_cells(tmp_path):
    """The whole streamed dataset (counts, genotypes, truth with cell_state.tsv) in flat memory."""
    from pyro_livi.simulate import write_simulation_streaming

    peaks = []
    write_simulation_streaming(tmp_path / "warm", small_config(cells_per_donor=10.0))  # one-off imports
    for per_donor in (700.0, 5600.0):  # 4,200 and 33,600 cells: 2 and 9 blocks
        cfg = small_config(cells_per_donor=per_donor, vary_cells_per_donor=False)
        tracemalloc.start()
        write_simulation_streaming(tmp_path / f"m{per_donor}", cfg, seed=0)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # 8x the cells: an in-memory simulation would hold 8x the counts and cell states; here the
    # peak is one block
    assert peaks[1] < 1.3 * peaks[0], peaks


@pytest.mark.parametrize("writer", ["write_h5ad_streaming", "write_simulation_streaming"])
def test_streaming_refuses_proteins(tmp_path, writer):
    import pyro_livi.simulate as simulation

    with pytest.raises(InputError, match="n_proteins.*--n-proteins 0"):
        getattr(simulation, writer)(tmp_path / "p", small_config(n_proteins=5))
    assert not (tmp_path / "p").exists()  # refused before writing anything


# ------------------------------------------------------------------------------ fit, backed


def test_fit_backed_equals_in_memory_with_the_same_shuffle(h5ad_path, tmp_path, one_torch_thread):
    from pyro_livi.run import fit

    kw = dict(model="scvi", n_latent=2, n_hidden=8, epochs=2, patience=None, batch_size=128,
              progress=False, chunk_size=32, buffer_batches=2)
    a = fit(h5ad_path, backed=True, out=tmp_path / "run", **kw)
    b = fit(h5ad_path, **kw)
    assert a.dataset.backed and not b.dataset.backed
    pd.testing.assert_frame_equal(a.history.drop(columns="cells_per_s"), b.history.drop(columns="cells_per_s"))
    stored = json.loads((tmp_path / "run" / "run.json").read_text())
    assert stored["backed"] is True and stored["chunk_size"] == 32
    # resuming asks for the same reading settings
    from pyro_livi.errors import RunDirectoryError

    with pytest.raises(RunDirectoryError, match="chunk_size"):
        fit(h5ad_path, backed=True, out=tmp_path / "run", resume=True, **{**kw, "chunk_size": 64})


def test_defaults_spelled_out_resume_a_run_that_left_them_unset(h5ad_path, tmp_path, one_torch_thread):
    from pyro_livi.run import fit

    kw = dict(model="scvi", n_latent=2, n_hidden=8, epochs=1, patience=None, batch_size=128, progress=False)
    first = fit(h5ad_path, backed=True, out=tmp_path / "run", **kw)
    again = fit(h5ad_path, backed=True, out=tmp_path / "run", resume=True, chunk_size=DEFAULT_CHUNK_SIZE,
                buffer_batches=32, **kw)
    pd.testing.assert_frame_equal(again.history, first.history)
    stored = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "chunk_size" not in stored and "buffer_batches" not in stored


def test_cli_simulate_stream_then_fit_backed(tmp_path, one_torch_thread):
    from pyro_livi.cli import main

    sim = tmp_path / "sim"
    assert main(["simulate", "--stream", "--out", str(sim), "--seed", "4", "--n-donors", "8",
                 "--cells-per-donor", "60", "--n-genes", "40", "--n-snps", "50"]) == 0
    assert json.loads((sim / "truth" / "config.json").read_text())["streamed"] is True
    assert (sim / "genotypes.bed").is_file() and (sim / "truth" / "cell_state.tsv").is_file()
    run = tmp_path / "run"
    assert main(["fit", "--data", str(sim / "expression.h5ad"), "--donor-key", "donor", "--backed",
                 "--chunk-size", "16", "--buffer-batches", "2", "--batch-size", "64", "--epochs-vae", "1",
                 "--epochs", "1", "--n-cell-state", "3", "--n-dxc", "2", "--n-persistent", "1",
                 "--encoder-hidden", "8", "--threads", "1", "--out", str(run)]) == 0
    stored = json.loads((run / "run.json").read_text())
    assert stored["backed"] is True and stored["buffer_batches"] == 2
    latent = pd.read_csv(run / "cell_state.tsv", sep="\t", index_col=0)
    assert latent.shape[0] == json.loads((sim / "truth" / "config.json").read_text())["n_cells"]
    assert main(["simulate", "--stream", "--out", str(tmp_path / "p"), "--n-proteins", "3"]) == 2


def test_model_api_reads_backed_and_trains_with_chunks(h5ad_path, one_torch_thread):
    from pyro_livi.api import Model

    m = Model(str(h5ad_path), "scvi", backed=True, n_latent=2, n_hidden=8)
    assert m.dataset.backed
    history = m.train(max_epochs=1, batch_size=256, chunk_size=32, buffer_batches=2, progress=False)
    assert len(history) == 1 and m.get_latent_representation().shape == (N_CELLS, 2)


def test_backed_reading_of_a_layer_is_refused(tmp_path):
    """anndata loads the layers of a backed file into memory: asking for a layer with backed=True
    is an InputError naming the layer and the fix, not a silent in-memory read."""
    x = sp.csr_matrix(np.random.default_rng(0).poisson(1.0, size=(20, 5)).astype(np.float32))
    adata = ad.AnnData(X=np.log1p(x.toarray()), layers={"counts": x},
                       obs=pd.DataFrame({"donor": ["a", "b"] * 10}, index=[f"c{i}" for i in range(20)]))
    path = tmp_path / "layer.h5ad"
    adata.write_h5ad(path)
    spec = {"modalities": {"rna": "counts"}, "donor_key": "donor"}
    with pytest.raises(InputError, match=r"layer.h5ad: field 'adata.layers\['counts'\]'.*keeps only .X on disk.*"
                                         r"adata.X = adata.layers\['counts'\]"):
        read_dataset(path, spec, backed=True)
    assert not read_dataset(path, spec).backed  # in memory it reads as before
