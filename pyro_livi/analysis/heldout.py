"""Reconstruction on held-out cells: per-feature negative log-likelihood from a model's own
observation sites.

Works for every model of the zoo through two conventions only: ``model.model(batch)`` and
``model.guide(batch)`` form a Pyro model/guide pair whose guide encodes the cells of the batch
(amortised), and each modality is observed at a site named ``obs_<modality>`` whose
distribution factorises over features (an elementwise distribution, possibly wrapped in
``.to_event``, ``.mask`` or ``.expand``).

The likelihood is read *before* any scaling: the cell plate's minibatch factor
``n_cells / batch_size`` and modality weights (``poutine.scale``) change the training loss, not
the likelihood of a cell, so ``Batch.n_cells`` and the batch size do not change the result.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import Independent

from ..errors import InputError

__all__ = ["split_cells", "heldout_nll", "nll_summary", "elementwise_log_prob", "posterior_mean",
           "replayed_model_trace"]


def split_cells(n_cells: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random train / held-out split of cell positions ``0..n_cells-1``.

    Returns ``(train, test)``, sorted int64 arrays that partition the cells; ``test`` holds
    ``round(test_fraction * n_cells)`` cells (at least one, and at least one cell is left for
    training). The split is a pure function of ``(n_cells, test_fraction, seed)``.
    """
    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or n_cells < 2:
        raise InputError("<arguments>", "n_cells", f"must be an integer >= 2, got {n_cells!r}",
                         "give the number of cells of the dataset (at least 2)")
    if not 0.0 < float(test_fraction) < 1.0:
        raise InputError("<arguments>", "test_fraction", f"must be in (0, 1), got {test_fraction}",
                         "give the fraction of cells to hold out, e.g. 0.2")
    n_test = min(max(int(round(float(test_fraction) * n_cells)), 1), int(n_cells) - 1)
    order = np.random.default_rng(seed).permutation(int(n_cells))
    return np.sort(order[n_test:]).astype(np.int64), np.sort(order[:n_test]).astype(np.int64)


class _PosteriorMean(Messenger):
    """Sets every unobserved sample site to the mean of its distribution (``fn.mean``).

    Used around a guide, it gives the plug-in posterior mean of every latent (the Gaussian
    location of an encoder, the point of a Delta guide). A site whose distribution has no
    analytic mean is sampled as usual.
    """

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or isinstance(msg["fn"], _Subsample):
            return
        try:
            msg["value"] = msg["fn"].mean
        except (NotImplementedError, AttributeError):
            pass


def posterior_mean(guide):
    """``guide`` with every latent set to its posterior mean (see :class:`_PosteriorMean`)."""
    return _PosteriorMean()(guide)


def replayed_model_trace(model, batch, guide=None):
    """The model's trace on ``batch`` with its latents taken from one run of ``guide``
    (default: the model's guide at the posterior means, :func:`posterior_mean`); the
    ``obs_<modality>`` nodes hold the observation distributions given those latents."""
    guide_trace = poutine.trace(guide or posterior_mean(model.guide)).get_trace(batch)
    return poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(batch)


def _as_mask(mask, event_ndim: int) -> torch.Tensor | None:
    """A site or MaskedDistribution mask aligned to elementwise values (event dims appended)."""
    if mask is None:
        return None
    if isinstance(mask, bool):
        return None if mask else torch.tensor(False)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    return mask.reshape(mask.shape + (1,) * event_ndim)


