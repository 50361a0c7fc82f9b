"""End to end on the main job's simulated population: LIVI recovers the planted structure, and
the association scan of its donor factors recovers the planted trans-eQTLs."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from pyro_livi.cli import main
from pyro_livi.demo import DemoSettings, matched_correlations, run_demo, score_recovery


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


@pytest.mark.parametrize("kind", ["D", "V"])
def test_each_planted_donor_factor_is_matched_by_a_fitted_factor(demo, kind):
    """After one-to-one matching, every planted D (and V) factor has a fitted factor of its
    kind with |r| >= 0.7."""
    out, recovery = demo
    truth = pd.read_csv(out / "simulation" / "truth" / f"{kind}.tsv", sep="\t", index_col=0)
    fitted = pd.read_csv(out / "run" / f"{kind}.tsv", sep="\t", index_col=0)
    assert len(truth) >= 100
    matched = matched_correlations(truth, fitted)
    assert np.allclose(matched, recovery[f"matched_r_{kind}"], atol=1e-3)  # as summary.md reports
    assert np.all(matched >= 0.7), f"matched |r| of the planted {kind} factors: {np.round(matched, 3)}"


def test_planted_trans_eqtls_are_found_with_few_false_discoveries(demo):
    """At FDR 5%: at least 80% of the planted SNPs are found (of D and of V factors each); at
    most 10% of discoveries are not planted; the genomic inflation stays within [0.9, 1.1]."""
    _, recovery = demo
    assert recovery["power"] >= 0.8, recovery
    assert recovery["power_D"] >= 0.8 and recovery["power_V"] >= 0.8, recovery
    assert recovery["false_discovery_proportion"] <= 0.10, recovery
    assert 0.9 <= recovery["lambda_gc"] <= 1.1, recovery


def test_donor_stage_stops_when_stalled(demo):
    """The donor stage ends by early stopping, well before its 300-epoch cap, once its loss has
    stalled and the donor factors have settled (the recovery tests above hold for that fit)."""
    out, _ = demo
    history = pd.read_csv(out / "run" / "history.tsv", sep="\t")
    donor = history[history["stage"] == "donor"]
    assert len(donor) < 0.7 * DemoSettings().epochs
    assert donor["factor_change"].iloc[-1] < 1e-3


@pytest.mark.slow
def test_quick_demo_finds_its_planted_snps(tmp_path):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    recovery = json.loads((tmp_path / "summary.json").read_text())
    assert recovery["n_planted_snps"] == 3 and recovery["power"] == 1.0, recovery
    assert recovery["false_discovery_proportion"] <= 0.10 and 0.9 <= recovery["lambda_gc"] <= 1.1, recovery


def test_score_recovery_counts_found_and_false_pairs():
    results = pd.DataFrame({"factor": ["D_0", "D_1", "V_0", "D_0"], "snp": ["s1", "s1", "s9", "s2"],
                            "significant": [True, True, True, False]})
    effects = pd.DataFrame({"snp": ["s1", "s2"], "kind": ["D", "V"]})
    r = score_recovery(results, effects)
    assert (r["n_planted_found"], r["n_significant_pairs"], r["n_false_pairs"]) == (1, 3, 1)
    assert (r["power_D"], r["power_V"]) == (1.0, 0.0)
    assert r["missed_snps"] == ["s2"] and r["false_discovery_proportion"] == pytest.approx(1 / 3)


def test_matched_correlations_pairs_factors_one_to_one():
    rng = np.random.default_rng(0)
    truth = pd.DataFrame(rng.normal(size=(50, 2)), columns=["t0", "t1"])
    noise = rng.normal(size=50)
    # fitted f2 ~ -t0, f0 ~ t1, f1 unrelated; t0 also correlates a little with f0
    fitted = pd.DataFrame({"f0": truth["t1"] + 0.3 * truth["t0"], "f1": noise, "f2": -truth["t0"]})
    matched = matched_correlations(truth, fitted.iloc[::-1])  # row order follows truth's index
    assert matched[0] == pytest.approx(1.0)
    assert matched[1] == pytest.approx(abs(np.corrcoef(truth["t1"], fitted["f0"])[0, 1]))


def test_cli_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("simulate", "fit", "associate", "demo"):
        assert command in text
