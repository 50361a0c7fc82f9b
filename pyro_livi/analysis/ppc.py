"""Posterior predictive checks for every model of the zoo.

Replicated data come from the model's own observation sites ``obs_<modality>``:
``pyro.infer.Predictive`` runs the guide (which encodes each cell) and then the model with
``observed=False``, so each site draws new counts from its likelihood. Draws are made in chunks
of cells to bound memory. Latents outside the cell plate (donor factors) are drawn once per
replicate and shared by all chunks, so every replicate is one joint draw from the posterior
predictive distribution of all cells together.

Per feature, three statistics over cells compare observed and replicated data: the mean, the
variance (ddof = 1) and the fraction of zeros. For each feature and statistic T the posterior
predictive p-value is ppp = P(T_rep > T_obs) + 0.5 P(T_rep = T_obs) over replicates (the mid-p
value: for continuous statistics the fraction of replicates with T_rep >= T_obs; ties, common
for the fraction of zeros of a rare feature, count half). A model whose predictions look like
the data has ppp away from 0 and 1 for most features; ``ppp < 0.025`` means the observed
statistic is larger than the model predicts, ``ppp > 0.975`` smaller.
"""

from __future__ import annotations

import warnings

import arviz as az
import numpy as np
import pandas as pd
import pyro.poutine as poutine
import torch
from pyro.infer import Predictive
from pyro.poutine.subsample_messenger import _Subsample

from ..errors import InputError

__all__ = ["STATISTICS", "posterior_predictive", "feature_statistics", "ppc_table", "ppc_calibration"]

#: Per-feature statistics over cells, each mapping (..., cells, features) -> (..., features),
#: ignoring NaN (cells absent from a modality).
STATISTICS = {
    "mean": lambda x: np.nanmean(x, axis=-2),
    "variance": lambda x: np.nanvar(x, axis=-2, ddof=1),
    "zero_fraction": lambda x: np.nanmean(np.where(np.isnan(x), np.nan, x == 0), axis=-2),
}


def _site_roles(model, batch, cell_plate: str):
    """Names of the guide's latent sites outside / inside the cell plate, and the model's
    observation sites."""
    guide_trace = poutine.trace(model.guide).get_trace(batch, observed=False)
    global_sites, cell_sites = [], []
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or isinstance(site["fn"], _Subsample):
            continue
        in_cells = any(frame.name == cell_plate for frame in site["cond_indep_stack"])
        (cell_sites if in_cells else global_sites).append(name)
    model_trace = poutine.trace(model.model).get_trace(batch)
    obs_sites = [name for name, site in model_trace.nodes.items()
                 if site["type"] == "sample" and name.startswith("obs_") and site["is_observed"]]
    if not obs_sites:
        raise ValueError(f"{type(model).__name__}: the model has no observed 'obs_<modality>' site")
    return global_sites, cell_sites, obs_sites


@torch.no_grad()
def posterior_predictive(model, dataset, idx=None, *, num_samples: int = 20, batch_size: int = 256,
                         seed: int = 0, cell_plate: str = "cells") -> az.InferenceData:
    """Replicated data from the posterior predictive distribution, as ArviZ InferenceData.

    Parameters
    ----------
    model : zoo model with ``model(batch, observed=True)`` and ``guide(batch, observed=True)``.
    dataset : SingleCellDataset; ``idx`` selects cells (all when None).
    num_samples : int
        Replicates S (memory: S x cells x features values per modality).
    batch_size : int
        Cells per chunk.
    seed : int
        Seed of the draws (the global torch RNG state is restored afterwards).
    cell_plate : str
        Name of the models' cell plate.

    Returns
    -------
    arviz.InferenceData with groups ``observed_data`` and ``posterior_predictive``. One
    variable per observation site (``obs_<modality>``), dims ``("cell", "feature_<modality>")``
    (after ``("chain", "draw")`` in the posterior predictive; one chain of S draws), with cell
    ids and feature names as coordinates. Values are int32 counts when every value is an integer
    and every cell is measured in the modality; otherwise float32 with NaN for cells absent from
    the modality (``present`` False), which the statistics ignore.
    """
    from ..data.loader import MinibatchLoader

    if int(num_samples) < 1:
        raise InputError("<arguments>", "num_samples", f"must be >= 1, got {num_samples}",
                         "give the number of replicated data sets to draw, e.g. 20")
    cells = dataset if idx is None else dataset.subset(idx)
    if cells.n_cells == 0:
        raise InputError(dataset.source, "idx", "no cells to check", "give at least one cell")
    loader = MinibatchLoader(cells, batch_size=batch_size, shuffle=False)
    observed: dict[str, list] = {}
    replicated: dict[str, list] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            global_samples = None
            for batch in loader:
                if global_samples is None:
                    global_sites, _, obs_sites = _site_roles(model, batch, cell_plate)
                    global_samples = (Predictive(model.guide, num_samples=num_samples,
                                                 return_sites=global_sites)(batch, observed=False)
                                      if global_sites else {})
                if global_samples:
                    latents = Predictive(model.guide, posterior_samples=global_samples,
                                         return_sites=None)(batch, observed=False)
                else:
                    latents = Predictive(model.guide, num_samples=num_samples,
                                         return_sites=None)(batch, observed=False)
                draws = Predictive(model.model, posterior_samples=latents,
                                   return_sites=obs_sites)(batch, observed=False)
                for site in obs_sites:
                    modality = site[len("obs_"):]
                    present = batch.present[modality].numpy()
                    obs = batch.x[modality].numpy().astype(np.float32)
                    rep = draws[site].reshape(num_samples, *obs.shape).numpy().astype(np.float32)
                    obs[~present] = np.nan
                    rep[:, ~present] = np.nan
                    observed.setdefault(site, []).append(obs)
                    replicated.setdefault(site, []).append(rep)
    finally:
        model.train(was_training)

    coords = {"cell": np.asarray(cells.obs_names, dtype=str)}
    dims, obs_data, pp_data = {}, {}, {}
    for site in observed:
        modality = site[len("obs_"):]
        obs = np.concatenate(observed[site], axis=0)
        rep = np.concatenate(replicated[site], axis=1)
        if not np.isnan(obs).any() and np.all(obs == np.round(obs)) and np.all(rep == np.round(rep)):
            obs, rep = obs.astype(np.int32), rep.astype(np.int32)
        names = cells.feature_names.get(modality)
        feature_dim = f"feature_{modality}"
        coords[feature_dim] = (np.asarray(names, dtype=str) if names is not None
                               and len(names) == obs.shape[1] else np.arange(obs.shape[1]))
        dims[site] = ["cell", feature_dim]
        obs_data[site] = obs
        pp_data[site] = rep[None]
    return az.from_dict(posterior_predictive=pp_data, observed_data=obs_data, coords=coords, dims=dims)


