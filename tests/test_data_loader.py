"""MinibatchLoader: coverage, determinism in (seed, epoch), resumption."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_livi.data import Batch, MinibatchLoader, read_dataset
from pyro_livi.errors import InputError


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(0)
    n = 103
    x = rng.poisson(2.0, size=(n, 8)).astype(np.float32)
    x[:, 0] += 1
    obs = pd.DataFrame({"donor": [f"d{i % 7}" for i in range(n)]},
                       index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(X=sp.csr_matrix(x), obs=obs)
    return read_dataset(adata, {"modalities": {"rna": None}, "donor_key": "donor"})


def epoch_indices(loader) -> list[np.ndarray]:
    return [b.index.numpy().copy() for b in loader]


def test_every_cell_once_per_epoch(dataset):
    loader = MinibatchLoader(dataset, batch_size=10, seed=1)
    assert len(loader) == 11
    for _ in range(3):
        batches = list(loader)
        assert len(batches) == 11 and all(isinstance(b, Batch) for b in batches)
        assert [b.size for b in batches] == [10] * 10 + [3]
        seen = np.concatenate([b.index.numpy() for b in batches])
        assert np.array_equal(np.sort(seen), np.arange(dataset.n_cells))
        assert all(b.n_cells == dataset.n_cells for b in batches)


def test_batches_hold_the_rows_of_their_index(dataset):
    loader = MinibatchLoader(dataset, batch_size=16, seed=4)
    for b in loader:
        ref = dataset.batch(b.index.numpy())
        assert torch.equal(b.x["rna"], ref.x["rna"]) and torch.equal(b.donor, ref.donor)


def test_same_seed_and_epoch_same_order(dataset):
    a = MinibatchLoader(dataset, batch_size=20, seed=7)
    b = MinibatchLoader(dataset, batch_size=20, seed=7)
    a.set_epoch(5)
    b.set_epoch(5)
    for x, y in zip(epoch_indices(a), epoch_indices(b), strict=True):
        assert np.array_equal(x, y)


def test_different_epochs_and_seeds_differ(dataset):
    loader = MinibatchLoader(dataset, batch_size=20, seed=7)
    assert not np.array_equal(loader.order(0), loader.order(1))
    other = MinibatchLoader(dataset, batch_size=20, seed=8)
    assert not np.array_equal(loader.order(0), other.order(0))


def test_completed_pass_advances_epoch_and_resume_matches(dataset):
    loader = MinibatchLoader(dataset, batch_size=25, seed=3)
    run = [epoch_indices(loader) for _ in range(3)]  # epochs 0, 1, 2
    assert loader.epoch == 3
    assert not np.array_equal(np.concatenate(run[0]), np.concatenate(run[1]))
    resumed = MinibatchLoader(dataset, batch_size=25, seed=3)
    resumed.set_epoch(2)
    for x, y in zip(run[2], epoch_indices(resumed), strict=True):
        assert np.array_equal(x, y)
    # A pass left early does not advance the epoch.
    partial = MinibatchLoader(dataset, batch_size=25, seed=3)
    for _ in partial:
        break
    assert partial.epoch == 0


def test_no_shuffle_and_drop_last(dataset):
    loader = MinibatchLoader(dataset, batch_size=50, shuffle=False, drop_last=True)
    batches = epoch_indices(loader)
    assert len(loader) == 2 and len(batches) == 2
    assert np.array_equal(np.concatenate(batches), np.arange(100))


def test_bad_arguments(dataset):
    with pytest.raises(InputError, match="batch_size"):
        MinibatchLoader(dataset, batch_size=0)
    with pytest.raises(InputError, match="no batch at all"):
        MinibatchLoader(dataset, batch_size=500, drop_last=True)
    with pytest.raises(InputError, match="epoch"):
        MinibatchLoader(dataset).set_epoch(-1)


def test_a_shuffle_buffer_without_chunks_is_refused(dataset, tmp_path, capsys):
    """In memory the shuffle is cell-level (chunk_size 1) and has no buffer: a buffer size given
    there is refused rather than ignored, naming both flags; with chunks it is taken."""
    with pytest.raises(InputError, match="buffer_batches.*cell-level.*--chunk-size"):
        MinibatchLoader(dataset, batch_size=10, buffer_batches=4)
    with pytest.raises(InputError, match="buffer_batches"):
        MinibatchLoader(dataset, batch_size=10, chunk_size=1, buffer_batches=4)
    assert MinibatchLoader(dataset, batch_size=10, chunk_size=8, buffer_batches=4).buffer_cells == 40

    from pyro_livi.cli import main

    path = tmp_path / "x.h5ad"
    ad.AnnData(X=sp.csr_matrix(np.ones((20, 5), np.float32)),
               obs=pd.DataFrame(index=[f"c{i}" for i in range(20)])).write_h5ad(path)
    assert main(["fit", "--data", str(path), "--model", "scvi", "--epochs", "1", "--buffer-batches", "4",
                 "--out", str(tmp_path / "run")]) == 2
    assert "--buffer-batches" in capsys.readouterr().err
