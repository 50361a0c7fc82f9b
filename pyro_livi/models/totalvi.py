"""totalVI-like model of RNA and surface-protein counts (CITE-seq) with a per-cell protein
background (Gayoso et al. 2021, Nat Methods 18:272; seed 002 section 5.2; reference
implementation scvi-tools ``module/_totalvae.py``, ``nn/_base_components.py``).

Generative model, for cell n with RNA counts x_n (G genes), protein counts y_n (T proteins)
and batch s_n (the first categorical covariate; every covariate is injected, one-hot, into the
encoder and every decoder)::

    z_n        ~ Normal(0, I_K)                                       cell plate
    rho_n      = softmax(f_rho(z_n, s_n))                             RNA proportions
    x_ng       ~ NB(l_n rho_ng, theta_g)                              site obs_<rna> ("nb")
    log beta_nt ~ Normal(c_{t,s_n}, d_{t,s_n})                        per-cell background
    alpha_nt   = ReLU(f_alpha(z_n, s_n)) + 1 + 1e-8                   foreground multiplier >= 1
    pi_nt      = sigmoid(f_pi(z_n, s_n))                              P(background)
    y_nt       ~ pi_nt NB(beta_nt, phi_t) + (1 - pi_nt) NB(beta_nt alpha_nt, phi_t)
                                                                      site obs_<prot> ("nb_mixture_cell")

l_n is the observed total RNA count of the cell, or with ``latent_library=True`` a latent
log l_n ~ Normal(m_{s_n}, v_{s_n}) with the per-batch empirical mean and variance of log total
counts. c and d (``back_prior_loc``, ``back_prior_log_scale``, shape (n_batches, T), log-counts)
are learned and initialised from the data (:func:`protein_background_init`); a user-supplied
per-protein background prior mean (e.g. from empty droplets) replaces and fixes c.

Guide (amortised, mean field over sites, conditional within a cell)::

    q(z_n | x_n, y_n, s_n)       = Normal(mu, sigma)   MLP on [log1p x_n, log1p y_n], sigma^2 = exp(.) + 1e-4
    q(log l_n | x_n, y_n, s_n)   = Normal(.)           (latent_library only)
    q(log beta_n | z_n, s_n)     = Normal(a(z_n, s_n), softplus(b(z_n, s_n)) + 1e-8)   on the sampled z_n

Missing proteins: a cell absent from the protein modality (MuData membership,
``Batch.present``) and a protein absent from the panel of the cell's batch
(``protein_mask[s_n, t]`` False, from a user-given panel table, see :func:`read_protein_panel`)
are masked out of ``obs_<prot>`` and zeroed in the encoder input; the placeholder values in the
data are never read. Their background, foreground and mixing are still decoded from z_n, so the
model returns imputed values for them (:mod:`pyro_livi.analysis.totalvi_outputs`).

KL terms (``kl_z``, ``kl_log_beta``, ``kl_log_library``) are warmed up by the trainer
(:class:`~pyro_livi.infer.stages.KLWarmup`, :meth:`TOTALVI.default_stages`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch import nn

from ..data.batch import Batch
from ..errors import InputError
from ..infer.stages import EarlyStopping, KLWarmup, Stage
from ..likelihoods import get_likelihood
from ..nn import NORMS, FCLayers, one_hot_covariates
from ._base import DataNeeds, Option, ZooModel

BACKGROUND_INITS = ("per_protein", "pooled", "none")
#: background prior (c, log d) without a data-based initialisation
DEFAULT_BACKGROUND = (1.0, 0.0)
#: cells per batch drawn for the background initialisation
INIT_CELLS = 500


# ---------------------------------------------------------------------------------- data helpers
def read_protein_panel(panel, categories: Sequence[str], proteins: Sequence[str],
                       source: str = "protein_panel") -> np.ndarray:
    """The protein panel of every batch as a boolean matrix (n_batches, T).

    ``panel`` says which proteins were measured in each batch (each category of the batch
    covariate); a protein not measured in a batch is missing for that batch's cells (masked in
    the likelihood, never read as zeros). Accepted forms:

    - a ``pandas.DataFrame`` of booleans (or 0/1), rows = batch categories, columns = protein names;
    - a dict {batch category: list of measured protein names};
    - a path to a TSV file holding the DataFrame form (first column = batch category; values
      0/1 or true/false).

    Every batch category and every protein must appear. Raises InputError naming the missing
    or unknown batch / protein and the fix.
    """
    categories = [str(c) for c in categories]
    proteins = [str(p) for p in proteins]
    if isinstance(panel, (str, Path)):
        path = Path(panel)
        if not path.is_file():
            raise InputError(path, "<file>", "protein panel file not found",
                             "give a TSV with batch categories as rows and protein names as columns")
        source = str(path)
        panel = pd.read_csv(path, sep="\t", index_col=0)
        panel = panel.apply(lambda col: col.map(
            lambda v: str(v).strip().lower() in ("1", "true", "yes", "1.0")))
    if isinstance(panel, dict):
        known = set(proteins)
        for batch, measured in panel.items():
            unknown = sorted(set(map(str, measured)) - known)
            if unknown:
                raise InputError(source, f"[{batch!r}]", f"unknown proteins {unknown[:5]}",
                                 f"use protein names of the data, e.g. {proteins[:5]}")
        panel = pd.DataFrame({p: [p in set(map(str, panel[b])) for b in panel] for p in proteins},
                             index=[str(b) for b in panel])
    if not isinstance(panel, pd.DataFrame):
        raise InputError(source, "<panel>", f"expected a DataFrame, dict or TSV path, got {type(panel).__name__}",
                         "give batch categories x protein names booleans")
    panel = panel.copy()
    panel.index = panel.index.map(str)
    panel.columns = panel.columns.map(str)
    missing_rows = [c for c in categories if c not in panel.index]
    if missing_rows:
        raise InputError(source, "rows", f"no panel for batch categories {missing_rows[:5]}",
                         f"give one row per category of the batch covariate: {categories[:10]}")
    missing_cols = [p for p in proteins if p not in panel.columns]
    if missing_cols:
        raise InputError(source, "columns", f"no column for proteins {missing_cols[:5]}",
                         "give one column per protein of the data (True where measured)")
    mask = panel.loc[categories, proteins].to_numpy().astype(bool)
    return mask


def _lower_component(values: np.ndarray, seed: int) -> tuple[float, float] | None:
    """(mean, sd) of the lower component of a 2-component Gaussian mixture fitted to
    ``values`` (n,); None when there are fewer than two distinct values."""
    if values.size < 2 or np.unique(values).size < 2:
        return None
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=2, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gmm.fit(values[:, None])
    low = int(np.argmin(gmm.means_.ravel()))
    return float(gmm.means_.ravel()[low]), float(np.sqrt(gmm.covariances_.ravel()[low]))


def protein_background_init(counts: np.ndarray, codes: np.ndarray, n_batches: int,
                            mask: np.ndarray | None = None, how: str = "per_protein",
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Initial background prior (c, d), each (n_batches, T), in log counts.

    counts : (n, T) protein counts of a sample of cells; codes : (n,) batch code of each;
    mask : (n_batches, T) measured proteins (None: all).

    - ``"per_protein"`` (default here): for each batch and protein, a 2-component Gaussian
      mixture on log1p(counts) over the batch's cells; c = mean and d = sd of the lower
      component (d at least 0.05). A protein lacking two distinct values in a batch takes the
      median over the batch's other proteins.
    - ``"pooled"`` (scvi-tools' ``_get_totalvi_protein_priors``): for each of up to 100 cells of
      a batch, a 2-component mixture on log1p of the cell's protein vector; c = mean of the lower
      means, d = sqrt(sum sd^2) / n_cells, tiled over every protein.
    - ``"none"``: c = 1, d = 1.

    A protein never measured in a batch takes the mean of its values in the batches that
    measured it (it has no data there; the value only starts its prior).
    """
    n_proteins = counts.shape[1]
    loc = np.full((n_batches, n_proteins), DEFAULT_BACKGROUND[0])
    scale = np.full((n_batches, n_proteins), np.exp(DEFAULT_BACKGROUND[1]))
    if how not in BACKGROUND_INITS:
        raise ValueError(f"background_init must be one of {BACKGROUND_INITS}, got {how!r}")
    if how == "none" or counts.shape[0] == 0:
        return loc, scale
    mask = np.ones((n_batches, n_proteins), bool) if mask is None else np.asarray(mask, bool)
    logged = np.log1p(np.asarray(counts, dtype=np.float64))
    known = np.zeros((n_batches, n_proteins), bool)
    rng = np.random.default_rng(seed)
    for b in range(n_batches):
        rows = logged[codes == b]
        measured = np.flatnonzero(mask[b])
        if rows.shape[0] < 2 or measured.size == 0:
            continue
        if how == "per_protein":
            for t in measured:
                fit = _lower_component(rows[:, t], seed)
                if fit is not None:
                    loc[b, t], scale[b, t] = fit[0], max(fit[1], 0.05)
                    known[b, t] = True
            missing = measured[~known[b, measured]]
            if missing.size and known[b].any():
                loc[b, missing] = np.median(loc[b, known[b]])
                scale[b, missing] = np.median(scale[b, known[b]])
                known[b, missing] = True
        else:
            if measured.size < 2:
                continue
            cells = rows[rng.choice(rows.shape[0], size=min(100, rows.shape[0]), replace=False)]
            fits = [_lower_component(c[measured], seed) or (0.0, 0.05) for c in cells]
            mus, sds = np.array([f[0] for f in fits]), np.array([f[1] for f in fits])
            loc[b, measured] = mus.mean()
            scale[b, measured] = max(np.sqrt(np.sum(sds ** 2)) / len(fits), 1e-3)
            known[b, measured] = True
    for t in range(n_proteins):
        rows = known[:, t]
        if rows.any() and not rows.all():
            loc[~rows, t] = loc[rows, t].mean()
            scale[~rows, t] = scale[rows, t].mean()
    return loc, scale


