"""Likelihood registry: one name per observation model, used at every ``obs_<modality>`` site.

A model never builds its observation distribution itself. It asks the registry for a
:class:`Likelihood` by name (``get_likelihood("nb")``), holds the per-feature parameters that
likelihood lists in ``feature_params`` (as unconstrained reals, initialised by
``init_feature_params``), decodes the per-cell quantities it lists in ``cell_heads`` with one
extra linear head each, and at the observation site writes::

    lik = get_likelihood(name)
    with pyro.plate("cells", n_cells, subsample=batch.index):
        pyro.sample("obs_rna", lik(mean, **params).to_event(1), obs=x)

so that ``likelihoods={"rna": "zinb"}`` swaps the observation model with no other change.

Registered names (see each class for the parameterisation):

=============== ================================ =========================== ============== =========
name            distribution                     feature_params              cell_heads     support
=============== ================================ =========================== ============== =========
``nb``          negative binomial (mu, theta)    ``log_theta``               --             counts
``zinb``        zero-inflated negative binomial  ``log_theta``, ``zi_logits`` --             counts
``nb_mixture``  background/foreground NB mixture ``log_background``,         ``mix_logits`` counts
                (totalVI-style, for proteins)    ``log_theta``
``poisson``     Poisson(mean)                    --                          --             counts
``bernoulli``   Bernoulli, P(x=1) = 1-exp(-mean) --                          --             binary
``normal``      Normal(mean, exp(log_scale))     ``log_scale``               --             real
=============== ================================ =========================== ============== =========

``nb_mixture_cell`` is the same mixture with a per-cell background (totalVI): feature param
``log_theta``, cell heads ``log_background`` and ``mix_logits``; a model may supply its own
per-cell values for a cell head (TOTALVI passes its sampled latent log background).

Shapes: ``mean`` is (B, G) (cells x features), feature params are (G,), cell heads are (B, G);
every distribution returned has batch_shape (B, G) and event_shape ().

``support`` (one of :data:`LIKELIHOOD_SUPPORTS`) says which values a likelihood gives a
density to: ``counts`` (non-negative whole numbers: a modality read as raw counts), ``binary``
(0 or 1) or ``real`` (any value, e.g. a modality declared continuous). Building a model checks
it against each modality's data (:func:`pyro_livi.models._base.check_likelihoods`).
"""

from __future__ import annotations

import abc
import warnings
import weakref
from typing import NamedTuple

import numpy as np
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

__all__ = [
    "LIKELIHOODS",
    "LIKELIHOOD_SUPPORTS",
    "BernoulliLikelihood",
    "Likelihood",
    "NBLikelihood",
    "NBMixtureCellLikelihood",
    "NBMixtureLikelihood",
    "NegativeBinomial",
    "NegativeBinomialMixture",
    "NormalLikelihood",
    "PoissonLikelihood",
    "ZINBLikelihood",
    "ZeroInflatedNegativeBinomial",
    "get_likelihood",
    "register_likelihood",
]


