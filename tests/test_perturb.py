"""Perturbation explainability (:mod:`pyro_livi.analysis.perturb`, ``pyro-livi perturb``): the
change frequencies of eq. 5.3 on every model of the zoo, the representative cell of eq. 5.1, the
decision rules, planted recovery (a fitted scVI ranks the genes that share the perturbed gene's
program above the others) and the command end to end."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_livi.analysis.perturb import (DEFAULT_MARGINS, TABLE_COLUMNS, _changes, marker_scores, perturb,
                                        representative_cell)
from pyro_livi.cli import main
from pyro_livi.errors import InputError
from pyro_livi.paths import shared_data_dir
from pyro_livi.run import fit
from test_zoo_contract import TINY, built

N_A, N_B, N_GENES = 8, 8, 40


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def programs(seed: int = 0, n: int = 400):
    """Counts of ``N_GENES`` genes driven by two independent programs: genes g0..g7 follow
    program A (log mean + u_A), g8..g15 program B (+ u_B), the rest neither. NB counts
    (theta 20) at lognormal library sizes. Cell types by u_A: ``A_high`` (> 0.5), ``A_low``
    (< -0.5), ``mid``."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, 2))
    log_mean = np.full((n, N_GENES), np.log(3.0)) + rng.normal(0, 0.3, size=N_GENES)
    log_mean[:, :N_A] += u[:, [0]]
    log_mean[:, N_A:N_A + N_B] += u[:, [1]]
    mu = np.exp(log_mean) * rng.lognormal(0, 0.2, size=(n, 1))
    x = rng.poisson(rng.gamma(20.0, mu / 20.0)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x))
    adata.var_names = [f"g{j}" for j in range(N_GENES)]
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.obs["program_a"] = u[:, 0]
    adata.obs["cell_type"] = np.where(u[:, 0] > 0.5, "A_high", np.where(u[:, 0] < -0.5, "A_low", "mid"))
    return adata


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small scVI fitted on :func:`programs`, its run directory and data file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("perturb")
    adata = programs()
    data = root / "programs.h5ad"
    adata.write_h5ad(data)
    run = root / "run"
    result = fit(str(data), model="scvi", label_keys=["cell_type"], epochs=30, patience=None, batch_size=128,
                 lr=1e-2, n_latent=2, n_hidden=32, progress=False, out=run)
    yield adata, data, run, result
    torch.set_num_threads(threads)


def _activation(adata):
    """The cell lowest on program A, and a g0 count twice the 99th percentile."""
    cell = str(adata.obs_names[np.argmin(adata.obs["program_a"].to_numpy())])
    return cell, 2.0 * float(np.quantile(adata.X.toarray()[:, 0], 0.99))


def test_planted_program_genes_rank_above_the_others(fitted):
    """Activating g0 in a program-A-low cell moves the latent along program A: the 7 other
    program-A genes are the 7 top-ranked outputs, all gained; a random ranking would put
    7 * 7 / 39 ~ 1.3 of them there."""
    adata, _, _, result = fitted
    cell, value = _activation(adata)
    res = perturb(result.model, result.dataset, feature="g0", value=value, cell=cell, n_passes=60, seed=0)
    linked = {f"g{j}" for j in range(1, N_A)}
    top = res.table.head(len(linked))
    precision = top["feature"].isin(linked).mean()
    rng = np.random.default_rng(0)
    features = res.table["feature"].to_numpy()
    shuffled = np.mean([np.isin(rng.permutation(features)[:len(linked)], list(linked)).mean() for _ in range(200)])
    assert precision >= 6 / 7, res.table.head(10)
    assert shuffled < 0.5 and precision > shuffled + 0.4
    assert (top["gained"] > 0).all() and (top["lost"] == 0).all() and top["gained"].mean() > 0.5, top
    assert (top["mean_shift"] > 0).all() and (top["shift_low"] > 0).all()  # paired shift, interval above 0
    others = res.table[~res.table["feature"].isin(linked)]
    assert others["frequency"].max() < top["frequency"].min()
    assert "g0" not in set(res.table["feature"])  # the input is not a response
    assert res.original_value == float(adata[cell].X.toarray()[0, 0]) and res.value == value


