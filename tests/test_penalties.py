"""DMLIVI's alignment and disentanglement penalties on inputs with known answers."""

import numpy as np
import pytest
import torch

from pyro_livi.penalties import alignment_penalty, cross_correlation, disentanglement_penalty


def test_alignment_known_values():
    a = torch.randn(50, 6)
    assert alignment_penalty(a, a.clone()).item() == 0.0
    assert alignment_penalty(a, a + 2.0).item() == pytest.approx(4.0)  # ||2 * 1||^2 / K
    b = a.clone()
    b[:10] += 3.0  # only these cells differ
    mask = torch.zeros(50, dtype=torch.bool)
    mask[10:] = True
    assert alignment_penalty(a, b, mask).item() == 0.0
    assert alignment_penalty(a, b).item() == pytest.approx(9.0 * 10 / 50)
    assert alignment_penalty(a, b, torch.zeros(50, dtype=torch.bool)).item() == 0.0


def _orthogonal_columns(n, k, seed):
    """n x k matrix with centred, mutually orthogonal columns (exactly uncorrelated)."""
    x = np.random.default_rng(seed).normal(size=(n, k))
    x -= x.mean(0)
    q, _ = np.linalg.qr(x)
    return q * np.sqrt(n)


def test_disentanglement_perfect_and_zero_correlation():
    c = _orthogonal_columns(200, 4, 0)
    s = 3.0 * c[:, [1]] + 7.0  # an affine copy of one shared column
    value = disentanglement_penalty(torch.tensor(c), {"rna": torch.tensor(s)})
    assert value.item() == pytest.approx(1.0, abs=1e-6)
    both = _orthogonal_columns(200, 6, 1)  # c and s exactly uncorrelated
    value = disentanglement_penalty(torch.tensor(both[:, :4]), {"rna": torch.tensor(both[:, 4:])})
    assert value.item() == pytest.approx(0.0, abs=1e-10)
    # two modalities add up: 1 (perfect copy) + 2 (two anti-correlated copies)
    value = disentanglement_penalty(torch.tensor(c), {"rna": torch.tensor(s),
                                                      "prot": torch.tensor(-c[:, [0, 2]])})
    assert value.item() == pytest.approx(3.0, abs=1e-6)


def test_independent_columns_give_about_zero():
    g = torch.Generator().manual_seed(0)
    c, s = torch.randn(20_000, 5, generator=g), torch.randn(20_000, 2, generator=g)
    value = disentanglement_penalty(c, {"prot": s}).item()
    # each squared correlation of independent columns is about 1 / n
    assert 0 < value < 10 * 5 * 2 / 20_000


def test_cross_correlation_matches_numpy_with_mask():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    b[:, 0] += a[:, 1]
    mask = rng.random(40) < 0.7
    a_bad, b_bad = a.copy(), b.copy()
    a_bad[~mask] = 1e6  # cells outside the mask must not count
    b_bad[~mask] = -1e6
    corr = cross_correlation(torch.tensor(a_bad), torch.tensor(b_bad), torch.tensor(mask))
    expected = np.corrcoef(a[mask].T, b[mask].T)[:3, 3:]
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-6)


def test_constant_column_and_too_few_cells_are_finite():
    c = torch.randn(30, 3, requires_grad=True)
    s = torch.ones(30, 2)
    value = disentanglement_penalty(c, {"rna": s})
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(c.grad).all()
    one = torch.zeros(30, dtype=torch.bool)
    one[0] = True
    assert disentanglement_penalty(c, {"rna": torch.randn(30, 2)}, {"rna": one}).item() == 0.0
