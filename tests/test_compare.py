"""`pyro-livi compare`: several models on the same cells, one table, resumable per model."""

import json

import pandas as pd
import pytest

from pyro_livi.analysis.compare import compare
from pyro_livi.cli import main
from pyro_livi.errors import InputError



@pytest.fixture(scope="module")
def DATA(tmp_path_factory):
    """The 30 fixture cells (RNA + protein, 3 donors) as an .h5mu file."""
    from fixtures.v0_1_cells import v0_1_cells

    path = tmp_path_factory.mktemp("compare") / "cells.h5mu"
    v0_1_cells()[1].write(path)
    return str(path)
OPTIONS = {"scvi": {"n_latent": 3, "n_hidden": 8}, "livi": {"n_dxc": 2, "n_cell_state": 3, "epochs_vae": 1}}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def test_compare_fits_each_model_on_the_same_cells_and_resumes(DATA, tmp_path, monkeypatch):
    table = compare(DATA, ["scvi", "livi", "multislivi"], tmp_path, donor_key=None, epochs=1, batch_size=16,
                    options=OPTIONS, progress=False)
    assert list(table["model"]) == ["scvi", "livi", "multislivi"]
    assert list(table["status"]) == ["ok", "skipped: needs donors (--donor-key)",
                                     "skipped: needs donors (--donor-key)"]
    scvi = table.iloc[0]
    assert 0 <= scvi["ari"] <= 1 and 0 <= scvi["probe_accuracy"] <= 1 and scvi["heldout_nll_rna"] > 0
    for name in ("compare.tsv", "compare.md", "umap_grid.png", "scvi/metrics.json", "scvi/run/model.pt"):
        assert (tmp_path / name).exists(), name
    assert "Leiden clusters" in (tmp_path / "compare.md").read_text()
    saved = json.loads((tmp_path / "scvi" / "metrics.json").read_text())

    import pyro_livi.run as run

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished model was fitted again")

    monkeypatch.setattr(run, "fit", no_fit)
    again = compare(DATA, ["scvi"], tmp_path, epochs=1, batch_size=16, options=OPTIONS, progress=False)
    assert again.iloc[0]["ari"] == saved["ari"]
    # other settings: the model is fitted again, never reported from the old fit
    with pytest.raises(AssertionError, match="fitted again"):
        compare(DATA, ["scvi"], tmp_path, epochs=2, batch_size=16, options=OPTIONS, progress=False)


def test_compare_with_donors_and_labels(DATA, tmp_path):
    code = main(["compare", "--data", DATA, "--models", "livi", "--donor-key", "donor", "--label-key", "donor",
                 "--epochs", "1", "--batch-size", "16", "--options", json.dumps(OPTIONS), "--out", str(tmp_path)])
    assert code == 0
    table = pd.read_csv(tmp_path / "compare.tsv", sep="\t")
    assert table.loc[0, "status"] == "ok" and table.loc[0, "input"] == "rna: counts"
    assert pd.notna(table.loc[0, "isolated_label_silhouette"])


def test_compare_names_bad_input(DATA, tmp_path):
    with pytest.raises(InputError, match="--models"):
        compare(DATA, ["nope"], tmp_path)
    with pytest.raises(InputError, match="--modalities"):
        compare(DATA, ["scvi"], tmp_path, modalities=["atac"])
    with pytest.raises(InputError, match=r"cells.h5mu: field 'obs\['donors'\].*did you mean 'donor'.*--donor-key"):
        compare(DATA, ["scvi"], tmp_path, donor_key="donors")
    with pytest.raises(InputError, match=r"Fix: give --label-key \(label_key= in Python\) one of"):
        compare(DATA, ["scvi"], tmp_path, label_key="celltype")
    assert main(["compare", "--data", DATA, "--models", "scvi", "--options", "{", "--out", str(tmp_path)]) == 2