def test_frequencies_are_consistent_and_reproducible(fitted):
    adata, _, _, result = fitted
    cell, value = _activation(adata)
    kw = dict(feature="g0", value=value, cell=cell, n_passes=25)
    a = perturb(result.model, result.dataset, seed=3, **kw).table
    b = perturb(result.model, result.dataset, seed=3, **kw).table
    c = perturb(result.model, result.dataset, seed=4, **kw).table
    pd.testing.assert_frame_equal(a, b)
    assert not a.set_index("feature")["perturbed_mean"].equals(c.set_index("feature")["perturbed_mean"])
    assert list(a.columns) == TABLE_COLUMNS and list(a["rank"]) == list(range(1, N_GENES))
    for col in ("frequency", "gained", "lost", "null_frequency"):
        assert a[col].between(0, 1).all(), col
    np.testing.assert_allclose(a["gained"] + a["lost"], a["frequency"])
    np.testing.assert_allclose(a["n_changed"], a["frequency"] * 25)
    assert (np.diff(a["frequency"].to_numpy()) <= 0).all()  # ranked by f_j
    assert ((a["shift_low"] <= a["mean_shift"] + 1e-12) & (a["mean_shift"] <= a["shift_high"] + 1e-12)).all()
    # the passes of an unperturbed cell are its null: setting g0 to its own value changes nothing paired
    same = perturb(result.model, result.dataset, feature="g0", value=float(adata[cell].X.toarray()[0, 0]),
                   cell=cell, n_passes=10, seed=0).table
    np.testing.assert_allclose(same["frequency"], same["null_frequency"])
    assert (same["mean_shift"] == 0).all()


def test_representative_cell_is_the_argmax_of_mean_marker_expression(fitted):
    adata, _, _, result = fitted
    dataset = result.dataset
    x = adata.X.toarray()
    norm = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    markers = ["g1", "g2", "g3"]
    score = norm[:, 1:4].mean(1)
    np.testing.assert_allclose(marker_scores(dataset, markers).to_numpy(), score, rtol=1e-6)
    for cell_type in ("A_high", "A_low"):
        of_type = np.flatnonzero(adata.obs["cell_type"].to_numpy() == cell_type)
        expected = adata.obs_names[of_type[np.argmax(score[of_type])]]
        assert representative_cell(dataset, cell_type, "cell_type", "g1,g2,g3") == expected
    res = perturb(result.model, dataset, feature="g0", value=0.0, cell_type="A_high", label_key="cell_type",
                  markers=markers, n_passes=3)
    assert res.cell == representative_cell(dataset, "A_high", "cell_type", markers)
    assert res.selection["cell_type"] == "A_high" and res.selection["markers"] == markers
    with pytest.raises(InputError, match="no cell of type 'T_cell'"):
        representative_cell(dataset, "T_cell", "cell_type", markers)
    with pytest.raises(InputError, match="markers"):
        representative_cell(dataset, "A_high", "cell_type", ["CD3E"])


def test_decision_rules_and_margins():
    """State changes must cross the whole margin band around the threshold; fold and shift
    changes must exceed the margin."""
    b = np.array([0.30, 0.30, 0.47, 0.70, 0.70, 0.52])
    v = np.array([[0.56, 0.54, 0.90, 0.44, 0.46, 0.10]])
    gained, lost, stat = _changes("state", v, b, threshold=0.5, margin=0.05, pseudocount=0.1, sd=np.ones(6))
    assert gained[0].tolist() == [True, False, False, False, False, False]  # 0.47 and 0.52 lie in the band
    assert lost[0].tolist() == [False, False, False, True, False, False]
    np.testing.assert_allclose(stat, v - b)
    b = np.array([1.0, 1.0, 1.0, 0.0])
    v = np.array([[1.5, 1.3, 0.6, 0.1]])
    gained, lost, stat = _changes("fold", v, b, threshold=0.5, margin=0.5, pseudocount=0.1, sd=np.ones(4))
    np.testing.assert_allclose(stat[0], np.log2((v[0] + 0.1) / (b + 0.1)))
    assert gained[0].tolist() == [True, False, False, True] and lost[0].tolist() == [False, False, True, False]
    gained, lost, stat = _changes("shift", np.array([[2.0, 0.5]]), np.array([1.0, 1.0]), threshold=0.5,
                                  margin=0.25, pseudocount=0.1, sd=np.array([2.0, 4.0]))
    np.testing.assert_allclose(stat[0], [0.5, -0.125])
    assert gained[0].tolist() == [True, False] and not lost.any()


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_of_the_zoo(name):
    """Generic over observation sites: input from the first modality, outputs every other one
    (or the input's own), rules by likelihood."""
    model, dataset = built(name)
    was_training = model.training
    first = dataset.modalities[0]
    count_input = first not in dataset.spec.continuous_modalities
    value = 40.0 if count_input else 3.0
    res = perturb(model, dataset, feature=str(dataset.feature_names[first][1]), value=value,
                  cell=str(dataset.obs_names[5]), n_passes=6, seed=1)
    outs = [m for m in dataset.modalities if m != first] or [first]
    assert set(res.table["modality"]) == set(outs) == set(res.rules)
    assert len(res.table) == sum(dataset.n_features[m] for m in outs) - (outs == [first])
    t = res.table
    assert t["frequency"].between(0, 1).all() and t["null_frequency"].between(0, 1).all()
    np.testing.assert_allclose(t["gained"] + t["lost"], t["frequency"])
    assert np.isfinite(t[["baseline", "perturbed_mean", "mean_shift", "effect"]].to_numpy()).all()
    for m, applied in res.rules.items():
        assert applied["rule"] in ("fold", "shift", "state") and applied["margin"] == DEFAULT_MARGINS[applied["rule"]]
    assert model.training == was_training  # the module's mode is left as found