def _mid_ppp(t_rep: np.ndarray, t_obs: np.ndarray) -> np.ndarray:
    """P(T_rep > T_obs) + 0.5 P(T_rep = T_obs) over the first axis (replicates)."""
    greater = (t_rep > t_obs).mean(axis=0)
    equal = (t_rep == t_obs).mean(axis=0)
    return greater + 0.5 * equal


def feature_statistics(idata: az.InferenceData, site: str, statistics=tuple(STATISTICS)) -> pd.DataFrame:
    """Per-feature statistics of one observation site, observed vs replicated.

    Returns a DataFrame indexed by feature with, for each statistic T in ``statistics`` (keys of
    :data:`STATISTICS`): ``T_obs``, ``T_rep_mean``, ``T_rep_sd``, ``T_rep_q025``,
    ``T_rep_q975`` (over replicates), ``T_ppp`` (mid-p posterior predictive p-value) and
    ``T_z`` = (T_obs - T_rep_mean) / T_rep_sd (0 where both the difference and the sd are 0).
    """
    obs = idata.observed_data[site]
    rep = idata.posterior_predictive[site]
    feature_dim = obs.dims[1]
    x_obs = obs.values.astype(np.float64)
    x_rep = rep.values.reshape(-1, *x_obs.shape).astype(np.float64)
    columns = {}
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # statistics of features without cells
        for name in statistics:
            fn = STATISTICS[name]
            t_obs, t_rep = fn(x_obs), fn(x_rep)
            sd = t_rep.std(axis=0, ddof=1) if t_rep.shape[0] > 1 else np.zeros_like(t_obs)
            diff = t_obs - t_rep.mean(axis=0)
            columns[f"{name}_obs"] = t_obs
            columns[f"{name}_rep_mean"] = t_rep.mean(axis=0)
            columns[f"{name}_rep_sd"] = sd
            columns[f"{name}_rep_q025"] = np.quantile(t_rep, 0.025, axis=0)
            columns[f"{name}_rep_q975"] = np.quantile(t_rep, 0.975, axis=0)
            columns[f"{name}_ppp"] = _mid_ppp(t_rep, t_obs)
            columns[f"{name}_z"] = np.where(diff == 0, 0.0, diff / sd)
    return pd.DataFrame(columns, index=pd.Index(obs.coords[feature_dim].values, name="feature"))


def ppc_table(idata: az.InferenceData, statistics=tuple(STATISTICS)) -> dict[str, pd.DataFrame]:
    """:func:`feature_statistics` of every observation site: ``{modality: table}``."""
    return {site[len("obs_"):]: feature_statistics(idata, site, statistics)
            for site in idata.observed_data.data_vars}


def ppc_calibration(tables: dict[str, pd.DataFrame], *, low: float = 0.025, high: float = 0.975) -> pd.DataFrame:
    """Calibration summary per modality and statistic.

    Columns: ``n_features``; ``frac_ppp_in_interval``, the fraction of features with
    ``low <= ppp <= high`` (near 1 when the model reproduces the statistic);
    ``frac_obs_above``, the fraction whose observed statistic lies above the predictions
    (``ppp < low``), and ``frac_obs_below``, below them (``ppp > high``); ``frac_ppp_low``
    and ``frac_ppp_high``, the same two fractions under their older names, which name the
    side of the p-value (``frac_ppp_low == frac_obs_above``); and
    ``calibration_error``, the median over features of |z| = |T_obs - E T_rep| / sd(T_rep),
    the distance of the observed statistic from its predictive distribution in predictive
    standard deviations (about 0.67 or less when the observed statistics look like draws from
    the predictive distribution; large when the model misses them). Features whose statistic
    is undefined (e.g. no cells) are left out.
    """
    rows = []
    for modality, table in tables.items():
        stats = sorted({c[: -len("_ppp")] for c in table.columns if c.endswith("_ppp")},
                       key=list(STATISTICS).index)
        for name in stats:
            ppp = table[f"{name}_ppp"]
            ok = table[f"{name}_obs"].notna() & ppp.notna()
            ppp = ppp[ok]
            z = table.loc[ok, f"{name}_z"].abs()
            rows.append({"modality": modality, "statistic": name, "n_features": int(ok.sum()),
                         "frac_ppp_in_interval": float(((ppp >= low) & (ppp <= high)).mean()),
                         "frac_obs_above": float((ppp < low).mean()),
                         "frac_obs_below": float((ppp > high).mean()),
                         "calibration_error": float(np.median(z)) if len(z) else float("nan"),
                         "frac_ppp_low": float((ppp < low).mean()),
                         "frac_ppp_high": float((ppp > high).mean())})
    return pd.DataFrame(rows).set_index(["modality", "statistic"])