# -------------------------------------------------------------------------------------- model
class TOTALVI(ZooModel):
    """totalVI-like VAE of RNA and protein counts as an explicit Pyro model/guide pair (see the
    module docstring for the equations).

    Parameters
    ----------
    n_genes, n_proteins : G and T.
    n_covariate_categories : categories of each categorical covariate; the first is the batch
        s_n of the background prior, the protein panel and the latent library prior.
    batch_categories : names of the batch categories (rows of ``protein_mask``; used in tables).
    n_latent : K, dimension of z (totalVI: 20).
    n_hidden : width of every hidden layer (256).
    n_layers_encoder, n_layers_decoder : hidden layers of the encoder (2) and of each decoder (1).
    dropout_rate : dropout in encoder and decoders (0.2, as scvi-tools).
    norm : "batch" (scvi-tools), "layer" or "none".
    latent_library : latent LogNormal RNA library size with a per-batch empirical prior
        (``library_log_means``/``library_log_vars``, each (n_batches,)) instead of the observed
        total count.
    likelihoods : {modality: registered likelihood name}; default ``nb`` for RNA and
        ``nb_mixture_cell`` for proteins. A protein likelihood with cell heads
        ``log_background``/``mix_logits`` gets the model's own per-cell values and the
        foreground excess beta (alpha - 1) as ``mean``; any other gets the mixture's mean
        pi beta + (1 - pi) beta alpha.
    modalities : (RNA name, protein name); sites ``obs_<name>``.
    protein_mask : (n_batches, T) booleans, True where a protein is measured in a batch
        (None: all measured).
    background_prior_mean : optional (T,) background prior mean per protein, in counts; sets
        c_{t,s} = log(value) for every batch and keeps it fixed (only d is learned).
    background_loc_init, background_scale_init : (n_batches, T) initial c and d (log counts);
        not part of ``config`` (they are parameters, saved with the state).
    counts_sample : {modality: (n, features) counts} for data-based likelihood initialisation.
    """

    summary = ("totalVI-like: RNA + protein counts, per-cell latent protein background, NB mixture, "
               "missing proteins masked")
    reference = "seed 002 section 5.2; Gayoso et al. 2021 (totalVI); scvi-tools TOTALVI"
    data_needs = DataNeeds(modalities=(2, 2), inputs="counts", donors="unused", missing_modalities=True)
    options = {
        "n_latent": Option(20, "K, dimension of the latent z", type=int, at_least=1),
        "n_hidden": Option(256, "width of the hidden layers", type=int, at_least=1),
        "n_layers_encoder": Option(2, "hidden layers of the encoder", type=int, at_least=1),
        "n_layers_decoder": Option(1, "hidden layers of each decoder", type=int, at_least=1),
        "dropout_rate": Option(0.2, "dropout probability in encoder and decoders", type=float, at_least=0,
                               below=1),
        "norm": Option("batch", "normalisation of the hidden layers", choices=NORMS),
        "latent_library": Option(False, "latent LogNormal RNA library size with a per-batch empirical "
                                 "prior (default: the observed total count)"),
        "background_init": Option("per_protein", "initial protein background prior: per protein and "
                                  "batch, pooled over proteins (scvi-tools), or none", choices=BACKGROUND_INITS),
        "background_prior_mean": Option(None, "fixed background prior mean of each protein, in counts, "
                                        "in the order of the protein features (e.g. from empty droplets)",
                                        type=float, nargs="+", above=0),
        "protein_panel": Option(None, "TSV of measured proteins per batch (rows: categories of the "
                                "first covariate key, columns: protein names, 1/0); unmeasured "
                                "proteins are missing for that batch's cells", type=str),
        "kl_warmup_factor": Option(0.75, "KL warm-up length: factor x n_cells optimiser steps with "
                                   "--n-cells, else factor x epochs", type=float, schedule=True, at_least=0),
        "n_cells": Option(None, "cells in the training data, for totalVI's warm-up of "
                          "kl_warmup_factor x n_cells steps", type=int, schedule=True, at_least=1),
    }
    outputs = ("latent", "dispersions", "protein_foreground")
    latent_name = "latent"
    latent_site = "z"

    def __init__(self, n_genes: int, n_proteins: int, *, n_covariate_categories: Sequence[int] = (),
                 batch_categories: Sequence[str] | None = None, n_latent: int = 20, n_hidden: int = 256,
                 n_layers_encoder: int = 2, n_layers_decoder: int = 1, dropout_rate: float = 0.2,
                 norm: str = "batch", latent_library: bool = False, library_log_means=None,
                 library_log_vars=None, likelihoods: dict | None = None,
                 modalities: Sequence[str] = ("rna", "prot"), protein_mask=None,
                 background_prior_mean=None, background_init: str = "per_protein",
                 background_loc_init=None, background_scale_init=None, counts_sample=None,
                 name: str | None = None):
        super().__init__(name=name)
        if n_layers_encoder < 1 or n_layers_decoder < 1:
            raise ValueError("TOTALVI needs at least one hidden layer in the encoder and each decoder")
        rna, prot = modalities
        self.n_categories = [int(n) for n in n_covariate_categories]
        n_batches = self.n_categories[0] if self.n_categories else 1
        batch_categories = [str(c) for c in batch_categories] if batch_categories is not None else \
            [f"b{k}" for k in range(n_batches)]
        if len(batch_categories) != n_batches:
            raise ValueError(f"batch_categories has {len(batch_categories)} names for {n_batches} batches")
        lik_names = {rna: "nb", prot: "nb_mixture_cell", **(likelihoods or {})}
        lik_names = {m: (v if isinstance(v, str) else v.name) for m, v in lik_names.items()}
        if protein_mask is not None:
            protein_mask = np.asarray(protein_mask, dtype=bool)
            if protein_mask.shape != (n_batches, n_proteins):
                raise ValueError(f"protein_mask must have shape ({n_batches}, {n_proteins}), got "
                                 f"{protein_mask.shape}")
        if background_prior_mean is not None:
            background_prior_mean = np.asarray(background_prior_mean, dtype=float).ravel()
            if background_prior_mean.shape != (n_proteins,) or np.any(background_prior_mean <= 0):
                raise ValueError(f"background_prior_mean must hold {n_proteins} positive counts, one "
                                 f"per protein; got shape {background_prior_mean.shape}")
        self.config = dict(
            n_genes=n_genes, n_proteins=n_proteins, n_covariate_categories=list(self.n_categories),
            batch_categories=batch_categories, n_latent=n_latent, n_hidden=n_hidden,
            n_layers_encoder=n_layers_encoder, n_layers_decoder=n_layers_decoder, dropout_rate=dropout_rate,
            norm=norm, latent_library=bool(latent_library),
            library_log_means=None if library_log_means is None else [float(v) for v in library_log_means],
            library_log_vars=None if library_log_vars is None else [float(v) for v in library_log_vars],
            likelihoods=dict(lik_names), modalities=[rna, prot],
            protein_mask=None if protein_mask is None else protein_mask.tolist(),
            background_prior_mean=None if background_prior_mean is None else background_prior_mean.tolist(),
            background_init=background_init)
        self.modalities = (rna, prot)
        self.n_latent, self.n_genes, self.n_proteins = n_latent, n_genes, n_proteins
        self.batch_categories = batch_categories
        self.latent_library = bool(latent_library)
        n_cov = sum(self.n_categories)
        enc_hidden, dec_hidden = [n_hidden] * n_layers_encoder, [n_hidden] * n_layers_decoder
        skip = n_hidden + n_latent + n_cov  # decoder heads read [hidden, z, covariates]

        # inference networks
        self.encoder = FCLayers(n_genes + n_proteins, enc_hidden, n_cov, norm, dropout_rate)
        self.z_loc = PyroModule[nn.Linear](n_hidden, n_latent)
        self.z_log_var = PyroModule[nn.Linear](n_hidden, n_latent)
        if self.latent_library:
            if library_log_means is None or library_log_vars is None:
                raise ValueError("latent_library needs library_log_means and library_log_vars (per batch)")
            self.library_encoder = FCLayers(n_genes + n_proteins, [n_hidden], n_cov, norm, dropout_rate)
            self.library_loc = PyroModule[nn.Linear](n_hidden, 1)
            self.library_log_var = PyroModule[nn.Linear](n_hidden, 1)
            self.register_buffer("library_prior_loc", torch.as_tensor(library_log_means, dtype=torch.float32))
            self.register_buffer("library_prior_scale",
                                 torch.as_tensor(library_log_vars, dtype=torch.float32).clamp(min=1e-4).sqrt())
        self.background_body = FCLayers(n_latent, dec_hidden, n_cov, norm, dropout_rate)
        self.background_loc = PyroModule[nn.Linear](skip, n_proteins)
        self.background_scale = PyroModule[nn.Linear](skip, n_proteins)

        # generative networks
        self.rna_body = FCLayers(n_latent, dec_hidden, n_cov, norm, dropout_rate)
        self.rho_head = PyroModule[nn.Linear](skip, n_genes)
        self.foreground_body = FCLayers(n_latent, dec_hidden, n_cov, norm, dropout_rate)
        self.foreground_head = PyroModule[nn.Linear](skip, n_proteins)
        self.mixing_body = FCLayers(n_latent, dec_hidden, n_cov, norm, dropout_rate)
        self.mixing_head = PyroModule[nn.Linear](skip, n_proteins)

        # background prior c, d per batch and protein
        loc0 = np.full((n_batches, n_proteins), DEFAULT_BACKGROUND[0]) if background_loc_init is None \
            else np.asarray(background_loc_init, dtype=float)
        scale0 = np.full((n_batches, n_proteins), np.exp(DEFAULT_BACKGROUND[1])) if background_scale_init is None \
            else np.asarray(background_scale_init, dtype=float)
        self.back_prior_log_scale = PyroParam(torch.as_tensor(np.log(scale0), dtype=torch.float32))
        if background_prior_mean is not None:
            fixed = np.log(np.broadcast_to(background_prior_mean, (n_batches, n_proteins)))
            self.register_buffer("back_prior_loc", torch.as_tensor(fixed, dtype=torch.float32))
        else:
            self.back_prior_loc = PyroParam(torch.as_tensor(loc0, dtype=torch.float32))
        mask = np.ones((n_batches, n_proteins), bool) if protein_mask is None else protein_mask
        self.register_buffer("protein_mask", torch.as_tensor(mask, dtype=torch.bool))
        self._panel_complete = bool(mask.all())

        # observation models
        counts_sample = counts_sample or {}
        self.likelihoods = {m: get_likelihood(n) for m, n in lik_names.items()}
        self._init_likelihood_params(rna, n_genes, skip, counts_sample.get(rna))
        lik = self.likelihoods[prot]
        for pname, init in lik.init_feature_params(n_proteins, counts_sample.get(prot)).items():
            setattr(self, f"lik_{prot}_{pname}", PyroParam(torch.as_tensor(init, dtype=torch.float32)))
        for head in lik.cell_heads:
            if head not in self.OWN_HEADS:
                setattr(self, f"head_{prot}_{head}_weight", PyroParam(torch.zeros(skip, n_proteins)))
                setattr(self, f"head_{prot}_{head}_bias", PyroParam(torch.zeros(n_proteins)))

    #: protein-likelihood cell heads the model supplies itself (per-cell background, mixing logits)
    OWN_HEADS = ("log_background", "mix_logits")

    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, protein_panel=None,
                     background_init: str = "per_protein", background_prior_mean=None,
                     latent_library: bool = False, **options) -> "TOTALVI":
        """TOTALVI sized for ``dataset`` (two modalities: RNA first, protein second).

        The batch is the first of the dataset's covariate keys; ``protein_panel`` (see
        :func:`read_protein_panel`) gives the proteins measured per batch (rows = categories
        of that key). The background prior is initialised per protein and batch from up to
        500 protein-measured cells of each batch (``background_init``; see
        :func:`protein_background_init`). ``background_prior_mean``: list of T counts, or a
        dict / Series {protein: counts}.
        """
        rna, prot = dataset.modalities
        n_cov = [len(c) for c in dataset.covariate_categories.values()]
        keys = list(dataset.covariate_categories)
        categories = dataset.covariate_categories[keys[0]] if keys else ["all"]
        codes = dataset.covariate_codes[:, 0] if keys else np.zeros(dataset.n_cells, dtype=np.int64)
        proteins = list(map(str, dataset.feature_names[prot]))
        mask = None
        if protein_panel is not None:
            if not keys:
                raise InputError(dataset.source, "protein_panel",
                                 "a protein panel per batch needs the batch as a covariate",
                                 "name the batch column with --covariate-keys (covariate_keys= in Python)")
            mask = read_protein_panel(protein_panel, categories, proteins)
        if isinstance(background_prior_mean, dict):
            background_prior_mean = pd.Series(background_prior_mean)
        if isinstance(background_prior_mean, pd.Series):
            missing = [p for p in proteins if p not in background_prior_mean.index]
            if missing:
                raise InputError("<arguments>", "background_prior_mean", f"no value for proteins {missing[:5]}",
                                 "give a background mean (counts) for every protein")
            background_prior_mean = background_prior_mean.loc[proteins].to_numpy(dtype=float)
        if background_prior_mean is not None and len(background_prior_mean) != len(proteins):
            raise InputError("<arguments>", "background_prior_mean",
                             f"{len(background_prior_mean)} values for {len(proteins)} proteins",
                             f"give one background mean (counts) per protein, in the order {proteins[:5]}...")
        rng = np.random.default_rng(0)
        chosen = []
        for b in range(len(categories)):
            cells = np.flatnonzero((codes == b) & np.asarray(dataset.present[prot]))
            chosen.append(np.sort(rng.choice(cells, size=min(INIT_CELLS, cells.size), replace=False)))
        chosen = np.concatenate(chosen)
        if chosen.size:
            sample = dataset.batch(chosen).x[prot].numpy()
        else:
            sample = np.zeros((0, len(proteins)), np.float32)
        loc, scale = protein_background_init(sample, codes[chosen], len(categories), mask, background_init)
        library = {}
        if latent_library:
            log_sf = np.log(np.asarray(dataset.size_factors[rna], dtype=np.float64))
            means = [float(log_sf[codes == b].mean()) if (codes == b).any() else float(log_sf.mean())
                     for b in range(len(categories))]
            variances = [float(log_sf[codes == b].var()) if (codes == b).sum() > 1 else float(log_sf.var())
                         for b in range(len(categories))]
            library = dict(library_log_means=means, library_log_vars=variances)
        return cls(dataset.n_features[rna], dataset.n_features[prot], n_covariate_categories=n_cov,
                   batch_categories=categories, likelihoods=likelihoods, modalities=(rna, prot),
                   protein_mask=mask, background_prior_mean=background_prior_mean,
                   background_init=background_init, background_loc_init=loc, background_scale_init=scale,
                   latent_library=latent_library, counts_sample=counts_sample, **library, **options)

    @classmethod
    def default_stages(cls, *, epochs: int, patience: int | None = 20, kl_warmup_factor: float = 0.75,
                       n_cells: int | None = None, **schedule_options) -> list[Stage]:
        """One stage training everything for up to ``epochs`` epochs with early stopping after
        ``patience`` stalled epochs, and a linear KL warm-up of every ``kl_*`` term: over
        ``round(kl_warmup_factor * n_cells)`` optimiser steps when ``n_cells`` is given (totalVI's
        rule: 0.75 x n_cells steps, i.e. 0.75 x batch-size epochs), otherwise over the first
        ``round(kl_warmup_factor * epochs)`` epochs (at least 1)."""
        if schedule_options:
            raise TypeError(f"unexpected schedule options {sorted(schedule_options)}")
        if n_cells is not None:
            warmup = KLWarmup(steps=max(1, round(kl_warmup_factor * n_cells)))
        else:
            warmup = KLWarmup(epochs=max(1, round(kl_warmup_factor * epochs)))
        stop = EarlyStopping(patience=patience) if patience else None
        return [Stage("train", epochs, train=("all",), early_stopping=stop, kl_warmup=warmup)]

    # ------------------------------------------------------------------------- building blocks
    def _covariates(self, batch: Batch) -> torch.Tensor | None:
        return one_hot_covariates(batch.covariates, self.n_categories)

    def _batch_codes(self, batch: Batch) -> torch.Tensor:
        """Batch code s_n of each cell, (B,) long (zeros without covariates)."""
        if self.n_categories:
            return batch.covariates[:, 0]
        return torch.zeros(batch.size, dtype=torch.long, device=batch.index.device)

    @staticmethod
    def _skip(body: FCLayers, z: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
        """[body(z, s), z, s]: a decoder's hidden layer with the skip of z and the covariates."""
        parts = [body(z, cov), z] + ([cov] if cov is not None else [])
        return torch.cat(parts, dim=-1)

    def observed_mask(self, batch: Batch) -> torch.Tensor:
        """(B, T) booleans: the cell has the protein modality and its batch's panel has the protein."""
        prot = self.modalities[1]
        return self.protein_mask[self._batch_codes(batch)] & batch.present[prot].bool()[:, None]

    def _encoder_input(self, batch: Batch) -> torch.Tensor:
        """[log1p x_n, log1p y_n] with unmeasured proteins set to 0, (B, G + T)."""
        rna, prot = self.modalities
        y = torch.where(self.observed_mask(batch), batch.x[prot], torch.zeros_like(batch.x[prot]))
        return torch.log1p(torch.cat([batch.x[rna], y], dim=-1))

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (loc, scale) of z, each (B, K); scale = sqrt(exp(.) + 1e-4) (scvi-tools)."""
        cov = self._covariates(batch)
        h = self.encoder(self._encoder_input(batch), cov)
        return self.z_loc(h), torch.sqrt(self.z_log_var(h).exp() + 1e-4)

    def encode_library(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (loc, scale) of log l_n, each (B,) (``latent_library`` only)."""
        cov = self._covariates(batch)
        h = self.library_encoder(self._encoder_input(batch), cov)
        return self.library_loc(h)[:, 0], torch.sqrt(self.library_log_var(h)[:, 0].exp() + 1e-4)

    def background_posterior(self, z: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """q(log beta_n | z_n, s_n): (loc, scale), each (B, T), log counts."""
        h = self._skip(self.background_body, z, self._covariates(batch))
        return self.background_loc(h), F.softplus(self.background_scale(h)) + 1e-8

    def background_prior(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """p(log beta_n | s_n) = Normal(c_{., s_n}, d_{., s_n}): (loc, scale), each (B, T)."""
        s = self._batch_codes(batch)
        return self.back_prior_loc[s], self.back_prior_log_scale[s].exp()

    def decode(self, z: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Decoder outputs for latents z (B, K): ``rho`` (B, G) RNA proportions, ``alpha``
        (B, T) foreground multiplier >= 1, ``mix_logits`` (B, T) logit of P(background),
        ``h_rna`` and ``h_mix`` the decoders' skip representations."""
        cov = self._covariates(batch)
        h_rna = self._skip(self.rna_body, z, cov)
        h_fore = self._skip(self.foreground_body, z, cov)
        h_mix = self._skip(self.mixing_body, z, cov)
        return {"rho": torch.softmax(self.rho_head(h_rna), dim=-1),
                "alpha": F.relu(self.foreground_head(h_fore)) + 1.0 + 1e-8,
                "mix_logits": self.mixing_head(h_mix), "h_rna": h_rna, "h_mix": h_mix}

    def _observe_protein(self, log_beta, alpha, mix_logits, h_mix, batch: Batch, observed: bool):
        """Site ``obs_<prot>``; unmeasured (cell, protein) pairs are masked out."""
        prot = self.modalities[1]
        lik = self.likelihoods[prot]
        beta = log_beta.exp()
        params = {p: getattr(self, f"lik_{prot}_{p}") for p in lik.feature_params}
        own = {"log_background": log_beta, "mix_logits": mix_logits}
        for head in lik.cell_heads:
            params[head] = own[head] if head in own else (
                h_mix @ getattr(self, f"head_{prot}_{head}_weight") + getattr(self, f"head_{prot}_{head}_bias"))
        if "mix_logits" in lik.cell_heads:
            mean = beta * (alpha - 1.0) + 1e-8  # foreground excess over the background
        else:
            w = torch.sigmoid(mix_logits)
            mean = w * beta + (1 - w) * beta * alpha
        fn = lik(mean, **params)
        if not self._panel_complete:
            fn = fn.mask(self.protein_mask[self._batch_codes(batch)])
        fn = fn.to_event(1).mask(batch.present[prot])
        return pyro.sample(f"obs_{prot}", fn, obs=batch.x[prot] if observed else None)

    # ----------------------------------------------------------------------- model / guide
    @pyro_method
    def model(self, batch: Batch, observed: bool = True):
        """totalVI's generative model (Gayoso et al. 2021; module docstring) for the B cells of
        ``batch``: ``z`` (B, K), ``log_library`` (B,) with ``latent_library``, ``log_beta`` (B, T),
        ``obs_<rna>`` (B, G) and ``obs_<prot>`` (B, T) (masked where a cell or a batch lacks the
        protein). ``observed=False`` draws both observation sites instead of conditioning on the
        counts (posterior predictive checks; see :meth:`ZooModel.model`)."""
        rna, prot = self.modalities
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            z = pyro.sample("z", dist.Normal(batch.size_factor[rna].new_zeros(self.n_latent), 1.0).to_event(1))
            if self.latent_library:
                s = self._batch_codes(batch)
                log_l = pyro.sample("log_library", dist.Normal(self.library_prior_loc[s], self.library_prior_scale[s]))
                library = log_l.exp()
            else:
                library = batch.size_factor[rna]
            out = self.decode(z, batch)
            self._observe(rna, out["rho"] * library[:, None], out["h_rna"], batch, observed)
            loc, scale = self.background_prior(batch)
            log_beta = pyro.sample("log_beta", dist.Normal(loc, scale).to_event(1))
            self._observe_protein(log_beta, out["alpha"], out["mix_logits"], out["h_mix"], batch, observed)

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
        """q(z | x, y, s), q(log l | x, y, s) (``latent_library``) and q(log beta | z, s) for the B
        cells of ``batch`` (shapes as in :meth:`model`); ``observed`` changes nothing."""
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            loc, scale = self.encode(batch)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            if self.latent_library:
                l_loc, l_scale = self.encode_library(batch)
                pyro.sample("log_library", dist.Normal(l_loc, l_scale))
            b_loc, b_scale = self.background_posterior(z, batch)
            pyro.sample("log_beta", dist.Normal(b_loc, b_scale).to_event(1))

    # ------------------------------------------------------------------- posterior summaries
    def dispersions(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-feature likelihood parameters (theta of each gene, phi of each protein), and for
        the proteins the background prior of each batch: ``background_mean_<batch>`` = exp(c)
        in counts and ``background_log_sd_<batch>`` = log d."""
        out = super().dispersions()
        prot = self.modalities[1]
        loc = self.back_prior_loc.detach()
        log_sd = self.back_prior_log_scale.detach()
        for k, name in enumerate(self.batch_categories):
            out[prot][f"background_mean_{name}"] = loc[k].exp()
            out[prot][f"background_log_sd_{name}"] = log_sd[k]
        return out
