"""Tests of the likelihood registry (pyro_livi.likelihoods).

References: scipy.stats and closed forms built from scipy.stats.nbinom.logpmf, plus a 50-digit
mpmath negative binomial. scipy's nbinom takes p = theta / (theta + mu), which rounds towards 1
when mu << theta: the relative error of 1 - p is about eps * theta / mu, so scipy is only used
where mu / theta >= 1e-10; the mpmath reference covers the whole grid.

zinb and nb_mixture mix two terms with logaddexp (in the implementation and in the reference
closed forms alike); where the probability is close to 1 their log is a small difference of
terms of order |log weight|, with an absolute rounding error of about 1e-17. Their mpmath
comparison (rtol 1e-9) therefore also allows an absolute 1e-15.
"""

from __future__ import annotations

import itertools

import mpmath
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.special as sps
import scipy.stats as ss
import torch
from pyro.infer import Predictive

from pyro_livi import likelihoods as lk
from pyro_livi.likelihoods import (
    LIKELIHOODS,
    Likelihood,
    NegativeBinomial,
    NegativeBinomialMixture,
    ZeroInflatedNegativeBinomial,
    get_likelihood,
    register_likelihood,
)

COUNTS = [0.0, 1.0, 10.0, 1000.0, 1e5]
MEANS = [1e-8, 1e-3, 1.0, 100.0, 1e5]
THETAS = [1e-3, 0.1, 1.0, 10.0, 1e4]
ZI_LOGITS = [-4.0, 0.0, 3.0]
BACKGROUNDS = [1e-3, 5.0]
MIX_LOGITS = [-3.0, 0.0, 2.0]
SCIPY_MIN_MU_OVER_THETA = 1e-10
REGISTERED = {"nb", "zinb", "nb_mixture", "poisson", "bernoulli", "normal"}


def grid(*axes):
    """Flattened cartesian product: one float64 array of shape (N,) per axis."""
    return [np.array(a, dtype=np.float64) for a in zip(*itertools.product(*axes))]