# ----------------------------------------------------------------------------------------------
# Numerical helpers
# ----------------------------------------------------------------------------------------------


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) without overflow, underflow or a threshold, with the exact gradient
    sigmoid(x) everywhere (``torch.logaddexp`` computes max + log1p(exp(-|diff|)))."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """View of ``t`` with size 1 along every broadcast (stride-0) dimension.

    It broadcasts back to ``t``'s shape, so a function of it equals the function of ``t`` while
    being evaluated once per distinct element: a per-feature parameter expanded to (cells,
    features) is computed on (1, features).
    """
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for size, stride in zip(t.shape, t.stride()))
    return t[index]


def _nb_log_prob(value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """log NB(value; mean mu, inverse dispersion theta), elementwise with broadcasting.

    log p = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
            + theta * (log theta - log(theta + mu)) + x * (log mu - log(theta + mu)).

    With delta = log(mu / theta): log(theta + mu) - log(theta) = softplus(delta) and
    log(theta + mu) - log(mu) = softplus(-delta). Writing the two last terms as
    -theta * softplus(delta) - x * softplus(-delta) avoids the cancellation of
    log theta - log(theta + mu) when mu << theta (the Poisson limit), so the result keeps full
    relative precision for mu down to 1e-8 and theta up to 1e4 and beyond.
    """
    theta_once = _unexpanded(theta)  # e.g. (1, G) for a per-gene theta broadcast to (B, G)
    delta = torch.log(mu) - torch.log(theta_once)
    return (
        torch.lgamma(value + theta)
        - torch.lgamma(theta_once)
        - torch.lgamma(value + 1)
        - theta * _softplus(delta)
        - value * _softplus(-delta)
    )


class NonZeros(NamedTuple):
    """The non-zero entries of a (B, G) tensor in row-major order: flat ``index``, ``row``,
    ``col`` (int64) and ``values``, each (nnz,)."""

    index: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor


_NONZEROS_MEMO: dict = {}


def _forget_nonzeros(ref) -> None:
    memo = _NONZEROS_MEMO.get("last")
    if memo is not None and memo[0] is ref:
        del _NONZEROS_MEMO["last"]


def nonzeros(x: torch.Tensor) -> NonZeros:
    """The non-zero entries of a 2-D tensor ``x`` (see :class:`NonZeros`).

    The result for the last tensor asked is kept while that tensor is alive and unmodified
    (same object, same version counter), so that an encoder and a likelihood reading the
    same minibatch of counts find its non-zero entries once.
    """
    if x.dim() != 2:
        raise ValueError(f"nonzeros expects a 2-D tensor, got shape {tuple(x.shape)}")
    memo = _NONZEROS_MEMO.get("last")
    if memo is not None and memo[0]() is x and memo[1] == x._version:
        return memo[2]
    flat = x.detach().reshape(-1)
    index = (flat != 0).nonzero().squeeze(1)
    row = torch.div(index, x.shape[1], rounding_mode="floor")
    result = NonZeros(index, row, index - row * x.shape[1], flat.index_select(0, index))
    _NONZEROS_MEMO["last"] = (weakref.ref(x, _forget_nonzeros), x._version, result)
    return result


#: Counts 1..SMALL_COUNT read the count-dependent NB terms of each feature from a per-feature
#: table (lgamma and digamma evaluated G x SMALL_COUNT times instead of once per non-zero count)
SMALL_COUNT = 16


def _small_counts(x_nz: torch.Tensor, col: torch.Tensor, n_features: int):
    """(key into a (features x SMALL_COUNT) table for every non-zero count, indices of the
    counts that are not whole numbers in 1..SMALL_COUNT)."""
    k = x_nz.long()
    small = (k >= 1) & (k <= SMALL_COUNT) & (k.to(x_nz.dtype) == x_nz)
    key = col * SMALL_COUNT + (k.clamp(1, SMALL_COUNT) - 1)
    return key, (~small).nonzero().squeeze(1)


def _count_table(fn, theta: torch.Tensor) -> torch.Tensor:
    """fn(theta_g + v) - fn(theta_g) for v = 1..SMALL_COUNT, flattened (G * SMALL_COUNT,)."""
    v = torch.arange(1, SMALL_COUNT + 1, dtype=theta.dtype, device=theta.device)
    return (fn(theta[:, None] + v) - fn(theta)[:, None]).reshape(-1)


class _NBFeatureSum(torch.autograd.Function):
    """Per-cell sum over features of log NB(x; mu, theta) with a per-feature theta, forward and
    backward written out (the terms of :func:`_nb_log_prob`).

    Inputs: ``value`` and ``mu`` (B, G), ``theta`` (G,); output (B,). With r = mu / theta and
    s = theta / (theta + mu) = 1 / (1 + r)::

        log p_bg = -theta log1p(r)                                           (every entry)
                   + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
                   - x log1p(1 / r)                                          (x != 0 only)
        d/d mu    = -s + [x != 0] x s / mu
        d/d theta = r s - log1p(r)
                    + [x != 0] (digamma(x + theta) - digamma(theta) - x s / theta)

    (log1p(r) = softplus(log(mu / theta)) and log1p(1 / r) = softplus(-log(mu / theta)), as in
    :func:`_nb_log_prob`.) The bracketed terms vanish at x = 0, so they are evaluated at the
    non-zero counts only (single-cell counts are mostly zeros); for counts 1..:data:`SMALL_COUNT`
    the lgamma and digamma differences depend only on the feature and the count and are read
    from per-feature tables. The dense part is a few passes over (B, G) and matrix-vector
    products; the theta gradient is computed only when theta requires it.
    """

    @staticmethod
    def forward(ctx, value, mu, theta):
        n_features = mu.shape[-1]
        r = mu * theta.reciprocal()
        sp = torch.log1p(r)
        out = -(sp @ theta)
        nz = nonzeros(value)
        x_nz = nz.values
        theta_nz = theta.index_select(0, nz.col)
        r_nz = r.reshape(-1).index_select(0, nz.index)
        key, other = _small_counts(x_nz, nz.col, n_features)
        v = torch.arange(1, SMALL_COUNT + 1, dtype=theta.dtype, device=theta.device)
        table = _count_table(torch.lgamma, theta) - torch.lgamma(v + 1).repeat(n_features)
        log_ratio = table.index_select(0, key)  # lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
        if other.numel():
            x_o, theta_o = x_nz.index_select(0, other), theta_nz.index_select(0, other)
            log_ratio.index_copy_(0, other, torch.lgamma(x_o + theta_o) - torch.lgamma(theta_o)
                                  - torch.lgamma(x_o + 1))
        out = out.index_add(0, nz.row, log_ratio - x_nz * torch.log1p(r_nz.reciprocal()))
        ctx.save_for_backward(theta, nz.index, nz.row, nz.col, x_nz, theta_nz, r_nz, r, key, other,
                              sp if ctx.needs_input_grad[2] else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        theta, index, row, col, x_nz, theta_nz, r_nz, r, key, other, sp = ctx.saved_tensors
        grad_nz = grad.index_select(0, row)
        s = (r + 1).reciprocal_()
        s_nz = (r_nz + 1).reciprocal_()
        grad_mu = grad_theta = None
        if ctx.needs_input_grad[2]:
            grad_theta = grad @ (r * s) - grad @ sp
            dpsi = _count_table(torch.digamma, theta).index_select(0, key)  # digamma(x + theta) - digamma(theta)
            if other.numel():
                x_o, theta_o = x_nz.index_select(0, other), theta_nz.index_select(0, other)
                dpsi.index_copy_(0, other, torch.digamma(x_o + theta_o) - torch.digamma(theta_o))
            grad_theta.index_add_(0, col, grad_nz * (dpsi - x_nz * s_nz / theta_nz))
        if ctx.needs_input_grad[1]:
            grad_mu = s.mul_(grad.neg()[:, None])
            grad_mu.view(-1).index_add_(0, index, grad_nz * x_nz * s_nz / (r_nz * theta_nz))
        return None, grad_mu, grad_theta


def _nb_feature_sum(value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor | None:
    """sum over the last dimension of :func:`_nb_log_prob` through :class:`_NBFeatureSum`, or
    None when it does not apply (value and mu not both (B, G), theta not per feature, a
    gradient wanted for the value)."""
    theta_once = _unexpanded(theta)
    if (mu.dim() != 2 or value.shape != mu.shape or value.requires_grad
            or theta_once.shape != (1, mu.shape[1])):
        return None
    return _NBFeatureSum.apply(value, mu, theta_once.reshape(-1))


class _NBIndependent(dist.Independent):
    """``NegativeBinomial(...).to_event(1)``: log_prob sums over the features through
    :func:`_nb_feature_sum` when it applies (the same value as summing the elementwise
    log_prob, in fewer passes over the data), else as :class:`pyro.distributions.Independent`."""

    def log_prob(self, value):
        base = self.base_dist
        if self.reinterpreted_batch_ndims == 1 and isinstance(base, NegativeBinomial):
            if base._validate_args:
                base._validate_sample(value)
            out = _nb_feature_sum(value, base.mu, base.theta)
            if out is not None:
                return out
        return super().log_prob(value)


def _nb_sample(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """One NB(mu, theta) draw per element, as Poisson(Gamma(shape theta, rate theta / mu))."""
    with torch.no_grad():
        rate = torch.distributions.Gamma(theta, theta / mu).sample()
        return torch.poisson(rate)


def _log_expm1(x: torch.Tensor) -> torch.Tensor:
    """log(exp(x) - 1) for x > 0: log(expm1(x)) below 1, x + log(-expm1(-x)) from 1 on (no
    overflow). Each branch only sees inputs on its own side, so no inf/nan leaks into gradients."""
    small = x.clamp(max=1.0)
    large = x.clamp(min=1.0)
    return torch.where(x < 1.0, torch.log(torch.expm1(small)), large + torch.log(-torch.expm1(-large)))


class _Bernoulli(dist.Bernoulli):
    """pyro's Bernoulli with log_prob -softplus(-logits) at 1 and -softplus(logits) at 0 through
    the exact :func:`_softplus`, which keeps full relative precision when a probability is near
    1 (torch's binary cross-entropy keeps only absolute precision there)."""

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.logits, value)
        return -(value * _softplus(-logits) + (1 - value) * _softplus(logits))


