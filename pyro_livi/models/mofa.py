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
    data_needs = DataNeeds(modalities=(1, None), inputs="any", donors="unused", missing_modalities=True)
    options = {
        "n_factors": Option(10, "K, number of factors", type=int),
        "prior": Option("horseshoe", "sparsity prior of the loadings, per view and factor", choices=PRIORS),
        "slab_df": Option(4.0, "degrees of freedom nu of the horseshoe's slab", type=float),
        "slab_scale": Option(1.0, "scale s of the horseshoe's slab, in units of the linear predictor",
                             type=float),
        "global_scale": Option(None, "tau0, scale of the horseshoe's view scales (default: "
                               "0.1 / 0.9 / sqrt(n_cells))", type=float),
        "spike_ratio": Option(0.05, "spike sd / slab sd of the spike-and-slab prior", type=float),
        "init": Option("pca", "initial loadings: PCA of a cell sample or random", choices=INITS),
        "factor_lr": Option(0.05, "Adam learning rate of every parameter (overrides --lr)", type=float,
                            schedule=True),
        "lr_decay": Option(0.1, "learning rate at the last epoch relative to the first", type=float,
                           schedule=True),
    }
    outputs = ("latent", "loadings", "dispersions", "variance_explained")
    latent_name = "factors"
    latent_site = "z"

    def __init__(self, n_features: dict, *, n_factors: int = 10, prior: str = "horseshoe",
                 likelihoods: dict | None = None, slab_df: float = 4.0, slab_scale: float = 1.0,
                 spike_ratio: float = 0.05, global_scale: float | None = None, n_cells: int | None = None,
                 init: str = "pca", name: str | None = None):
        super().__init__(name=name)
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        if not n_features:
            raise ValueError("MOFA needs at least one view")
        if int(n_factors) < 1:
            raise ValueError(f"n_factors must be >= 1, got {n_factors}")
        n_features = {str(m): int(g) for m, g in n_features.items()}
        likelihoods = {m: (likelihoods or {}).get(m, "normal") for m in n_features}
        self.config = dict(n_features=n_features, n_factors=int(n_factors), prior=prior,
                           likelihoods=likelihoods, slab_df=float(slab_df), slab_scale=float(slab_scale),
                           spike_ratio=float(spike_ratio), global_scale=global_scale, n_cells=n_cells,
                           init=init)
        if global_scale is None:
            global_scale = 0.1 / 0.9 / math.sqrt(n_cells) if n_cells else 1.0
        self.global_scale = float(global_scale)
        self.modalities = tuple(n_features)
        self.n_features = n_features
        self.n_factors = K = int(n_factors)
        self.prior = prior
        self.slab_df, self.slab_scale, self.spike_ratio = float(slab_df), float(slab_scale), float(spike_ratio)
        self.likelihoods = {m: get_likelihood(name) for m, name in likelihoods.items()}
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
        model = cls({m: dataset.n_features[m] for m in dataset.modalities}, likelihoods=chosen, **options)
        if model.config["init"] == "pca":
            model.initialise_from(dataset, n_cells=n_init_cells)
        return model

    @torch.no_grad()
    def initialise_from(self, dataset, *, n_cells: int = 5000, seed: int = 0) -> None:
        """Start from a PCA of a random sample of up to ``n_cells`` cells.

        Each view is put on its working scale (x for ``normal``, log1p(x) for count
        likelihoods), centred over the cells that have it (absent cells count as the mean) and
        divided by the square root of its total variance, so every view weighs the same. The
        top-K SVD X = U S V^T gives loadings W_m = S V_m^T / sqrt(n) times the view's scale
        (factors U sqrt(n) have unit variance) for the components whose eigenvalue S_j^2 / n
        exceeds the Marchenko-Pastur edge of the noise, sigma^2 (1 + sqrt(D / n))^2 (sigma^2: the
        variance per dimension left after the top K, D = sum_m G_m); the other factors start
        at loadings N(0, 1e-6), so components of pure noise are not started at full strength. Intercepts start at the feature means (through
        softplus^-1 for non-normal views), noise sd of normal views at the PCA residual sd
        (at least 10% of the feature sd), the guide's pseudo-precisions of other views likewise.
        """
        rng = np.random.default_rng(seed)
        n = dataset.n_cells
        idx = np.sort(rng.choice(n, size=min(n, int(n_cells)), replace=False))
        batch = dataset.batch(idx)
        blocks, stats = [], {}
        for m in self.modalities:
            x = batch.x[m].float()
            present = batch.present[m].bool()
            lik = self.config["likelihoods"][m]
            y = torch.log1p(x.clamp(min=0)) if lik in _COUNT_LIKELIHOODS else x
            rows = y[present] if present.any() else torch.zeros(1, y.shape[1])
            mean = rows.mean(0)
            yc = torch.where(present[:, None], y - mean, torch.zeros_like(y))
            var = rows.var(0, unbiased=False) if rows.shape[0] > 1 else torch.ones(y.shape[1])
            view_sd = float(var.sum().clamp(min=1e-8).sqrt())
            blocks.append(yc / view_sd)
            stats[m] = (x, present, mean, var, view_sd, yc)
        X = torch.cat(blocks, dim=1)
        K = self.n_factors
        q = min(K, min(X.shape) - 1) if min(X.shape) > 1 else 0
        W_all = torch.zeros(K, X.shape[1])
        if q > 0:
            if min(X.shape) > 3 * q:
                _, S, V = torch.svd_lowrank(X, q=q, niter=4)
            else:
                _, S, Vh = torch.linalg.svd(X, full_matrices=False)
                V = Vh.T
            ell = S[:q].pow(2) / X.shape[0]
            noise = (X.pow(2).sum() / X.shape[0] - ell.sum()).clamp(min=0) / max(X.shape[1] - q, 1)
            edge = noise * (1 + math.sqrt(X.shape[1] / X.shape[0])) ** 2
            q = int((ell > edge).sum())
            W_all[:q] = (S[:q, None] * V[:, :q].T) / math.sqrt(X.shape[0])
        W_all[q:] = 1e-3 * torch.randn(K - q, X.shape[1], generator=torch.Generator().manual_seed(seed))
        start = 0
        for m, block in zip(self.modalities, blocks):
            x, present, mean, var, view_sd, yc = stats[m]
            G = block.shape[1]
            W = W_all[:, start:start + G] * view_sd
            start += G
            getattr(self, f"W_loc_{m}").copy_(W)
            z = torch.linalg.lstsq(W.T, yc.T).solution.T if present.any() else None  # (n, K)
            resid = ((yc - z @ W)[present]).var(0, unbiased=False) if z is not None else var
            sd = torch.maximum(resid, 0.01 * var).clamp(min=1e-6).sqrt()
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
    def default_stages(cls, *, epochs: int, patience: int | None = 20, factor_lr: float = 0.05,
                       lr_decay: float = 0.1) -> list[Stage]:
        """One stage training every parameter at Adam rate ``factor_lr`` (the guide's closed-form
        factors let the globals take large steps), falling to ``lr_decay`` times that by the
        last of ``epochs`` epochs, stopped after ``patience`` epochs without a new best loss
        (any improvement counts: the one-sample loss is noisy while the factors still rotate
        towards sparse loadings, so a relative threshold would stop too early)."""
        stop = EarlyStopping(patience=patience, min_delta=0.0) if patience else None
        return [Stage("train", epochs, train=("all",), early_stopping=stop, lr_decay=lr_decay,
                      group_lr={"all": factor_lr})]

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
        K = self.n_factors
        W = {}
        for m in self.modalities:
            W[m] = pyro.sample(f"W_{m}", self._prior_W(m))
            if W[m].dim() > 2 and W[m].shape[:-2].numel() == 1:  # one draw, padded by Predictive
                W[m] = W[m].reshape(W[m].shape[-2:])
        ref = getattr(self, f"b_{self.modalities[0]}")
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            z = pyro.sample("z", dist.MultivariateNormal(ref.new_zeros(K), scale_tril=torch.eye(K, device=ref.device)))
            for m in self.modalities:
                eta = getattr(self, f"b_{m}") + z @ W[m]
                mean = eta if self.config["likelihoods"][m] == "normal" else F.softplus(eta)
                self._observe(m, mean, z, batch, observed)

    def _q_positive(self, site: str, shape) -> dist.Distribution:
        loc, scale = getattr(self, f"{site}_loc"), getattr(self, f"{site}_scale")
        if site.startswith("theta_"):
            return dist.TransformedDistribution(dist.Normal(loc, scale), [dist.transforms.SigmoidTransform()])
        return dist.LogNormal(loc, scale)

    @pyro_method
    def guide(self, batch: Batch, observed: bool = True):
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
    def _view_terms(self, m: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(E_q[W_m diag(kappa_m) W_m^T] (K, K), M_m diag(kappa_m) (y_m - c_m) (B, K)) of view m."""
        M, S = getattr(self, f"W_loc_{m}"), getattr(self, f"W_scale_{m}")
        if self.config["likelihoods"][m] == "normal":
            kappa = torch.exp(-2 * getattr(self, f"lik_{m}_log_scale"))
            resid = x - getattr(self, f"b_{m}")
        else:
            kappa = torch.exp(getattr(self, f"q_log_kappa_{m}"))
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
        for m in self.modalities:
            precision, eta = self._view_terms(m, batch.x[m])
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
        """Posterior means of the loadings, {``W__<modality>``: (K, G_m)}."""
        return {f"W__{m}": getattr(self, f"W_loc_{m}").detach() for m in self.modalities}

    def intercepts(self) -> dict[str, torch.Tensor]:
        """Intercepts b_m (G_m,), on the linear-predictor scale, per modality."""
        return {m: getattr(self, f"b_{m}").detach() for m in self.modalities}

    def link_mean(self, modality: str, eta: torch.Tensor) -> torch.Tensor:
        """Mean of the observation site given the linear predictor eta (identity for ``normal``,
        softplus otherwise)."""
        return eta if self.config["likelihoods"][modality] == "normal" else F.softplus(eta)
