"""Gaussian product of experts: the joint posterior of a latent shared by several modalities.

Each expert e is a diagonal Gaussian N(loc_e, scale_e^2) over the same latent. Their product,
normalised, is again Gaussian (seed 001, appendix A.2, eq. 20-21), per dimension::

    precision = [1 +] sum_e mask_e / scale_e^2
    loc       = (sum_e mask_e * loc_e / scale_e^2) / precision
    scale     = precision^{-1/2}

The optional ``1`` is a standard-normal prior expert N(0, 1) (DESIGN section 5: it keeps the
precision positive and gives a cell with no measured modality the prior). Experts with
``mask_e = False`` (a modality the cell lacks) are left out of the product.
"""

from __future__ import annotations

import torch


def product_of_experts(
    locs: torch.Tensor,
    scales: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    prior_expert: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised product of diagonal Gaussian experts.

    Parameters
    ----------
    locs, scales : Tensor, shape (E, B, K)
        Mean and standard deviation of each of E experts for B cells and K latent dimensions
        (scales > 0).
    mask : BoolTensor, shape (E, B), optional
        Whether expert e is available for cell b; unavailable experts are left out (their
        locs and scales may be anything, even NaN). Default: every expert everywhere.
    prior_expert : bool
        Include a standard-normal expert N(0, I) (default). Without it, every cell needs at
        least one available expert.

    Returns
    -------
    (loc, scale) : Tensors of shape (B, K).
    """
    if locs.shape != scales.shape or locs.dim() != 3:
        raise ValueError(f"locs and scales must both have shape (E, B, K); got {tuple(locs.shape)} "
                         f"and {tuple(scales.shape)}")
    if mask is None:
        mask = torch.ones(locs.shape[:2], dtype=torch.bool, device=locs.device)
    if mask.shape != locs.shape[:2]:
        raise ValueError(f"mask must have shape (E, B) = {tuple(locs.shape[:2])}; got {tuple(mask.shape)}")
    keep = mask.to(torch.bool)[..., None]
    # where() rather than multiplication, so that NaN in a left-out expert cannot leak in
    precisions = torch.where(keep, scales.pow(-2), torch.zeros_like(scales))
    weighted = torch.where(keep, locs * precisions, torch.zeros_like(locs))
    precision = precisions.sum(0)
    if prior_expert:
        precision = precision + 1.0
    elif not bool(mask.any(0).all()):
        empty = torch.nonzero(~mask.any(0)).flatten()[:10].tolist()
        raise ValueError(f"cells {empty} have no available expert and there is no prior expert; "
                         "use prior_expert=True or give every cell at least one expert")
    return weighted.sum(0) / precision, precision.rsqrt()
