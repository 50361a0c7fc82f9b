"""DMLIVI's latent penalties (seed 001, eq. 16-17; DESIGN section 5) as plain functions.

Both return a per-cell quantity (a mean over the minibatch's cells), in the reference's units:
a model multiplies it by its weight and by the number of cells before adding it to the
summed ELBO, exactly as LIVI does with its decoder penalties.
"""

from __future__ import annotations

import torch


def alignment_penalty(loc_a: torch.Tensor, loc_b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_align: mean over cells of ||loc_a - loc_b||^2 / K (eq. 16).

    loc_a, loc_b : (B, K) posterior means of two modalities' shared experts.
    mask : optional (B,) bool, the cells that have both modalities; others do not count.
    Returns a scalar; 0 when no cell counts.
    """
    if loc_a.shape != loc_b.shape or loc_a.dim() != 2:
        raise ValueError(f"expected two (B, K) tensors of one shape; got {tuple(loc_a.shape)} and "
                         f"{tuple(loc_b.shape)}")
    per_cell = (loc_a - loc_b).pow(2).mean(-1)
    if mask is None:
        return per_cell.mean()
    mask = mask.to(per_cell.dtype)
    return (per_cell * mask).sum() / mask.sum().clamp(min=1.0)


def _standardise(x: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """Columns of x (B, K) centred and scaled to unit variance over the weighted cells."""
    n = weights.sum()
    mean = (x * weights[:, None]).sum(0) / n
    centred = (x - mean) * weights[:, None]
    var = centred.pow(2).sum(0) / n
    return centred / torch.sqrt(var + eps)


def cross_correlation(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
                      eps: float = 1e-8) -> torch.Tensor:
    """Pearson cross-correlation matrix (K_a, K_b) between the columns of a (B, K_a) and
    b (B, K_b) over the cells in ``mask`` (B,) bool (default: all). A constant column gives 0."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected (B, K_a) and (B, K_b) tensors; got {tuple(a.shape)} and {tuple(b.shape)}")
    weights = a.new_ones(a.shape[0]) if mask is None else mask.to(a.dtype)
    n = weights.sum()
    if float(n) < 2:
        return a.new_zeros(a.shape[1], b.shape[1])
    return _standardise(a, weights, eps).T @ _standardise(b, weights, eps) / n


def disentanglement_penalty(shared: torch.Tensor, specific: dict[str, torch.Tensor],
                            masks: dict[str, torch.Tensor] | None = None, eps: float = 1e-8) -> torch.Tensor:
    """L_disent: sum over modalities m of the squared entries of the cross-correlation matrix
    between the standardised minibatch columns of ``shared`` (B, K) and ``specific[m]``
    (B, K_m), over the cells that have modality m (``masks[m]``, (B,) bool; default all).

    Between 0 (uncorrelated) and sum_m K * K_m; e.g. 1 for one shared and one specific column
    that are affine functions of each other.
    """
    masks = masks or {}
    total = shared.new_zeros(())
    for m, s in specific.items():
        total = total + cross_correlation(shared, s, masks.get(m), eps).pow(2).sum()
    return total
