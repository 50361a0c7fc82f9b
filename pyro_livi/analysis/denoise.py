"""Denoised values and posterior predictive samples of any model of the zoo, read from its
``obs_<modality>`` sites (the conventions of :mod:`.heldout`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import Independent

from ..data.loader import MinibatchLoader
from ..errors import InputError
from .heldout import replayed_model_trace


def _elementwise(fn):
    """The elementwise distribution under ``.mask``, ``.to_event`` and ``.expand`` wrappers."""
    while isinstance(fn, (MaskedDistribution, Independent, ExpandedDistribution)):
        fn = fn.base_dist
    return fn


def _denoised_mean(fn) -> torch.Tensor:
    """The expected value a user calls "denoised": the count mean ``mu`` of NB-type
    distributions (without the zero inflation, as scvi-tools), else the distribution's mean."""
    fn = _elementwise(fn)
    return fn.mu if hasattr(fn, "mu") else fn.mean


def _is_count(fn) -> bool:
    """Whether the observation distribution is over counts (NB-type or Poisson), whose means
    scale with the library size; Bernoulli and Normal sites do not."""
    fn = _elementwise(fn)
    return hasattr(fn, "mu") or hasattr(fn, "mu_fore") or isinstance(fn, torch.distributions.Poisson)


def _check_modality(model, dataset, modality):
    modality = modality or dataset.modalities[0]
    if modality not in dataset.modalities:
        raise InputError(dataset.source, "modality", f"unknown modality {modality!r}",
                         f"use one of {dataset.modalities}")
    return modality


@torch.no_grad()
def normalized_expression(model, dataset, *, modality: str | None = None, library_size: float | None = 1e4,
                          batch_size: int = 1024) -> pd.DataFrame:
    """Denoised values of ``modality`` (default: the first) for every cell of ``dataset``.

    Every latent is set to its posterior mean (the encoder's location, the donor point
    estimates), the model is replayed, and the ``obs_<modality>`` site's mean is read (for
    NB-type likelihoods the NB mean mu, as scvi-tools' ``get_normalized_expression``).
    ``library_size``: counts per cell the means of count likelihoods (NB-type, Poisson) are
    rescaled to (default 1e4); None keeps each cell's observed total. Continuous modalities
    and other likelihoods (e.g. ``bernoulli`` probabilities) are returned as modelled.

    Returns a DataFrame (cells x features) indexed by cell ids, columns feature names.
    """
    modality = _check_modality(model, dataset, modality)
    continuous = modality in dataset.spec.continuous_modalities
    parts = []
    was_training = model.training
    model.eval()
    try:
        for batch in MinibatchLoader(dataset, batch_size=batch_size, shuffle=False):
            trace = replayed_model_trace(model, batch)
            fn = trace.nodes[f"obs_{modality}"]["fn"]
            mean = _denoised_mean(fn).expand(batch.x[modality].shape)
            if library_size is not None and not continuous and _is_count(fn):
                mean = mean / batch.size_factor[modality][:, None] * float(library_size)
            parts.append(mean.cpu().numpy())
    finally:
        model.train(was_training)
    return pd.DataFrame(np.concatenate(parts), index=dataset.obs_names,
                        columns=pd.Index(dataset.feature_names[modality], name="feature"))


@torch.no_grad()
def predictive_samples(model, dataset, *, modality: str | None = None, n_samples: int = 1, seed: int = 0,
                       batch_size: int = 256) -> np.ndarray:
    """Posterior predictive samples of ``modality``: latents drawn from the guide, then
    ``obs_<modality>`` drawn from the model. Returns (n_samples, n_cells, n_features) float32;
    cells absent from the modality are NaN."""
    from pyro.infer import Predictive

    modality = _check_modality(model, dataset, modality)
    if int(n_samples) < 1:
        raise InputError("<arguments>", "n_samples", f"must be >= 1, got {n_samples}", "give a positive number")
    parts = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for batch in MinibatchLoader(dataset, batch_size=batch_size, shuffle=False):
                draws = Predictive(model.model, guide=model.guide, num_samples=int(n_samples),
                                   return_sites=[f"obs_{modality}"])(batch, observed=False)
                rep = draws[f"obs_{modality}"].reshape(int(n_samples), batch.size, -1).float().numpy()
                rep[:, ~batch.present[modality].numpy()] = np.nan
                parts.append(rep)
    finally:
        model.train(was_training)
    return np.concatenate(parts, axis=1)
