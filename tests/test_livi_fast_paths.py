"""The fast paths of LIVI training give the same results as the straightforward computation:
the NB log-probability summed over genes (fused forward and backward), the frozen encoder's
per-cell cache in the donor stages, and Pyro's distribution checks on the first batch of each
epoch only."""

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.distributions as tdist

from pyro_livi.data import DatasetSpec, MinibatchLoader, read_dataset
from pyro_livi.infer import Stage, Trainer, TrainingConfig, elbo_terms
from pyro_livi.infer import trainer as trainer_module
from pyro_livi.likelihoods import NegativeBinomial, _NBIndependent, get_likelihood
from pyro_livi.models import LIVI, livi_stages
from pyro_livi.models._livi_family import FrozenEncoderCache
from pyro_livi.simulate import SimulationConfig, simulate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torch_nb_log_prob(x, mu, theta):
    """log NB(x; mean mu, inverse dispersion theta) by torch.distributions (total_count theta,
    success logits log(mu / theta): mean theta * mu / theta = mu)."""
    return tdist.NegativeBinomial(total_count=theta, logits=torch.log(mu) - torch.log(theta)).log_prob(x)


def counts_like(mu, seed=0, zeros=0.7):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(mu * 3, generator=g)
    x[torch.rand(mu.shape, generator=g, dtype=mu.dtype) < zeros] = 0
    x[0] = 0  # a cell with no counts at all
    x[1, 0] = 2000.0  # a large count
    return x


# ------------------------------------------------------------------ NB summed over genes
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("theta_grad", [True, False])
def test_nb_sum_over_genes_equals_torch_distributions(dtype, rtol, theta_grad):
    """Values and gradients (mean and log theta) of the fused per-cell sum equal the sum of
    torch.distributions.NegativeBinomial's log_prob, with a weighted upstream gradient."""
    g = torch.Generator().manual_seed(1)
    B, G = 37, 23
    mu0 = torch.rand(B, G, generator=g, dtype=dtype) * 10 + 1e-3
    mu0[:, 3] = 1e-6  # the Poisson limit mu << theta
    log_theta0 = torch.randn(G, generator=g, dtype=dtype) * 2
    log_theta0[5] = 8.0
    x = counts_like(mu0)
    weights = torch.linspace(0.5, 2.0, B, dtype=dtype)
    out = {}
    for way in ("fused", "torch"):
        mu = mu0.clone().requires_grad_(True)
        log_theta = log_theta0.clone().requires_grad_(theta_grad)
        d = get_likelihood("nb")(mu, log_theta=log_theta)
        if way == "fused":
            event = d.to_event(1)
            assert isinstance(event, _NBIndependent)
            per_cell = event.log_prob(x)
        else:
            per_cell = torch_nb_log_prob(x, mu, log_theta.exp()).sum(-1)
        (per_cell * weights).sum().backward()
        out[way] = (per_cell.detach(), mu.grad, log_theta.grad)
    assert out["fused"][0].shape == (B,)
    torch.testing.assert_close(out["fused"][0], out["torch"][0], rtol=rtol, atol=rtol)
    scale = out["torch"][1].abs().max()
    torch.testing.assert_close(out["fused"][1], out["torch"][1], rtol=rtol, atol=rtol * scale)
    if theta_grad:
        scale = out["torch"][2].abs().max()
        torch.testing.assert_close(out["fused"][2], out["torch"][2], rtol=rtol, atol=rtol * scale)
    else:
        assert out["fused"][2] is None


def test_nb_sum_over_genes_gradcheck():
    g = torch.Generator().manual_seed(2)
    mu = (torch.rand(6, 5, generator=g, dtype=torch.float64) * 4 + 0.1).requires_grad_(True)
    log_theta = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(True)
    x = counts_like(mu.detach(), zeros=0.4)
    fn = lambda m, t: get_likelihood("nb")(m, log_theta=t).to_event(1).log_prob(x)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu, log_theta))


@pytest.mark.parametrize("shape", ["per_cell_theta", "three_dims"])
def test_nb_sum_over_genes_falls_back_where_it_does_not_apply(shape):
    """A per-cell theta (B, G) or a leading sample dimension take the elementwise path: same values."""
    g = torch.Generator().manual_seed(3)
    mu = torch.rand(4, 6, 5, generator=g, dtype=torch.float64) + 0.2
    theta = torch.rand(4, 6, 5, generator=g, dtype=torch.float64) + 0.5
    if shape == "per_cell_theta":
        mu, theta = mu[0], theta[0]
    x = counts_like(mu, zeros=0.3)
    d = NegativeBinomial(mu, theta).to_event(1)
    torch.testing.assert_close(d.log_prob(x), torch_nb_log_prob(x, mu, theta).sum(-1), rtol=1e-10, atol=1e-10)


def test_nb_sum_over_genes_keeps_validation():
    d = get_likelihood("nb")(torch.ones(3, 4), log_theta=torch.zeros(4)).to_event(1)
    with pytest.raises(ValueError):
        d.log_prob(torch.full((3, 4), 1.5))
    with pyro.validation_enabled(False):
        d = get_likelihood("nb")(torch.ones(3, 4), log_theta=torch.zeros(4)).to_event(1)
        assert torch.isfinite(d.log_prob(torch.full((3, 4), 1.5))).all()


