"""MOFA-like linear factor model (Argelaguet et al. 2018, MOFA; Argelaguet et al. 2020, MOFA+;
reference implementation bioFAM/mofapy2; Pyro formulation with the regularised horseshoe:
Qoku & Buettner 2023, MuVI, MLO-lab/MuVI ``muvi/core/models.py``). Seed 002, section 5.3.

Generative model, for cell i, view (modality) m with G_m features and K factors::

    z_i        ~ Normal(0, I_K)                                     cell plate (minibatched)
    eta_im     = b_m + z_i W_m                                      W_m: (K, G_m), b_m: (G_m,)
    x_img      ~ Likelihood_m(mean_img)                             obs_<m>, masked where the
                                                                    cell lacks view m
    mean_img   = eta_img                  for ``normal`` views     (noise sd sigma_mg per feature)
               = softplus(eta_img)        for every other likelihood (``poisson``: the rate, as
                                          mofapy2's Poisson link log(1 + e^eta); ``bernoulli``:
                                          the registry's P(x = 1) = 1 - exp(-mean) = sigmoid(eta))

Sparsity prior on W_m, one per view and factor (``prior``):

- ``"horseshoe"`` (default; regularised horseshoe, Piironen & Vehtari 2017, as in MuVI)::

      tau_m ~ HalfCauchy(tau0)         view scale           site tau_<m>      ()
      delta_mk ~ HalfCauchy(1)         factor scale         site delta_<m>    (K, 1)
      lambda_mkg ~ HalfCauchy(1)       local scale          site lambda_<m>   (K, G_m)
      c2_mk ~ InverseGamma(nu/2, nu s^2/2)   slab           site c2_<m>       (K, 1)
      l = tau_m delta_mk lambda_mkg,   W_mkg ~ Normal(0, c l / sqrt(c^2 + l^2))

  with nu = ``slab_df`` and s = ``slab_scale`` (the largest loadings are regularised as by a
  Normal(0, s^2) slab instead of left unshrunk) and tau0 = ``global_scale``, by default
  Piironen & Vehtari's (2017, eq. 3.12) p0 / (G - p0) / sqrt(N) with p0 / G = 0.1 (a tenth of the
  loadings of a factor expected to be nonzero, noise sd 1) and N the number of cells.
- ``"ard"`` (mofapy2's ARD, without the spike): alpha_mk ~ Gamma(1e-3, 1e-3) (site alpha_<m>,
  a precision), W_mkg ~ Normal(0, alpha_mk^-1/2).
- ``"spike_slab"`` (a relaxed, continuous spike-and-slab, George & McCulloch 1993, in place of
  mofapy2's discrete one): alpha_mk as for ARD, theta_mk ~ Beta(1, 1) (site theta_<m>, the slab
  probability), W_mkg ~ theta_mk Normal(0, alpha_mk^-1) + (1 - theta_mk) Normal(0, r^2 alpha_mk^-1)
  with spike ratio r = ``spike_ratio``.

Point estimates (no prior): the intercepts b_m and the likelihood's per-feature parameters
(``normal``: log sigma_mg, one noise scale per feature; ``nb``: log theta_g).

Guide. Global sites are mean-field, written out: Normal(loc, scale) for W_m, LogNormal(loc,
scale) for the positive scales and precisions, a logit-Normal for theta. The factors are
amortised in closed form: q(z_i) = MultivariateNormal(mu_i, Lambda_i^-1) with::

    Lambda_i = I + sum_m present_im E_q[W_m diag(kappa_m) W_m^T]
             = I + sum_m present_im (M_m diag(kappa_m) M_m^T + diag(sum_g kappa_mg S_mg^2))
    mu_i     = Lambda_i^-1 sum_m present_im M_m diag(kappa_m) (y_im - c_m)

(M_m, S_m: loc and scale of q(W_m)). For ``normal`` views kappa_mg = sigma_mg^-2, y = x and
c_m = b_m: this is mofapy2's variational update of Z (the optimal q(z_i) given q(W) and the
noise), so there is no amortisation gap. For other likelihoods it is a Gaussian stand-in on a
transformed scale: y = log1p(x) for count likelihoods, y = x for ``bernoulli``, with
per-feature pseudo-precisions kappa_m and centres c_m learned by the guide. A cell lacking a
view gets no term from it, so a cell with no view has the prior as its posterior. New cells
(held-out sets, subsets) are encoded from their own data.

Switching factors off (option ``prune_snr``, component ``"prune"``). A factor's
signal-to-noise ratio in view m, snr_mk = sum_g M_mkg^2 kappa_mg, is the variance it puts into
the view in units of the noise. Pure noise of G_m features in N_m cells has principal
components up to the Marchenko-Pastur edge (1 + sqrt(G_m / N_m))^2 (in noise units), so a
factor fitted to noise reaches an SNR of up to (1 + sqrt(G_m / N_m))^2 - 1, while a real factor
is fitted above that exactly when it can be told from the noise at all (Baik, Ben Arous &
Peche 2005; :func:`noise_snr_edge`). The guide's flexible q(z) (full covariance, no mean-field
over factors) lets spare factors fit the top noise components at a fraction of that edge
(variance explained a few 1e-3 per view); mofapy2, with a mean-field q(Z) and ARD, leaves
such factors near zero. In the last training stage (``default_stages``), and in every fitted model,
a factor whose SNR in a view is below ``prune_snr`` times the edge is switched off in that
view: its loadings there are zero in the model, in q(z) and in the outputs, so its variance
explained is exactly 0 (a factor off in every view has the prior as posterior). This is
mofapy2's factor dropping (``drop_factor_threshold``, a fixed variance explained) with the
threshold set by the noise instead (the PCA initialisation likewise starts the components
below the Marchenko-Pastur edge of all views together at zero). ``prune_snr=0`` keeps every
factor.

Minibatches: z_i and obs_<m> are in the plate ``cells`` (size n_cells, subsample batch.index),
which scales their terms by n_cells / B; the global sites (W, its scales; event shapes (K, G_m)
or (K, 1), no plate) are outside it and enter the ELBO once per step, so each step's loss estimates the full-data negative ELBO.
Memory is O(B sum_m G_m + K sum_m G_m) per step, independent of n_cells.

Shapes: x_m (B, G_m) float32 (continuous values or counts); z (B, K); W_m (K, G_m).
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.nn import PyroParam, pyro_method

from ..data.batch import Batch
from ..infer.stages import EarlyStopping, Stage
from ..likelihoods import get_likelihood
from ._base import DataNeeds, Option, ZooModel

PRIORS = ("horseshoe", "ard", "spike_slab")
INITS = ("pca", "random")
#: likelihoods whose guide term uses log1p(x) (counts); any other non-normal one uses x itself
_COUNT_LIKELIHOODS = ("poisson", "nb", "zinb", "nb_mixture")


def noise_snr_edge(n_features: int, n_cells: int) -> float:
    """The largest signal-to-noise ratio a factor fitted to pure noise reaches:
    (1 + sqrt(G / N))^2 - 1 = 2 sqrt(G / N) + G / N for G features and N cells.

    (1 + sqrt(G / N))^2 is the upper edge of the Marchenko-Pastur law, the largest eigenvalue
    of the sample covariance of N cells of G features of unit white noise (Marchenko & Pastur
    1967); a factor fitted to the top principal component of such noise carries that
    eigenvalue minus the noise floor 1 (probabilistic PCA's maximum-likelihood loading, Tipping
    & Bishop 1999). A real factor of signal-to-noise ratio l is fitted at about
    l + G/N + G/(N l) (Baik, Ben Arous & Peche 2005), above this edge exactly when l > sqrt(G/N),
    the smallest l whose principal component separates from the noise; empirical variational
    Bayes matrix factorisation switches components off a little above the same edge
    (Nakajima et al. 2013). Raises ValueError when N < 1."""
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    gamma = n_features / n_cells
    return 2.0 * math.sqrt(gamma) + gamma


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    """softplus^-1(y) = log(expm1(y)) for y > 0, stable for large y."""
    y = y.clamp(min=1e-4)
    return y + torch.log(-torch.expm1(-y))


class MOFA(ZooModel):
    """MOFA-like multi-view linear factor model with a sparsity prior per view and factor.

    Parameters
    ----------
    n_features : {modality: G_m}, in modality order (the views).
    n_factors : K, number of factors.
    prior : ``"horseshoe"`` (regularised horseshoe, default), ``"ard"`` or ``"spike_slab"``.
    likelihoods : {modality: registered likelihood name}; default ``"normal"`` for every view.
    slab_df, slab_scale : nu and s of the horseshoe's slab, c^2 ~ InverseGamma(nu/2, nu s^2/2);
        s is in the units of the linear predictor (data units for ``normal`` views).
    spike_ratio : r, the spike's standard deviation relative to the slab's (``spike_slab``).
    global_scale : tau0 of the horseshoe (default: from ``n_cells``, see the module docstring;
        1.0 when ``n_cells`` is not given either).
    n_cells : N, number of cells of the data (sets the default tau0).
    init : ``"pca"``: loadings, intercepts and noise initialised from a PCA of a sample of cells
        (given to :meth:`from_dataset`); ``"random"``: loadings N(0, 0.1^2), intercepts 0, noise 1.
    name : Pyro name prefix (unique per instance by default).

    Raises ValueError on an unknown prior, an empty view list or K < 1.
    """

    summary = "MOFA-like linear factor model: Z W_m^T per view, horseshoe/ARD/spike-slab sparse loadings"
    reference = ("seed 002, section 5.3; Argelaguet et al. 2018 (MOFA), 2020 (MOFA+), bioFAM/mofapy2; "
                 "Qoku & Buettner 2023 (MuVI)")
    data_needs = DataNeeds(modalities=(1, None), inputs="any", donors="unused", missing_modalities=True,
                           preferred_inputs=("continuous",))
    options = {
        "n_factors": Option(10, "K, number of factors", type=int, at_least=1),
        "prior": Option("horseshoe", "sparsity prior of the loadings, per view and factor", choices=PRIORS),
        "slab_df": Option(4.0, "degrees of freedom nu of the horseshoe's slab", type=float, above=0),
        "slab_scale": Option(1.0, "scale s of the horseshoe's slab, in units of the linear predictor",
                             type=float, above=0),
        "global_scale": Option(None, "tau0, scale of the horseshoe's view scales (default: "
                               "0.1 / 0.9 / sqrt(n_cells))", type=float, above=0),
        "spike_ratio": Option(0.05, "spike sd / slab sd of the spike-and-slab prior", type=float, above=0),
        "init": Option("pca", "initial loadings: PCA of a cell sample (the centred views side by side, "
                       "unscaled, as mofapy2) or random", choices=INITS),
        "prune_snr": Option(1.0, "switch a factor off in a view at the end of training when its "
                            "signal-to-noise ratio there is below this multiple of the largest that pure "
                            "noise reaches, (1 + sqrt(G_m / N_m))^2 - 1; 0 keeps every factor", type=float,
                            at_least=0),
        "prune_epochs": Option(0.1, "fraction of the epochs trained after the switch-off (the last stage)",
                               type=float, schedule=True, at_least=0, at_most=1),
        "factor_lr": Option(0.01, "Adam learning rate of every parameter (overrides --lr)", type=float,
                            schedule=True, above=0),
        "lr_decay": Option(0.1, "learning rate at the last epoch relative to the first", type=float,
                           schedule=True, above=0),
    }
    outputs = ("latent", "loadings", "dispersions", "variance_explained")
    latent_name = "factors"
    latent_site = "z"
    #: ``"prune"``: factors below the noise threshold are switched off (:meth:`active_factors`)
    components_all = ("prune",)

    def __init__(self, n_features: dict, *, n_factors: int = 10, prior: str = "horseshoe",
                 likelihoods: dict | None = None, slab_df: float = 4.0, slab_scale: float = 1.0,
                 spike_ratio: float = 0.05, global_scale: float | None = None, n_cells: int | None = None,
                 view_cells: dict | None = None, init: str = "pca", prune_snr: float = 1.0,
                 name: str | None = None):
        super().__init__(name=name)
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        if not n_features:
            raise ValueError("MOFA needs at least one view")
        if int(n_factors) < 1:
            raise ValueError(f"n_factors must be >= 1, got {n_factors}")
        if not float(prune_snr) >= 0:
            raise ValueError(f"prune_snr must be >= 0 (0: no factor is switched off), got {prune_snr}")
        n_features = {str(m): int(g) for m, g in n_features.items()}
        view_cells = {m: int((view_cells or {}).get(m, n_cells or 0)) for m in n_features}
        likelihoods = {m: (likelihoods or {}).get(m, "normal") for m in n_features}
        self.config = dict(n_features=n_features, n_factors=int(n_factors), prior=prior,
                           likelihoods=likelihoods, slab_df=float(slab_df), slab_scale=float(slab_scale),
                           spike_ratio=float(spike_ratio), global_scale=global_scale, n_cells=n_cells,
                           view_cells=view_cells, init=init, prune_snr=float(prune_snr))
        if global_scale is None:
            global_scale = 0.1 / 0.9 / math.sqrt(n_cells) if n_cells else 1.0
        self.global_scale = float(global_scale)
        self.modalities = tuple(n_features)
        self.n_features = n_features
        self.n_factors = K = int(n_factors)
        self.prior = prior
        self.slab_df, self.slab_scale, self.spike_ratio = float(slab_df), float(slab_scale), float(spike_ratio)
        self.likelihoods = {m: get_likelihood(name) for m, name in likelihoods.items()}
        #: per view, the SNR below which a factor is switched off (0: never; no cell count given)
        self.snr_threshold = {m: float(prune_snr) * noise_snr_edge(G, view_cells[m]) if view_cells[m] else 0.0
                              for m, G in n_features.items()}
        gen = torch.Generator().manual_seed(0)
        positive = constraints.softplus_positive
        for m, G in n_features.items():
            self._init_likelihood_params(m, G, K)
            setattr(self, f"b_{m}", PyroParam(torch.zeros(G)))
            setattr(self, f"W_loc_{m}", PyroParam(0.1 * torch.randn(K, G, generator=gen)))
            setattr(self, f"W_scale_{m}", PyroParam(torch.full((K, G), 1e-2), constraint=positive))
            for site, shape in self._scale_sites(m).items():
                setattr(self, f"{site}_loc", PyroParam(torch.zeros(shape)))
                setattr(self, f"{site}_scale", PyroParam(torch.full(shape, 0.1), constraint=positive))
            if likelihoods[m] != "normal":
                setattr(self, f"q_log_kappa_{m}", PyroParam(torch.zeros(G)))
                setattr(self, f"q_center_{m}", PyroParam(torch.zeros(G)))

    def _scale_sites(self, m: str) -> dict[str, tuple[int, ...]]:
        """Positive (or unit-interval, ``theta``) global sites of view ``m``'s prior: {site: shape}."""
        K, G = self.n_factors, self.n_features[m]
        if self.prior == "horseshoe":
            return {f"tau_{m}": (), f"delta_{m}": (K, 1), f"lambda_{m}": (K, G), f"c2_{m}": (K, 1)}
        if self.prior == "ard":
            return {f"alpha_{m}": (K, 1)}
        return {f"alpha_{m}": (K, 1), f"theta_{m}": (K, 1)}

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, n_init_cells: int = 5000,
                     **options) -> "MOFA":
        """MOFA sized for ``dataset`` (one view per modality). Default likelihoods: ``normal`` for
        the modalities declared continuous, ``poisson`` for count modalities; ``likelihoods``
        ({modality: name}) overrides them. With ``init="pca"`` (default) the parameters start
        from a PCA of up to ``n_init_cells`` cells (see :meth:`initialise_from`)."""
        continuous = set(dataset.spec.continuous_modalities)
        chosen = {m: "normal" if m in continuous else "poisson" for m in dataset.modalities}
        chosen.update({m: v for m, v in (likelihoods or {}).items() if m in chosen})
        options.setdefault("n_cells", dataset.n_cells)
        options.setdefault("view_cells", {m: int(np.sum(dataset.present[m])) for m in dataset.modalities})
        model = cls({m: dataset.n_features[m] for m in dataset.modalities}, likelihoods=chosen, **options)
        if model.config["init"] == "pca":
            model.initialise_from(dataset, n_cells=n_init_cells)
        return model

    @torch.no_grad()
    def initialise_from(self, dataset, *, n_cells: int = 5000, seed: int = 0) -> None:
        """Start from a PCA of a random sample of up to ``n_cells`` cells, as mofapy2 starts its
        factors (``initZ(qmean="pca")``: a PCA of the centred views side by side, unscaled).

        Each view is put on its working scale (x for ``normal``, log1p(x) for count
        likelihoods) and centred over the cells that have it (absent cells count as the mean);
        the views are concatenated (D = sum_m G_m features) without rescaling, so a feature
        weighs by its variance, whatever its view. The top-K SVD X = U S V^T gives, for the
        components whose eigenvalue l_j = S_j^2 / n exceeds the Marchenko-Pastur edge of the
        noise, s^2 (1 + sqrt(D / n))^2 (s^2: the variance per dimension left after the top K),
        probabilistic PCA's maximum-likelihood loadings W_j = sqrt(l_j - s^2) V_j (Tipping &
        Bishop 1999; factors of unit variance); the other factors start at loadings
        N(0, 1e-6), so components of pure noise are not started at full strength. Intercepts
        start at the feature means (through softplus^-1 for non-normal views), the noise
        variance of normal views at the variance the kept components leave, v_g - sum_j W_jg^2
        (at least 1% of the feature variance v_g), the guide's pseudo-precisions of other views
        at its inverse.

        The full-covariance q(z) is indifferent to rotations of the factors, so only the
        sparsity prior turns them away from these principal axes, and it does so slowly: the
        start largely sets which rotation is found. mofapy2 starts from the same axes.
        """
        rng = np.random.default_rng(seed)
        n = dataset.n_cells
        idx = np.sort(rng.choice(n, size=min(n, int(n_cells)), replace=False))
        batch = dataset.batch(idx)
        blocks, variances, stats = [], [], {}
        for m in self.modalities:
            x = batch.x[m].float()
            present = batch.present[m].bool()
            lik = self.config["likelihoods"][m]
            y = torch.log1p(x.clamp(min=0)) if lik in _COUNT_LIKELIHOODS else x
            rows = y[present] if present.any() else torch.zeros(1, y.shape[1])
            mean = rows.mean(0)
            blocks.append(torch.where(present[:, None], y - mean, torch.zeros_like(y)))
            variances.append(rows.var(0, unbiased=False) if rows.shape[0] > 1 else torch.ones(y.shape[1]))
            stats[m] = (x, present, mean)
        X, var = torch.cat(blocks, dim=1), torch.cat(variances)
        n_rows, D = X.shape
        K = self.n_factors
        q = min(K, min(X.shape) - 1) if min(X.shape) > 1 else 0
        W_all = torch.zeros(K, D)
        if q > 0:
            if min(X.shape) > 3 * q:
                _, S, V = torch.svd_lowrank(X, q=q, niter=4)
            else:
                _, S, Vh = torch.linalg.svd(X, full_matrices=False)
                V = Vh.T
            ell = S[:q].pow(2) / n_rows
            noise = (X.pow(2).sum() / n_rows - ell.sum()).clamp(min=0) / max(D - q, 1)
            q = int((ell > noise * (1 + math.sqrt(D / n_rows)) ** 2).sum())
            W_all[:q] = (ell[:q] - noise).clamp(min=0).sqrt()[:, None] * V[:, :q].T
        W_all[q:] = 1e-3 * torch.randn(K - q, D, generator=torch.Generator().manual_seed(seed))
        # start noise at least 1% of the feature's variance and 0.1% of its view's mean variance:
        # a feature (nearly) constant in the subsample would otherwise start with a near-zero
        # noise, whose huge precision dominates q(z) (on PBMC 10k with all 4,000 genes the first
        # epoch's loss was then 6e4 times higher and the fit ended with every factor switched off)
        view_floor = torch.cat([torch.full_like(v, 1e-3 * float(v.mean())) for v in variances])
        psi = torch.maximum(var - W_all[:q].pow(2).sum(0), torch.maximum(0.01 * var, view_floor)).clamp(min=1e-12)
        start = 0
        for m in self.modalities:
            x, present, mean = stats[m]
            G = self.n_features[m]
            getattr(self, f"W_loc_{m}").copy_(W_all[:, start:start + G])
            sd = psi[start:start + G].sqrt()
            start += G
            lik = self.config["likelihoods"][m]
            if lik == "normal":
                getattr(self, f"b_{m}").copy_(mean)
                getattr(self, f"lik_{m}_log_scale").copy_(sd.log())
            else:
                rate = x[present].mean(0) if present.any() else torch.ones(G)
                getattr(self, f"b_{m}").copy_(_inv_softplus(rate))
                getattr(self, f"q_center_{m}").copy_(mean)
                getattr(self, f"q_log_kappa_{m}").copy_(-2 * sd.log())

    @classmethod
    def default_stages(cls, *, epochs: int, patience: int | None = 20, factor_lr: float = 0.01,
                       lr_decay: float = 0.1, prune_epochs: float = 0.1) -> list[Stage]:
        """Two stages training every parameter, ``epochs`` epochs in all: ``"train"`` with every
        factor free, then ``"prune"`` (the last ``prune_epochs`` fraction of the epochs, at least
        one) with the factors below the noise threshold switched off (component ``"prune"``,
        :meth:`active_factors`) while the others settle without them. Adam's rate starts at
        ``factor_lr`` and falls geometrically to ``lr_decay`` times that by the last epoch,
        across both stages. (Adam's first steps move every parameter by about the rate, whatever
        its gradient, so a rate much above 0.01 scrambles the small loadings of the PCA start.)
        Each stage stops after ``patience`` epochs without a new best loss (any improvement
        counts: the one-sample loss is noisy while the factors still rotate towards sparse
        loadings, so a relative threshold would stop too early).
        Raises ValueError when ``prune_epochs`` is outside [0, 1]."""
        if not 0.0 <= float(prune_epochs) <= 1.0:
            raise ValueError(f"prune_epochs must be in [0, 1], got {prune_epochs}")
        stop = EarlyStopping(patience=patience, min_delta=0.0) if patience else None
        last = min(epochs, max(1, round(float(prune_epochs) * epochs)))
        first = epochs - last
        stages = []
        if first > 0:
            stages.append(Stage("train", first, train=("all",), early_stopping=stop,
                                lr_decay=lr_decay ** (first / epochs), group_lr={"all": factor_lr}))
        stages.append(Stage("prune", last, train=("all",), components=("prune",), early_stopping=stop,
                            lr_decay=lr_decay ** (last / epochs),
                            group_lr={"all": factor_lr * lr_decay ** (first / epochs)}))
        return stages

    # ----------------------------------------------------------------------- model / guide
    def _prior_W(self, m: str) -> dist.Distribution:
        """p(W_m | scales), event shape (K, G_m), sampling the prior's scale sites (each one
        site with event shape (K, 1) or (K, G_m); global sites need no plate)."""
        K, G = self.n_factors, self.n_features[m]
        ones = getattr(self, f"b_{m}").new_ones(())
        if self.prior == "horseshoe":
            tau = pyro.sample(f"tau_{m}", dist.HalfCauchy(self.global_scale * ones))
            delta = pyro.sample(f"delta_{m}", dist.HalfCauchy(ones).expand([K, 1]).to_event(2))
            half_df = 0.5 * self.slab_df
            c2 = pyro.sample(f"c2_{m}", dist.InverseGamma(half_df * ones, half_df * self.slab_scale ** 2 * ones)
                             .expand([K, 1]).to_event(2))
            lam = pyro.sample(f"lambda_{m}", dist.HalfCauchy(ones).expand([K, G]).to_event(2))
            scale_sq = (tau * delta * lam).pow(2)
            return dist.Normal(0.0 * ones, torch.sqrt(c2 * scale_sq / (c2 + scale_sq))).to_event(2)
        alpha = pyro.sample(f"alpha_{m}", dist.Gamma(1e-3 * ones, 1e-3 * ones).expand([K, 1]).to_event(2))
        slab = alpha.rsqrt().expand(*alpha.shape[:-1], G)
        if self.prior == "ard":
            return dist.Normal(0.0 * ones, slab).to_event(2)
        theta = pyro.sample(f"theta_{m}", dist.Beta(ones, ones).expand([K, 1]).to_event(2))
        scales = torch.stack([slab, self.spike_ratio * slab], dim=-1)
        weights = torch.stack([theta, 1 - theta], dim=-1).expand(*slab.shape, 2)
        return dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(0.0 * scales, scales)).to_event(2)

    @pyro_method
    def model(self, batch: Batch, observed: bool = True):
        """MOFA's generative model (module docstring; Argelaguet et al. 2018, 2020): the sparse
        loadings ``W_<m>`` (K, G_m) with their prior's scale sites, ``z`` (B, K) ~ N(0, I) for the
        B cells of ``batch``, and ``obs_<m>`` (B, G_m) ~ likelihood(link(b_m + z W_m)) per view
        (masked where ``batch.present[m]`` is False). ``observed=False`` draws every ``obs_<m>``
        instead of conditioning on the data (posterior predictive checks; see
        :meth:`ZooModel.model`)."""
        K = self.n_factors
        W = {}
        active = self.active_factors()
        for m in self.modalities:
            W[m] = pyro.sample(f"W_{m}", self._prior_W(m))
            if W[m].dim() > 2 and W[m].shape[:-2].numel() == 1:  # one draw, padded by Predictive
                W[m] = W[m].reshape(W[m].shape[-2:])
            W[m] = W[m] * active[m].to(W[m].dtype)[:, None]
        ref = getattr(self, f"b_{self.modalities[0]}")
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            z = pyro.sample("z", dist.MultivariateNormal(ref.new_zeros(K), scale_tril=torch.eye(K, device=ref.device)))
            for m in self.modalities:
                eta = getattr(self, f"b_{m}") + z @ W[m]
                self._observe(m, self.link_mean(m, eta), z, batch, observed)

    def _q_positive(self, site: str, shape) -> dist.Distribution:
        loc, scale = getattr(self, f"{site}_loc"), getattr(self, f"{site}_scale")
        if site.startswith("theta_"):
            return dist.TransformedDistribution(dist.Normal(loc, scale), [dist.transforms.SigmoidTransform()])
        return dist.LogNormal(loc, scale)

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
        """Mean-field guide of the loadings and their scale sites (Normal / LogNormal), and q(z_i)
        (B, K) in closed form from the views (module docstring); ``observed`` changes nothing."""
        for m in self.modalities:
            for site, shape in self._scale_sites(m).items():
                q = self._q_positive(site, shape)
                pyro.sample(site, q.to_event(len(shape)) if shape else q)
            q = dist.Normal(getattr(self, f"W_loc_{m}"), getattr(self, f"W_scale_{m}")).to_event(2)
            pyro.sample(f"W_{m}", q)
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            loc, scale_tril = self._posterior_z(batch)
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    # ------------------------------------------------------------------- posterior summaries
    def _noise_precision(self, m: str) -> torch.Tensor:
        """kappa_m (G_m,): sigma_mg^-2 for ``normal`` views, the guide's pseudo-precisions on the
        transformed scale for the others."""
        if self.config["likelihoods"][m] == "normal":
            return torch.exp(-2 * getattr(self, f"lik_{m}_log_scale"))
        return torch.exp(getattr(self, f"q_log_kappa_{m}"))

    @torch.no_grad()
    def factor_snr(self) -> dict[str, torch.Tensor]:
        """Signal-to-noise ratio of every factor in every view, {view: (K,)}:
        snr_mk = sum_g M_mkg^2 kappa_mg, the variance factor k (prior variance 1) puts into view m
        in units of the noise, summed over its features (M: posterior mean loadings; kappa: noise
        precisions, see :meth:`_noise_precision`)."""
        return {m: (getattr(self, f"W_loc_{m}").pow(2) * self._noise_precision(m)).sum(-1).detach()
                for m in self.modalities}

    def active_factors(self) -> dict[str, torch.Tensor]:
        """Which factors are switched on in each view, {view: (K,) bool}.

        With component ``"prune"`` on (the last training stage, and every fitted model), factor k
        is off in view m when its signal-to-noise ratio (:meth:`factor_snr`) is below
        ``prune_snr`` times :func:`noise_snr_edge` (G_m, N_m), the most a factor fitted to pure
        noise of that view's size reaches: the factor cannot be told from the noise there
        (mofapy2 drops factors whose variance explained falls below a fixed
        ``drop_factor_threshold``; here the threshold follows from the noise). A factor off in
        a view has zero loadings there, in the model and in q(z); off in every view, its
        posterior is the prior. A factor off stays off: its loadings get no likelihood
        gradient. With the component off every factor is on."""
        if "prune" not in self.components:
            return {m: torch.ones(self.n_factors, dtype=torch.bool, device=getattr(self, f"b_{m}").device)
                    for m in self.modalities}
        return {m: snr > self.snr_threshold[m] for m, snr in self.factor_snr().items()}

    def _view_terms(self, m: str, x: torch.Tensor, active: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(E_q[W_m diag(kappa_m) W_m^T] (K, K), M_m diag(kappa_m) (y_m - c_m) (B, K)) of view m,
        rows of the factors not ``active`` (K,) bool zeroed."""
        M, S = getattr(self, f"W_loc_{m}"), getattr(self, f"W_scale_{m}")
        if active is not None:
            M, S = M * active[:, None], S * active[:, None]
        kappa = self._noise_precision(m)
        if self.config["likelihoods"][m] == "normal":
            resid = x - getattr(self, f"b_{m}")
        else:
            y = torch.log1p(x.clamp(min=0)) if self.config["likelihoods"][m] in _COUNT_LIKELIHOODS else x
            resid = y - getattr(self, f"q_center_{m}")
        Mk = M * kappa
        precision = Mk @ M.T + torch.diag((S.pow(2) * kappa).sum(-1))
        return precision, (resid * kappa) @ M.T

    def _posterior_z(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Closed-form q(z_i): (mu (B, K), Cholesky factor of the covariance (B, K, K))."""
        K = self.n_factors
        ref = getattr(self, f"b_{self.modalities[0]}")
        B = batch.index.shape[0]
        Lam = torch.eye(K, device=ref.device).expand(B, K, K)
        h = ref.new_zeros(B, K)
        active = self.active_factors()
        for m in self.modalities:
            precision, eta = self._view_terms(m, batch.x[m], active[m].to(ref.dtype))
            p = batch.present[m].to(ref.dtype)
            Lam = Lam + p[:, None, None] * precision
            h = h + p[:, None] * eta
        L = torch.linalg.cholesky(Lam)
        mu = torch.cholesky_solve(h[..., None], L)[..., 0]
        cov = torch.cholesky_inverse(L)
        return mu, torch.linalg.cholesky(cov)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, sd) of z, each (B, K): the closed-form q(z_i) of the guide."""
        mu, tril = self._posterior_z(batch)
        return mu, tril.pow(2).sum(-1).sqrt()

    def loadings(self) -> dict[str, torch.Tensor]:
        """Posterior means of the loadings, {``W__<modality>``: (K, G_m)}; zero for the factors
        switched off in a view (:meth:`active_factors`)."""
        active = self.active_factors()
        return {f"W__{m}": getattr(self, f"W_loc_{m}").detach() * active[m][:, None] for m in self.modalities}

    def intercepts(self) -> dict[str, torch.Tensor]:
        """Intercepts b_m (G_m,), on the linear-predictor scale, per modality."""
        return {m: getattr(self, f"b_{m}").detach() for m in self.modalities}

    def link_mean(self, modality: str, eta: torch.Tensor) -> torch.Tensor:
        """Mean of the observation site given the linear predictor eta (identity for ``normal``,
        softplus otherwise, floored at 1e-6 so that a very negative eta cannot underflow to a
        zero rate, under which a positive count has probability 0)."""
        if self.config["likelihoods"][modality] == "normal":
            return eta
        return F.softplus(eta).clamp_min(1e-6)
