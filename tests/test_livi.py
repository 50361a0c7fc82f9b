"""LIVI's model/guide: sites, shapes, the objective, penalties, likelihood swap, save/load."""

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO

from pyro_livi.data import DatasetSpec, MinibatchLoader, read_dataset
from pyro_livi.infer import elbo_terms
from pyro_livi.likelihoods import NegativeBinomial, ZeroInflatedNegativeBinomial
from pyro_livi.models import LIVI
from pyro_livi.persistence import load_model, save_model
from pyro_livi.simulate import SimulationConfig, simulate


@pytest.fixture(scope="module")
def data():
    cfg = SimulationConfig(n_donors=12, cells_per_donor=10, n_genes=40, n_snps=50)
    sim = simulate(cfg, seed=3)
    return read_dataset(sim.adata, DatasetSpec(modalities={"rna": None}, donor_key="donor",
                                               label_keys=["cell_type"]))


def make_model(data, **kw):
    opts = dict(n_cell_state=5, n_dxc=3, n_persistent=2, encoder_hidden=(16,))
    opts.update(kw)
    return LIVI(data.n_features["rna"], len(data.donor_index), **opts)


def first_batch(data, size=32):
    return next(iter(MinibatchLoader(data, batch_size=size, shuffle=True, seed=0)))


def test_sites_and_shapes(data):
    model = make_model(data)
    batch = first_batch(data)
    guide_tr = poutine.trace(model.guide).get_trace(batch)
    tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(batch)
    n_donors, B, G = len(data.donor_index), batch.size, data.n_features["rna"]
    assert tr.nodes["D"]["value"].shape == (n_donors, 3)
    assert tr.nodes["V"]["value"].shape == (n_donors, 2)
    assert tr.nodes["c"]["value"].shape == (B, 5)
    assert tr.nodes["obs_rna"]["value"].shape == (B, G)
    assert isinstance(tr.nodes["obs_rna"]["fn"].base_dist.base_dist, NegativeBinomial)
    # the plate scales the cell-level terms by n_cells / B
    assert tr.nodes["obs_rna"]["scale"] == pytest.approx(data.n_cells / B)
    assert {"penalty_l1_W_DxC", "penalty_A"} <= set(tr.nodes)
    # the donor point-mass guide returns exactly the donor locations
    assert torch.equal(guide_tr.nodes["D"]["value"], model.D_loc.detach())


def test_mean_is_softmax_times_size_factor(data):
    """eq. 3: the NB mean sums to the cell's total count over genes."""
    model = make_model(data)
    batch = first_batch(data)
    guide_tr = poutine.trace(model.guide).get_trace(batch)
    tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(batch)
    mean = tr.nodes["obs_rna"]["fn"].base_dist.base_dist.mu
    assert torch.allclose(mean.sum(-1), batch.size_factor["rna"], rtol=1e-4)


def test_vae_stage_has_no_donor_sites(data):
    model = make_model(data)
    model.components = set()
    tr = poutine.trace(model.model).get_trace(first_batch(data))
    assert not {"D", "V", "penalty_l1_W_DxC", "penalty_A"} & set(tr.nodes)


def test_penalties_in_per_cell_units(data):
    model = make_model(data, l1_weight=2e-3, a_weight=5e-3)
    batch = first_batch(data)
    terms = elbo_terms(model.model, model.guide, batch)
    A = torch.sigmoid(model.A_logits.detach())
    W = model.W_DxC.detach()
    assert terms["penalty_l1_W_DxC"].item() == pytest.approx(data.n_cells * 2e-3 * W.abs().sum().item(), rel=1e-5)
    assert terms["penalty_A"].item() == pytest.approx(data.n_cells * 5e-3 * ((A * (1 - A)) ** 2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("donor_guide", ["delta", "normal"])
def test_elbo_terms_equal_trace_mean_field_elbo(data, donor_guide):
    model = make_model(data, donor_guide=donor_guide)
    batch = first_batch(data)
    pyro.set_rng_seed(11)
    ours = sum(elbo_terms(model.model, model.guide, batch).values()).item()
    pyro.set_rng_seed(11)
    theirs = TraceMeanField_ELBO().loss(model.model, model.guide, batch)
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.parametrize("name", ["zinb", "poisson", "nb_mixture"])
def test_likelihood_swap_by_name(data, name):
    model = make_model(data, likelihood=name, counts_sample=data.counts_sample("rna", n=100))
    batch = first_batch(data)
    terms = elbo_terms(model.model, model.guide, batch)
    assert torch.isfinite(sum(terms.values()))
    tr = poutine.trace(model.model).get_trace(batch)
    fn = tr.nodes["obs_rna"]["fn"].base_dist.base_dist
    if name == "zinb":
        assert isinstance(fn, ZeroInflatedNegativeBinomial)


def test_svi_step_and_predictive(data):
    pyro.set_rng_seed(0)
    model = make_model(data)
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    before = model.W_C.detach().clone()
    losses = [svi.step(batch) for batch in MinibatchLoader(data, batch_size=32, seed=0)]
    assert np.all(np.isfinite(losses))
    assert not torch.equal(before, model.W_C.detach())
    batch = first_batch(data)
    draws = Predictive(model.model, guide=model.guide, num_samples=4)(batch, observed=False)
    assert draws["obs_rna"].shape == (4, batch.size, data.n_features["rna"])
    assert torch.all(draws["obs_rna"] >= 0) and torch.equal(draws["obs_rna"], draws["obs_rna"].round())


def test_two_models_side_by_side_do_not_share_parameters(data):
    pyro.clear_param_store()
    m1, m2 = make_model(data), make_model(data)
    assert m1._pyro_name != m2._pyro_name
    w2 = m2.W_C.detach().clone()
    svi = SVI(m1.model, m1.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    for batch in MinibatchLoader(data, batch_size=32, seed=0):
        svi.step(batch)
    assert torch.equal(m2.W_C.detach(), w2), "training m1 changed m2"
    # m2 still reads its own parameters after m1 filled the param store
    svi2 = SVI(m2.model, m2.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    svi2.step(first_batch(data))
    assert not torch.equal(m2.W_C.detach(), w2)
    assert not torch.allclose(m1.W_C.detach(), m2.W_C.detach())


def test_save_load_round_trip(data, tmp_path):
    model = make_model(data, likelihood="zinb", donor_guide="normal")
    path = save_model(model, tmp_path, donor_index=data.donor_index,
                      covariate_categories=data.covariate_categories, feature_names=data.feature_names)
    loaded, meta = load_model(path)
    assert meta["donor_index"] == data.donor_index
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    batch = first_batch(data)
    assert torch.equal(model.encode(batch)[0], loaded.encode(batch)[0])
    assert loaded.config == model.config


def test_bad_options_are_reported(data):
    with pytest.raises(ValueError, match="link"):
        make_model(data, link="tanh")
    with pytest.raises(ValueError, match="donor_guide"):
        make_model(data, donor_guide="laplace")
    with pytest.raises(ValueError, match="registered|available|unknown"):
        make_model(data, likelihood="gamma")
