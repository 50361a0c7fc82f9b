"""MultiSLIVI: multimodal shared-space LIVI (seed 001, "The MultiSLIVI framework", eq. 5-11).

Generative model, for cell i of donor y(i) with counts x_i^m over G_m features of each
modality m (e.g. m in {rna, prot})::

    d_y ~ Normal(0, I_{K_DxC}),  v_y ~ Normal(0, I_{K_V})               donor plate
    c_i ~ Normal(0, I_{K_C})                                            cell plate
    h_i = link(c_i)                              (softmax by default, DESIGN section 3)
    A   = sigmoid(A_logits)                                             K_C x K_DxC
    z_i = (h_i A) * d_y(i)                                              eq. 6
    l_i^m = h_i W_C^m + z_i W_DxC^m + v_y(i) W_V^m + sum_k offset_k^m[cov_ik]   eq. 7-8
    mu_i^m = softmax(l_i^m) * size_factor_i^m
    x_i^m ~ Likelihood_m(mu_i^m, theta^m)        ("nb" for every modality by default)  eq. 9-10

Loss (eq. 11) = sum_m lambda_m * rec_m + KL(c) + sum_m lambda_DxC^m sum|W_DxC^m|
+ lambda_A sum (A (1 - A))^2: the weights lambda_m are ``poutine.scale`` around the
observation sites, the penalties are ``pyro.factor`` sites in per-cell units (times n_cells).

Guide: c_i ~ Normal(encoder(concat(x_i^rna, x_i^prot))) (the encoder takes log1p of the
concatenated counts); d_y, v_y ~ Delta(loc) (MAP, default) or Normal(loc, scale).

This module also holds :class:`MultimodalLIVIBase`, the decoders, donor factors, observation
sites and decoder penalties that MultiSLIVI and DMLIVI share.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam, pyro_method

from ..data.batch import Batch
from ..likelihoods import get_likelihood
from ..nn import GaussianEncoder
from ._base import DataNeeds, Option, ZooModel
from ._livi_family import MULTIMODAL_LIVI_OPTIONS, DonorFactorsMixin
from .livi import LINKS


def _per_modality(value, modalities: Sequence[str], what: str, default=None) -> dict:
    """A per-modality setting from a scalar (every modality), a partial mapping (the rest get
    ``default``) or None (all ``default``)."""
    if value is None:
        return {m: default for m in modalities}
    if isinstance(value, Mapping):
        unknown = set(value) - set(modalities)
        if unknown:
            raise ValueError(f"{what}: unknown modalities {sorted(unknown)}; the model has {list(modalities)}")
        return {m: value.get(m, default) for m in modalities}
    return {m: value for m in modalities}


class MultimodalLIVIBase(DonorFactorsMixin, ZooModel):
    """Decoders, donor factors, observation sites and decoder penalties of multimodal LIVI.

    Subclasses create the encoders and write ``model`` / ``guide``. Parameters (per modality
    m): ``W_C__m`` (n_in_m, G_m) acting on the cell-state input of modality m, ``W_DxC__m``
    (K_DxC, G_m), ``W_V__m`` (K_V, G_m), ``cov_offset__m_k`` (n_categories_k, G_m), the
    likelihood's ``lik_m_*`` and ``head_m_*``; shared: ``A_logits``, ``D_loc``, ``V_loc``
    (and ``D_scale``, ``V_scale`` with the Normal donor guide).
    """

    param_groups = {
        "encoder": "encoder",
        "W_C__": "cell_state",
        "cov_offset": "cell_state",
        "lik_": "cell_state",
        "head_": "cell_state",
        "V_": "persistent",
        "W_V__": "persistent",
        "D_": "interaction",
        "A_logits": "interaction",
        "W_DxC__": "interaction",
    }
    components_all = ("persistent", "interaction")

    def _setup_decoders(self, n_features: Mapping[str, int], n_donors: int, *, n_cell_input: Mapping[str, int],
                        n_a_rows: int, n_dxc: int, n_persistent: int, n_covariate_categories: Sequence[int],
                        likelihoods, modality_weights, link: str, donor_guide: str, l1_weight, a_weight: float,
                        counts_sample) -> None:
        """Create everything but the encoders (called by subclasses' constructors)."""
        if not n_features:
            raise ValueError("n_features must name at least one modality")
        for m in n_features:
            if not str(m).isidentifier():
                raise ValueError(f"modality name {m!r} must be a Python identifier (it names parameters)")
        if link not in LINKS:
            raise ValueError(f"link must be one of {sorted(LINKS)}, got {link!r}")
        if donor_guide not in ("delta", "normal"):
            raise ValueError(f"donor_guide must be 'delta' or 'normal', got {donor_guide!r}")
        self.modalities = tuple(n_features)
        self.n_features = {m: int(g) for m, g in n_features.items()}
        self.n_donors, self.n_dxc, self.n_persistent = n_donors, n_dxc, n_persistent
        self.link = LINKS[link]
        self.donor_guide = donor_guide
        self.likelihood_names = _per_modality(likelihoods, self.modalities, "likelihoods", "nb")
        self.modality_weights = {m: float(w) for m, w in
                                 _per_modality(modality_weights, self.modalities, "modality_weights", 1.0).items()}
        self.l1_weights = {m: float(w) for m, w in
                           _per_modality(l1_weight, self.modalities, "l1_weight", 1e-3).items()}
        self.a_weight = float(a_weight)
        if any(w <= 0 for w in self.modality_weights.values()):
            raise ValueError(f"modality weights must be > 0 (they scale the observation sites), got "
                             f"{self.modality_weights}")
        if any(w < 0 for w in (*self.l1_weights.values(), self.a_weight)):
            raise ValueError("penalty weights must be >= 0")
        counts_sample = counts_sample if isinstance(counts_sample, Mapping) else {}

        self.A_logits = PyroParam(torch.randn(n_a_rows, n_dxc))
        self.D_loc = PyroParam(0.1 * torch.randn(n_donors, n_dxc))
        self.V_loc = PyroParam(0.1 * torch.randn(n_donors, n_persistent))
        if donor_guide == "normal":
            self.D_scale = PyroParam(torch.full((n_donors, n_dxc), 0.1), constraint=constraints.positive)
            self.V_scale = PyroParam(torch.full((n_donors, n_persistent), 0.1), constraint=constraints.positive)
        self.n_covariates = len(n_covariate_categories)
        self.likelihoods = {}
        for m, g in self.n_features.items():
            bound = n_cell_input[m] ** -0.5
            setattr(self, f"W_C__{m}", PyroParam(torch.empty(n_cell_input[m], g).uniform_(-bound, bound)))
            setattr(self, f"W_DxC__{m}", PyroParam(0.1 * torch.randn(n_dxc, g)))
            setattr(self, f"W_V__{m}", PyroParam(0.1 * torch.randn(n_persistent, g)))
            for k, n_cat in enumerate(n_covariate_categories):
                setattr(self, f"cov_offset__{m}_{k}", PyroParam(torch.zeros(n_cat, g)))
            self.likelihoods[m] = get_likelihood(self.likelihood_names[m])
            self._init_likelihood_params(m, g, n_cell_input[m], counts_sample.get(m))

    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, protein_weight=None, **options):
        """A model sized for ``dataset`` (its modalities, features, donors and covariate
        categories). ``likelihoods``: {modality: name}; ``counts_sample``: {modality: (n, G_m)
        counts} for data-based likelihood initialisation (e.g. the protein background of
        ``nb_mixture``); ``protein_weight``: lambda of every modality after the first (unless
        ``modality_weights`` is given)."""
        n_features = {m: dataset.n_features[m] for m in dataset.modalities}
        n_cov = [len(dataset.covariate_categories[k]) for k in dataset.covariate_categories]
        if protein_weight is not None and "modality_weights" not in options:
            options["modality_weights"] = {m: 1.0 if k == 0 else float(protein_weight)
                                           for k, m in enumerate(n_features)}
        return cls(n_features, len(dataset.donor_index), n_covariate_categories=n_cov,
                   likelihoods=likelihoods, counts_sample=counts_sample, **options)

    # ------------------------------------------------------------------ pieces of the decoder
    @property
    def A(self) -> torch.Tensor:
        """Cell-state x interaction assignment matrix, sigmoid(A_logits), (rows, K_DxC)."""
        return torch.sigmoid(self.A_logits)

    def _mean(self, m: str, u: torch.Tensor, z: torch.Tensor | None, batch: Batch,
              V: torch.Tensor | None) -> torch.Tensor:
        """Mean counts mu^m (B, G_m) of modality m from its cell-state input u (B, n_in_m), the
        interaction z (B, K_DxC) or None, and the persistent factors V (N_y, K_V) or None."""
        logits = u @ getattr(self, f"W_C__{m}")
        if z is not None:
            logits = logits + z @ getattr(self, f"W_DxC__{m}")
        if V is not None:
            logits = logits + V[batch.donor] @ getattr(self, f"W_V__{m}")
        for k in range(self.n_covariates):
            logits = logits + getattr(self, f"cov_offset__{m}_{k}")[batch.covariates[:, k]]
        return torch.softmax(logits, dim=-1) * batch.size_factor[m][:, None]

    def _standard_normal(self, batch: Batch, n_latent: int):
        """The N(0, I) prior of a per-cell latent of dimension ``n_latent``."""
        return dist.Normal(batch.size_factor[self.modalities[0]].new_zeros(n_latent), 1.0).to_event(1)

    def _observe_weighted(self, m: str, mean: torch.Tensor, u: torch.Tensor, batch: Batch, observed: bool):
        """``obs_<m>`` scaled by the modality weight lambda_m, absent cells masked."""
        with poutine.scale(scale=self.modality_weights[m]):
            return self._observe(m, mean, u, batch, observed)

    # -------------------------------------------------------------------------- donor parts
    def _decoder_penalties(self, batch: Batch) -> None:
        """Per-modality L1 on W_DxC^m and the A penalty, in per-cell units (times n_cells)."""
        self._interaction_penalties(batch.n_cells, {f"penalty_l1_W_DxC_{m}": (getattr(self, f"W_DxC__{m}"),
                                                                             self.l1_weights[m])
                                                    for m in self.modalities})

    # ------------------------------------------------------------------- posterior summaries
    def loadings(self) -> dict[str, torch.Tensor]:
        """Decoder loadings per modality: {"W_C__m": (K_C, G_m), "W_DxC__m": (K_DxC, G_m),
        "W_V__m": (K_V, G_m)}."""
        out = {}
        for m in self.modalities:
            for name in ("W_C", "W_DxC", "W_V"):
                out[f"{name}__{m}"] = getattr(self, f"{name}__{m}").detach()
        return out


