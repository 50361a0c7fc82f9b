"""LIVI's staged schedule (livi_stages): the VAE stage, freezing in the donor stage, V trained with
the VAE, per-group learning rates of the donor parts, early stopping on the donor factors."""

import pytest
import torch

from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.infer import EarlyStopping, Stage, Trainer, TrainingConfig, seed_everything
from pyro_livi.models import LIVI, livi_stages
from pyro_livi.simulate import SimulationConfig, simulate


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def data():
    sim = simulate(SimulationConfig(n_donors=10, cells_per_donor=12, n_genes=30, n_snps=20), seed=5)
    return read_dataset(sim.adata, DatasetSpec(modalities={"rna": None}, donor_key="donor"))


def make_model(data, seed=0):
    seed_everything(seed)
    return LIVI(data.n_features["rna"], len(data.donor_index), n_cell_state=4, n_dxc=3,
                n_persistent=2, encoder_hidden=(16,))


def config(**kw):
    return TrainingConfig(batch_size=32, progress=False, **kw)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_schedule_as_data():
    vae, donor = livi_stages(60, 200, donor_lr=0.05)
    assert (vae.name, vae.epochs, vae.train, vae.components) == ("vae", 60, ("encoder", "cell_state"), ())
    assert (donor.name, donor.epochs, donor.components) == ("donor", 200, ("persistent", "interaction"))
    assert donor.group_lr == {"persistent": 0.05, "interaction": 0.05}
    assert donor.early_stopping.watch == ("D_loc", "V_loc")
    assert [s.name for s in livi_stages(2, 3, warmup_epochs_G=4)] == ["vae", "persistent", "donor"]
    assert livi_stages(2, 3, patience=None)[-1].early_stopping is None
    assert LIVI.default_stages(epochs=7, epochs_vae=2)[-1].epochs == 7


def test_donor_stage_freezes_the_vae_parts(data):
    model = make_model(data)
    Trainer(model, data, livi_stages(2, 0), config()).fit()
    after_vae = snapshot(model)
    history = Trainer(model, data, [Stage("donor", 3, train=("persistent", "interaction"),
                                          components=("persistent", "interaction"))], config()).fit()
    after = snapshot(model)
    for name, value in after.items():
        group = model.group_of(name)
        if group in ("encoder", "cell_state"):
            assert torch.equal(value, after_vae[name]), f"{name} changed while frozen"
        else:
            assert not torch.equal(value, after_vae[name]), f"{name} did not train"
    assert {"kl_D", "kl_V", "penalty_l1_W_DxC", "penalty_A", "nll_obs_rna", "kl_c"} <= set(history.columns)


def test_vae_stage_leaves_donor_parts_untouched(data):
    model = make_model(data)
    before = snapshot(model)
    history = Trainer(model, data, livi_stages(3, 0), config()).fit()
    assert list(history["stage"]) == ["vae"] * 3 and "kl_D" not in history.columns
    for name in ("D_loc_unconstrained", "V_loc_unconstrained", "W_DxC_unconstrained", "A_logits_unconstrained"):
        assert torch.equal(model.state_dict()[name], before[name])


def test_persistent_factors_can_train_with_the_vae(data):
    """persistent_in_vae_stage: V and W_V train in stage 1 with the VAE; D, A, W_DxC do not."""
    model = make_model(data)
    before = snapshot(model)
    history = Trainer(model, data, livi_stages(3, 0, persistent_in_vae_stage=True), config()).fit()
    assert "kl_V" in history.columns and "kl_D" not in history.columns
    after = model.state_dict()
    for name in ("V_loc_unconstrained", "W_V_unconstrained", "W_C_unconstrained"):
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    for name in ("D_loc_unconstrained", "W_DxC_unconstrained", "A_logits_unconstrained"):
        assert torch.equal(after[name], before[name]), f"{name} changed"


def test_early_stopping_waits_for_the_donor_factors(data):
    model = make_model(data)
    Trainer(model, data, livi_stages(2, 0), config()).fit()
    stage = livi_stages(1, 30)[-1]
    stage.early_stopping = EarlyStopping(patience=2, min_delta=1.0, watch=("D_loc", "V_loc"), factor_tol=1e9)
    assert len(Trainer(model, data, [stage], config()).fit()) == 4  # two full windows of `patience` epochs
