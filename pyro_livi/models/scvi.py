"""scVI-like VAE: the donor-free baseline of the zoo (Lopez et al. 2018; seed 002 compares the
multimodal models against it; reference implementation scvi-tools ``module/_vae.py``).

Generative model, for cell i with counts x_i over G genes and categorical covariates s_i::

    z_i   ~ Normal(0, I_K)                                   cell plate
    h_i   = f(z_i, s_i)                    MLP decoder, covariates injected in every layer
    rho_i = softmax(W h_i + b)             expression proportions over genes
    x_ig  ~ Likelihood(l_i rho_ig, theta_g)  ("nb" by default; any registered name)

with l_i the observed total count of the cell and theta_g one inverse dispersion per gene.
Guide: z_i ~ Normal(mu(x_i, s_i), sigma(x_i, s_i)), an MLP encoder on log1p(x_i).
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ..data.batch import Batch
from ..likelihoods import get_likelihood
from ..nn import NORMS, FCLayers, one_hot_covariates
from ._base import DataNeeds, Option, ZooModel


class SCVI(ZooModel):
    """scVI-like VAE as an explicit Pyro model/guide pair.

    Parameters
    ----------
    n_genes : G.
    n_covariate_categories : number of categories of each categorical covariate (e.g. batch),
        injected as one-hot codes into the encoder and every decoder layer.
    n_latent : K, dimension of z.
    n_hidden, n_layers : width and number of the hidden layers of encoder and decoder.
    dropout_rate : dropout of the encoder's layers (the decoder has none, as in scvi-tools).
    norm : normalisation in the hidden layers: "batch" (scvi-tools' default), "layer", "none".
    likelihood : registered likelihood name of the observation site.
    modality : name of the modality (the site is ``obs_<modality>``).
    counts_sample : optional dense (n, G) counts for data-based likelihood initialisation.
    """

    summary = "scVI-like VAE: a latent z decoded by an MLP to NB counts; the donor-free baseline"
    reference = "seed 002 (baseline of the comparisons); Lopez et al. 2018; scvi-tools SCVI"
    data_needs = DataNeeds(modalities=(1, 1), inputs="counts", donors="unused")
    options = {
        "n_latent": Option(10, "K, dimension of the latent z", type=int, at_least=1),
        "n_hidden": Option(128, "width of the hidden layers", type=int, at_least=1),
        "n_layers": Option(1, "hidden layers in the encoder and in the decoder (0: linear maps)", type=int,
                           at_least=0),
        "dropout_rate": Option(0.1, "dropout probability in the encoder", type=float, at_least=0, below=1),
        "norm": Option("batch", "normalisation of the hidden layers", choices=NORMS),
    }
    outputs = ("latent", "dispersions")

    def __init__(self, n_genes: int, *, n_covariate_categories: Sequence[int] = (), n_latent: int = 10,
                 n_hidden: int = 128, n_layers: int = 1, dropout_rate: float = 0.1, norm: str = "batch",
                 likelihood: str = "nb", modality: str = "rna", counts_sample=None, name: str | None = None):
        super().__init__(name=name)
        self.config = dict(n_genes=n_genes, n_covariate_categories=list(n_covariate_categories),
                           n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers, dropout_rate=dropout_rate,
                           norm=norm, likelihood=likelihood, modality=modality)
        self.modalities = (modality,)
        self.n_latent = n_latent
        self.n_categories = list(n_covariate_categories)
        n_cov = sum(self.n_categories)
        hidden = [n_hidden] * n_layers
        width = hidden[-1] if hidden else None
        self.encoder = FCLayers(n_genes, hidden, n_cov, norm, dropout_rate)
        self.z_loc = PyroModule[nn.Linear](width or n_genes + n_cov, n_latent)
        self.z_log_var = PyroModule[nn.Linear](width or n_genes + n_cov, n_latent)
        self.decoder = FCLayers(n_latent, hidden, n_cov, norm, 0.0)
        self.rho_head = PyroModule[nn.Linear](width or n_latent + n_cov, n_genes)
        self.likelihoods = {modality: get_likelihood(likelihood)}
        self._init_likelihood_params(modality, n_genes, width or n_latent + n_cov, counts_sample)

    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, **options) -> "SCVI":
        """SCVI sized for ``dataset`` (its one modality and covariate categories)."""
        (modality,) = dataset.modalities
        if likelihoods and modality in likelihoods:
            options["likelihood"] = likelihoods[modality]
        n_cov = [len(c) for c in dataset.covariate_categories.values()]
        return cls(dataset.n_features[modality], n_covariate_categories=n_cov, modality=modality,
                   counts_sample=(counts_sample or {}).get(modality), **options)

    def _hidden(self, body: FCLayers, x: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
        """Hidden representation (B, n_hidden), or the covariate-augmented input without layers."""
        h = body(x, cov)
        return torch.cat([h, cov], dim=-1) if cov is not None and not body.blocks else h

    # ----------------------------------------------------------------------- model / guide
    @pyro_method
    def model(self, batch: Batch, observed: bool = True):
        """scVI's generative model (Lopez et al. 2018; module docstring) for the B cells of ``batch``:
        ``z`` (B, K) ~ N(0, I), ``obs_<modality>`` (B, G) ~ likelihood(l_i softmax(W f(z_i, s_i) + b)),
        with ``batch.x[m]`` (B, G) counts, ``size_factor[m]`` (B,) totals l_i and ``covariates``
        (B, n_covariates) codes s_i. ``observed=False`` draws ``obs_<modality>`` instead of
        conditioning on the counts (posterior predictive checks; see :meth:`ZooModel.model`)."""
        m = self.modalities[0]
        cov = one_hot_covariates(batch.covariates, self.n_categories)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            z = pyro.sample("z", dist.Normal(batch.size_factor[m].new_zeros(self.n_latent), 1.0).to_event(1))
            h = self._hidden(self.decoder, z, cov)
            rho = torch.softmax(self.rho_head(h), dim=-1)
            self._observe(m, rho * batch.size_factor[m][:, None], h, batch, observed)

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
        """q(z_i | x_i, s_i) = Normal(encoder(log1p x_i, s_i)), ``z`` (B, K); ``observed`` changes nothing."""
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            loc, scale = self.encode(batch)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------------- posterior summaries
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (loc, scale) of z, each (B, K); scale = sqrt(exp(.) + 1e-4) (scvi-tools)."""
        cov = one_hot_covariates(batch.covariates, self.n_categories)
        h = self._hidden(self.encoder, torch.log1p(batch.x[self.modalities[0]]), cov)
        return self.z_loc(h), torch.sqrt(self.z_log_var(h).exp() + 1e-4)
