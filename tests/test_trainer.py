"""The training engine on a toy model (no model family): stages and freezing, per-stage learning
rates, early stopping, checkpoints and resume, divergence, data without donors."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pyro_livi.data import read_dataset
from pyro_livi.infer import EarlyStopping, Stage, Trainer, TrainingConfig, TrainingDivergedError, seed_everything
from toy_model import ToyModel


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    pass


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(120, 2))
    rate = np.exp(z @ rng.normal(size=(2, 20))) * 5
    return read_dataset(ad.AnnData(rng.poisson(rate).astype(np.float32) + 1), {"modalities": {"rna": None}})


def make_model(data, seed=0):
    seed_everything(seed)
    return ToyModel(data.n_features["rna"])


def config(**kw):
    return TrainingConfig(batch_size=32, progress=False, **kw)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


TWO_STAGES = [Stage("base", 3, train=("encoder", "decoder")),
              Stage("offset", 4, train=("offset",), components=("offset",))]


def test_a_stage_freezes_what_it_does_not_train(data):
    model = make_model(data)
    trainer = Trainer(model, data, TWO_STAGES[:1], config())
    history = trainer.fit()
    assert "kl_tau" not in history.columns and data.donor_index is None
    after_base = snapshot(model)
    history = Trainer(model, data, TWO_STAGES[1:], config()).fit()
    after = snapshot(model)
    for name, value in after.items():
        if model.group_of(name) == "offset":
            assert not torch.equal(value, after_base[name]), f"{name} did not train"
        else:
            assert torch.equal(value, after_base[name]), f"{name} changed while frozen"
    assert {"kl_tau", "kl_z", "nll_obs_rna"} <= set(history.columns)
    # after fit every part of the model is on again, and every parameter trainable
    assert model.components == {"offset"} and all(p.requires_grad for p in model.parameters())


def test_a_component_that_is_off_leaves_its_parameters_untouched(data):
    model = make_model(data)
    before = snapshot(model)
    Trainer(model, data, [Stage("base", 2, train=("encoder", "decoder", "offset"))], config()).fit()
    for name in ("u_unconstrained", "tau_loc_unconstrained", "tau_scale_unconstrained"):
        assert torch.equal(model.state_dict()[name], before[name])


def test_stage_learning_rates_are_per_group(data):
    model = make_model(data)
    before = snapshot(model)
    stage = Stage("base", 2, train=("encoder", "decoder"), group_lr={"decoder": 0.0})
    Trainer(model, data, [stage], config(lr=1e-2)).fit()
    after = model.state_dict()
    assert torch.equal(after["W_unconstrained"], before["W_unconstrained"])  # rate 0
    assert not torch.equal(after["encoder.weight"], before["encoder.weight"])  # the config's rate


def test_models_without_groups_train_everything_in_group_all(data):
    from pyro_livi.models import SCVI

    model = SCVI(data.n_features["rna"], n_latent=2, n_hidden=8)
    assert set(model.parameters_by_group()) == {"all"}
    before = snapshot(model)
    history = Trainer(model, data, SCVI.default_stages(epochs=2, patience=None), config()).fit()
    assert list(history["stage"]) == ["train", "train"]
    assert not torch.equal(model.state_dict()["rho_head.weight"], before["rho_head.weight"])


def test_history_records_each_site_per_cell(data):
    history = Trainer(make_model(data), data, TWO_STAGES, config()).fit()
    terms = [c for c in history.columns if c.startswith(("nll_", "kl_", "penalty_"))]
    assert np.allclose(history[terms].sum(axis=1, skipna=True), history["loss"])
    assert list(history["epoch"]) == list(range(7)) and list(history["stage"]) == ["base"] * 3 + ["offset"] * 4


def _train(data, tmp_path, stop_after=None, resume=False):
    model = make_model(data, seed=123)
    callbacks = []
    if stop_after is not None:
        def interrupt(trainer, record):
            if record["epoch"] + 1 == stop_after:
                raise KeyboardInterrupt
        callbacks.append(interrupt)
    trainer = Trainer(model, data, TWO_STAGES, config(seed=7), checkpoint_dir=tmp_path, callbacks=callbacks)
    return model, trainer.fit(resume=resume)


@pytest.mark.parametrize("stop_after", [2, 3, 5])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(data, tmp_path, stop_after):
    """Interrupt inside the first stage, at the stage boundary, and inside the second."""
    reference, ref_history = _train(data, tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "cut", stop_after=stop_after)
    resumed, history = _train(data, tmp_path / "cut", resume=True)
    for (k, v), (_, w) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, w), f"{k} differs after resume"
    pd.testing.assert_frame_equal(ref_history.drop(columns="cells_per_s"), history.drop(columns="cells_per_s"))


def test_resume_refuses_another_models_checkpoint(data, tmp_path):
    _train(data, tmp_path)
    other = ToyModel(data.n_features["rna"], n_latent=3)
    with pytest.raises(ValueError, match="fresh checkpoint directory"):
        Trainer(other, data, TWO_STAGES, config(), checkpoint_dir=tmp_path).fit(resume=True)


def test_divergence_names_the_epoch_and_the_last_checkpoint(data, tmp_path):
    model = make_model(data)

    def poison(trainer, record):
        if record["epoch"] == 1:
            with torch.no_grad():
                trainer.model.W_unconstrained.fill_(float("nan"))

    trainer = Trainer(model, data, TWO_STAGES[:1], config(), checkpoint_dir=tmp_path, callbacks=[poison])
    with pytest.raises(TrainingDivergedError, match=r"epoch 2.*checkpoint\.pt"):
        trainer.fit()


def test_early_stopping_waits_for_the_watched_parameters(data):
    """A stage whose loss never improves stops after `patience` epochs without watched
    parameters, and with them only once both windows of `patience` epochs are full and the
    parameters have settled."""
    model = make_model(data)
    stage = Stage("offset", 30, train=("offset",), components=("offset",),
                  early_stopping=EarlyStopping(patience=2, min_delta=1.0))
    history = Trainer(model, data, [stage], config()).fit()
    assert len(history) == 3  # min_delta=1 (100%) never counts as improving after the first epoch
    stage.early_stopping = EarlyStopping(patience=2, min_delta=1.0, watch=("u", "tau_loc"), factor_tol=1e9)
    history = Trainer(model, data, [stage], config()).fit()
    assert len(history) == 4 and history["factor_change"].iloc[:3].isna().all()
    stage.early_stopping = EarlyStopping(patience=2, min_delta=1.0, watch=("u",), factor_tol=0.0)
    history = Trainer(model, data, [stage], config()).fit()
    assert len(history) == 30  # the watched parameters never settle below a zero tolerance


def test_direction_change_ignores_scale_and_collapsed_columns():
    from pyro_livi.infer.stages import direction_change

    g = torch.Generator().manual_seed(0)
    old = torch.randn(1000, 3, generator=g)
    assert direction_change(3.0 * old + 1.0, old) == pytest.approx(0.0, abs=1e-6)
    assert direction_change(-old, old) == pytest.approx(0.0, abs=1e-6)  # sign is not a direction change
    turned = old.clone()
    turned[:, 0] = torch.randn(1000, generator=g)  # one of three equal-variance columns replaced
    assert 0.25 < direction_change(turned, old) < 0.4
    collapsed = old.clone()
    collapsed[:, 0] = 1e-3 * torch.randn(1000, generator=g)  # a column with no spread across rows
    assert direction_change(collapsed, old) < 1e-5
    assert direction_change(old[:, 0], old[:, 0]) == pytest.approx(0.0, abs=1e-6)
    assert direction_change(torch.tensor(2.0), torch.tensor(1.0)) == pytest.approx(0.5)  # a scalar


def test_unknown_group_or_component_is_reported(data):
    model = make_model(data)
    with pytest.raises(ValueError, match="unknown parameter groups"):
        Trainer(model, data, [Stage("x", 1, train=("cell_state",))], config()).fit()
    with pytest.raises(ValueError, match="no components"):
        Trainer(model, data, [Stage("x", 1, train=("encoder",), components=("batch",))], config()).fit()


def test_kl_warmup_scales_the_kl_terms_of_a_stage(data):
    from pyro_livi.infer import KLWarmup

    warm = KLWarmup(steps=8)
    assert [warm.weight(s, 0) for s in (0, 4, 8, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert KLWarmup(epochs=4, beta_min=0.5, beta_max=2.0).weight(0, 2) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="exactly one"):
        KLWarmup()
    plain = Trainer(make_model(data), data, [Stage("base", 3, train=("encoder", "decoder"))], config()).fit()
    stage = Stage("base", 3, train=("encoder", "decoder"), kl_warmup=KLWarmup(epochs=2))
    warmed = Trainer(make_model(data), data, [stage], config()).fit()
    assert list(warmed["beta"]) == [0.0, 0.5, 1.0]
    assert warmed["kl_z"].iloc[0] == 0.0 and plain["kl_z"].iloc[0] > 0
    terms = [c for c in warmed.columns if c.startswith(("nll_", "kl_"))]
    assert np.allclose(warmed[terms].sum(axis=1), warmed["loss"])


def test_validation_cells_are_scored_without_changing_training(data):
    """Held-out cells get a loss per epoch; training on the other cells is exactly what it is
    without them (their scoring draws from its own random stream); early stopping watches them."""
    train, held = data.subset(np.arange(100)), data.subset(np.arange(100, 120))
    stage = [Stage("base", 3, train=("encoder", "decoder"))]
    plain = Trainer(make_model(data), train, stage, config()).fit()
    scored = Trainer(make_model(data), train, stage, config(), validation=held).fit()
    pd.testing.assert_frame_equal(plain.drop(columns="cells_per_s"),
                                  scored.drop(columns=["cells_per_s", "validation_loss"]))
    assert np.isfinite(scored["validation_loss"]).all() and scored["validation_loss"].iloc[-1] > 0
    stop = EarlyStopping(patience=1, min_delta=0.0)
    watched = []

    class Spy(Trainer):
        def _stalled(self, stop, loss, snapshot):
            watched.append(loss)
            return super()._stalled(stop, loss, snapshot)

    history = Spy(make_model(data), train, [Stage("base", 2, train=("encoder", "decoder"), early_stopping=stop)],
                  config(), validation=held).fit()
    assert watched == list(history["validation_loss"])


def test_progress_bar_falls_back_to_text_without_ipywidgets(monkeypatch):
    import importlib
    import importlib.util

    import tqdm.std

    import pyro_livi.progress as progress

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    assert importlib.reload(progress).tqdm is tqdm.std.tqdm
    monkeypatch.undo()
    importlib.reload(progress)
