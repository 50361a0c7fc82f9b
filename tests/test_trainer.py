"""The training engine: stages and freezing, early stopping, checkpoints and resume, divergence."""

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.infer import (EarlyStopping, Stage, Trainer, TrainingConfig, TrainingDivergedError,
                             seed_everything)
from pyro_livi.models import LIVI, livi_stages
from pyro_livi.simulate import SimulationConfig, simulate


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


def test_stage_two_freezes_the_vae_parts(data):
    model = make_model(data)
    trainer = Trainer(model, data, livi_stages(2, 0), config())
    trainer.fit()
    after_vae = snapshot(model)
    trainer = Trainer(model, data, [Stage("donor", 3, train=("persistent", "interaction"),
                                          components=("persistent", "interaction"))], config())
    history = trainer.fit()
    after = snapshot(model)
    for name, value in after.items():
        group = model.group_of(name)
        if group in ("encoder", "cell_state"):
            assert torch.equal(value, after_vae[name]), f"{name} changed while frozen"
        else:
            assert not torch.equal(value, after_vae[name]), f"{name} did not train"
    assert {"kl_D", "kl_V", "penalty_l1_W_DxC", "penalty_A", "nll_obs_rna", "kl_c"} <= set(history.columns)
    # after fit every part of the model is on again, and every parameter trainable
    assert model.components == {"persistent", "interaction"}
    assert all(p.requires_grad for p in model.parameters())


def test_vae_stage_leaves_donor_parts_untouched(data):
    model = make_model(data)
    before = snapshot(model)
    history = Trainer(model, data, livi_stages(3, 0), config()).fit()
    assert list(history["stage"]) == ["vae"] * 3
    assert "kl_D" not in history.columns
    for name in ("D_loc_unconstrained", "V_loc_unconstrained", "W_DxC_unconstrained", "A_logits_unconstrained"):
        assert torch.equal(model.state_dict()[name], before[name])


def test_persistent_factors_can_train_with_the_vae(data):
    """persistent_in_vae_stage: V and W_V train in stage 1 with the VAE; D, A, W_DxC do not."""
    model = make_model(data)
    before = snapshot(model)
    history = Trainer(model, data, livi_stages(3, 0, persistent_in_vae_stage=True), config()).fit()
    assert list(history["stage"]) == ["vae"] * 3
    assert "kl_V" in history.columns and "kl_D" not in history.columns
    after = model.state_dict()
    for name in ("V_loc_unconstrained", "W_V_unconstrained", "W_C_unconstrained"):
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
    for name in ("D_loc_unconstrained", "W_DxC_unconstrained", "A_logits_unconstrained"):
        assert torch.equal(after[name], before[name]), f"{name} changed"


def test_history_records_each_site_per_cell(data):
    model = make_model(data)
    history = Trainer(model, data, livi_stages(2, 2), config()).fit()
    terms = [c for c in history.columns if c.startswith(("nll_", "kl_", "penalty_"))]
    assert np.allclose(history[terms].sum(axis=1, skipna=True), history["loss"])
    assert list(history["epoch"]) == [0, 1, 2, 3]


def _train(data, tmp_path, stop_after=None, resume=False):
    model = make_model(data, seed=123)
    stages = livi_stages(3, 4, patience=50)
    callbacks = []
    if stop_after is not None:
        def interrupt(trainer, record):
            if record["epoch"] + 1 == stop_after:
                raise KeyboardInterrupt
        callbacks.append(interrupt)
    trainer = Trainer(model, data, stages, config(seed=7), checkpoint_dir=tmp_path, callbacks=callbacks)
    return model, trainer.fit(resume=resume)


@pytest.mark.parametrize("stop_after", [2, 3, 5])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(data, tmp_path, stop_after):
    """Interrupt inside the VAE stage, at the stage boundary, and inside the donor stage."""
    reference, ref_history = _train(data, tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "cut", stop_after=stop_after)
    resumed, history = _train(data, tmp_path / "cut", resume=True)
    for (k, v), (_, w) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, w), f"{k} differs after resume"
    pd.testing.assert_frame_equal(ref_history.drop(columns="cells_per_s"), history.drop(columns="cells_per_s"))


def test_resume_refuses_another_models_checkpoint(data, tmp_path):
    _train(data, tmp_path)
    other = LIVI(data.n_features["rna"], len(data.donor_index), n_cell_state=6, n_dxc=3, n_persistent=2)
    with pytest.raises(ValueError, match="fresh checkpoint directory"):
        Trainer(other, data, livi_stages(1, 1), config(), checkpoint_dir=tmp_path).fit(resume=True)


def test_divergence_names_the_epoch_and_the_last_checkpoint(data, tmp_path):
    model = make_model(data)

    def poison(trainer, record):
        if record["epoch"] == 1:
            with torch.no_grad():
                trainer.model.W_C_unconstrained.fill_(float("nan"))

    trainer = Trainer(model, data, livi_stages(4, 0), config(), checkpoint_dir=tmp_path, callbacks=[poison])
    with pytest.raises(TrainingDivergedError, match=r"epoch 2.*checkpoint\.pt"):
        trainer.fit()


def test_early_stopping_waits_for_the_donor_factors(data):
    """A stage whose loss is flat stops after `patience` epochs only once the factors settle."""
    model = make_model(data)
    Trainer(model, data, livi_stages(2, 0), config()).fit()
    stop = EarlyStopping(patience=2, min_delta=1.0, watch=("D_loc", "V_loc"), factor_tol=1e9)
    stage = Stage("donor", 30, train=("persistent", "interaction"), components=("persistent", "interaction"),
                  early_stopping=stop)
    history = Trainer(model, data, [stage], config()).fit()
    assert len(history) == 3  # min_delta=1 (100%) never counts as improving after the first epoch
    stop_strict = EarlyStopping(patience=2, min_delta=1.0, watch=("D_loc",), factor_tol=0.0)
    stage.early_stopping = stop_strict
    history = Trainer(model, data, [stage], config()).fit()
    assert len(history) == 30  # factors never settle below a zero tolerance


def test_unknown_group_or_component_is_reported(data):
    model = make_model(data)
    with pytest.raises(ValueError, match="unknown parameter groups"):
        Trainer(model, data, [Stage("x", 1, train=("decoder",))], config()).fit()
    with pytest.raises(ValueError, match="no components"):
        Trainer(model, data, [Stage("x", 1, train=("encoder",), components=("batch",))], config()).fit()
