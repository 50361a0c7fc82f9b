"""Issue 11, cases 4-6: numerical failures of training, run directories, messages in the
interface that was used. Every test checks the result or the message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pyro_livi.cli import main
from pyro_livi.errors import RunDirectoryError, TrainingDivergedError
from pyro_livi.infer import trainer as trainer_module
from pyro_livi.run import fit
from pyro_livi.rundir import prepare_run_dir, run_outputs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FAST = dict(model="scvi", epochs=3, patience=None, batch_size=64, train_size=1.0, progress=False)


def make_adata(n_cells=120, n_genes=30, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    x[:, 0] += 1
    obs = pd.DataFrame({"donor": [f"D{i % 6}" for i in range(n_cells)],
                        "cell_type": [["T", "B"][i % 2] for i in range(n_cells)]},
                       index=[f"cell{i}" for i in range(n_cells)])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    make_adata().write_h5ad(path)
    return path


def cli(capsys, *args) -> tuple[int, str]:
    rc = main(["fit", *map(str, args)])
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------ 4. divergence
def test_divergence_on_the_cli_is_one_line_naming_site_epoch_and_an_existing_checkpoint(h5ad, tmp_path, capsys):
    rc, err = cli(capsys, "--model", "scvi", "--data", h5ad, "--lr", 1, "--epochs", 5, "--batch-size", 200,
                  "--train-size", 1, "--out", tmp_path / "run")
    assert rc == 3
    line = error_line(err)
    assert "training diverged in stage 'train' at epoch 1" in line
    assert re.search(r"(guide|model) sample site '\w+': argument \w+ of its \w+ distribution", line), line
    assert "--lr 0.1" in line and "lr=0.1" in line and "--overwrite" in line
    path = Path(re.search(r"Last good checkpoint: (\S+) \(written after epoch 0\)", line).group(1))
    state = torch.load(path, weights_only=False)
    assert state["position"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())


def test_divergence_in_the_first_epoch_says_no_checkpoint_was_written(h5ad, tmp_path):
    with pytest.raises(TrainingDivergedError) as info:
        fit(h5ad, **dict(FAST, lr=10.0), out=tmp_path / "run")
    err = info.value
    assert err.checkpoint is None and err.epoch == 0 and err.stage == "train"
    assert "No checkpoint was written" in str(err) and "Last good" not in str(err)
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint.pt").exists()


def test_an_exploding_loss_is_a_divergence(h5ad, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "LOSS_EXPLOSION_FACTOR", 0.5)  # any epoch trips it
    with pytest.raises(TrainingDivergedError, match=r"epoch 0: the loss exploded from .* \(largest term: nll_obs_rna\)"):
        fit(h5ad, **FAST)


def test_a_non_finite_gradient_stops_before_the_step_and_names_the_parameter(h5ad, tmp_path):
    from pyro_livi.data import DatasetSpec, read_dataset
    from pyro_livi.infer import Stage, Trainer, TrainingConfig
    from pyro_livi.run import build_model

    data = read_dataset(h5ad, DatasetSpec(modalities={"rna": None}))
    net = build_model("scvi", data)
    name, param = next(iter(net.named_parameters()))
    calls = []

    def poison(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) > 2 else grad  # third step: NaN gradient

    param.register_hook(poison)
    trainer = Trainer(net, data, [Stage("train", 3, train=("all",))],
                      TrainingConfig(batch_size=64, progress=False), checkpoint_dir=tmp_path)
    with pytest.raises(TrainingDivergedError, match=rf"epoch 1 \(batch 0\): the gradient of parameter\(s\) \['{name}'\]"):
        trainer.fit()
    assert torch.isfinite(param).all()  # the step was not taken


def test_divergence_seen_on_the_validation_cells_is_named(h5ad, tmp_path):
    with pytest.raises(TrainingDivergedError, match="validation cells") as info:
        fit(h5ad, **dict(FAST, lr=1.0, batch_size=200, train_size=0.8))
    assert info.value.stage == "train"


def test_python_divergence_error_carries_the_details(h5ad, tmp_path):
    with pytest.raises(TrainingDivergedError) as info:
        fit(h5ad, **dict(FAST, lr=1.0, batch_size=200), out=tmp_path / "run")
    err = info.value
    assert (err.stage, err.epoch, err.lr) == ("train", 1, 1.0)
    assert err.checkpoint is not None and Path(err.checkpoint).exists() and err.checkpoint_epoch == 0


# -------------------------------------------------------------------- 5. run directories
def test_interrupted_run_is_refused_without_resume_and_resumes_to_the_same_result(h5ad, tmp_path, monkeypatch):
    reference = fit(h5ad, **dict(FAST, epochs=4), out=tmp_path / "ref")
    saves = []
    original = trainer_module.Trainer.save_checkpoint

    def interrupt_after_two(self):
        original(self)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "save_checkpoint", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        fit(h5ad, **dict(FAST, epochs=4), out=tmp_path / "cut")
    monkeypatch.setattr(trainer_module.Trainer, "save_checkpoint", original)
    before = (tmp_path / "cut" / "checkpoints" / "checkpoint.pt").read_bytes()
    with pytest.raises(RunDirectoryError) as info:
        fit(h5ad, **dict(FAST, epochs=4), out=tmp_path / "cut")
    msg = str(info.value)
    assert "unfinished run (last checkpoint after epoch 1) of model 'scvi'" in msg
    assert "--resume" in msg and "resume=True" in msg and "--overwrite" in msg and "overwrite=True" in msg
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint.pt").read_bytes() == before  # untouched
    resumed = fit(h5ad, **dict(FAST, epochs=4), out=tmp_path / "cut", resume=True)
    pd.testing.assert_frame_equal(reference.history.drop(columns="cells_per_s"),
                                  resumed.history.drop(columns="cells_per_s"))


def test_resume_without_a_checkpoint_is_a_named_error_on_the_cli(h5ad, tmp_path, capsys):
    rc, err = cli(capsys, "--model", "scvi", "--data", h5ad, "--out", tmp_path / "none", "--resume")
    assert rc == 2
    line = error_line(err)
    assert "no checkpoint to resume from" in line and "without --resume" in line


def test_resume_with_other_settings_names_each_difference(h5ad, tmp_path):
    fit(h5ad, **dict(FAST, epochs=2), out=tmp_path / "run")
    with pytest.raises(RunDirectoryError) as info:
        fit(h5ad, **dict(FAST, epochs=2, lr=2e-3, seed=1), n_latent=4, out=tmp_path / "run", resume=True)
    msg = str(info.value)
    assert "lr (--lr): 0.0008 in the checkpoint, 0.002 now" in msg
    assert "seed (--seed): 0 in the checkpoint, 1 now" in msg
    assert "n_latent (--n-latent): 10 in the checkpoint, 4 now" in msg
    assert "--overwrite" in msg
    other = tmp_path / "other.h5ad"
    make_adata(n_cells=100).write_h5ad(other)
    with pytest.raises(RunDirectoryError, match="the data differ"):
        fit(other, **dict(FAST, epochs=2), out=tmp_path / "run", resume=True)
    with pytest.raises(RunDirectoryError, match="both resume and overwrite"):
        fit(h5ad, **dict(FAST, epochs=2), out=tmp_path / "run", resume=True, overwrite=True)


def test_another_models_run_is_refused_then_overwritten_without_touching_user_files(h5ad, tmp_path, capsys):
    run = tmp_path / "run"
    fit(h5ad, **dict(FAST, epochs=1), out=run)
    old = set(json.loads((run / "run.json").read_text())["outputs"])
    assert {"model.pt", "latent.tsv", "run.json"} <= old
    (run / "notes.txt").write_text("mine")
    (run / "associations.tsv").write_text("mine")
    args = ["--model", "livi", "--data", h5ad, "--donor-key", "donor", "--epochs", 1, "--epochs-vae", 1,
            "--n-dxc", 3, "--n-cell-state", 3, "--n-persistent", 2, "--batch-size", 120, "--out", run]
    rc, err = cli(capsys, *args)
    assert rc == 2
    line = error_line(err)
    assert "already holds a finished run of model 'scvi'" in line and "--resume" in line and "--overwrite" in line
    rc, err = cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    new = set(json.loads((run / "run.json").read_text())["outputs"])
    assert json.loads((run / "run.json").read_text())["model"] == "livi"
    stale = old - new
    assert stale and not any((run / name).exists() for name in stale)  # e.g. latent.tsv is gone
    assert (run / "notes.txt").read_text() == "mine" and (run / "associations.tsv").read_text() == "mine"


def test_overwrite_of_a_run_without_an_output_list_removes_only_run_files(tmp_path):
    run = tmp_path / "old"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("model.pt", "D.tsv", "cell_state.tsv", "loadings_W_C.tsv", "results.tsv", "notes.md"):
        (run / name).write_text("x")
    (run / "run.json").write_text(json.dumps({"model": "livi"}))
    (run / "checkpoints" / "checkpoint.pt").write_text("x")
    assert {p.name for p in run_outputs(run)} == {"model.pt", "D.tsv", "cell_state.tsv", "loadings_W_C.tsv",
                                                   "run.json", "checkpoint.pt"}
    with pytest.raises(RunDirectoryError, match="finished run of model 'livi'"):
        prepare_run_dir(run)
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.md", "results.tsv"]


# ----------------------------------------------------------- 6. the user's interface
def test_cli_log_normalised_x_lists_the_layers_and_names_the_counts_layer(tmp_path, capsys):
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.layers["scaled"] = adata.X / 3.0
    adata.X = np.log1p(adata.X)
    path = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(path)
    rc, err = cli(capsys, "--model", "scvi", "--data", path, "--out", tmp_path / "run")
    assert rc == 2
    line = error_line(err)
    assert "layers of modality 'rna': ['counts', 'scaled']" in line
    assert "layer 'counts' holds integer counts" in line
    assert "--layer counts" in line and "modalities={'rna': 'counts'}" in line
    rc, err = cli(capsys, "--model", "scvi", "--data", path, "--layer", "count", "--out", tmp_path / "run")
    line = error_line(err)
    assert rc == 2 and "available layers: ['counts', 'scaled'] (layer 'counts' holds integer counts)" in line
    assert "--layer counts" in line


def test_cli_unknown_donor_column_lists_columns_with_both_forms(h5ad, tmp_path, capsys):
    rc, err = cli(capsys, "--data", h5ad, "--donor-key", "Donor", "--out", tmp_path / "run")
    line = error_line(err)
    assert rc == 2 and "['donor', 'cell_type']" in line and "did you mean 'donor'?" in line
    assert "--donor-key on the CLI" in line and "donor_key= in Python" in line
