"""MOFA-like model: planted factors recovered, R2 as mofapy2 defines it, Poisson views, views
missing in some cells masked, the three sparsity priors."""

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch

from pyro_livi.analysis.factors import r2_from_arrays, variance_explained
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.infer import Trainer, TrainingConfig, elbo_terms
from pyro_livi.models import MOFA
from pyro_livi.models.mofa import noise_snr_edge
from pyro_livi.simulate import simulate_factor_views as planted

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def as_dataset(views: dict, *, continuous=None, keep=None):
    """A dataset of views {name: (n, G)}; ``keep`` {name: bool (n,)} drops cells from a view."""
    n = next(iter(views.values())).shape[0]
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    mods = {}
    for m, Y in views.items():
        a = ad.AnnData(np.asarray(Y, dtype=np.float32), obs=obs.copy(),
                       var=pd.DataFrame(index=[f"{m}_{j}" for j in range(Y.shape[1])]))
        mods[m] = a[keep[m]].copy() if keep and m in keep else a
    mdata = md.MuData(mods)
    spec = DatasetSpec(modalities={m: None for m in views},
                       continuous_modalities=list(views) if continuous is None else continuous,
                       optional_modalities=list(keep or {}))
    return read_dataset(mdata, spec)


def train(model, dataset, epochs, batch_size=None):
    stages = MOFA.default_stages(epochs=epochs, patience=None)
    config = TrainingConfig(batch_size=batch_size or dataset.n_cells, progress=False, seed=0)
    return Trainer(model, dataset, stages, config).fit()


def abs_r(truth, fitted):
    """|Pearson r| between every column of ``truth`` and every column of ``fitted`` (K, K');
    a constant column of ``fitted`` (a factor switched off: its posterior mean is 0 in every
    cell) correlates with nothing, r = 0."""
    K = truth.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        C = np.corrcoef(truth.T, fitted.T)[:K, K:]
    return np.abs(np.where(fitted.std(axis=0) > 0, C, 0.0))


def best_abs_r(truth, fitted):
    return abs_r(truth, fitted).max(axis=1)


@pytest.fixture(scope="module")
def planted_fit():
    Z, _, Ys = planted()
    data = as_dataset({"v0": Ys[0], "v1": Ys[1]})
    torch.manual_seed(0)
    model = MOFA.from_dataset(data, n_factors=6)
    train(model, data, epochs=600)
    mu = model.encode(data.batch(np.arange(data.n_cells)))[0].detach().numpy()
    return Z, data, model, mu, variance_explained(model, data)


@pytest.mark.slow
def test_planted_factors_recovered_and_private_factor_stays_private(planted_fit):
    Z, data, model, mu, ve = planted_fit
    C = abs_r(Z, mu)
    assert (C.max(axis=1) > 0.95).all(), C.round(3)
    matched = C.argmax(axis=1)
    assert len(set(matched)) == 3
    private = f"z_{matched[2]}"
    assert ve.per_factor.loc[private, "v1"] < 0.01
    assert ve.per_factor.loc[private, "v0"] > 0.1
    # the three matched factors lead the order by total R2
    assert set(ve.order[:3]) == {f"z_{k}" for k in matched}
    assert (ve.total > 0.35).all() and (ve.total < 0.6).all()


@pytest.mark.slow
def test_planted_spurious_factors_are_inactive(planted_fit):
    Z, data, model, mu, ve = planted_fit
    matched = {f"z_{k}" for k in abs_r(Z, mu).argmax(axis=1)}
    spurious = [f for f in ve.order if f not in matched]
    assert (ve.per_factor.loc[spurious] < 1e-3).all().all(), ve.per_factor
    assert set(ve.inactive) == set(spurious)


