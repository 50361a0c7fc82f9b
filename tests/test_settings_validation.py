"""Settings and inputs that used to be accepted silently (or failed with a traceback) are refused
with an error naming the flag (CLI: exit code 2) or the keyword (Python: InputError) and the fix:
numeric covariates, learning rates, epochs, seeds, patience, repeated modalities, duplicate
feature names; and the messages of a fit (cells trained and held out) and of a refused resume."""

from __future__ import annotations

import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyro_livi.api import Model
from pyro_livi.cli import main
from pyro_livi.data import read_dataset
from pyro_livi.errors import InputError
from pyro_livi.infer import EarlyStopping, Stage, Trainer, TrainingConfig
from pyro_livi.paths import shared_data_dir
from pyro_livi.run import fit

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # mudata's update() notice

N_CELLS, N_GENES, N_DONORS = 200, 30, 10
SCVI = ["--model", "scvi", "--n-latent", "2", "--n-hidden", "8", "--batch-size", "64", "--threads", "1"]
LIVI = ["--donor-key", "donor", "--epochs-vae", "1", "--n-dxc", "2", "--n-persistent", "2", "--n-cell-state", "2",
        "--batch-size", "64", "--threads", "1"]
TINY = {"n_latent": 2, "n_hidden": 8, "batch_size": 64, "progress": False}