class _ElementwiseDistribution(TorchDistribution):
    """Base for distributions whose parameters (the keys of ``arg_constraints``) are tensors of
    the batch shape: broadcasts them on construction and implements ``expand``."""

    def _set_params(self, validate_args, **params) -> None:
        tensors = broadcast_all(*params.values())
        for name, tensor in zip(params, tensors):
            setattr(self, name, tensor)
        super().__init__(tensors[0].shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        for name in self.arg_constraints:
            setattr(new, name, getattr(self, name).expand(batch_shape))
        super(_ElementwiseDistribution, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


# ----------------------------------------------------------------------------------------------
# Distributions
# ----------------------------------------------------------------------------------------------


class NegativeBinomial(_ElementwiseDistribution):
    """Negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    p(x) = Gamma(x + theta) / (Gamma(theta) x!) * (theta / (theta + mu))^theta
           * (mu / (theta + mu))^x,  x = 0, 1, 2, ...
    Mean mu, variance mu + mu^2 / theta; theta -> infinity gives Poisson(mu).
    Equivalent to scipy.stats.nbinom(n=theta, p=theta / (theta + mu)) and to a Gamma-Poisson
    mixture with Gamma shape theta and rate theta / mu. (Not torch's NegativeBinomial, whose
    (total_count, logits) parameterisation has mean total_count * exp(logits).)

    Parameters
    ----------
    mu : Tensor, positive, broadcastable
        Mean, in counts.
    theta : Tensor, positive, broadcastable
        Inverse dispersion (the Gamma shape), unitless.
    """

    arg_constraints = {"mu": constraints.positive, "theta": constraints.positive}
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, mu, theta, validate_args=None):
        self._set_params(validate_args, mu=mu, theta=theta)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return _nb_log_prob(value, self.mu, self.theta)

    def to_event(self, reinterpreted_batch_ndims=None):
        """As Pyro's; one reinterpreted dimension gives a distribution whose log_prob sums the
        features in one fused pass (:class:`_NBIndependent`)."""
        if reinterpreted_batch_ndims == 1 and len(self.batch_shape) >= 1:
            return _NBIndependent(self, 1)
        return super().to_event(reinterpreted_batch_ndims)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        return _nb_sample(self.mu.expand(shape), self.theta.expand(shape))

    @property
    def mean(self):
        return self.mu

    @property
    def variance(self):
        return self.mu + self.mu.pow(2) / self.theta


class ZeroInflatedNegativeBinomial(_ElementwiseDistribution):
    """Zero-inflated negative binomial: a structural zero with probability
    pi = sigmoid(zi_logits), otherwise a draw from NegativeBinomial(mu, theta).

    p(0) = pi + (1 - pi) NB(0; mu, theta),  p(x) = (1 - pi) NB(x; mu, theta) for x > 0,
    computed in log space as logaddexp(log pi, log(1 - pi) + log NB(0)) at zero.
    Mean (1 - pi) mu; variance (1 - pi) mu (1 + mu / theta) + pi (1 - pi) mu^2.

    Parameters
    ----------
    mu : Tensor, positive
        Mean of the NB component, in counts.
    theta : Tensor, positive
        Inverse dispersion of the NB component.
    zi_logits : Tensor, real
        Logit of the structural-zero probability pi.
    """

    arg_constraints = {
        "mu": constraints.positive,
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, mu, theta, zi_logits, validate_args=None):
        self._set_params(validate_args, mu=mu, theta=theta, zi_logits=zi_logits)

    @property
    def zi_probs(self) -> torch.Tensor:
        """Probability pi of a structural zero."""
        return torch.sigmoid(self.zi_logits)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        log_keep_nb = F.logsigmoid(-self.zi_logits) + _nb_log_prob(value, self.mu, self.theta)
        log_zero = torch.logaddexp(F.logsigmoid(self.zi_logits), log_keep_nb)
        return torch.where(value == 0, log_zero, log_keep_nb)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            counts = _nb_sample(self.mu.expand(shape), self.theta.expand(shape))
            structural = torch.bernoulli(self.zi_probs.expand(shape)).bool()
            return torch.where(structural, torch.zeros_like(counts), counts)

    @property
    def mean(self):
        return (1 - self.zi_probs) * self.mu

    @property
    def variance(self):
        pi = self.zi_probs
        return (1 - pi) * self.mu * (1 + self.mu / self.theta) + pi * (1 - pi) * self.mu.pow(2)


class NegativeBinomialMixture(_ElementwiseDistribution):
    """Two-component negative-binomial mixture (totalVI-style protein background/foreground).

    With w = sigmoid(mix_logits) the probability of the background component:
    p(x) = w NB(x; mu_back, theta) + (1 - w) NB(x; mu_fore, theta),
    computed as logaddexp(log w + log NB_back, log(1 - w) + log NB_fore).
    Mean w mu_back + (1 - w) mu_fore; variance
    w v_back + (1 - w) v_fore + w (1 - w) (mu_fore - mu_back)^2 with v = mu + mu^2 / theta.

    Parameters
    ----------
    mu_back : Tensor, positive
        Background mean, in counts.
    mu_fore : Tensor, positive
        Foreground mean, in counts (:class:`NBMixtureLikelihood` makes it mu_back + mean, so
        that it exceeds the background).
    theta : Tensor, positive
        Inverse dispersion shared by both components.
    mix_logits : Tensor, real
        Logit of the background probability w.
    """

    arg_constraints = {
        "mu_back": constraints.positive,
        "mu_fore": constraints.positive,
        "theta": constraints.positive,
        "mix_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(self, mu_back, mu_fore, theta, mix_logits, validate_args=None):
        self._set_params(
            validate_args, mu_back=mu_back, mu_fore=mu_fore, theta=theta, mix_logits=mix_logits
        )

    @property
    def background_probs(self) -> torch.Tensor:
        """Probability w of the background component."""
        return torch.sigmoid(self.mix_logits)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        log_back = F.logsigmoid(self.mix_logits) + _nb_log_prob(value, self.mu_back, self.theta)
        log_fore = F.logsigmoid(-self.mix_logits) + _nb_log_prob(value, self.mu_fore, self.theta)
        return torch.logaddexp(log_back, log_fore)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            background = torch.bernoulli(self.background_probs.expand(shape)).bool()
            mu = torch.where(background, self.mu_back.expand(shape), self.mu_fore.expand(shape))
            return _nb_sample(mu, self.theta.expand(shape))

    @property
    def mean(self):
        w = self.background_probs
        return w * self.mu_back + (1 - w) * self.mu_fore

    @property
    def variance(self):
        w = self.background_probs
        var_back = self.mu_back + self.mu_back.pow(2) / self.theta
        var_fore = self.mu_fore + self.mu_fore.pow(2) / self.theta
        return w * var_back + (1 - w) * var_fore + w * (1 - w) * (self.mu_fore - self.mu_back).pow(2)


# ----------------------------------------------------------------------------------------------
# Likelihoods
# ----------------------------------------------------------------------------------------------


class Likelihood(abc.ABC):
    """An observation model usable at any ``obs_<modality>`` site.

    Attributes
    ----------
    name : str
        Registry name.
    feature_params : tuple of str
        Per-feature learned parameters the model must hold, as unconstrained reals of shape
        (n_features,).
    cell_heads : tuple of str
        Per-cell per-feature quantities, shape (B, n_features), that the model must decode
        from its cell latent with one extra linear head each.
    feature_init : dict of str to float
        Constant initial value of each feature param (used by the default
        :meth:`init_feature_params`).
    support : str
        The observed values the likelihood gives a density to, one of
        :data:`LIKELIHOOD_SUPPORTS`: ``"counts"`` (non-negative whole numbers, the default),
        ``"binary"`` (0 or 1), ``"real"`` (any real value).
    """

    name: str = ""
    feature_params: tuple[str, ...] = ()
    cell_heads: tuple[str, ...] = ()
    feature_init: dict[str, float] = {}
    support: str = "counts"

    def init_feature_params(
        self, n_features: int, counts_sample: np.ndarray | None = None
    ) -> dict[str, torch.Tensor]:
        """Initial value of each feature param.

        Parameters
        ----------
        n_features : int
            Number of features G.
        counts_sample : ndarray, shape (n_cells, G), optional
            Dense sample of raw counts for data-driven initialisation; the default ignores it.

        Returns
        -------
        dict of str to Tensor
            One tensor of shape (G,) and the default dtype per name in ``feature_params``.
        """
        _check_n_features(n_features)
        return {
            k: torch.full((n_features,), float(self.feature_init[k])) for k in self.feature_params
        }

    def __call__(self, mean: torch.Tensor, **params: torch.Tensor) -> TorchDistribution:
        """The observation distribution.

        Parameters
        ----------
        mean : Tensor, shape (B, G)
            Decoder output: expected counts (> 0) for count likelihoods, the location for
            ``normal``.
        **params : Tensor
            Exactly the names in ``feature_params`` (shape (G,), unconstrained) and
            ``cell_heads`` (shape (B, G)).

        Returns
        -------
        TorchDistribution
            batch_shape (B, G), event_shape (); the caller applies ``.to_event(1)``/``.mask``.
        """
        expected = set(self.feature_params) | set(self.cell_heads)
        missing = sorted(expected - set(params))
        extra = sorted(set(params) - expected)
        if missing or extra:
            raise TypeError(
                f"likelihood {self.name!r} takes params {sorted(expected)}; "
                f"missing {missing}, unexpected {extra}"
            )
        return self.distribution(mean, **params)

    @abc.abstractmethod
    def distribution(self, mean: torch.Tensor, **params: torch.Tensor) -> TorchDistribution:
        """Build the distribution from already checked params (see :meth:`__call__`)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, feature_params={self.feature_params}, "
            f"cell_heads={self.cell_heads})"
        )


class NBLikelihood(Likelihood):
    """``nb``: NegativeBinomial(mu=mean, theta=exp(log_theta)), variance mu + mu^2 / theta.

    Feature param ``log_theta`` (log inverse dispersion per feature), initialised at 1.0.
    """

    name = "nb"
    feature_params = ("log_theta",)
    feature_init = {"log_theta": 1.0}

    def distribution(self, mean, log_theta):
        return NegativeBinomial(mean, torch.exp(log_theta))


class ZINBLikelihood(Likelihood):
    """``zinb``: ZeroInflatedNegativeBinomial(mu=mean, theta=exp(log_theta), zi_logits).

    Feature params ``log_theta`` (init 1.0) and ``zi_logits`` (logit of the structural-zero
    probability per feature, init -2.0, i.e. pi = 0.12).
    """

    name = "zinb"
    feature_params = ("log_theta", "zi_logits")
    feature_init = {"log_theta": 1.0, "zi_logits": -2.0}

    def distribution(self, mean, log_theta, zi_logits):
        return ZeroInflatedNegativeBinomial(mean, torch.exp(log_theta), zi_logits)


class NBMixtureLikelihood(Likelihood):
    """``nb_mixture``: totalVI-style protein background/foreground mixture.

    mu_back = exp(log_background) (per feature, in counts), mu_fore = mu_back + mean (so the
    foreground is mu_back * (1 + alpha) with alpha = mean / mu_back > 0), shared
    theta = exp(log_theta); P(background) = sigmoid(mix_logits), a cell head. See
    :class:`NegativeBinomialMixture`.

    Feature params ``log_background`` and ``log_theta`` (init 1.0). ``log_background`` is
    initialised from ``counts_sample`` when given: per feature, a two-component Gaussian
    mixture (``sklearn.mixture.GaussianMixture``, ``random_state=0``) on log1p(counts); with m
    the lower component mean, log_background = log(expm1(m)), the background mean expm1(m)
    clipped below at ``min_background`` counts. A feature with fewer than two distinct values
    (or a sample with fewer than two cells) uses m = the mean of log1p(counts). Without a
    sample, log_background = 0.0 (a background of 1 count).
    """

    name = "nb_mixture"
    feature_params = ("log_background", "log_theta")
    cell_heads = ("mix_logits",)
    feature_init = {"log_background": 0.0, "log_theta": 1.0}
    min_background = 1e-2
    random_state = 0

    def init_feature_params(self, n_features, counts_sample=None):
        params = super().init_feature_params(n_features)
        if counts_sample is None:
            return params
        counts = counts_sample.toarray() if hasattr(counts_sample, "toarray") else counts_sample
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 2 or counts.shape[1] != n_features:
            raise ValueError(
                f"counts_sample must have shape (n_cells, {n_features}); got {counts.shape}"
            )
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise ValueError("counts_sample must hold finite nonnegative counts")
        lower = np.array([self._lower_log1p_mean(np.log1p(counts[:, j])) for j in range(n_features)])
        background = np.maximum(np.expm1(lower), self.min_background)
        params["log_background"] = torch.as_tensor(
            np.log(background), dtype=torch.get_default_dtype()
        )
        return params

    def _lower_log1p_mean(self, y: np.ndarray) -> float:
        """Mean of the lower component of a 2-component Gaussian mixture fitted to y (n_cells,)."""
        if y.shape[0] < 2 or np.unique(y).size < 2:
            return float(y.mean()) if y.size else 0.0
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(n_components=2, random_state=self.random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            gmm.fit(y[:, None])
        return float(gmm.means_.min())

    def distribution(self, mean, log_background, log_theta, mix_logits):
        mu_back = torch.exp(log_background)
        return NegativeBinomialMixture(mu_back, mu_back + mean, torch.exp(log_theta), mix_logits)


class NBMixtureCellLikelihood(Likelihood):
    """``nb_mixture_cell``: the totalVI protein mixture with a **per-cell, per-feature**
    background.

    Both the background and the mixing logits are cell heads, shape (B, G): a model may decode
    them with the generic linear heads, or (as :class:`~pyro_livi.models.TOTALVI` does) supply
    its own per-cell quantities under these names, e.g. a sampled latent log background
    log beta_nt. With beta = exp(log_background):

        mu_back = beta,  mu_fore = beta + mean,  theta = exp(log_theta),
        y ~ w NB(mu_back, theta) + (1 - w) NB(mu_fore, theta),  w = sigmoid(mix_logits),

    so ``mean`` is the foreground excess over the background, in counts (> 0), as for
    ``nb_mixture``; totalVI's foreground beta * alpha with alpha >= 1 is ``mean = beta (alpha
    - 1)``. Feature param ``log_theta`` (one inverse dispersion per feature, init 1.0). The
    component is drawn per element by ``sample()`` (:class:`NegativeBinomialMixture`).
    Reference: Gayoso et al. 2021, Nat Methods 18:272 (totalVI), Methods, protein likelihood.
    """

    name = "nb_mixture_cell"
    feature_params = ("log_theta",)
    cell_heads = ("log_background", "mix_logits")
    feature_init = {"log_theta": 1.0}

    def distribution(self, mean, log_theta, log_background, mix_logits):
        mu_back = torch.exp(log_background)
        return NegativeBinomialMixture(mu_back, mu_back + mean, torch.exp(log_theta), mix_logits)


class PoissonLikelihood(Likelihood):
    """``poisson``: Poisson(rate=mean). No params."""

    name = "poisson"

    def distribution(self, mean):
        return dist.Poisson(mean)


class BernoulliLikelihood(Likelihood):
    """``bernoulli``: for binarised data (e.g. ATAC peaks). P(x = 1) = 1 - exp(-mean), the
    probability that a Poisson with that mean is nonzero; logits = log(expm1(mean)) computed
    without overflow, so log P(x = 0) = -mean exactly. No params."""

    name = "bernoulli"
    support = "binary"

    def distribution(self, mean):
        return _Bernoulli(logits=_log_expm1(mean))


class NormalLikelihood(Likelihood):
    """``normal``: Normal(loc=mean, scale=exp(log_scale)), for continuous data (``mean`` may be
    any real). Feature param ``log_scale`` (log standard deviation per feature), init 0.0."""

    name = "normal"
    support = "real"
    feature_params = ("log_scale",)
    feature_init = {"log_scale": 0.0}

    def distribution(self, mean, log_scale):
        return dist.Normal(mean, torch.exp(log_scale))


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def _check_n_features(n_features) -> None:
    if isinstance(n_features, bool) or not isinstance(n_features, (int, np.integer)) or n_features < 1:
        raise ValueError(f"n_features must be a positive integer; got {n_features!r}")


LIKELIHOODS: dict[str, Likelihood] = {}
#: what a likelihood's observations may be (:attr:`Likelihood.support`)
LIKELIHOOD_SUPPORTS = ("counts", "binary", "real")


def register_likelihood(likelihood: Likelihood, *, replace: bool = False) -> None:
    """Add ``likelihood`` to the registry under ``likelihood.name``.

    Raises ValueError if the name is taken (unless ``replace=True``), if a param name is
    listed twice or if ``support`` is not one of :data:`LIKELIHOOD_SUPPORTS`; TypeError if
    ``likelihood`` is not a :class:`Likelihood`.
    """
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"expected a Likelihood instance; got {type(likelihood).__name__}")
    name = likelihood.name
    if not isinstance(name, str) or not name:
        raise ValueError("a likelihood needs a non-empty string name")
    names = tuple(likelihood.feature_params) + tuple(likelihood.cell_heads)
    if len(set(names)) != len(names):
        raise ValueError(f"likelihood {name!r} lists a param twice: {names}")
    if likelihood.support not in LIKELIHOOD_SUPPORTS:
        raise ValueError(f"likelihood {name!r} has support {likelihood.support!r}; declare one of "
                         f"{LIKELIHOOD_SUPPORTS}")
    missing_init = set(likelihood.feature_params) - set(likelihood.feature_init)
    if missing_init and type(likelihood).init_feature_params is Likelihood.init_feature_params:
        raise ValueError(f"likelihood {name!r} has no feature_init for {sorted(missing_init)}")
    if name in LIKELIHOODS and not replace:
        raise ValueError(f"likelihood {name!r} is already registered (pass replace=True)")
    LIKELIHOODS[name] = likelihood


def get_likelihood(name: str | Likelihood) -> Likelihood:
    """The registered likelihood called ``name`` (a :class:`Likelihood` is returned as is).

    Raises ValueError naming the registered likelihoods if ``name`` is unknown.
    """
    if isinstance(name, Likelihood):
        return name
    if name not in LIKELIHOODS:
        raise ValueError(
            f"unknown likelihood {name!r}; registered: {', '.join(sorted(LIKELIHOODS))}"
        )
    return LIKELIHOODS[name]


for _likelihood in (
    NBLikelihood(),
    ZINBLikelihood(),
    NBMixtureLikelihood(),
    NBMixtureCellLikelihood(),
    PoissonLikelihood(),
    BernoulliLikelihood(),
    NormalLikelihood(),
):
    register_likelihood(_likelihood)
del _likelihood