def test_r2_matches_a_hand_computation():
    rng = np.random.default_rng(1)
    n, K = 40, 3
    views = {"a": rng.normal(size=(n, 6)), "b": rng.normal(size=(n, 4))}
    keep = {"b": np.arange(n) % 5 != 0}
    data = as_dataset(views, keep=keep)
    model = MOFA(data.n_features, n_factors=K, init="random")
    with torch.no_grad():
        for m, G in data.n_features.items():
            getattr(model, f"W_loc_{m}").copy_(torch.tensor(rng.normal(size=(K, G)), dtype=torch.float32))
            getattr(model, f"b_{m}").copy_(torch.tensor(rng.normal(size=G), dtype=torch.float32))
    ve = variance_explained(model, data, batch_size=7)
    batch = data.batch(np.arange(n))
    Z = model.encode(batch)[0].detach().double().numpy()
    for m in data.modalities:
        present = batch.present[m].numpy()
        Y = batch.x[m].double().numpy()[present] - getattr(model, f"b_{m}").detach().double().numpy()
        W = getattr(model, f"W_loc_{m}").detach().double().numpy()
        z = Z[present]
        ss = (Y ** 2).sum()
        for k in range(K):
            expected = 1 - ((Y - np.outer(z[:, k], W[k])) ** 2).sum() / ss
            assert ve.per_factor.loc[f"z_{k}", m] == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert ve.total[m] == pytest.approx(1 - ((Y - z @ W) ** 2).sum() / ss, rel=1e-6)
        assert ve.n_cells[m] == present.sum()
    # rows ordered by total R2; the array version agrees
    score = ve.per_factor.sum(axis=1).to_numpy()
    assert (np.diff(score) <= 1e-12).all()
    Ys = {m: batch.x[m].double().numpy() - getattr(model, f"b_{m}").detach().double().numpy()
          for m in data.modalities}
    again = r2_from_arrays(Ys, Z, {m: getattr(model, f"W_loc_{m}").detach().numpy() for m in data.modalities},
                           present={m: batch.present[m].numpy() for m in data.modalities})
    pd.testing.assert_frame_equal(again.per_factor, ve.per_factor, rtol=1e-6)
    assert set(ve.tables()) == {"r2_per_factor", "r2_total"}


def test_inactive_factors_are_reported():
    Z = np.random.default_rng(0).normal(size=(50, 3))
    W = {"v": np.array([[1.0, 2.0], [0.0, 0.0], [1e-4, 0.0]])}
    ve = r2_from_arrays({"v": Z @ W["v"]}, Z, W)
    assert ve.order[0] == "z_0" and set(ve.inactive) == {"z_1", "z_2"}
    assert ve.total["v"] == pytest.approx(1.0)


def test_default_likelihoods_follow_the_declared_inputs():
    rng = np.random.default_rng(0)
    views = {"rna": rng.poisson(2.0, size=(20, 5)).astype(np.float32), "prot": rng.normal(size=(20, 3))}
    data = as_dataset(views, continuous=["prot"])
    model = MOFA.from_dataset(data, n_factors=2)
    assert model.config["likelihoods"] == {"rna": "poisson", "prot": "normal"}
    model = MOFA.from_dataset(data, n_factors=2, likelihoods={"rna": "nb"})
    assert model.config["likelihoods"]["rna"] == "nb"


@pytest.mark.slow
def test_poisson_view_recovers_the_factors():
    rng = np.random.default_rng(3)
    n, K = 300, 2
    Z = rng.normal(size=(n, K))
    W0 = rng.normal(size=(K, 60)) * (rng.random((K, 60)) < 0.3)
    W1 = 0.8 * rng.normal(size=(K, 80)) * (rng.random((K, 80)) < 0.3)
    gauss = Z @ W0 + 0.5 * rng.normal(size=(n, 60))
    counts = rng.poisson(np.log1p(np.exp(0.5 + Z @ W1))).astype(np.float32)
    data = as_dataset({"g": gauss, "c": counts}, continuous=["g"])
    torch.manual_seed(0)
    model = MOFA.from_dataset(data, n_factors=4)
    assert model.config["likelihoods"]["c"] == "poisson"
    history = train(model, data, epochs=300)
    assert np.isfinite(history["loss"]).all()
    mu = model.encode(data.batch(np.arange(n)))[0].detach().numpy()
    assert (best_abs_r(Z, mu) > 0.9).all()
    # the counts alone place the cells too (the guide's Poisson term)
    only_counts = data.batch(np.arange(n))
    only_counts.present["g"] = torch.zeros(n, dtype=torch.bool)
    mu_c = model.encode(only_counts)[0].detach().numpy()
    assert (best_abs_r(Z, mu_c) > 0.7).all()
    ve = variance_explained(model, data)
    assert ve.total["c"] > 0.1 and ve.total["g"] > 0.5