def t64(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def nb_scipy(x, mu, theta):
    return ss.nbinom.logpmf(x, theta, theta / (theta + mu))


mpmath.mp.dps = 50


def _nb_mp_scalar(x, mu, theta):
    x, mu, theta = (mpmath.mpf(float(v)) for v in (x, mu, theta))
    log_sum = mpmath.log(theta + mu)
    return float(
        mpmath.loggamma(x + theta)
        - mpmath.loggamma(theta)
        - mpmath.loggamma(x + 1)
        + theta * (mpmath.log(theta) - log_sum)
        + x * (mpmath.log(mu) - log_sum)
    )


nb_mpmath = np.vectorize(_nb_mp_scalar, otypes=[np.float64])

# (reference NB log-pmf, rtol, whether to keep only the cells where scipy is accurate)
REFERENCES = {"scipy": (nb_scipy, 1e-6, True), "mpmath": (nb_mpmath, 1e-9, False)}
MIXING_ATOL = {"scipy": 0.0, "mpmath": 1e-15}


def scipy_ok(mu, theta):
    return mu / theta >= SCIPY_MIN_MU_OVER_THETA


# ----------------------------------------------------------------------------------------------
# 1. log_prob against references (float64)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", REFERENCES)
def test_nb_log_prob(ref):
    nb_ref, rtol, restrict = REFERENCES[ref]
    x, mu, log_theta = grid(COUNTS, MEANS, np.log(THETAS))
    theta = np.exp(log_theta)
    keep = scipy_ok(mu, theta) if restrict else np.ones_like(x, dtype=bool)
    # mean (1, G) with feature params (G,)
    d = get_likelihood("nb")(t64(mu)[None], log_theta=t64(log_theta))
    assert d.batch_shape == (1, x.size) and d.event_shape == ()
    ours = d.log_prob(t64(x)[None])[0].numpy()
    np.testing.assert_allclose(ours[keep], nb_ref(x, mu, theta)[keep], rtol=rtol, atol=0)
    if restrict:
        assert keep.sum() >= 0.9 * x.size


@pytest.mark.parametrize("ref", REFERENCES)
def test_zinb_log_prob(ref):
    nb_ref, rtol, restrict = REFERENCES[ref]
    x, mu, log_theta, z = grid(COUNTS, MEANS, np.log(THETAS), ZI_LOGITS)
    theta = np.exp(log_theta)
    keep = scipy_ok(mu, theta) if restrict else np.ones_like(x, dtype=bool)
    d = get_likelihood("zinb")(t64(mu)[None], log_theta=t64(log_theta), zi_logits=t64(z))
    ours = d.log_prob(t64(x)[None])[0].numpy()
    log_keep_nb = log_sigmoid(-z) + nb_ref(x, mu, theta)
    expected = np.where(x == 0, np.logaddexp(log_sigmoid(z), log_keep_nb), log_keep_nb)
    np.testing.assert_allclose(ours[keep], expected[keep], rtol=rtol, atol=MIXING_ATOL[ref])


@pytest.mark.parametrize("ref", REFERENCES)
def test_nb_mixture_log_prob(ref):
    nb_ref, rtol, restrict = REFERENCES[ref]
    x, mu, log_theta, log_bg, l = grid(COUNTS, MEANS, np.log(THETAS), np.log(BACKGROUNDS), MIX_LOGITS)
    theta, mu_back = np.exp(log_theta), np.exp(log_bg)
    mu_fore = mu_back + mu
    keep = (scipy_ok(mu_back, theta) & scipy_ok(mu_fore, theta)) if restrict else np.ones_like(x, dtype=bool)
    d = get_likelihood("nb_mixture")(
        t64(mu)[None], log_background=t64(log_bg), log_theta=t64(log_theta), mix_logits=t64(l)[None]
    )
    ours = d.log_prob(t64(x)[None])[0].numpy()
    expected = np.logaddexp(
        log_sigmoid(l) + nb_ref(x, mu_back, theta), log_sigmoid(-l) + nb_ref(x, mu_fore, theta)
    )
    np.testing.assert_allclose(ours[keep], expected[keep], rtol=rtol, atol=MIXING_ATOL[ref])


def test_poisson_log_prob():
    x, mu = grid(COUNTS, MEANS)
    ours = get_likelihood("poisson")(t64(mu)[None]).log_prob(t64(x)[None])[0].numpy()
    np.testing.assert_allclose(ours, ss.poisson.logpmf(x, mu), rtol=1e-10, atol=0)


def test_bernoulli_log_prob():
    x, mu = grid([0.0, 1.0], MEANS)
    ours = get_likelihood("bernoulli")(t64(mu)[None]).log_prob(t64(x)[None])[0].numpy()
    # P(x=1) = 1 - exp(-mu): log P(1) = log(1 - exp(-mu)) (log(-expm1(-mu)) below log 2,
    # log1p(-exp(-mu)) above, each exact on its side), log P(0) = -mu
    with np.errstate(divide="ignore"):
        log_p1 = np.where(mu < np.log(2), np.log(-np.expm1(-mu)), np.log1p(-np.exp(-mu)))
    expected = np.where(x == 1, log_p1, -mu)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=0)


def test_normal_log_prob():
    x, mu, log_scale = grid([-3.0] + COUNTS, [-2.0] + MEANS, [-3.0, 0.0, 2.0])
    d = get_likelihood("normal")(t64(mu)[None], log_scale=t64(log_scale))
    ours = d.log_prob(t64(x)[None])[0].numpy()
    np.testing.assert_allclose(ours, ss.norm.logpdf(x, mu, np.exp(log_scale)), rtol=1e-10, atol=0)


