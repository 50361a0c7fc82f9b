"""Held-out reconstruction NLL against direct computations."""

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats as st
import torch
from pyro.nn import PyroModule, PyroParam

from pyro_livi.analysis.heldout import heldout_nll, nll_summary, split_cells
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.errors import InputError
from pyro_livi.models import LIVI

N_CELLS, N_GENES, N_DONORS = 60, 7, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _counts_adata(seed=0, n_cells=N_CELLS, n_genes=N_GENES):
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 0.2, size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    obs = pd.DataFrame({"donor": [f"d{k % N_DONORS}" for k in range(n_cells)]},
                       index=[f"cell{k}" for k in range(n_cells)])
    return ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


@pytest.fixture(scope="module")
def dataset():
    return read_dataset(_counts_adata(), DatasetSpec(modalities={"rna": None}, donor_key="donor"))


def _livi(likelihood):
    torch.manual_seed(0)
    model = LIVI(N_GENES, N_DONORS, n_cell_state=3, n_dxc=2, n_persistent=2, encoder_hidden=(8,),
                 likelihood=likelihood)
    with torch.no_grad():  # known, non-trivial parameters everywhere
        model.W_C.copy_(torch.randn(3, N_GENES))
        model.W_DxC.copy_(torch.randn(2, N_GENES))
        model.W_V.copy_(torch.randn(2, N_GENES))
        model.A_logits.copy_(torch.randn(3, 2))
        model.D_loc.copy_(torch.randn(N_DONORS, 2))
        model.V_loc.copy_(torch.randn(N_DONORS, 2))
        if likelihood == "nb":
            model.lik_rna_log_theta.copy_(torch.linspace(-1.0, 2.0, N_GENES))
    return model


def _direct_nll(model, dataset, idx, likelihood):
    """-log p(x_ig) with scipy at the encoder's location, averaged over cells: (G,)."""
    batch = dataset.batch(idx)
    with torch.no_grad():
        loc, _ = model.encoder(batch.x["rna"])
        s = torch.softmax(loc, -1)
        logits = s @ model.W_C + ((s @ model.A) * model.D_loc[batch.donor]) @ model.W_DxC \
            + model.V_loc[batch.donor] @ model.W_V
        mu = (torch.softmax(logits, -1) * batch.size_factor["rna"][:, None]).double().numpy()
    x = batch.x["rna"].double().numpy()
    if likelihood == "nb":
        theta = model.lik_rna_log_theta.detach().exp().double().numpy()
        logp = st.nbinom.logpmf(x, theta, theta / (theta + mu))
    else:
        logp = st.poisson.logpmf(x, mu)
    return -logp.mean(axis=0)


def test_split_cells_partitions_reproducibly():
    train, test = split_cells(100, 0.2, seed=3)
    assert len(test) == 20 and len(train) == 80
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    again = split_cells(100, 0.2, seed=3)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(split_cells(100, 0.2, seed=4)[1], test)
    assert len(split_cells(3, 0.01)[1]) == 1
    with pytest.raises(InputError, match="test_fraction"):
        split_cells(10, 1.5)
    with pytest.raises(InputError, match="n_cells"):
        split_cells(1)


@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_heldout_nll_equals_direct_computation(dataset, likelihood):
    model = _livi(likelihood)
    _, test = split_cells(dataset.n_cells, 0.25, seed=0)
    nll = heldout_nll(model, dataset, test)
    assert list(nll) == ["rna"]
    assert list(nll["rna"].index) == [f"g{j}" for j in range(N_GENES)]
    assert nll["rna"].attrs["n_cells"] == len(test)
    np.testing.assert_allclose(nll["rna"].to_numpy(), _direct_nll(model, dataset, test, likelihood),
                               rtol=1e-5)
    summary = nll_summary(nll)
    assert summary.loc["rna", "nll_per_cell"] == pytest.approx(nll["rna"].sum())


def test_batch_size_and_plate_size_do_not_matter(dataset):
    model = _livi("nb")
    idx = np.arange(5, 45)
    reference = heldout_nll(model, dataset, idx, batch_size=1024)["rna"]
    by_sevens = heldout_nll(model, dataset, idx, batch_size=7)["rna"]
    subset = heldout_nll(model, dataset.subset(idx))["rna"]  # Batch.n_cells 40 instead of 60
    np.testing.assert_allclose(by_sevens, reference, rtol=1e-6)
    np.testing.assert_allclose(subset, reference, rtol=1e-6)