# ------------------------------------------------------------------ LIVI's loss
@pytest.fixture(scope="module")
def data():
    sim = simulate(SimulationConfig(n_donors=8, cells_per_donor=12, n_genes=30, n_snps=20), seed=5)
    return read_dataset(sim.adata, DatasetSpec(modalities={"rna": None}, donor_key="donor"))


def make_model(data, seed=0):
    pyro.set_rng_seed(seed)
    return LIVI(data.n_features["rna"], len(data.donor_index), n_cell_state=4, n_dxc=3, n_persistent=2,
                encoder_hidden=(16, 8))


def straightforward_loss(model, batch, donor: bool, eps):
    """LIVI's negative ELBO written out with torch.distributions (same draw eps of c)."""
    x, sf = batch.x["rna"], batch.size_factor["rna"]
    scale = batch.n_cells / x.shape[0]
    loc, sd = model.encoder(x)
    c = loc + sd * eps
    kl = tdist.kl_divergence(tdist.Normal(loc, sd), tdist.Normal(0.0, 1.0)).sum()
    s = torch.softmax(c, dim=-1)
    logits = s @ model.W_C
    loss = scale * kl
    if donor:
        A = torch.sigmoid(model.A_logits)
        logits = logits + ((s @ A) * model.D_loc[batch.donor]) @ model.W_DxC + model.V_loc[batch.donor] @ model.W_V
        prior = tdist.Normal(0.0, 1.0)
        loss = loss - prior.log_prob(model.D_loc).sum() - prior.log_prob(model.V_loc).sum()
        loss = loss + batch.n_cells * (model.l1_weight * model.W_DxC.abs().sum()
                                       + model.a_weight * ((A * (1 - A)) ** 2).sum())
    mu = torch.softmax(logits, dim=-1) * sf[:, None]
    nll = -torch_nb_log_prob(x, mu, model.lik_rna_log_theta.exp()).sum()
    return loss + scale * nll


@pytest.mark.parametrize("stage", ["vae", "donor"])
def test_livi_loss_and_gradients_equal_the_straightforward_computation(data, stage):
    model = make_model(data)
    model.components = {"persistent", "interaction"} if stage == "donor" else set()
    batch = next(iter(MinibatchLoader(data, batch_size=40, shuffle=True, seed=0)))
    pyro.set_rng_seed(7)
    guide = poutine.trace(model.guide).get_trace(batch)
    eps = (guide.nodes["c"]["value"] - guide.nodes["c"]["fn"].base_dist.loc) / guide.nodes["c"]["fn"].base_dist.scale
    pyro.set_rng_seed(7)
    ours = sum(elbo_terms(model.model, model.guide, batch).values())
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = straightforward_loss(model, batch, stage == "donor", eps.detach())
    ref.backward()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=0)
    for name, grad in grads.items():
        expected = dict(model.named_parameters())[name].grad
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-7)


# ------------------------------------------------------------------ the frozen encoder's cache
def test_cache_returns_the_encoder_output_while_frozen_and_notices_changes(data):
    model = make_model(data)
    encoder = model.encoder
    cache = FrozenEncoderCache()
    batch = data.batch(range(10))
    x = batch.x["rna"]
    # trainable encoder: the cache is bypassed and gradients flow
    loc, scale = cache(encoder, x, batch.index, batch.n_cells)
    assert loc.requires_grad
    encoder.requires_grad_(False)
    calls = []
    handle = encoder.register_forward_hook(lambda *a: calls.append(1))
    expected = encoder(x)
    first = cache(encoder, x, batch.index, batch.n_cells)
    again = cache(encoder, x, batch.index, batch.n_cells)
    assert len(calls) == 2  # computed once by the cache, then read back
    for a, b, c in zip(expected, first, again):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.equal(b, c)
    # a parameter changed in place (optimiser step, load_state_dict, .data): recomputed
    for change in (lambda p: p.add_(0.1), lambda p: p.data.mul_(1.5)):
        with torch.no_grad():
            change(encoder.loc_head.bias)
        new = cache(encoder, x, batch.index, batch.n_cells)
        torch.testing.assert_close(new[0], encoder(x)[0], rtol=1e-6, atol=1e-7)
    # other cells at the same positions of a set of the same size: recomputed, not read back
    other = x.flip(0)
    torch.testing.assert_close(cache(encoder, other, batch.index, batch.n_cells)[0], encoder(other)[0],
                               rtol=1e-6, atol=1e-7)
    # back to trainable: bypassed again
    encoder.requires_grad_(True)
    assert cache(encoder, x, batch.index, batch.n_cells)[0].requires_grad
    handle.remove()