def test_params_broadcast_along_features():
    """Feature params (G,) line up with the last axis of mean (B, G); cell heads are (B, G)."""
    torch.manual_seed(0)
    B, G = 3, 4
    mean = torch.rand(B, G, dtype=torch.float64) * 10 + 0.1
    x = torch.poisson(mean)
    for name in sorted(LIKELIHOODS):
        lik = get_likelihood(name)
        params = {k: v.double() + 0.1 * torch.arange(G) for k, v in lik.init_feature_params(G).items()}
        params.update({h: torch.randn(B, G, dtype=torch.float64) for h in lik.cell_heads})
        obs = (x > 0).double() if name == "bernoulli" else x
        d = lik(mean, **params)
        assert d.batch_shape == (B, G) and d.event_shape == ()
        full = d.log_prob(obs)
        for b, g in itertools.product(range(B), range(G)):
            one = {k: v[g] if v.dim() == 1 else v[b, g] for k, v in params.items()}
            assert torch.allclose(lik(mean[b, g], **one).log_prob(obs[b, g]), full[b, g], rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# 2. Gradients
# ----------------------------------------------------------------------------------------------


def grid_inputs(name, dtype):
    """(mean (1, N), params, obs (1, N)) on the test grid for likelihood ``name``."""
    lik = get_likelihood(name)
    if name == "nb":
        x, mu, a = grid(COUNTS, MEANS, np.log(THETAS))
        params = {"log_theta": a}
    elif name == "zinb":
        x, mu, a, z = grid(COUNTS, MEANS, np.log(THETAS), ZI_LOGITS)
        params = {"log_theta": a, "zi_logits": z}
    elif name == "nb_mixture":
        x, mu, a, b, l = grid(COUNTS, MEANS, np.log(THETAS), np.log(BACKGROUNDS), MIX_LOGITS)
        params = {"log_theta": a, "log_background": b, "mix_logits": l[None]}
    elif name == "poisson":
        x, mu = grid(COUNTS, MEANS)
        params = {}
    elif name == "bernoulli":
        x, mu = grid([0.0, 1.0], MEANS)
        params = {}
    elif name == "normal":
        x, mu, s = grid(COUNTS, MEANS, [-3.0, 0.0, 2.0])
        params = {"log_scale": s}
    assert set(params) == set(lik.feature_params) | set(lik.cell_heads)
    to = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return to(mu)[None], {k: to(v) for k, v in params.items()}, to(x)[None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_gradients_finite_on_grid(name, dtype):
    mean, params, x = grid_inputs(name, dtype)
    mean.requires_grad_(True)
    for v in params.values():
        v.requires_grad_(True)
    log_prob = get_likelihood(name)(mean, **params).log_prob(x)
    assert torch.isfinite(log_prob).all()
    log_prob.sum().backward()
    assert torch.isfinite(mean.grad).all()
    for k, v in params.items():
        assert v.grad is not None and torch.isfinite(v.grad).all(), k


def test_nb_gradients_match_closed_form():
    x, mu, log_theta = grid(COUNTS, MEANS, np.log(THETAS))
    theta = np.exp(log_theta)
    mean_t, a_t = t64(mu).requires_grad_(True), t64(log_theta).requires_grad_(True)
    get_likelihood("nb")(mean_t, log_theta=a_t).log_prob(t64(x)).sum().backward()

    d_mu_terms = [x / mu, -(x + theta) / (theta + mu)]
    d_a_terms = [
        theta * sps.digamma(x + theta),
        -theta * sps.digamma(theta),
        theta * (np.log(theta) + 1),
        -theta * np.log(theta + mu),
        -theta * (x + theta) / (theta + mu),
    ]
    for grad, terms in [(mean_t.grad, d_mu_terms), (a_t.grad, d_a_terms)]:
        expected = sum(terms)
        # rounding of the reference itself: eps times the size of the cancelling terms
        tol = 1e-8 * np.abs(expected) + 1e-13 * sum(np.abs(t) for t in terms)
        assert np.all(np.abs(grad.numpy() - expected) <= tol)


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_gradients_match_finite_differences(name):
    torch.manual_seed(1)
    lik = get_likelihood(name)
    B, G = 3, 4
    mean = torch.rand(B, G, dtype=torch.float64) * 20 + 0.5
    x = torch.tensor([0.0, 1.0, 3.0, 30.0], dtype=torch.float64).expand(B, G)
    if name == "bernoulli":
        x = (x > 0.5).double()
    init = lik.init_feature_params(G)
    keys = list(lik.feature_params) + list(lik.cell_heads)
    values = [init[k].double() + 0.2 * torch.randn(G, dtype=torch.float64) for k in lik.feature_params]
    values += [torch.randn(B, G, dtype=torch.float64) for _ in lik.cell_heads]

    def f(mean, *vals):
        return lik(mean, **dict(zip(keys, vals))).log_prob(x)

    inputs = [mean.requires_grad_(True)] + [v.requires_grad_(True) for v in values]
    assert torch.autograd.gradcheck(f, inputs)


# ----------------------------------------------------------------------------------------------
# 3. Moments: properties vs formulas, formulas vs exact sums, samples vs formulas
# ----------------------------------------------------------------------------------------------

MOMENT_MU, MOMENT_THETA = grid([0.5, 5.0, 50.0], [0.5, 2.0, 20.0])
MOMENT_Z = np.array([-1.5, 0.0, 1.0] * 3)  # zi_logits / mix_logits per parameter set
MOMENT_BG = np.array([0.2, 3.0, 10.0] * 3)


def moment_cases():
    """name -> (distribution with batch (9,), mean formula, variance formula), float64."""
    mu, theta, z, bg = MOMENT_MU, MOMENT_THETA, MOMENT_Z, MOMENT_BG
    pi = sps.expit(z)
    nb_var = lambda m: m + m**2 / theta  # noqa: E731
    fore = bg + mu
    return {
        "nb": (NegativeBinomial(t64(mu), t64(theta)), mu, nb_var(mu)),
        "zinb": (
            ZeroInflatedNegativeBinomial(t64(mu), t64(theta), t64(z)),
            (1 - pi) * mu,
            (1 - pi) * mu * (1 + mu / theta) + pi * (1 - pi) * mu**2,
        ),
        "nb_mixture": (
            NegativeBinomialMixture(t64(bg), t64(fore), t64(theta), t64(z)),
            pi * bg + (1 - pi) * fore,
            pi * nb_var(bg) + (1 - pi) * nb_var(fore) + pi * (1 - pi) * mu**2,
        ),
        "poisson": (get_likelihood("poisson")(t64(mu)), mu, mu),
        "bernoulli": (
            get_likelihood("bernoulli")(t64(mu / 20)),
            -np.expm1(-mu / 20),
            -np.expm1(-mu / 20) * np.exp(-mu / 20),
        ),
        "normal": (get_likelihood("normal")(t64(mu), log_scale=t64(np.log(theta))), mu, theta**2),
    }


@pytest.mark.parametrize("name", ["nb", "zinb", "nb_mixture"])
def test_moment_formulas_by_exact_summation(name):
    """The closed-form mean and variance equal sums over the pmf (x = 0..20000, tail < 1e-80)."""
    d, mean, var = moment_cases()[name]
    support = torch.arange(20001, dtype=torch.float64)[:, None]
    pmf = d.log_prob(support).exp().numpy()
    np.testing.assert_allclose(pmf.sum(0), 1.0, rtol=1e-10)
    m1 = (support.numpy() * pmf).sum(0)
    m2 = ((support.numpy() - m1) ** 2 * pmf).sum(0)
    np.testing.assert_allclose(m1, mean, rtol=1e-9)
    np.testing.assert_allclose(m2, var, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_mean_variance_properties(name):
    d, mean, var = moment_cases()[name]
    np.testing.assert_allclose(d.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(d.variance.numpy(), var, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_sample_moments(name):
    torch.manual_seed(2024)
    d, mean, var = moment_cases()[name]
    n = 200_000
    s = d.sample((n,)).numpy()
    assert s.shape == (n, 9)
    if name != "normal":
        assert np.all(s >= 0) and np.all(s == np.round(s))
    m = s.mean(0)
    c = s - m
    s2 = (c**2).mean(0)
    m4 = (c**4).mean(0)
    se_mean = np.sqrt(var / n)
    se_var = np.sqrt((m4 - s2**2) / n)
    assert np.all(np.abs(m - mean) < 5 * se_mean), (m, mean)
    assert np.all(np.abs(s2 - var) < 5 * se_var), (s2, var)


def test_nb_is_not_torch_logits_parameterisation():
    """mean mu, variance mu + mu^2/theta: GammaPoisson(theta, theta/mu) agrees, on the same grid."""
    x, mu, theta = grid([0.0, 3.0, 40.0], [0.5, 7.0], [0.3, 4.0])
    ours = NegativeBinomial(t64(mu), t64(theta)).log_prob(t64(x))
    gp = dist.GammaPoisson(t64(theta), t64(theta / mu)).log_prob(t64(x))
    assert torch.allclose(ours, gp, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# 4. At a Pyro observation site
# ----------------------------------------------------------------------------------------------


def site_inputs(name, B=6, G=4):
    torch.manual_seed(3)
    lik = get_likelihood(name)
    mean = torch.rand(B, G) * 5 + 0.1
    params = {k: v + 0.3 * torch.randn(G) for k, v in lik.init_feature_params(G).items()}
    params.update({h: torch.randn(B, G) for h in lik.cell_heads})
    x = lik(mean, **params).sample()
    return lik, mean, params, x


def obs_model(lik, mean, params, x=None, mask=None):
    with pyro.plate("cells", mean.shape[0]):
        d = lik(mean, **params).to_event(1)
        if mask is not None:
            d = d.mask(mask)
        return pyro.sample("obs_x", d, obs=x)


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_observation_site_trace_and_mask(name):
    lik, mean, params, x = site_inputs(name)
    direct = lik(mean, **params).log_prob(x)
    tr = pyro.poutine.trace(obs_model).get_trace(lik, mean, params, x)
    assert torch.allclose(tr.log_prob_sum(), direct.sum(), rtol=1e-6)

    mask = torch.tensor([True, False, True, True, False, True])
    tr = pyro.poutine.trace(obs_model).get_trace(lik, mean, params, x, mask)
    tr.compute_log_prob()
    per_cell = tr.nodes["obs_x"]["log_prob"]
    assert per_cell.shape == (6,)
    assert torch.all(per_cell[~mask] == 0)
    assert torch.allclose(per_cell[mask], direct.sum(-1)[mask], rtol=1e-6)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_predictive_shapes(name, parallel):
    lik, mean, params, x = site_inputs(name)
    model = lambda: obs_model(lik, mean, params)  # noqa: E731
    draws = Predictive(model, num_samples=5, parallel=parallel)()["obs_x"]
    assert draws.shape == (5, 6, 4)
    assert torch.isfinite(lik(mean, **params).log_prob(draws)).all()


@pytest.mark.parametrize("name", ["nb", "zinb", "nb_mixture"])
def test_expand(name):
    lik, mean, params, x = site_inputs(name)
    d = lik(mean, **params)
    e = d.expand((3, 6, 4))
    assert type(e) is type(d) and e.batch_shape == (3, 6, 4)
    assert torch.allclose(e.log_prob(x), d.log_prob(x).expand(3, 6, 4), rtol=1e-6)
    assert e.sample().shape == (3, 6, 4)
    np.testing.assert_allclose(e.mean.numpy(), d.mean.expand(3, 6, 4).numpy())


def test_validation_rejects_bad_values():
    d = NegativeBinomial(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError):
        NegativeBinomial(torch.tensor([0.0, 1.0]), torch.ones(2), validate_args=True)


# ----------------------------------------------------------------------------------------------
# 5. Registry
# ----------------------------------------------------------------------------------------------


def test_registered_names():
    assert set(LIKELIHOODS) == REGISTERED | {"nb_mixture_cell"}
    for name, lik in LIKELIHOODS.items():
        assert lik.name == name and get_likelihood(name) is lik
        assert get_likelihood(lik) is lik


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError) as err:
        get_likelihood("zero_inflated_poisson")
    for name in REGISTERED:
        assert repr(name)[1:-1] in str(err.value)
    assert "zero_inflated_poisson" in str(err.value)


def test_wrong_params_raise():
    lik = get_likelihood("zinb")
    with pytest.raises(TypeError, match="zi_logits"):
        lik(torch.ones(2, 3), log_theta=torch.zeros(3))
    with pytest.raises(TypeError, match="bogus"):
        lik(torch.ones(2, 3), log_theta=torch.zeros(3), zi_logits=torch.zeros(3), bogus=1)


class _GeometricTest(Likelihood):
    """Geometric (failures before the first success) with mean mean * exp(log_extra): a
    user-defined likelihood for the registry test."""

    name = "geometric_test"
    feature_params = ("log_extra",)
    feature_init = {"log_extra": 0.5}

    def distribution(self, mean, log_extra):
        return dist.Geometric(probs=1 / (1 + mean * torch.exp(log_extra)))


def test_register_likelihood(monkeypatch):
    monkeypatch.setattr(lk, "LIKELIHOODS", dict(LIKELIHOODS))
    new = _GeometricTest()
    register_likelihood(new)
    assert lk.get_likelihood("geometric_test") is new
    assert set(lk.LIKELIHOODS) == REGISTERED | {"nb_mixture_cell", "geometric_test"}
    params = new.init_feature_params(3)
    assert torch.equal(params["log_extra"], torch.full((3,), 0.5))
    d = new(torch.full((2, 3), 4.0), **params)
    assert torch.allclose(d.mean, torch.full((2, 3), 4.0 * np.exp(0.5)))
    with pytest.raises(ValueError, match="already registered"):
        register_likelihood(_GeometricTest())
    other = _GeometricTest()
    register_likelihood(other, replace=True)
    assert lk.get_likelihood("geometric_test") is other
    with pytest.raises(TypeError):
        register_likelihood("nb")
    assert "geometric_test" not in LIKELIHOODS


@pytest.mark.parametrize(
    "name, expected",
    [
        ("nb", {"log_theta": 1.0}),
        ("zinb", {"log_theta": 1.0, "zi_logits": -2.0}),
        ("nb_mixture", {"log_background": 0.0, "log_theta": 1.0}),
        ("poisson", {}),
        ("bernoulli", {}),
        ("normal", {"log_scale": 0.0}),
    ],
)
def test_init_feature_params(name, expected):
    lik = get_likelihood(name)
    params = lik.init_feature_params(7)
    assert set(params) == set(lik.feature_params) == set(expected)
    for k, v in params.items():
        assert v.shape == (7,) and v.dtype == torch.get_default_dtype()
        assert torch.all(v == expected[k])
    with pytest.raises(ValueError):
        lik.init_feature_params(0)


def test_nb_mixture_background_init_recovers_planted_background():
    rng = np.random.default_rng(0)
    n = 2000
    background = np.array([3.0, 8.0, 20.0, 60.0, 150.0])
    alpha = np.array([10.0, 15.0, 8.0, 20.0, 12.0])
    is_background = rng.random((n, 5)) < 0.4
    mu = np.where(is_background, background, background * (1 + alpha))
    counts = rng.negative_binomial(10.0, 10.0 / (10.0 + mu))
    params = get_likelihood("nb_mixture").init_feature_params(5, counts)
    assert params["log_background"].shape == (5,)
    assert params["log_theta"].shape == (5,) and torch.all(params["log_theta"] == 1.0)
    recovered = np.exp(params["log_background"].numpy())
    np.testing.assert_allclose(recovered, background, rtol=0.2)
    # deterministic (fixed random_state)
    again = get_likelihood("nb_mixture").init_feature_params(5, counts)
    assert torch.equal(again["log_background"], params["log_background"])


def test_nb_mixture_background_init_edge_cases():
    lik = get_likelihood("nb_mixture")
    counts = np.zeros((50, 3))
    counts[:, 1] = 7.0  # constant column: a single component at 7 counts
    counts[:25, 2] = 1.0
    params = lik.init_feature_params(3, counts)
    bg = np.exp(params["log_background"].numpy())
    assert np.all(np.isfinite(bg))
    np.testing.assert_allclose(bg[0], lik.min_background, rtol=1e-6)  # all zeros: clipped floor
    np.testing.assert_allclose(bg[1], 7.0, rtol=1e-6)
    assert bg[2] < 0.5  # lower component of {0, 1} is the zeros
    with pytest.raises(ValueError, match="shape"):
        lik.init_feature_params(4, counts)


@pytest.mark.parametrize("name", ["nb", "zinb", "nb_mixture"])
def test_per_feature_theta_gives_the_same_values_and_gradients_as_a_full_matrix(name):
    """theta (G,) is broadcast to (B, G) as a stride-0 view, and its own terms are evaluated
    once per feature; values and gradients equal those of a materialised (B, G) theta."""
    torch.manual_seed(0)
    B, G = 5, 7
    lik = get_likelihood(name)
    mean = torch.rand(B, G, dtype=torch.float64) * 20 + 0.01
    x = torch.poisson(mean)
    params = {k: (v.double() + 0.3 * torch.randn(G, dtype=torch.float64)) for k, v in lik.init_feature_params(G).items()}
    params.update({h: torch.randn(B, G, dtype=torch.float64) for h in lik.cell_heads})
    results = []
    for materialise in (False, True):
        log_theta = params["log_theta"].clone().requires_grad_(True)
        others = {k: v for k, v in params.items() if k != "log_theta"}
        if materialise:
            others = {k: v.expand(B, G).contiguous() for k, v in others.items()}
            full = log_theta.expand(B, G).contiguous()
        else:
            full = log_theta
        lp = lik(mean, log_theta=full, **others).log_prob(x)
        lp.sum().backward()
        results.append((lp.detach(), log_theta.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


def test_unexpanded_keeps_real_dimensions():
    from pyro_livi.likelihoods import _unexpanded

    t = torch.arange(6.0).reshape(2, 3)
    assert _unexpanded(t).shape == (2, 3) and torch.equal(_unexpanded(t), t)
    e = torch.arange(3.0).expand(4, 3)
    assert _unexpanded(e).shape == (1, 3) and torch.equal(_unexpanded(e).expand(4, 3), e)
    col = torch.arange(4.0)[:, None].expand(4, 3)
    assert _unexpanded(col).shape == (4, 1)