def test_bad_inputs_raise_input_errors(fitted):
    _, _, _, result = fitted
    ds = result.dataset
    with pytest.raises(InputError, match="no cell 'nope'"):
        perturb(result.model, ds, feature="g0", value=1.0, cell="nope")
    with pytest.raises(InputError, match="no feature 'CD3E'"):
        perturb(result.model, ds, feature="CD3E", value=1.0, cell="c0")
    with pytest.raises(InputError, match="unknown modality 'atac'"):
        perturb(result.model, ds, feature="g0", value=1.0, cell="c0", output_modalities=["atac"])
    with pytest.raises(InputError, match="negative"):
        perturb(result.model, ds, feature="g0", value=-1.0, cell="c0")
    with pytest.raises(InputError, match="no cell given"):
        perturb(result.model, ds, feature="g0", value=1.0)
    with pytest.raises(InputError, match="n_passes"):
        perturb(result.model, ds, feature="g0", value=1.0, cell="c0", n_passes=0)


def test_perturb_command_writes_table_and_figure(fitted, tmp_path, capsys):
    adata, data, run, _ = fitted
    cell, value = _activation(adata)
    out = tmp_path / "out"
    assert main(["perturb", "--run", str(run), "--data", str(data), "--cell", cell, "--gene", "g0",
                 "--value", str(value), "--passes", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"g0 (rna) 0 -> {value:g} in cell {cell}, 30 passes" in printed
    table = pd.read_csv(out / "perturbation.tsv", sep="\t")
    assert list(table.columns) == TABLE_COLUMNS and len(table) == N_GENES - 1
    assert table.head(7)["feature"].isin([f"g{j}" for j in range(1, N_A)]).mean() >= 6 / 7
    summary = json.loads((out / "perturbation.json").read_text())
    assert summary["n_passes"] == 30 and summary["rules"]["rna"]["rule"] == "fold"
    png = (out / "perturbation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    out2 = tmp_path / "by_type"
    assert main(["perturb", "--run", str(run), "--data", str(data), "--cell-type", "A_low", "--label-key",
                 "cell_type", "--markers", "g8,g9", "--gene", "g0", "--value", "0", "--passes", "5",
                 "--out", str(out2)]) == 0
    assert "representative A_low" in capsys.readouterr().out
    assert (out2 / "perturbation.tsv").is_file() and (out2 / "perturbation.png").is_file()


@pytest.mark.parametrize("extra, fragment", [
    (["--cell", "nope", "--gene", "g0"], "field '--cell': no cell 'nope'"),
    (["--cell", "c0", "--gene", "CD3E"], "field '--gene': no feature 'CD3E'"),
    (["--cell", "c0", "--gene", "g0", "--input-modality", "atac"], "field '--input-modality': unknown modality"),
    (["--cell", "c0", "--gene", "g0", "--output-modality", "atac"], "field '--output-modality': unknown modality"),
    (["--gene", "g0"], "field '--cell': no cell given"),
    (["--cell-type", "A_low", "--markers", "g1", "--gene", "g0"], "field '--label-key'"),
    (["--cell-type", "B", "--label-key", "cell_type", "--markers", "g1", "--gene", "g0"],
     "field '--cell-type': no cell of type 'B'"),
])
def test_perturb_command_errors_are_one_line(fitted, tmp_path, capsys, extra, fragment):
    _, data, run, _ = fitted
    code = main(["perturb", "--run", str(run), "--data", str(data), "--value", "3", "--passes", "2",
                 "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: ") and fragment in err, err
    assert "Fix:" in err


MULTIOME = shared_data_dir() / "multiome" / "pbmc_multiome_1000cells.h5mu"


@pytest.mark.skipif(not MULTIOME.exists(), reason=f"real data absent: {MULTIOME} (set PYRO_LIVI_DATA)")
def test_perturb_command_on_real_multiome_with_gpg(tmp_path, capsys):
    """GPG fitted briefly on the 10x PBMC multiome subset (RNA counts, NB; peaks, Bernoulli):
    `pyro-livi perturb` silences NKG7 in the cell expressing it most and scores the 174 peaks."""
    import mudata as md

    mdata = md.read_h5mu(MULTIOME)
    totals = [np.asarray(mdata.mod[m].X.sum(1)).ravel() for m in ("rna", "atac")]
    mdata = mdata[(totals[0] > 0) & (totals[1] > 0)].copy()  # cells without counts cannot be fitted
    data = tmp_path / "multiome.h5mu"
    mdata.write_h5mu(data)
    run = tmp_path / "gpg"
    fit(str(data), model="gpg", modalities={"rna": None, "atac": None}, epochs=3, patience=None,
        batch_size=256, lr=3e-3, n_latent=8, hidden=[32], progress=False, out=run)
    nkg7 = mdata.mod["rna"][:, "NKG7"].X.toarray().ravel()
    cell = str(mdata.obs_names[int(np.argmax(nkg7))])
    out = tmp_path / "out"
    assert main(["perturb", "--run", str(run), "--data", str(data), "--cell", cell, "--gene", "NKG7",
                 "--value", "0", "--passes", "20", "--out", str(out)]) == 0
    assert f"gpg: NKG7 (rna) {nkg7.max():g} -> 0 in cell {cell}, 20 passes" in capsys.readouterr().out
    table = pd.read_csv(out / "perturbation.tsv", sep="\t")
    assert len(table) == mdata.mod["atac"].n_vars and set(table["modality"]) == {"atac"}
    assert set(table["rule"]) == {"state"} and table["baseline"].between(0, 1).all()
    assert (out / "perturbation.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_gpg_ranks_planted_linked_peaks_of_a_perturbed_gene(tmp_path):
    """Simulated multiome (:mod:`pyro_livi.simulate_multiome`): 3 regulator genes, each linked
    to 25-40 of 500 peaks. GPG (NB genes, Bernoulli peaks, the thesis's beta = 0.1) is fitted,
    each regulator is raised to twice its 99th-percentile count in the cell expressing it least,
    and the top 10 peaks by change frequency are compared with the planted links: precision at
    10 >= 0.5 on average, against the ~0.06 of a shuffled ranking; linked peaks in the top 10
    move in the direction of their planted effect."""
    from pyro_livi.simulate_multiome import MultiomeConfig, simulate_multiome

    config = MultiomeConfig(n_cells=2000, n_genes=100, n_peaks=500, n_cell_types=4, n_programs=2, n_regulators=3,
                            links_per_regulator=(25, 40), link_effect=(2.0, 3.0), regulator_sd=1.0,
                            rna_library=3000.0)
    sim = simulate_multiome(config, seed=0)
    result = fit(sim.mdata, model="gpg", modalities={"rna": None, "atac": None}, epochs=40, patience=None,
                 batch_size=128, lr=2e-3, n_latent=16, hidden=[128], kl_warmup_epochs=10, kl_weight=0.1,
                 progress=False)
    x = sim.mdata.mod["rna"].X.toarray().astype(float)
    normalised = np.log1p(x / x.sum(1, keepdims=True) * 1e3)
    rng = np.random.default_rng(0)
    precisions, shuffled, agree = [], [], []
    for gene, links in sim.links.groupby("gene"):
        j = int(links["gene_index"].iloc[0])
        cell = str(result.dataset.obs_names[int(np.argmin(normalised[:, j]))])
        value = 2.0 * float(np.quantile(x[:, j], 0.99))
        res = perturb(result.model, result.dataset, feature=gene, value=value, cell=cell, n_passes=30, seed=0)
        assert res.rules == {"atac": {"rule": "state", "margin": 0.05, "threshold": 0.5}}
        top = res.table.head(10)
        precisions.append(top["feature"].isin(links["peak"]).mean())
        features = res.table["feature"].to_numpy()
        shuffled.append(np.mean([np.isin(rng.permutation(features)[:10], links["peak"]).mean()
                                 for _ in range(200)]))
        effect = links.set_index("peak")["effect"]
        hits = top[top["feature"].isin(effect.index)]
        agree += list(np.sign(hits["mean_shift"].to_numpy()) == np.sign(effect[hits["feature"]].to_numpy()))
    print(f"precision at 10 per regulator {np.round(precisions, 2)}, shuffled ranking {np.round(shuffled, 3)}")
    assert np.mean(precisions) >= 0.5 and min(precisions) > max(shuffled)
    assert np.mean(shuffled) < 0.1
    assert np.mean(agree) >= 0.8, agree