def test_missing_view_is_masked():
    Z, _, Ys = planted(n=60, G=(20, 10))
    keep = {"v1": np.arange(60) % 3 != 0}
    data = as_dataset({"v0": Ys[0], "v1": Ys[1]}, keep=keep)
    model = MOFA.from_dataset(data, n_factors=3)
    batch = data.batch(np.arange(60))
    absent = ~batch.present["v1"]
    assert absent.sum() == 20
    # whatever the absent cells' v1 values are, neither the guide nor the likelihood sees them
    other = data.batch(np.arange(60))
    other.x["v1"][absent] = 1e3
    torch.manual_seed(0)
    a = elbo_terms(model.model, model.guide, batch)
    torch.manual_seed(0)
    b = elbo_terms(model.model, model.guide, other)
    for k in a:
        assert torch.allclose(a[k], b[k]), k
    torch.testing.assert_close(model.encode(batch)[0], model.encode(other)[0])
    # a cell with no view at all has the prior as its posterior
    none = data.batch(np.arange(5))
    for m in none.present:
        none.present[m] = torch.zeros(5, dtype=torch.bool)
    loc, sd = model.encode(none)
    torch.testing.assert_close(loc, torch.zeros_like(loc))
    torch.testing.assert_close(sd, torch.ones_like(sd))
    # training on minibatches with the masked view runs and R2 counts only present cells
    train(model, data, epochs=3, batch_size=16)
    ve = variance_explained(model, data)
    assert ve.n_cells["v1"] == 40 and ve.n_cells["v0"] == 60


@pytest.mark.parametrize("prior", ["horseshoe", "ard", "spike_slab"])
def test_priors_give_finite_elbo_terms_and_gradients(prior):
    Z, _, Ys = planted(n=40, G=(12, 6))
    data = as_dataset({"v0": Ys[0], "v1": Ys[1]})
    model = MOFA.from_dataset(data, n_factors=3, prior=prior)
    batch = data.batch(np.arange(16))
    terms = elbo_terms(model.model, model.guide, batch)
    expected = {"horseshoe": {"tau", "delta", "lambda", "c2"}, "ard": {"alpha"}, "spike_slab": {"alpha", "theta"}}
    assert {k.split("_")[1] for k in terms if k.startswith("kl_") and k != "kl_z"} >= expected[prior] | {"W"}
    assert all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in model.named_parameters() if n.startswith("W_loc"))


def test_unknown_prior_is_refused():
    with pytest.raises(ValueError, match="prior"):
        MOFA({"rna": 5}, prior="laplace")


def test_noise_snr_edge_is_the_top_noise_component():
    # the largest eigenvalue of the sample covariance of white noise, minus the noise floor
    rng = np.random.default_rng(0)
    for n, G in ((2000, 400), (1000, 50)):
        X = rng.normal(size=(n, G))
        top = np.linalg.eigvalsh(X.T @ X / n)[-1]
        assert top - 1 == pytest.approx(noise_snr_edge(G, n), abs=0.05)
    with pytest.raises(ValueError, match="n_cells"):
        noise_snr_edge(10, 0)