def test_posterior_samples_average_matches_plugin_for_a_tight_posterior(dataset):
    model = _livi("nb")
    plugin = heldout_nll(model, dataset)["rna"]
    sampled = heldout_nll(model, dataset, n_samples=3, seed=1)["rna"]
    assert not np.allclose(sampled, plugin, rtol=1e-4)  # the encoder's scale is not small
    np.testing.assert_allclose(heldout_nll(model, dataset, n_samples=3, seed=1)["rna"], sampled)
    with torch.no_grad():  # scale = exp(-30) + 1e-4: every draw is essentially the location
        model.encoder.log_scale_head.weight.zero_()
        model.encoder.log_scale_head.bias.fill_(-30.0)
    tight = heldout_nll(model, dataset, n_samples=2, seed=0)["rna"]
    np.testing.assert_allclose(tight, heldout_nll(model, dataset)["rna"], rtol=1e-3)


class _TwoModalityToy(PyroModule):
    """A minimal zoo-style model: one cell latent z, Poisson sites obs_a (elementwise rates) and
    obs_b (an expanded distribution, masked for cells absent from modality b)."""

    def __init__(self, ga, gb):
        super().__init__(name="toy_heldout")
        self.rate_a = PyroParam(torch.linspace(0.5, 3.0, ga))
        self.rate_b = PyroParam(torch.tensor(2.0))
        self.gb = gb

    def model(self, batch, observed=True):
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            rate = self.rate_a * torch.exp(z)[:, None]
            pyro.sample("obs_a", dist.Poisson(rate).to_event(1), obs=batch.x["a"] if observed else None)
            fn = dist.Poisson(self.rate_b).expand([batch.size, self.gb]).to_event(1).mask(batch.present["b"])
            pyro.sample("obs_b", fn, obs=batch.x["b"] if observed else None)

    def guide(self, batch, observed=True):
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            pyro.sample("z", dist.Normal(self.loc(batch), 0.3))

    def loc(self, batch):
        return torch.log1p(batch.x["a"]).mean(-1) - 1.0

    def encode(self, batch):
        loc = self.loc(batch)
        return loc[:, None], torch.full_like(loc, 0.3)[:, None]


def test_masked_and_expanded_sites_of_any_model():
    rng = np.random.default_rng(0)
    n, ga, gb = 30, 4, 3
    a = ad.AnnData(rng.poisson(2.0, size=(n, ga)).astype(np.float32) + np.eye(n, ga, dtype=np.float32) + 1,
                   obs=pd.DataFrame({"donor": ["d0"] * n}, index=[f"c{k}" for k in range(n)]),
                   var=pd.DataFrame(index=[f"a{j}" for j in range(ga)]))
    present = np.arange(n) % 3 != 0  # every third cell lacks modality b
    b = ad.AnnData(rng.poisson(2.0, size=(int(present.sum()), gb)).astype(np.float32) + 1,
                   obs=pd.DataFrame(index=a.obs_names[present]),
                   var=pd.DataFrame(index=[f"b{j}" for j in range(gb)]))
    mdata = md.MuData({"a": a, "b": b})
    mdata.obs["donor"] = "d0"
    data = read_dataset(mdata, DatasetSpec(modalities={"a": None, "b": None}, donor_key="donor",
                                           optional_modalities=["b"]))
    model = _TwoModalityToy(ga, gb)
    nll = heldout_nll(model, data, batch_size=8)
    batch = data.batch(np.arange(n))
    z = model.loc(batch).double().numpy()
    rate_a = model.rate_a.detach().double().numpy()[None, :] * np.exp(z)[:, None]
    expected_a = -st.poisson.logpmf(batch.x["a"].double().numpy(), rate_a).mean(0)
    xb = batch.x["b"].double().numpy()[present]
    expected_b = -st.poisson.logpmf(xb, 2.0).mean(0)
    np.testing.assert_allclose(nll["a"].to_numpy(), expected_a, rtol=1e-5)
    np.testing.assert_allclose(nll["b"].to_numpy(), expected_b, rtol=1e-5)
    assert nll["a"].attrs["n_cells"] == n and nll["b"].attrs["n_cells"] == present.sum()
