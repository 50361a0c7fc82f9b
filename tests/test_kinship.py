"""Kinship: computed from genotypes (closed form), read from files, validated."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pyro_livi.data.kinship import (
    KinshipAccumulator,
    align_kinship,
    gower_factor,
    kinship_from_blocks,
    kinship_from_genotypes,
    read_kinship,
    validate_kinship,
)
from pyro_livi.errors import InputError


@pytest.fixture
def G():
    rng = np.random.default_rng(1)
    g = rng.binomial(2, rng.uniform(0.1, 0.5, 40), size=(12, 40)).astype(float)
    g[:, 5] = 1.0                      # zero variance: skipped
    g[3, 7] = np.nan                   # missing: mean-imputed
    return g


def _by_hand(G):
    G = G.copy()
    col_mean = np.nanmean(G, axis=0)
    G = np.where(np.isnan(G), col_mean, G)
    sd = G.std(axis=0)
    keep = sd > 0
    Z = (G[:, keep] - G[:, keep].mean(axis=0)) / sd[keep]
    K = Z @ Z.T / keep.sum()
    n = K.shape[0]
    return K * (n - 1) / (np.trace(K) - np.ones(n) @ K @ np.ones(n) / n)


def test_kinship_matches_closed_form(G):
    K = kinship_from_genotypes(G)
    np.testing.assert_allclose(K, _by_hand(G), rtol=1e-12, atol=1e-12)
    n = K.shape[0]
    # Gower-normalised: mean sample variance of N(0, K) is 1
    assert (np.trace(K) - K.sum() / n) / (n - 1) == pytest.approx(1.0)
    assert gower_factor(K) == pytest.approx(1.0)
    np.testing.assert_allclose(K, K.T)


def test_kinship_in_blocks_and_leave_out(G):
    K = kinship_from_genotypes(G, block_size=7)
    K2, rep = kinship_from_blocks([G[:, :15], G[:, 15:]], G.shape[0])
    np.testing.assert_allclose(K, K2, rtol=1e-12)
    assert rep == {"n_snps_used": 39, "n_snps_skipped": 1}
    total, part = KinshipAccumulator(12), KinshipAccumulator(12)
    total.add(G)
    part.add(G[:, 20:])
    np.testing.assert_allclose(total.without(part), _by_hand(G[:, :20]), rtol=1e-12,
                               atol=1e-12)


def test_kinship_needs_variable_snps():
    with pytest.raises(InputError, match="non-zero variance"):
        kinship_from_genotypes(np.ones((5, 3)))


def _frame(K, ids):
    return pd.DataFrame(K, index=ids, columns=ids)


def test_validate_kinship_errors(G):
    K = kinship_from_genotypes(G)
    ids = [f"d{i}" for i in range(12)]
    with pytest.raises(InputError, match="not square"):
        validate_kinship(pd.DataFrame(K[:, :11], index=ids, columns=ids[:11]), "k.tsv")
    with pytest.raises(InputError, match="row ids and column ids differ"):
        validate_kinship(pd.DataFrame(K, index=ids, columns=ids[:11] + ["zz"]), "k.tsv")
    bad = K.copy()
    bad[0, 1] += 0.1
    with pytest.raises(InputError, match="not symmetric") as err:
        validate_kinship(_frame(bad, ids), "k.tsv")
    assert "k.tsv" in str(err.value) and "'d0'" in str(err.value)
    w, V = np.linalg.eigh(K)
    w[0] = -0.5
    with pytest.raises(InputError, match="not positive semi-definite"):
        validate_kinship(_frame(V @ np.diag(w) @ V.T, ids), "k.tsv")
    nan = K.copy()
    nan[2, 2] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        validate_kinship(_frame(nan, ids), "k.tsv")


def test_validate_kinship_aligns_columns(G):
    K = kinship_from_genotypes(G)
    ids = [f"d{i}" for i in range(12)]
    shuffled = _frame(K, ids)[ids[::-1]]
    out = validate_kinship(shuffled, "k")
    np.testing.assert_allclose(out.to_numpy(), K)
    np.testing.assert_allclose(align_kinship(out, ["d3", "d1"]), K[np.ix_([3, 1], [3, 1])])
    with pytest.raises(InputError) as err:
        align_kinship(out, ["d3", "x9", "x8"], "k.tsv")
    assert "x9" in str(err.value) and "x8" in str(err.value)


@pytest.mark.parametrize("name,sep", [("k.tsv", "\t"), ("k.csv", ",")])
def test_read_kinship(tmp_path, G, name, sep):
    K = kinship_from_genotypes(G)
    ids = [str(1000 + i) for i in range(12)]      # numeric-looking ids stay strings
    path = tmp_path / name
    _frame(K, ids).to_csv(path, sep=sep)
    out = read_kinship(path, ["1005", "1000"])
    assert list(out.index) == ["1005", "1000"] and list(out.columns) == ["1005", "1000"]
    np.testing.assert_allclose(out.to_numpy(), K[np.ix_([5, 0], [5, 0])])
    with pytest.raises(InputError, match="missing from the kinship"):
        read_kinship(path, ["1000", "999"])
