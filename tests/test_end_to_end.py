"""End to end on the main job's simulated population: LIVI recovers the planted structure, and
the association scan of its donor factors recovers the planted trans-eQTLs."""

import numpy as np
import pandas as pd
import pytest
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


def donor_factors(out, kind):
    truth = pd.read_csv(out / "simulation" / "truth" / f"{kind}.tsv", sep="\t", index_col=0)
    fitted = pd.concat([pd.read_csv(out / "run" / f"{k}.tsv", sep="\t", index_col=0) for k in "DV"], axis=1)
    return truth, fitted.loc[truth.index]


def test_planted_donor_factors_lie_in_the_fitted_donor_space(demo):
    """Each planted D and V factor is a linear combination of the fitted donor factors.

    In-sample R^2 of a regression on the 12 fitted factors over 120 donors is about 0.1 by
    chance; the planted factors must reach 0.8.
    """
    out, _ = demo
    for kind in ("D", "V"):
        truth, fitted = donor_factors(out, kind)
        assert len(truth) >= 100
        X = np.column_stack([np.ones(len(fitted)), fitted.to_numpy()])
        for column in truth:
            y = truth[column].to_numpy()
            residual = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
            r2 = 1 - residual.var() / y.var()
            assert r2 >= 0.8, f"planted {column}: R^2 {r2:.3f} on the fitted donor factors"


def test_association_is_calibrated_and_enriched_for_planted_snps(demo):
    """Genomic inflation within [0.9, 1.1]; significant pairs are dominated by planted SNPs
    (whose base rate among all SNPs is 6 / 2000)."""
    _, recovery = demo
    assert 0.9 <= recovery["lambda_gc"] <= 1.1, recovery
    assert recovery["n_planted_found"] >= 1, recovery
    precision = 1 - recovery["false_discovery_proportion"]
    assert precision >= 0.5, recovery


def test_score_recovery_counts_found_and_false_pairs():
    results = pd.DataFrame({"factor": ["D_0", "D_1", "V_0", "D_0"], "snp": ["s1", "s1", "s9", "s2"],
                            "significant": [True, True, True, False]})
    effects = pd.DataFrame({"snp": ["s1", "s2"]})
    r = score_recovery(results, effects)
    assert (r["n_planted_found"], r["n_significant_pairs"], r["n_false_pairs"]) == (1, 3, 1)
    assert r["missed_snps"] == ["s2"] and r["false_discovery_proportion"] == pytest.approx(1 / 3)


def test_cli_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("simulate", "fit", "associate", "demo"):
        assert command in text