def test_donor_stage_trains_the_same_with_and_without_the_cache(data, monkeypatch):
    def train():
        model = make_model(data)
        stages = livi_stages(2, 3, patience=None)
        history = Trainer(model, data, stages, TrainingConfig(batch_size=32, progress=False)).fit()
        return history["loss"].to_numpy(), model.D_loc.detach().clone()

    cached = train()
    monkeypatch.setattr(FrozenEncoderCache, "__call__", lambda self, enc, x, index, n: enc(x))
    plain = train()
    np.testing.assert_allclose(cached[0], plain[0], rtol=1e-5)
    torch.testing.assert_close(cached[1], plain[1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ validation in the Trainer
def test_checking_the_first_batch_of_each_epoch_trains_the_same(data, monkeypatch):
    def train():
        model = make_model(data)
        trainer = Trainer(model, data, [Stage("all", 2, train=("encoder", "cell_state", "persistent",
                                                                 "interaction"),
                                              components=("persistent", "interaction"))],
                          TrainingConfig(batch_size=32, progress=False))
        return trainer.fit()["loss"].to_numpy()

    checked = []
    real = pyro.validation_enabled

    def spy(flag=True):
        checked.append(flag)
        return real(flag)

    monkeypatch.setattr(trainer_module.pyro, "validation_enabled", spy)
    first_only = train()
    n_batches = -(-data.n_cells // 32)
    assert checked[:n_batches] == [True] + [False] * (n_batches - 1)
    monkeypatch.setattr(trainer_module, "VALIDATE_EVERY_BATCH", True)
    checked.clear()
    every = train()
    assert all(checked[:n_batches])
    np.testing.assert_array_equal(first_only, every)


def test_invalid_values_after_the_first_batch_still_stop_training(data):
    """With the checks off for a batch, a non-finite parameter still raises TrainingDivergedError
    naming the site."""
    from pyro_livi.errors import TrainingDivergedError

    model = make_model(data)
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        if len(calls) >= 2:  # from the second batch of the first epoch on (not validated)
            return output[0] * float("nan"), output[1]
        return output

    model.encoder.register_forward_hook(poison)
    trainer = Trainer(model, data, [Stage("vae", 1, train=("encoder", "cell_state"))],
                      TrainingConfig(batch_size=32, progress=False))
    with pytest.raises(TrainingDivergedError, match=r"batch 1\).*loss became nan.*guide sample site 'c'"):
        trainer.fit()


# ------------------------------------------------------------------ sparse first encoder layer
@pytest.mark.parametrize("transform", ["log1p", "raw"])
def test_sparse_first_encoder_layer_equals_the_dense_layer(transform):
    from pyro_livi.nn import GaussianEncoder

    g = torch.Generator().manual_seed(4)
    x = torch.poisson(torch.rand(50, 120, generator=g) * 0.25, generator=g)
    assert 0 < (x != 0).float().mean() < 0.2
    torch.manual_seed(0)
    encoder = GaussianEncoder(120, 4, (32, 8), transform, sparse_input=True)
    results = []
    for sparse in (True, False):
        encoder.sparse_input = sparse
        encoder.zero_grad()
        loc, scale = encoder(x.clone())
        (loc.sum() + 2 * scale.sum()).backward()
        results.append([loc.detach(), scale.detach()] + [p.grad.clone() for p in encoder.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()) + 1e-7)


def test_dense_minibatches_take_the_dense_path():
    from pyro_livi.nn import GaussianEncoder

    encoder = GaussianEncoder(10, 2, (4,), sparse_input=True)
    assert encoder._sparse_first_layer(torch.ones(3, 10)) is None
    assert encoder._sparse_first_layer(torch.eye(10)) is not None


def test_nonzeros_are_found_once_per_tensor():
    from pyro_livi.likelihoods import nonzeros

    x = torch.tensor([[0.0, 2.0, 0.0], [5.0, 0.0, 1.0]])
    nz = nonzeros(x)
    assert nz.row.tolist() == [0, 1, 1] and nz.col.tolist() == [1, 0, 2] and nz.values.tolist() == [2.0, 5.0, 1.0]
    assert nonzeros(x) is nz  # the same tensor: found once
    x[0, 0] = 3.0  # modified in place: found again
    assert nonzeros(x).values.tolist() == [3.0, 2.0, 5.0, 1.0]


def test_counts_off_the_per_feature_tables_are_computed_directly():
    """Counts above SMALL_COUNT and non-whole values (validation off) give the elementwise values."""
    from pyro_livi.likelihoods import SMALL_COUNT, _nb_log_prob

    mu = torch.full((2, 3), 4.0, dtype=torch.float64, requires_grad=True)
    log_theta = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0, SMALL_COUNT, SMALL_COUNT + 1.0], [2.5, 0.0, 5000.0]], dtype=torch.float64)
    with pyro.validation_enabled(False):
        fused = get_likelihood("nb")(mu, log_theta=log_theta).to_event(1).log_prob(x)
    grads = torch.autograd.grad(fused.sum(), (mu, log_theta))
    direct = _nb_log_prob(x, mu, log_theta.exp()).sum(-1)
    expected = torch.autograd.grad(direct.sum(), (mu, log_theta))
    torch.testing.assert_close(fused, direct, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
