"""DMLIVI: disentangled multimodal LIVI (seed 001, "The DMLIVI framework", eq. 12-18).

Generative model, for cell i of donor y(i) with counts x_i^m of each modality m::

    d_y ~ Normal(0, I_{K_DxC}),  v_y ~ Normal(0, I_{K_V})               donor plate
    c_i   ~ Normal(0, I_{K_shared})           shared cell state         cell plate
    s_i^m ~ Normal(0, I_{K_m})                specific state of each modality m
    u_i^m = [link(c_i); s_i^m]                cell-state input of modality m's decoder
                                              (link: identity by default, as in eq. 14-15)
    g_i   = interaction_link(c_i)             (softmax by default, as in eq. 13)
    A     = sigmoid(A_logits)
    z_i   = (g_i A) * d_y(i)                  eq. 13 (interaction_input="shared", default)
    z_i^m = ([g_i; s_i^m] A_m) * d_y(i)       (interaction_input="shared_specific": A has
                                               K_shared + sum_m K_m rows, A_m = rows of c, s^m)
    l_i^m = u_i^m W_C^m + z_i W_DxC^m + v_y(i) W_V^m + sum_k offset_k^m[cov_ik]   eq. 14-15
    x_i^m ~ Likelihood_m(softmax(l_i^m) * size_factor_i^m, theta^m)

Guide (four encoders for two modalities)::

    (mu_c^m, sigma_c^m) = shared_encoder_m(x_i^m)        one expert per measured modality
    q(c_i)   = product of experts of the measured modalities' experts [and N(0, I)]  (eq. 12, A.2)
    q(s_i^m) = Normal(specific_encoder_m(x_i^m)), or N(0, I) where the cell lacks modality m
    d_y, v_y ~ Delta(loc) (MAP, default) or Normal(loc, scale)

Loss (eq. 18) = sum_m lambda_m rec_m + KL(c) + sum_m KL(s^m) + lambda_align L_align
+ lambda_disent L_disent + sum_m lambda_DxC^m sum|W_DxC^m| + lambda_A sum (A (1 - A))^2, with
L_align = mean over cells with both modalities of ||mu_c^a - mu_c^b||^2 / K_shared (summed
over modality pairs) and L_disent = sum_m sum of squared entries of the minibatch
cross-correlation between the posterior means of c and of s^m (:mod:`pyro_livi.penalties`).
Penalties are ``pyro.factor`` sites in per-cell units (times n_cells).

A cell without modality m: its obs_m site is masked, its expert m is left out of the product
and q(s^m) is the prior, so cells with RNA only are embedded from their RNA alone.
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method

from ..data.batch import Batch
from ..nn import GaussianEncoder
from ..penalties import alignment_penalty, disentanglement_penalty
from ..poe import product_of_experts
from .livi import LINKS
from ._base import DataNeeds, Option
from ._livi_family import LIVI_OUTPUTS, MULTIMODAL_LIVI_OPTIONS
from .multislivi import MultimodalLIVIBase, _per_modality

INTERACTION_INPUTS = ("shared", "shared_specific")


def _first_or_rest(value, modalities, first, rest, what):
    """Per-modality setting whose default differs for the first modality (the reference, RNA)."""
    resolved = _per_modality(value, modalities, what, default=None)
    return {m: (v if v is not None else (first if k == 0 else rest)) for k, (m, v) in enumerate(resolved.items())}


class DMLIVI(MultimodalLIVIBase):
    """DMLIVI as an explicit Pyro model/guide pair (shared c, specific s^m per modality).

    Parameters
    ----------
    n_features : {modality: number of features}, e.g. ``{"rna": 4000, "prot": 14}``.
    n_donors : N_y.
    n_covariate_categories : categories of each categorical covariate.
    n_shared : K_shared.
    n_specific : K_m per modality (int for all, or mapping); default 5 for the first modality
        and 2 for the others (seed 001, appendix A.1).
    n_dxc, n_persistent : K_DxC, K_V.
    shared_encoder_hidden, specific_encoder_hidden : MLP widths, one sequence for every
        modality or a per-modality mapping; defaults (128,) / (64,) for the first modality and
        (64,) / (32,) for the others.
    encoder_input : "log1p" (default) or "raw".
    likelihoods, modality_weights, donor_guide, l1_weight, a_weight, counts_sample :
        as in :class:`~pyro_livi.models.MultiSLIVI`.
    link : map of c into the decoders, "identity" (default, as W_C^m [c; s^m] in eq. 14-15)
        or "softmax" (LIVI's reference). With softmax(c) beside the linear s^m the decoders
        tend to use s^m alone and q(c) collapses to the prior (seen on simulated data), hence
        the identity default here.
    interaction_link : map of c into the interaction, "softmax" (default, eq. 13) or
        "identity".
    prior_expert : include the N(0, I) expert in the product (default; DESIGN section 5);
        False gives the plain product of the modality experts (appendix A.2).
    interaction_input : "shared" (eq. 13, default) or "shared_specific"
        ([interaction_link(c); s^m] enters the interaction).
    align_weight, disent_weight : lambda_align, lambda_disent (per cell; 0 removes the site).
    """

    summary = "multimodal LIVI with shared and modality-specific cell states; cells may lack a modality"
    reference = "seed 001 (DMLIVI, eq. 12-18); seed 000"
    data_needs = DataNeeds(modalities=(1, None), inputs="counts", donors="required", missing_modalities=True)
    outputs = LIVI_OUTPUTS + ("specific_state",)
    options = {
        "n_shared": Option(15, "K_shared, dimension of the shared cell state c", type=int,
                           flags=("--n-cell-state",), at_least=1),
        **MULTIMODAL_LIVI_OPTIONS,
        "protein_weight": Option(1.0, "weight lambda of every modality after the first (the MultiSLIVI paper uses 50 to "
                                 "200; the first keeps 1; > 0)", type=float, above=0),
        "link": Option("identity", "map of c into the decoders", choices=tuple(LINKS)),
        "interaction_link": Option("softmax", "map of c into the interaction", choices=tuple(LINKS)),
        "prior_expert": Option(True, "include the N(0, I) expert in the product of experts"),
        "interaction_input": Option("shared", "what enters the interaction: c, or c and s^m",
                                    choices=INTERACTION_INPUTS),
        "align_weight": Option(1.0, "lambda_align, weight of the shared-encoder alignment (per cell)", type=float,
                               at_least=0),
        "disent_weight": Option(1.0, "lambda_disent, weight of the disentanglement penalty (per cell)",
                                type=float, at_least=0),
    }

    def __init__(
        self,
        n_features: Mapping[str, int],
        n_donors: int,
        *,
        n_covariate_categories: Sequence[int] = (),
        n_shared: int = 15,
        n_specific: int | Mapping[str, int] | None = None,
        n_dxc: int = 100,
        n_persistent: int = 5,
        shared_encoder_hidden: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        specific_encoder_hidden: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        encoder_input: str = "log1p",
        likelihoods: Mapping[str, str] | str | None = None,
        modality_weights: Mapping[str, float] | None = None,
        link: str = "identity",
        interaction_link: str = "softmax",
        donor_guide: str = "delta",
        prior_expert: bool = True,
        interaction_input: str = "shared",
        l1_weight: float | Mapping[str, float] = 1e-3,
        a_weight: float = 1e-3,
        align_weight: float = 1.0,
        disent_weight: float = 1.0,
        counts_sample=None,
        name: str | None = None,
    ):
        if interaction_input not in INTERACTION_INPUTS:
            raise ValueError(f"interaction_input must be one of {INTERACTION_INPUTS}, got {interaction_input!r}")
        if interaction_link not in LINKS:
            raise ValueError(f"interaction_link must be one of {sorted(LINKS)}, got {interaction_link!r}")
        if align_weight < 0 or disent_weight < 0:
            raise ValueError("align_weight and disent_weight must be >= 0")
        super().__init__(name=name)
        modalities = tuple(n_features)
        self.n_shared = int(n_shared)
        self.n_specific = {m: int(k) for m, k in
                           _first_or_rest(n_specific, modalities, 5, 2, "n_specific").items()}
        shared_hidden = {m: list(h) for m, h in _first_or_rest(
            _hidden_mapping(shared_encoder_hidden, modalities), modalities, (128,), (64,),
            "shared_encoder_hidden").items()}
        specific_hidden = {m: list(h) for m, h in _first_or_rest(
            _hidden_mapping(specific_encoder_hidden, modalities), modalities, (64,), (32,),
            "specific_encoder_hidden").items()}
        self.prior_expert = bool(prior_expert)
        self.interaction_input = interaction_input
        self.interaction_link = LINKS[interaction_link]
        self.align_weight, self.disent_weight = float(align_weight), float(disent_weight)
        # rows of A: the shared factors, then (shared_specific only) each modality's specific ones
        self._a_rows = {m: list(range(self.n_shared)) for m in modalities}
        n_a_rows = self.n_shared
        if interaction_input == "shared_specific":
            for m in modalities:
                self._a_rows[m] += list(range(n_a_rows, n_a_rows + self.n_specific[m]))
                n_a_rows += self.n_specific[m]
        self._setup_decoders(
            n_features, n_donors, n_cell_input={m: self.n_shared + self.n_specific[m] for m in modalities},
            n_a_rows=n_a_rows, n_dxc=n_dxc, n_persistent=n_persistent,
            n_covariate_categories=n_covariate_categories, likelihoods=likelihoods,
            modality_weights=modality_weights, link=link, donor_guide=donor_guide, l1_weight=l1_weight,
            a_weight=a_weight, counts_sample=counts_sample)
        for m in modalities:
            setattr(self, f"encoder_shared_{m}",
                    GaussianEncoder(self.n_features[m], self.n_shared, shared_hidden[m], encoder_input))
            setattr(self, f"encoder_specific_{m}",
                    GaussianEncoder(self.n_features[m], self.n_specific[m], specific_hidden[m], encoder_input))
        self.config = dict(
            n_features=dict(self.n_features), n_donors=n_donors,
            n_covariate_categories=list(n_covariate_categories), n_shared=self.n_shared,
            n_specific=dict(self.n_specific), n_dxc=n_dxc, n_persistent=n_persistent,
            shared_encoder_hidden=shared_hidden, specific_encoder_hidden=specific_hidden,
            encoder_input=encoder_input, likelihoods=dict(self.likelihood_names),
            modality_weights=dict(self.modality_weights), link=link, interaction_link=interaction_link,
            donor_guide=donor_guide,
            prior_expert=self.prior_expert, interaction_input=interaction_input,
            l1_weight=dict(self.l1_weights), a_weight=self.a_weight, align_weight=self.align_weight,
            disent_weight=self.disent_weight,
        )
        #: names of the rows of A (assignment table)
        self.A_row_names = [f"c_{k}" for k in range(self.n_shared)]
        if interaction_input == "shared_specific":
            self.A_row_names += [f"s_{m}_{k}" for m in modalities for k in range(self.n_specific[m])]

    # ------------------------------------------------------------------------ the encoders
    def experts(self, batch: Batch) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Every encoder's Gaussian: {"shared": {m: (loc, scale) (B, K_shared)},
        "specific": {m: (loc, scale) (B, K_m)}}, computed from each modality's counts
        (whether or not the cell has the modality)."""
        return {
            "shared": {m: getattr(self, f"encoder_shared_{m}")(batch.x[m]) for m in self.modalities},
            "specific": {m: getattr(self, f"encoder_specific_{m}")(batch.x[m]) for m in self.modalities},
        }

    def posteriors(self, batch: Batch, experts=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The guide's posteriors: {"c": (loc, scale) (B, K_shared), "s_m": (loc, scale)
        (B, K_m)}. Modalities a cell lacks are left out of the product for c, and give the
        prior N(0, I) for s^m."""
        experts = experts if experts is not None else self.experts(batch)
        mods = self.modalities
        locs = torch.stack([experts["shared"][m][0] for m in mods])
        scales = torch.stack([experts["shared"][m][1] for m in mods])
        mask = torch.stack([batch.present[m] for m in mods])
        out = {"c": product_of_experts(locs, scales, mask, prior_expert=self.prior_expert)}
        for m in mods:
            loc, scale = experts["specific"][m]
            present = batch.present[m][:, None]
            out[f"s_{m}"] = (torch.where(present, loc, torch.zeros_like(loc)),
                             torch.where(present, scale, torch.ones_like(scale)))
        return out

    # ---------------------------------------------------------------------- model / guide
    @pyro_method
    def model(self, batch: Batch, observed: bool = True):
        """DMLIVI's eq. 12-18 (seed 001) for the B cells of ``batch``: sites ``V``, ``D`` (donor
        plate, while on), ``c`` (B, K_shared), ``s_<m>`` (B, K_m) and ``obs_<m>`` (B, G_m) per
        modality (masked where ``batch.present[m]`` is False), and the penalty factors.
        ``observed=False`` draws every ``obs_<m>`` instead of conditioning on the counts (posterior
        predictive checks; see :meth:`ZooModel.model`)."""
        D, V = self._donor_sites()
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            c = pyro.sample("c", self._standard_normal(batch, self.n_shared))
            s = {m: pyro.sample(f"s_{m}", self._standard_normal(batch, self.n_specific[m]))
                 for m in self.modalities}
            h, g = self.link(c), self.interaction_link(c)
            for m in self.modalities:
                u = torch.cat([h, s[m]], dim=-1)  # eq. 14-15: W_C^m acts on [link(c); s^m]
                z = self._interaction(g, s[m], m, batch, D)  # eq. 13
                self._observe_weighted(m, self._mean(m, u, z, batch, V), u, batch, observed)
        if D is not None:
            self._decoder_penalties(batch)
        self._latent_penalties(batch)

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
        """q(c_i) = product of the measured modalities' experts (eq. 12), q(s_i^m) = Normal(specific
        encoder m) (the prior where the cell lacks m), and the donor guide; shapes as in
        :meth:`model`; ``observed`` changes nothing."""
        self._donor_guide_sites()
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            post = self.posteriors(batch)
            pyro.sample("c", dist.Normal(*post["c"]).to_event(1))
            for m in self.modalities:
                pyro.sample(f"s_{m}", dist.Normal(*post[f"s_{m}"]).to_event(1))

    def _interaction(self, g: torch.Tensor, s_m: torch.Tensor, m: str, batch: Batch, D) -> torch.Tensor | None:
        """z (B, K_DxC) for modality m from g = interaction_link(c) (B, K_shared) and s^m (B, K_m):
        (g A) * d_y (eq. 13), or ([g; s^m] A_m) * d_y with interaction_input="shared_specific";
        None while the interaction is off."""
        if D is None:
            return None
        if self.interaction_input == "shared":
            return (g @ self.A) * D[batch.donor]
        return (torch.cat([g, s_m], dim=-1) @ self.A[self._a_rows[m]]) * D[batch.donor]

    def _latent_penalties(self, batch: Batch) -> None:
        """L_align and L_disent as factor sites, per cell (times n_cells), from the encoders'
        posterior means on this minibatch."""
        if self.align_weight == 0 and self.disent_weight == 0:
            return
        experts = self.experts(batch)
        if self.align_weight > 0 and len(self.modalities) > 1:
            value = sum(alignment_penalty(experts["shared"][a][0], experts["shared"][b][0],
                                          batch.present[a] & batch.present[b])
                        for a, b in combinations(self.modalities, 2))
            pyro.factor("penalty_align", -batch.n_cells * self.align_weight * value)
        if self.disent_weight > 0:
            post = self.posteriors(batch, experts)
            value = disentanglement_penalty(post["c"][0], {m: post[f"s_{m}"][0] for m in self.modalities},
                                            {m: batch.present[m] for m in self.modalities})
            pyro.factor("penalty_disent", -batch.n_cells * self.disent_weight * value)

    # ------------------------------------------------------------------- posterior summaries
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (loc, scale) of the shared cell state c, each (B, K_shared)."""
        return self.posteriors(batch)["c"]

    def encode_latents(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Posterior (loc, scale) of every cell-level latent: "c" and "s_<modality>"."""
        return self.posteriors(batch)

    def loadings(self) -> dict[str, torch.Tensor]:
        """Per modality: "W_C__m" (K_shared, G_m) and "W_S__m" (K_m, G_m), the two blocks of
        W_C^m acting on link(c) and on s^m; "W_DxC__m" (K_DxC, G_m); "W_V__m" (K_V, G_m)."""
        out = {}
        for m in self.modalities:
            W = getattr(self, f"W_C__{m}").detach()
            out[f"W_C__{m}"], out[f"W_S__{m}"] = W[:self.n_shared], W[self.n_shared:]
            out[f"W_DxC__{m}"] = getattr(self, f"W_DxC__{m}").detach()
            out[f"W_V__{m}"] = getattr(self, f"W_V__{m}").detach()
        return out


def _hidden_mapping(value, modalities):
    """Encoder widths: None, one sequence (every modality) or a per-modality mapping."""
    if value is None or isinstance(value, Mapping):
        return value
    return {m: tuple(value) for m in modalities}