def make_adata(seed: int = 0) -> ad.AnnData:
    """Poisson counts; obs: donor, an integer-coded batch (1, 2, 3), age (a float measurement),
    barcode (one string per cell), cell_type."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(N_CELLS, N_GENES)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    obs = pd.DataFrame({
        "donor": [f"D{i % N_DONORS}" for i in range(N_CELLS)],
        "batch": (np.arange(N_CELLS) % 3 + 1).astype(np.int64),
        "age": rng.normal(50, 10, N_CELLS),
        "barcode": [f"AACG{i:05d}-1" for i in range(N_CELLS)],
        "cell_type": pd.Categorical([["T", "B"][i % 2] for i in range(N_CELLS)]),
    }, index=[f"cell{i}" for i in range(N_CELLS)])
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]))


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    make_adata().write_h5ad(path)
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``pyro-livi`` with ``argv``."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv) -> str:
    """The stderr of a ``pyro-livi`` command refused as a usage error (exit code 2)."""
    code, out, err = cli(capsys, *argv)
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and "Fix:" in err and "Traceback" not in err, err
    return err


def input_error(fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ 1. covariates are categories
def test_numeric_covariate_measurement_is_refused(h5ad, capsys, tmp_path):
    err = refused(capsys, "fit", "--data", h5ad, *SCVI, "--epochs", "1", "--covariate-keys", "age",
                  "--out", tmp_path / "run")
    assert str(h5ad) in err and "obs['age']" in err and f"{N_CELLS} distinct values" in err
    assert "pd.cut" in err and "astype(str)" in err and "--covariate-keys" in err
    assert not (tmp_path / "run" / "model.pt").exists()
    msg = input_error(fit, make_adata(), model="scvi", covariate_keys=["age"], epochs=1, **TINY)
    assert "obs['age'] (covariate_keys)" in msg and "covariate_keys=" in msg
    # many distinct whole numbers are a measurement too (e.g. a count), not categories
    adata = make_adata()
    adata.obs["n_genes"] = np.arange(N_CELLS) // 2
    msg = input_error(read_dataset, adata, {"modalities": {"rna": None}, "covariate_keys": ["n_genes"]})
    assert f"{N_CELLS // 2} distinct values" in msg and "more than 50" in msg


def test_identifier_covariate_is_refused():
    msg = input_error(read_dataset, make_adata(), {"modalities": {"rna": None}, "covariate_keys": ["barcode"]})
    assert "obs['barcode'] (covariate_keys)" in msg and f"every one of the {N_CELLS} cells" in msg
    assert "covariate_keys=" in msg and "--covariate-keys" in msg


def test_integer_coded_batches_remain_categories(h5ad, capsys, tmp_path, one_torch_thread):
    data = read_dataset(make_adata(), {"modalities": {"rna": None}, "covariate_keys": ["batch"]})
    assert data.covariate_categories == {"batch": ["1", "2", "3"]}
    assert np.array_equal(data.covariate_codes[:, 0], np.arange(N_CELLS) % 3)
    # the categories of a fitted model are re-applied to a few new cells without the checks
    few = read_dataset(make_adata()[:2].copy(), {"modalities": {"rna": None}, "covariate_keys": ["barcode"]},
                       covariate_categories={"barcode": ["AACG00000-1", "AACG00001-1"]})
    assert few.covariate_codes[:, 0].tolist() == [0, 1]
    code, _, err = cli(capsys, "fit", "--data", h5ad, *SCVI, "--epochs", "1", "--covariate-keys", "batch",
                       "--out", tmp_path / "run")
    assert code == 0, err
    import torch

    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert saved["config"]["n_covariate_categories"] == [3]


# ------------------------------------------------------------------------- 2. learning rates
@pytest.mark.parametrize("lr", ["-0.01", "0"])
def test_cli_refuses_a_learning_rate_that_is_not_positive(h5ad, capsys, tmp_path, lr):
    err = refused(capsys, "fit", "--data", h5ad, *SCVI, "--epochs", "1", "--lr", lr, "--out", tmp_path / "run")
    assert "field 'lr'" in err and "--lr 8e-4" in err and "lower the learning rate" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was read or written


def test_python_refuses_a_learning_rate_that_is_not_positive():
    msg = input_error(fit, make_adata(), model="scvi", epochs=1, lr=-0.1, **TINY)
    assert "field 'lr'" in msg and "lr=8e-4" in msg and "-0.01" not in msg
    model = Model(make_adata(), "scvi", n_latent=2, n_hidden=8)
    assert "lr=" in input_error(model.train, max_epochs=1, lr=0.0, progress=False)
    assert "lr=" in input_error(model.train, max_epochs=1, lr=float("nan"), progress=False)
    assert "lr=" in input_error(TrainingConfig, lr=-1e-3)


def test_stage_rates_are_checked():
    assert "lr_decay" in input_error(Stage, "donor", 5, train=("all",), lr_decay=0.0)
    assert "lr_decay" in input_error(Stage, "donor", 5, train=("all",), lr_decay=1.5)
    msg = input_error(Stage, "donor", 5, train=("persistent",), group_lr={"persistent": -1.0})
    assert "group_lr['persistent']" in msg and "--donor-lr" in msg and "donor_lr=" in msg
    Stage("donor", 5, train=("persistent",), group_lr={"persistent": 0.0}, lr_decay=1.0)  # 0 holds it still


# ---------------------------------------------------------------------------------- 3. epochs
@pytest.mark.parametrize("model, epochs", [("scvi", "0"), ("scvi", "-3"), ("multigrate", "0"), ("mofa", "0"),
                                           ("livi", "0")])
def test_cli_refuses_fewer_than_one_epoch(h5ad, capsys, tmp_path, model, epochs):
    flags = LIVI if model == "livi" else ["--modalities", "rna", "--threads", "1"]
    err = refused(capsys, "fit", "--data", h5ad, "--model", model, *flags, "--epochs", epochs,
                  "--out", tmp_path / "run")
    assert "field 'epochs'" in err and "--epochs 200" in err and f"got {epochs}" in err
    assert not (tmp_path / "run").exists()


def test_python_refuses_fewer_than_one_epoch(one_torch_thread):
    assert "epochs=" in input_error(fit, make_adata(), model="scvi", epochs=0, **TINY)
    model = Model(make_adata(), "scvi", n_latent=2, n_hidden=8)
    for bad in (0, -1):
        msg = input_error(model.train, max_epochs=bad, progress=False)
        assert "field 'max_epochs'" in msg and "max_epochs=200" in msg
    assert model.history is None
    # a stage of no epochs given to the trainer directly: refused, not a ZeroDivisionError
    msg = input_error(Trainer, model.module, model.dataset, [Stage("train", 0, train=("all",))],
                      TrainingConfig(progress=False))
    assert "stage 'train' epochs" in msg and "--epochs" in msg
    assert "stage 'vae' epochs" in input_error(Stage, "vae", -1, train=("all",))


# ------------------------------------------------------------------------------------ 4. seeds
def test_seeds_outside_numpys_range_are_refused(h5ad, capsys, tmp_path):
    err = refused(capsys, "fit", "--data", h5ad, *SCVI, "--epochs", "1", "--seed", "-5", "--out", tmp_path / "run")
    assert "field 'seed'" in err and "--seed 0" in err and "2**32 - 1" in err
    msg = input_error(Model, make_adata(), "scvi", seed=-1)
    assert "field 'seed'" in msg and "seed=0" in msg
    assert "seed=" in input_error(fit, make_adata(), model="scvi", epochs=1, seed=2 ** 32, **TINY)
    assert "seed=" in input_error(TrainingConfig, seed=1.5)


# --------------------------------------------------------------------------------- 5. patience
def test_negative_patience_is_refused(h5ad, capsys, tmp_path, one_torch_thread):
    err = refused(capsys, "fit", "--data", h5ad, *SCVI, "--epochs", "2", "--patience", "-1",
                  "--out", tmp_path / "run")
    assert "field 'patience'" in err and "--patience 20" in err and "--patience 0" in err
    assert "patience=" in input_error(fit, make_adata(), model="scvi", epochs=2, patience=-3, **TINY)
    assert "patience=" in input_error(EarlyStopping, patience=0)
    # 0 (as --patience 0 on the CLI) is no early stopping: every epoch trains
    result = fit(make_adata(), model="scvi", epochs=2, patience=0, train_size=1.0, **TINY)
    assert len(result.history) == 2


# ------------------------------------------------------------------------------ 6. modalities
def test_a_modality_named_twice_is_refused(h5ad, capsys, tmp_path):
    err = refused(capsys, "fit", "--data", h5ad, *SCVI, "--epochs", "1", "--modalities", "rna,rna",
                  "--out", tmp_path / "run")
    assert "field '--modalities'" in err and "['rna']" in err and "--modalities rna" in err


# --------------------------------------------------------------------- 7. duplicate feature names
def test_duplicate_feature_names_are_refused(tmp_path, capsys):
    adata = make_adata()
    adata.var_names = ["g0", "g1", "g0"] + [f"g{j}" for j in range(3, N_GENES - 1)] + ["g1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's own note on non-unique names
        msg = input_error(read_dataset, adata, {"modalities": {"rna": None}})
        path = tmp_path / "dup.h5ad"
        adata.write_h5ad(path)
        err = refused(capsys, "fit", "--data", path, *SCVI, "--epochs", "1", "--out", tmp_path / "run")
    for text in (msg, err):
        assert "adata.var_names" in text and "modality 'rna'" in text and "['g0', 'g1']" in text
        assert "adata.var_names_make_unique()" in text
    assert str(path) in err
    rna = make_adata()
    prot = ad.AnnData(X=np.ones((N_CELLS, 3), dtype=np.float32), obs=pd.DataFrame(index=rna.obs_names),
                      var=pd.DataFrame(index=["CD3", "CD4", "CD3"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mdata = md.MuData({"rna": rna, "prot": prot})
        msg = input_error(read_dataset, mdata, {"modalities": {"rna": None, "prot": None}})
    assert "mdata.mod['prot'].var_names" in msg and "['CD3']" in msg
    assert "mdata.mod['prot'].var_names_make_unique()" in msg and "mdata.update()" in msg


REAL = [("donors/onek1k_40donors_7811cells.h5ad", {"rna": None}),
        ("citeseq/pbmc10k_cite.h5mu", {"rna": None, "prot": None}),
        ("citeseq/eccite_pbmc500.h5mu", {"rna": None, "adt": None, "hto": None}),
        ("multiome/pbmc_multiome_1000cells.h5mu", {"rna": None})]  # (19 cells lack ATAC counts)


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")
@pytest.mark.parametrize("name, modalities", REAL)
def test_real_data_still_read(name, modalities):
    path = shared_data_dir() / name
    if not path.exists():
        pytest.skip(f"real data absent: {path} (set PYRO_LIVI_DATA)")
    data = read_dataset(path, {"modalities": modalities}, backed=name.endswith(".h5ad"))
    for m in modalities:
        assert data.feature_names[m].is_unique


def test_real_integer_covariates_read_and_a_pseudotime_is_refused():
    path = shared_data_dir() / "donors" / "onek1k_bcells_100donors_3726cells.h5ad"
    if not path.exists():
        pytest.skip(f"real data absent: {path} (set PYRO_LIVI_DATA)")
    spec = {"modalities": {"rna": None}, "donor_key": "indiv", "covariate_keys": ["sex"]}
    data = read_dataset(path, spec, backed=True)
    assert data.covariate_categories == {"sex": ["1", "2"]}
    with pytest.warns(UserWarning, match="numeric column with 44 distinct values"):  # integer ages
        read_dataset(path, dict(spec, covariate_keys=["age"]), backed=True)
    msg = input_error(read_dataset, path, dict(spec, covariate_keys=["slingPseudotime_1"]), backed=True)
    assert str(path) in msg and "obs['slingPseudotime_1']" in msg and "pd.cut" in msg


# ------------------------------------------------------------- 8. and 9. messages of fit and resume
def test_fit_reports_trained_and_held_out_cells(h5ad, capsys, tmp_path, one_torch_thread):
    code, out, err = cli(capsys, "fit", "--data", h5ad, *SCVI, "--epochs", "1", "--out", tmp_path / "run")
    assert code == 0, err
    held = (pd.read_csv(tmp_path / "run" / "split.tsv", sep="\t")["set"] == "validation").sum()
    assert held > 0
    assert f"fitted scvi on {N_CELLS - held} cells ({held} of the {N_CELLS} held out for validation)" in out
    # a refused resume shows the flag as given or not, never a bare None
    err = refused(capsys, "fit", "--data", h5ad, *SCVI, "--epochs", "1", "--backed", "--chunk-size", "16",
                  "--resume", "--out", tmp_path / "run")
    assert "backed (--backed): not given in the checkpoint, given now" in err
    assert "chunk_size (--chunk-size): not given (the default) in the checkpoint, 16 now" in err
    assert "None" not in err


def test_a_protein_likelihood_for_a_one_modality_run_is_refused(h5ad, capsys, tmp_path):
    err = refused(capsys, "fit", "--model", "scvi", "--data", h5ad, "--protein-likelihood", "normal",
                  "--epochs", "1", "--out", tmp_path / "run")
    assert "--protein-likelihood" in err and "reads one: rna" in err and not (tmp_path / "run").exists()


def test_querying_an_untrained_model_warns(one_torch_thread):
    m = Model(make_adata(), "scvi", n_latent=2, n_hidden=8)
    with pytest.warns(UserWarning, match="untrained scvi model.*train"):
        m.get_latent_representation()
    m.train(max_epochs=1, batch_size=64, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        m.get_latent_representation()