def elementwise_log_prob(site: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood of each observed element of a trace site, unscaled, with its mask.

    Unwraps ``MaskedDistribution`` (``.mask``), ``Independent`` (``.to_event``) and
    ``ExpandedDistribution`` (``.expand``) down to the elementwise distribution and evaluates
    its ``log_prob`` at the site's value.

    Returns
    -------
    log_prob : Tensor, the shape of ``site["value"]`` (e.g. (B, G))
        log p(x_ig) in nats.
    mask : BoolTensor, same shape
        False where the element is masked out (e.g. cells absent from the modality), by a
        ``.mask`` of the distribution or a ``poutine.mask`` of the site.

    Raises ValueError when the innermost distribution is not elementwise (non-empty
    ``event_shape``, e.g. a multinomial), where a per-feature likelihood is not defined.
    """
    fn, value = site["fn"], site["value"]
    mask = _as_mask(site.get("mask"), len(fn.event_shape))
    while True:
        if isinstance(fn, MaskedDistribution):
            inner = _as_mask(fn._mask, len(fn.event_shape))
            mask = inner if mask is None else (mask & inner if inner is not None else mask)
            fn = fn.base_dist
        elif isinstance(fn, (Independent, ExpandedDistribution)):
            fn = fn.base_dist
        else:
            break
    if len(fn.event_shape):
        raise ValueError(
            f"site {site['name']!r}: its distribution {type(fn).__name__} has event shape "
            f"{tuple(fn.event_shape)}, so it does not factorise over features and has no "
            "per-feature likelihood")
    log_prob = fn.log_prob(value)
    log_prob = log_prob.expand(torch.broadcast_shapes(log_prob.shape, value.shape))
    if mask is None:
        mask = torch.ones((), dtype=torch.bool)
    return log_prob, mask.expand(log_prob.shape)


def _observation_sites(trace) -> dict[str, dict]:
    return {name[len("obs_"):]: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and name.startswith("obs_") and site["is_observed"]}


@torch.no_grad()
def heldout_nll(model, dataset, idx=None, *, batch_size: int = 1024, n_samples: int = 0,
                seed: int = 0) -> dict[str, pd.Series]:
    """Mean negative log-likelihood per feature of each modality on the cells ``idx``.

    For each cell the guide encodes the cell's own data (amortised), the model is replayed with
    those latents, and each ``obs_<modality>`` site's elementwise likelihood is evaluated at the
    observed counts.

    Parameters
    ----------
    model : zoo model
        Has ``model(batch)`` and ``guide(batch)``; put in eval mode during the computation.
    dataset : SingleCellDataset
        Cells to evaluate; ``idx`` selects some of them (all when None).
    batch_size : int
        Cells per forward pass (does not change the result).
    n_samples : int
        0 (default): plug-in estimate, every latent at its posterior mean (the encoder's
        location for cell latents, the point estimate for donor latents), so the result is
        deterministic. S > 0: the expected NLL under the guide, E_q[-log p(x | z)], averaged
        over S posterior draws (the reconstruction term of the ELBO); it is additive over
        features, unlike -log E_q[p(x | z)].
    seed : int
        Seed of those draws (the global torch RNG state is restored afterwards).

    Returns
    -------
    dict of str to pandas.Series
        Modality -> Series over its features (index: feature names) of the NLL in nats per
        cell, averaged over the cells present in that modality. ``Series.attrs["n_cells"]``
        holds that number of cells. The sum over features is the NLL per cell.
    """
    from ..data.loader import MinibatchLoader

    cells = dataset if idx is None else dataset.subset(idx)
    if cells.n_cells == 0:
        raise InputError(dataset.source, "idx", "no cells to evaluate", "give at least one cell")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for batch in MinibatchLoader(cells, batch_size=batch_size, shuffle=False):
                draws = max(int(n_samples), 1)
                for _ in range(draws):
                    trace = replayed_model_trace(model, batch, model.guide if n_samples else None)
                    sites = _observation_sites(trace)
                    if not sites:
                        raise ValueError(f"{type(model).__name__}: the model has no observed "
                                         "'obs_<modality>' site")
                    for modality, site in sites.items():
                        log_prob, mask = elementwise_log_prob(site)
                        nll = torch.where(mask, -log_prob, torch.zeros_like(log_prob))
                        nll = nll.reshape(-1, nll.shape[-1]).double()
                        sums[modality] = sums.get(modality, 0) + nll.sum(0) / draws
                        n = mask.reshape(-1, mask.shape[-1]).sum(0).double()
                        counts[modality] = counts.get(modality, 0) + n / draws
    finally:
        model.train(was_training)
    out = {}
    for modality, total in sums.items():
        n = counts[modality].numpy()
        names = dataset.feature_names.get(modality) if hasattr(dataset, "feature_names") else None
        index = pd.Index(names if names is not None and len(names) == len(n) else range(len(n)),
                         name="feature")
        with np.errstate(invalid="ignore", divide="ignore"):
            series = pd.Series(total.numpy() / n, index=index, name=f"nll_{modality}")
        series.attrs["n_cells"] = int(round(float(n.max()))) if n.size else 0
        out[modality] = series
    return out


def nll_summary(nll: dict[str, pd.Series]) -> pd.DataFrame:
    """One row per modality: cells evaluated, features, NLL per cell (sum over features) and
    mean NLL per feature and cell, both in nats."""
    rows = []
    for modality, series in nll.items():
        rows.append({"modality": modality, "n_cells": series.attrs.get("n_cells"),
                     "n_features": len(series), "nll_per_cell": float(series.sum()),
                     "nll_per_feature": float(series.mean())})
    return pd.DataFrame(rows).set_index("modality")