def test_factors_below_the_noise_edge_are_switched_off():
    _, _, Ys = planted(n=60, G=(20, 10))
    data = as_dataset({"v0": Ys[0], "v1": Ys[1]})
    model = MOFA.from_dataset(data, n_factors=3)
    assert model.snr_threshold["v0"] == pytest.approx(noise_snr_edge(20, 60))
    with torch.no_grad():
        model.W_loc_v0[1] = 1e-2          # factor 1: SNR far below the edge in v0 ...
        model.W_loc_v1[1] = 3.0           # ... far above it in v1
        model.W_loc_v0[2] = 1e-2
        model.W_loc_v1[2] = 1e-2          # factor 2: below the edge in both views
    active = model.active_factors()
    assert active["v0"].tolist() == [True, False, False] and active["v1"].tolist() == [True, True, False]
    loadings = model.loadings()
    assert (loadings["W__v0"][1:] == 0).all() and (loadings["W__v1"][2] == 0).all()
    assert (loadings["W__v1"][1] == 3.0).all()
    batch = data.batch(np.arange(60))
    loc, sd = model.encode(batch)
    # a factor off in every view has the prior as posterior: variance explained exactly 0
    torch.testing.assert_close(loc[:, 2], torch.zeros(60))
    torch.testing.assert_close(sd[:, 2], torch.ones(60))
    ve = variance_explained(model, data)
    assert (ve.per_factor.loc["z_2"] == 0).all() and "z_2" in ve.inactive
    assert ve.per_factor.loc["z_1", "v0"] == 0 and ve.per_factor.loc["z_1", "v1"] > 0
    # the ELBO's observation sites see the switched-off loadings as zero
    terms = elbo_terms(model.model, model.guide, batch)
    assert all(torch.isfinite(v) for v in terms.values())
    # with the component off (the first training stage) every factor is on
    model.components = set()
    assert all(a.all() for a in model.active_factors().values())
    assert model.encode(batch)[1][:, 2].max() < 1
    # prune_snr=0 keeps every factor
    assert all(a.all() for a in MOFA.from_dataset(data, n_factors=3, prune_snr=0.0).active_factors().values())


def test_default_stages_switch_factors_off_in_the_last_stage():
    stages = MOFA.default_stages(epochs=100, patience=None, factor_lr=0.05, lr_decay=0.1, prune_epochs=0.2)
    assert [s.name for s in stages] == ["train", "prune"] and [s.epochs for s in stages] == [80, 20]
    assert stages[0].components == () and stages[1].components == ("prune",)
    # one geometric decay from factor_lr to lr_decay x factor_lr across both stages
    assert stages[1].group_lr["all"] == pytest.approx(0.05 * stages[0].lr_decay)
    assert stages[0].lr_decay * stages[1].lr_decay == pytest.approx(0.1)
    assert [s.name for s in MOFA.default_stages(epochs=1)] == ["prune"]
    with pytest.raises(ValueError, match="prune_epochs"):
        MOFA.default_stages(epochs=10, prune_epochs=1.5)


def test_poisson_rate_never_underflows_to_zero():
    """A very negative linear predictor keeps a positive rate, so observed counts keep a finite
    log-likelihood (a zero rate made the loss infinite on raw protein counts)."""
    rng = np.random.default_rng(0)
    data = as_dataset({"prot": rng.poisson(50.0, size=(20, 4)).astype(np.float32)}, continuous=[])
    model = MOFA.from_dataset(data, n_factors=2)
    assert model.config["likelihoods"]["prot"] == "poisson"
    with torch.no_grad():
        model.b_prot.fill_(-500.0)
    terms = elbo_terms(model.model, model.guide, data.batch(np.arange(20)))
    assert all(torch.isfinite(v) for v in terms.values()), terms


def _constant_where_the_start_looks():
    """Planted views whose feature v0_0 is 0 in the cells the PCA start reads and 3 in every
    20th cell, which the start does not read; the model started from the other cells."""
    _, _, Ys = planted()
    v0 = Ys[0].copy()
    rare = np.zeros(v0.shape[0], dtype=bool)
    rare[::20] = True
    v0[:, 0] = np.where(rare, 3.0, 0.0)
    data = as_dataset({"v0": v0, "v1": Ys[1]})
    torch.manual_seed(0)
    model = MOFA.from_dataset(data, n_factors=6)
    model.initialise_from(data.subset(np.flatnonzero(~rare)))
    return model, v0[~rare].var(0).mean()


def test_feature_constant_where_the_start_looks_starts_above_the_noise_floor():
    """Its noise starts at 0.1% of its view's mean variance, not at zero (a near-zero start
    noise gives that feature a huge precision in every factor's update)."""
    model, view_var = _constant_where_the_start_looks()
    assert float(torch.exp(2 * model.lik_v0_log_scale[0])) >= 1e-3 * view_var * (1 - 1e-4)
