"""End to end on the main job's simulated population: LIVI recovers the planted structure, and
the association scan of its donor factors recovers the planted trans-eQTLs."""

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from pyro_livi.cli import main
from pyro_livi.demo import run_demo, score_recovery


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    recovery = run_demo(out, seed=0, progress=False)
    return out, recovery


def test_demo_writes_every_output(demo):
    out, _ = demo
    for name in ["associations.tsv", "associations_manhattan.png", "associations_qq.png", "umap_cell_state.png",
                 "summary.md", "run/loss_curve.png", "run/D.tsv", "run/V.tsv", "run/A.tsv", "run/cell_state.tsv",
                 "run/model.pt", "simulation/genotypes.bed", "simulation/truth/effects.tsv"]:
        assert (out / name).exists(), name
    summary = (out / "summary.md").read_text()
    assert "planted causal SNPs found" in summary and "genomic inflation" in summary


def test_cell_state_separates_cell_types(demo):
    out, _ = demo
    cells = pd.read_csv(out / "run" / "cell_state.tsv", sep="\t", index_col=0)
    import anndata

    labels = anndata.read_h5ad(out / "simulation" / "expression.h5ad").obs.loc[cells.index, "cell_type"]
    x_tr, x_te, y_tr, y_te = train_test_split(cells.to_numpy(), labels.to_numpy(), test_size=0.3,
                                              random_state=0, stratify=labels.to_numpy())
    accuracy = LogisticRegression(max_iter=2000).fit(x_tr, y_tr).score(x_te, y_te)
    assert accuracy >= 0.9


def test_each_planted_d_factor_is_matched_by_a_fitted_d_factor(demo):
    """After one-to-one matching, every planted D factor has a fitted D factor with |r| >= 0.7."""
    out, _ = demo
    truth = pd.read_csv(out / "simulation" / "truth" / "D.tsv", sep="\t", index_col=0)
    fitted = pd.read_csv(out / "run" / "D.tsv", sep="\t", index_col=0).loc[truth.index]
    assert len(truth) >= 100
    k = truth.shape[1]
    r = np.abs(np.corrcoef(truth.to_numpy().T, fitted.to_numpy().T)[:k, k:])
    rows, cols = linear_sum_assignment(-r)
    assert np.all(r[rows, cols] >= 0.7), f"matched |r| of the planted D factors: {np.round(r[rows, cols], 3)}"


def test_planted_d_trans_eqtls_are_found_with_few_false_discoveries(demo):
    """At FDR 5%: every SNP planted on a D factor is found; at most 10% of discoveries are not
    planted; the genomic inflation stays within [0.9, 1.1]."""
    _, recovery = demo
    assert recovery["power_D"] >= 0.8, recovery
    assert recovery["false_discovery_proportion"] <= 0.10, recovery
    assert 0.9 <= recovery["lambda_gc"] <= 1.1, recovery


def test_score_recovery_counts_found_and_false_pairs():
    results = pd.DataFrame({"factor": ["D_0", "D_1", "V_0", "D_0"], "snp": ["s1", "s1", "s9", "s2"],
                            "significant": [True, True, True, False]})
    effects = pd.DataFrame({"snp": ["s1", "s2"], "kind": ["D", "V"]})
    r = score_recovery(results, effects)
    assert (r["n_planted_found"], r["n_significant_pairs"], r["n_false_pairs"]) == (1, 3, 1)
    assert (r["power_D"], r["power_V"]) == (1.0, 0.0)
    assert r["missed_snps"] == ["s2"] and r["false_discovery_proportion"] == pytest.approx(1 / 3)


def test_cli_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("simulate", "fit", "associate", "demo"):
        assert command in text
