"""Gaussian product of experts against a numerical product of densities."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pyro_livi.poe import product_of_experts

GRID = np.linspace(-30, 30, 600_001)


def _grid_product(locs, scales, prior):
    """Mean and variance of the normalised product of 1-D normal densities on a fine grid."""
    log_density = sum(norm.logpdf(GRID, loc, scale) for loc, scale in zip(locs, scales))
    if prior:
        log_density = log_density + norm.logpdf(GRID, 0.0, 1.0)
    weights = np.exp(log_density - log_density.max())
    weights /= weights.sum()
    mean = (weights * GRID).sum()
    return mean, (weights * (GRID - mean) ** 2).sum()


@pytest.mark.parametrize("prior", [True, False])
def test_matches_numerical_product_of_densities(prior):
    rng = np.random.default_rng(0)
    E, B, K = 3, 2, 2
    locs = rng.normal(0, 2, size=(E, B, K))
    scales = rng.uniform(0.3, 2.5, size=(E, B, K))
    loc, scale = product_of_experts(torch.tensor(locs), torch.tensor(scales), prior_expert=prior)
    assert loc.shape == scale.shape == (B, K)
    for b in range(B):
        for k in range(K):
            mean, var = _grid_product(locs[:, b, k], scales[:, b, k], prior)
            assert loc[b, k].item() == pytest.approx(mean, abs=1e-6)
            assert scale[b, k].item() ** 2 == pytest.approx(var, rel=1e-5)


def test_mask_leaves_experts_out():
    rng = np.random.default_rng(1)
    locs = torch.tensor(rng.normal(size=(2, 4, 3)))
    scales = torch.tensor(rng.uniform(0.5, 2.0, size=(2, 4, 3)))
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]])
    locs_nan, scales_nan = locs.clone(), scales.clone()
    locs_nan[1, ~mask[1]] = float("nan")  # a left-out expert may hold anything
    scales_nan[1, ~mask[1]] = float("nan")
    loc, scale = product_of_experts(locs_nan, scales_nan, mask)
    only_first = product_of_experts(locs[:1], scales[:1])
    both = product_of_experts(locs, scales)
    for b in range(4):
        expected = only_first if not mask[1, b] else both
        torch.testing.assert_close(loc[b], expected[0][b])
        torch.testing.assert_close(scale[b], expected[1][b])
    # the RNA-only cell's posterior is the grid product of its one expert with the prior
    mean, var = _grid_product(locs[0, 1, :1].numpy(), scales[0, 1, :1].numpy(), prior=True)
    assert loc[1, 0].item() == pytest.approx(mean, abs=1e-6)
    assert scale[1, 0].item() ** 2 == pytest.approx(var, rel=1e-5)


def test_no_expert_gives_prior_or_an_error():
    locs, scales = torch.randn(2, 3, 4), torch.rand(2, 3, 4) + 0.1
    mask = torch.tensor([[True, False, True], [False, False, True]])
    loc, scale = product_of_experts(locs, scales, mask)
    torch.testing.assert_close(loc[1], torch.zeros(4))
    torch.testing.assert_close(scale[1], torch.ones(4))
    with pytest.raises(ValueError, match="no available expert"):
        product_of_experts(locs, scales, mask, prior_expert=False)


def test_single_expert_without_prior_is_itself():
    locs, scales = torch.randn(1, 5, 2), torch.rand(1, 5, 2) + 0.1
    loc, scale = product_of_experts(locs, scales, prior_expert=False)
    torch.testing.assert_close(loc, locs[0])
    torch.testing.assert_close(scale, scales[0])


def test_gradients_are_finite_and_shapes_checked():
    locs = torch.randn(2, 3, 4, requires_grad=True)
    scales = (torch.rand(2, 3, 4) + 0.1).requires_grad_()
    mask = torch.tensor([[True, False, True], [True, True, False]])
    loc, scale = product_of_experts(locs, scales, mask)
    (loc.sum() + scale.sum()).backward()
    assert torch.isfinite(locs.grad).all() and torch.isfinite(scales.grad).all()
    assert (locs.grad[1, 2] == 0).all()  # a left-out expert gets no gradient
    with pytest.raises(ValueError, match="shape"):
        product_of_experts(locs[0], scales[0])
    with pytest.raises(ValueError, match="mask"):
        product_of_experts(locs, scales, mask[:, :2])
