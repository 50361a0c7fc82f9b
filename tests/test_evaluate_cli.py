"""``pyro-livi evaluate`` end to end on a tiny fitted LIVI."""

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_livi.cli import main
from pyro_livi.run import fit
from pyro_livi.simulate import SimulationConfig, simulate


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    config = SimulationConfig(n_donors=8, cells_per_donor=25, vary_cells_per_donor=False, n_snps=20,
                              n_genes=60, k_c=4, k_dxc=2, k_v=1, n_cell_types=3)
    adata = simulate(config, seed=0).adata
    data = root / "sim.h5ad"
    adata.write_h5ad(data)
    run = root / "run"
    fit(str(data), donor_key="donor", epochs_vae=2, epochs=2, batch_size=64, n_cell_state=4,
        n_dxc=2, n_persistent=1, encoder_hidden=(16,), progress=False, out=run)
    yield root, data, run
    torch.set_num_threads(threads)


def test_evaluate_writes_report_metrics_and_figures(fitted, capsys):
    root, data, run = fitted
    out = root / "eval"
    code = main(["evaluate", "--run", str(run), "--data", str(data), "--label-keys", "cell_type",
                 "--ppc-cells", "80", "--ppc-samples", "5", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "probe cell_type: accuracy" in printed and "probe donor: accuracy" in printed
    for name in ("report.md", "metrics.tsv", "probes.png", "loss_curve.png", "ppc_rna.png",
                 "ppc_statistics_rna.png", "umap_cell_state.png", "umap_pca15.png", "ppc_rna.tsv",
                 "nll_rna.tsv"):
        assert (out / name).is_file(), name
    metrics = pd.read_csv(out / "metrics.tsv", sep="\t")
    probes = metrics[(metrics["section"] == "probe") & (metrics["metric"] == "accuracy")]
    assert set(zip(probes["latent"], probes["label"])) == {
        ("cell_state", "cell_type"), ("cell_state", "donor"), ("pca15", "cell_type"), ("pca15", "donor")}
    assert probes["value"].between(0, 1).all()
    graph = metrics[metrics["section"] == "graph"]
    assert set(graph["metric"]) >= {"ari", "nmi", "silhouette", "graph_connectivity",
                                    "isolated_label_silhouette"}
    nll = metrics[(metrics["section"] == "reconstruction") & (metrics["metric"] == "nll_per_cell")]
    assert len(nll) == 1 and np.isfinite(nll["value"]).all() and (nll["value"] > 0).all()
    ppc = metrics[metrics["section"] == "ppc"]
    assert set(ppc["label"]) == {"mean", "variance", "zero_fraction"}
    report = (out / "report.md").read_text()
    assert "Donor leakage" in report and "pca15" in report and "![umap_cell_state]" in report
    assert "cells evaluated: 200" in report


def test_subsample_and_default_labels(fitted):
    root, data, run = fitted
    out = root / "eval_small"
    code = main(["evaluate", "--run", str(run), "--data", str(data), "--n-cells", "120",
                 "--ppc-cells", "50", "--ppc-samples", "3", "--no-umap", "--out", str(out)])
    assert code == 0
    report = (out / "report.md").read_text()
    assert "cells evaluated: 120" in report
    metrics = pd.read_csv(out / "metrics.tsv", sep="\t")
    assert set(metrics.loc[metrics["section"] == "probe", "label"]) == {"donor"}
    assert not (out / "umap_cell_state.png").exists()


def test_bad_inputs_exit_with_a_message(fitted, tmp_path, capsys):
    root, data, run = fitted
    code = main(["evaluate", "--run", str(run), "--data", str(data), "--label-keys", "no_such_column",
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "no_such_column" in capsys.readouterr().err
    code = main(["evaluate", "--run", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "y")])
    assert code == 2
    assert "model.pt" in capsys.readouterr().err
    other = simulate(SimulationConfig(n_donors=8, cells_per_donor=5, vary_cells_per_donor=False,
                                      n_snps=20, n_genes=30, k_c=4, k_dxc=2, k_v=1, n_cell_types=3),
                     seed=1).adata
    other.write_h5ad(tmp_path / "other.h5ad")
    code = main(["evaluate", "--run", str(run), "--data", str(tmp_path / "other.h5ad"),
                 "--out", str(tmp_path / "z")])
    assert code == 2
    assert "features" in capsys.readouterr().err


def test_evaluate_a_donor_free_run_scores_reconstruction_on_its_validation_cells(fitted, tmp_path):
    """A scVI run (no donor key) holds out 10% of the cells; evaluate reports the reconstruction
    of exactly those cells, and without labels or donors stands in Leiden clusters."""
    _, data, _ = fitted
    run = tmp_path / "run"
    assert main(["fit", "--model", "scvi", "--data", str(data), "--epochs", "2", "--batch-size", "64",
                 "--n-latent", "3", "--n-hidden", "16", "--out", str(run)]) == 0
    split = pd.read_csv(run / "split.tsv", sep="\t", index_col=0)["set"]
    assert (split == "validation").sum() == 20  # 10% of 200 cells
    assert "validation_loss" in pd.read_csv(run / "history.tsv", sep="\t").columns
    out = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--no-umap", "--ppc-cells", "40",
                 "--ppc-samples", "3", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "20 validation cells the model did not train on" in report and "leiden_pca15" in report
    metrics = pd.read_csv(out / "metrics.tsv", sep="\t")
    n_cells = metrics[(metrics.section == "reconstruction") & (metrics.metric == "n_cells")]["value"]
    assert list(n_cells) == [20]


def test_evaluate_on_other_data_says_so(fitted, tmp_path, capsys):
    """Data other than the fitted data (another draw, same genes and donors): evaluate warns and
    the report says so, instead of calling every cell a training cell."""
    root, data, run = fitted
    config = SimulationConfig(n_donors=8, cells_per_donor=20, vary_cells_per_donor=False, n_snps=20,
                              n_genes=60, k_c=4, k_dxc=2, k_v=1, n_cell_types=3)
    simulate(config, seed=3).adata.write_h5ad(tmp_path / "other.h5ad")
    out = tmp_path / "eval_other"
    assert main(["evaluate", "--run", str(run), "--data", str(tmp_path / "other.h5ad"), "--no-umap",
                 "--ppc-cells", "40", "--ppc-samples", "3", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--data differs from the data the run was fitted on (160 cells" in err and "200 cells" in err
    report = (out / "report.md").read_text()
    assert "training cells included" not in report
    assert "which of them the model trained on is unknown" in report and "differs from the data" in report
    same = root / "eval_same"
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--no-umap", "--ppc-cells", "40",
                 "--ppc-samples", "3", "--out", str(same)]) == 0
    assert "differs" not in capsys.readouterr().err
    assert "training cells included" in (same / "report.md").read_text()
