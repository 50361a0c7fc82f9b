"""LIVI: Latent Interaction Variational Inference (seed 001, "The original LIVI model", eq. 2-4).

Generative model, for cell i of donor y(i) with counts x_i over G genes (one modality, of any
name; its site is ``obs_<modality>``, ``obs_rna`` for the usual ``rna``)::

    d_y ~ Normal(0, I_{K_DxC}),  v_y ~ Normal(0, I_{K_V})          donor plate
    c_i ~ Normal(0, I_{K_C})                                       cell plate
    s_i = link(c_i)                          (softmax by default, DESIGN section 3)
    A   = sigmoid(A_logits)                                        K_C x K_DxC
    z_i = (softmax(c_i) A) * d_y(i)                                eq. 2
    l_i = s_i W_C + z_i W_DxC + v_y(i) W_V + sum_k offset_k[cov_ik]  eq. 3 (bias-free)
    mu_i = softmax(l_i) * size_factor_i
    x_i ~ Likelihood(mu_i, theta)            ("nb" by default; any registered name)

Loss (eq. 4) = -ELBO + lambda_DxC * sum|W_DxC| + lambda_A * sum (A (1 - A))^2, with the
penalty weights in the reference's per-cell units (multiplied by n_cells here, because Pyro
sums the ELBO over cells where the reference averages it).

Guide: c_i ~ Normal(encoder(x_i)); d_y, v_y ~ Delta(loc) (MAP, default) or Normal(loc, scale).
While the encoder is frozen (the donor stages) each cell's encoder output is computed once and
read back (:class:`~pyro_livi.models._livi_family.FrozenEncoderCache`).
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam, pyro_method

from ..data.batch import Batch
from ..likelihoods import get_likelihood
from ..nn import GaussianEncoder
from ._base import DataNeeds, Option, ZooModel
from ._livi_family import LIVI_OPTIONS, DonorFactorsMixin, FrozenEncoderCache

LINKS = {
    "softmax": lambda c: torch.softmax(c, dim=-1),
    "identity": lambda c: c,
}


class LIVI(DonorFactorsMixin, ZooModel):
    """LIVI as an explicit Pyro model/guide pair.

    Parameters
    ----------
    n_genes, n_donors : sizes of the data (G, N_y).
    n_covariate_categories : number of categories of each categorical covariate; each gets a
        per-gene offset table of shape (n_categories, G).
    n_cell_state, n_dxc, n_persistent : K_C, K_DxC, K_V.
    encoder_hidden : widths of the encoder's MLP blocks.
    likelihood : registered likelihood name of ``obs_<modality>`` (see :mod:`pyro_livi.likelihoods`).
    modality : name of the modality (default ``"rna"``): it names the observation site
        ``obs_<modality>`` and the likelihood's parameters ``lik_<modality>_*``.
    link : link of the cell-state term, "softmax" (reference) or "identity" (the paper's
        ``W_C c``). The interaction always uses ``softmax(c)`` (eq. 2).
    donor_guide : "delta" (point estimates, default) or "normal" (posterior uncertainty).
    l1_weight, a_weight : penalty weights, per cell (reference units).
    batch_norm : BatchNorm over genes before the softmax (reference option, off by default).
    counts_sample : optional dense (n, G) count sample for data-driven likelihood initialisation.
    """

    summary = "cell state, persistent donor effects and donor x cell-state interactions of one modality"
    reference = "seed 001 (LIVI, eq. 2-4); PMBio/LIVI"
    data_needs = DataNeeds(modalities=(1, 1), inputs="counts", donors="required")
    options = {
        "n_cell_state": Option(15, "K_C, dimension of the cell state c", type=int, at_least=1),
        **LIVI_OPTIONS,
        "encoder_hidden": Option((128,), "widths of the encoder's MLP blocks", type=int, nargs="+", at_least=1),
        "link": Option("softmax", "link of the cell-state decoder term", choices=tuple(LINKS)),
        "batch_norm": Option(False, "BatchNorm over genes before the softmax (reference option)"),
    }
    #: parameter-name prefix -> parameter group (what a training stage trains or freezes)
    param_groups = {
        "encoder": "encoder",
        "W_C": "cell_state",
        "cov_offset": "cell_state",
        "lik_": "cell_state",
        "head_": "cell_state",
        "bn": "cell_state",
        "V_": "persistent",
        "W_V": "persistent",
        "D_": "interaction",
        "A_logits": "interaction",
        "W_DxC": "interaction",
    }
    components_all = ("persistent", "interaction")

    def __init__(
        self,
        n_genes: int,
        n_donors: int,
        *,
        n_covariate_categories: Sequence[int] = (),
        n_cell_state: int = 15,
        n_dxc: int = 100,
        n_persistent: int = 5,
        encoder_hidden: Sequence[int] = (128,),
        encoder_input: str = "log1p",
        likelihood: str = "nb",
        link: str = "softmax",
        donor_guide: str = "delta",
        l1_weight: float = 1e-3,
        a_weight: float = 1e-3,
        batch_norm: bool = False,
        modality: str = "rna",
        counts_sample=None,
        name: str | None = None,
    ):
        if link not in LINKS:
            raise ValueError(f"link must be one of {sorted(LINKS)}, got {link!r}")
        if donor_guide not in ("delta", "normal"):
            raise ValueError(f"donor_guide must be 'delta' or 'normal', got {donor_guide!r}")
        super().__init__(name=name)
        self.config = dict(
            n_genes=n_genes, n_donors=n_donors, n_covariate_categories=list(n_covariate_categories),
            n_cell_state=n_cell_state, n_dxc=n_dxc, n_persistent=n_persistent,
            encoder_hidden=list(encoder_hidden), encoder_input=encoder_input, likelihood=likelihood,
            link=link, donor_guide=donor_guide, l1_weight=l1_weight, a_weight=a_weight,
            batch_norm=batch_norm, modality=modality,
        )
        self.modalities = (modality,)
        self.n_genes, self.n_donors = n_genes, n_donors
        self.n_cell_state, self.n_dxc, self.n_persistent = n_cell_state, n_dxc, n_persistent
        self.link = LINKS[link]
        self.donor_guide = donor_guide
        self.l1_weight, self.a_weight = l1_weight, a_weight

        self.encoder = GaussianEncoder(n_genes, n_cell_state, encoder_hidden, encoder_input, sparse_input=True)
        bound = n_cell_state ** -0.5
        self.W_C = PyroParam(torch.empty(n_cell_state, n_genes).uniform_(-bound, bound))
        self.W_DxC = PyroParam(0.1 * torch.randn(n_dxc, n_genes))
        self.W_V = PyroParam(0.1 * torch.randn(n_persistent, n_genes))
        self.A_logits = PyroParam(torch.randn(n_cell_state, n_dxc))
        self.D_loc = PyroParam(0.1 * torch.randn(n_donors, n_dxc))
        self.V_loc = PyroParam(0.1 * torch.randn(n_donors, n_persistent))
        if donor_guide == "normal":
            self.D_scale = PyroParam(torch.full((n_donors, n_dxc), 0.1), constraint=constraints.positive)
            self.V_scale = PyroParam(torch.full((n_donors, n_persistent), 0.1), constraint=constraints.positive)
        self.n_covariates = len(n_covariate_categories)
        for k, n_cat in enumerate(n_covariate_categories):
            setattr(self, f"cov_offset_{k}", PyroParam(torch.zeros(n_cat, n_genes)))
        self.bn = PyroModule[torch.nn.BatchNorm1d](n_genes) if batch_norm else None
        self.likelihoods = {modality: get_likelihood(likelihood)}
        self._init_likelihood_params(modality, n_genes, n_cell_state, counts_sample)
        #: the frozen encoder's output per cell in the donor stages (see FrozenEncoderCache)
        self._posterior_cache = FrozenEncoderCache()

    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, **options) -> "LIVI":
        """LIVI sized for ``dataset`` (its one modality, whatever its name, its donors and
        covariate categories); ``likelihoods`` ({modality: name}) sets ``likelihood``."""
        (modality,) = dataset.modalities
        if likelihoods and modality in likelihoods:
            options["likelihood"] = likelihoods[modality]
        n_cov = [len(c) for c in dataset.covariate_categories.values()]
        return cls(dataset.n_features[modality], len(dataset.donor_index), n_covariate_categories=n_cov,
                   modality=modality, counts_sample=(counts_sample or {}).get(modality), **options)

    # ----------------------------------------------------------------- pieces of eq. 2-3
    @property
    def A(self) -> torch.Tensor:
        """Cell-state x interaction assignment matrix, sigmoid(A_logits), (K_C, K_DxC)."""
        return torch.sigmoid(self.A_logits)

    def _logits(self, c: torch.Tensor, batch: Batch, D=None, V=None) -> torch.Tensor:
        """Per-gene logits l_i (B, G) of eq. 3 from the cell state c (B, K_C)."""
        logits = self.link(c) @ self.W_C
        if D is not None:
            z = (torch.softmax(c, dim=-1) @ self.A) * D[batch.donor]  # eq. 2
            logits = logits + z @ self.W_DxC
        if V is not None:
            logits = logits + V[batch.donor] @ self.W_V
        for k in range(self.n_covariates):
            logits = logits + getattr(self, f"cov_offset_{k}")[batch.covariates[:, k]]
        if self.bn is not None:
            logits = self.bn(logits)
        return logits

    # ----------------------------------------------------------------------- model / guide
    @pyro_method
    def model(self, batch: Batch, observed: bool = True):
        """LIVI's eq. 2-4 for a minibatch of B cells: sites ``V``, ``D`` (donor plate, while their
        components are on), ``c`` (B, K_C), ``obs_<modality>`` (B, G) and the penalty factors.
        ``batch.x[modality]`` (B, G) counts, ``batch.size_factor[modality]`` (B,) totals,
        ``batch.donor`` (B,). ``observed=False`` draws ``obs_<modality>`` instead of conditioning
        on the counts (posterior predictive: ``Predictive(m.model, guide=m.guide)(batch,
        observed=False)``; with the default the sampled site is the observed counts)."""
        m = self.modalities[0]
        D, V = self._donor_sites()
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            c = pyro.sample("c", dist.Normal(self.W_C.new_zeros(self.n_cell_state), 1.0).to_event(1))
            mean = torch.softmax(self._logits(c, batch, D, V), dim=-1) * batch.size_factor[m][:, None]
            self._observe(m, mean, self.link(c), batch, observed)
        if D is not None:
            self._interaction_penalties(batch.n_cells, {"penalty_l1_W_DxC": (self.W_DxC, self.l1_weight)})

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
        """q(c_i) = Normal(encoder(x_i)) for the B cells of ``batch``, and the donor guide
        (Delta or Normal at ``D_loc``, ``V_loc``); ``observed`` changes nothing."""
        self._donor_guide_sites()
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            loc, scale = self._posterior_cache(self.encoder, batch.x[self.modalities[0]], batch.index, batch.n_cells)
            pyro.sample("c", dist.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------------- posterior summaries
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (loc, scale) of the cell state c, each (B, K_C)."""
        return self.encoder(batch.x[self.modalities[0]])

    def loadings(self) -> dict[str, torch.Tensor]:
        """Decoder gene loadings: {"W_C": (K_C, G), "W_DxC": (K_DxC, G), "W_V": (K_V, G)}."""
        return {"W_C": self.W_C.detach(), "W_DxC": self.W_DxC.detach(), "W_V": self.W_V.detach()}