class MultiSLIVI(MultimodalLIVIBase):
    """MultiSLIVI as an explicit Pyro model/guide pair (one shared cell state c).

    Parameters
    ----------
    n_features : {modality: number of features}, e.g. ``{"rna": 4000, "prot": 14}``; the
        order fixes the encoder's input order.
    n_donors : N_y.
    n_covariate_categories : number of categories of each categorical covariate (per-feature
        offsets in every modality).
    n_cell_state, n_dxc, n_persistent : K_C, K_DxC, K_V.
    encoder_hidden : widths of the encoder's MLP blocks.
    encoder_input : "log1p" (default) or "raw" counts into the encoder.
    likelihoods : registered likelihood name per modality (default "nb" for each), e.g.
        ``{"prot": "nb_mixture"}``.
    modality_weights : lambda_m per modality (default 1.0 each), e.g. ``{"prot": 50}``.
    link : "softmax" (reference) or "identity".
    donor_guide : "delta" (point estimates, default) or "normal".
    l1_weight : lambda_DxC^m, a float for every modality or a per-modality mapping (per cell).
    a_weight : lambda_A (per cell).
    counts_sample : optional {modality: dense (n, G_m) counts} for likelihood initialisation.

    Every cell must have every modality: the encoder reads the concatenated counts, so a
    missing modality would look like zero counts (use :class:`~pyro_livi.models.DMLIVI` for
    partially measured cells).
    """

    summary = "multimodal LIVI with one shared cell state encoded from every modality"
    reference = "seed 001 (MultiSLIVI, eq. 5-11); seed 000"
    data_needs = DataNeeds(modalities=(1, None), inputs="counts", donors="required")
    options = {
        "n_cell_state": Option(15, "K_C, dimension of the shared cell state c", type=int, at_least=1),
        **MULTIMODAL_LIVI_OPTIONS,
        "encoder_hidden": Option((128,), "widths of the encoder's MLP blocks", type=int, nargs="+", at_least=1),
        "protein_weight": Option(1.0, "weight lambda of every modality after the first (the MultiSLIVI paper uses 50 to "
                                 "200; the first keeps 1; > 0)", type=float, above=0),
        "link": Option("softmax", "link of the cell-state decoder term", choices=tuple(LINKS)),
    }

    def __init__(
        self,
        n_features: Mapping[str, int],
        n_donors: int,
        *,
        n_covariate_categories: Sequence[int] = (),
        n_cell_state: int = 15,
        n_dxc: int = 100,
        n_persistent: int = 5,
        encoder_hidden: Sequence[int] = (128,),
        encoder_input: str = "log1p",
        likelihoods: Mapping[str, str] | str | None = None,
        modality_weights: Mapping[str, float] | None = None,
        link: str = "softmax",
        donor_guide: str = "delta",
        l1_weight: float | Mapping[str, float] = 1e-3,
        a_weight: float = 1e-3,
        counts_sample=None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        self.n_cell_state = n_cell_state
        self._setup_decoders(
            n_features, n_donors, n_cell_input={m: n_cell_state for m in n_features}, n_a_rows=n_cell_state,
            n_dxc=n_dxc, n_persistent=n_persistent, n_covariate_categories=n_covariate_categories,
            likelihoods=likelihoods, modality_weights=modality_weights, link=link, donor_guide=donor_guide,
            l1_weight=l1_weight, a_weight=a_weight, counts_sample=counts_sample)
        self.config = dict(
            n_features=dict(self.n_features), n_donors=n_donors,
            n_covariate_categories=list(n_covariate_categories), n_cell_state=n_cell_state, n_dxc=n_dxc,
            n_persistent=n_persistent, encoder_hidden=list(encoder_hidden), encoder_input=encoder_input,
            likelihoods=dict(self.likelihood_names), modality_weights=dict(self.modality_weights), link=link,
            donor_guide=donor_guide, l1_weight=dict(self.l1_weights), a_weight=self.a_weight,
        )
        self.encoder = GaussianEncoder(sum(self.n_features.values()), n_cell_state, encoder_hidden, encoder_input)

    def _encoder_input(self, batch: Batch) -> torch.Tensor:
        """Counts of every modality side by side, (B, sum_m G_m) (eq. 5)."""
        return torch.cat([batch.x[m] for m in self.modalities], dim=-1)

    # ----------------------------------------------------------------------- model / guide
    @pyro_method
    def model(self, batch: Batch, observed: bool = True):
        """MultiSLIVI's eq. 5-11 (seed 001) for the B cells of ``batch``: sites ``V``, ``D`` (donor
        plate, while their components are on), ``c`` (B, K_C), one ``obs_<m>`` (B, G_m) per modality
        scaled by lambda_m, and the penalty factors; ``batch.x[m]`` (B, G_m) counts,
        ``size_factor[m]`` (B,), ``donor`` (B,). ``observed=False`` draws every ``obs_<m>`` instead
        of conditioning on the counts (posterior predictive checks; see :meth:`ZooModel.model`)."""
        D, V = self._donor_sites()
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            c = pyro.sample("c", self._standard_normal(batch, self.n_cell_state))
            h = self.link(c)
            z = (h @ self.A) * D[batch.donor] if D is not None else None  # eq. 6
            for m in self.modalities:  # eq. 7-10, weighted by lambda_m (eq. 11)
                self._observe_weighted(m, self._mean(m, h, z, batch, V), h, batch, observed)
        if D is not None:
            self._decoder_penalties(batch)

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
        """q(c_i) = Normal(encoder(x_i^1, ..., x_i^M)) (the modalities side by side, eq. 5), ``c``
        (B, K_C), and the donor guide (Delta or Normal at ``D_loc``, ``V_loc``); ``observed``
        changes nothing."""
        self._donor_guide_sites()
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            loc, scale = self.encoder(self._encoder_input(batch))
            pyro.sample("c", dist.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------------- posterior summaries
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (loc, scale) of the cell state c, each (B, K_C)."""
        return self.encoder(self._encoder_input(batch))
