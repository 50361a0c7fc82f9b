"""Tests of the generative simulator with planted genetics (pyro_livi.simulate)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyro_livi.errors import InputError
from pyro_livi.simulate import SimulatedData, SimulationConfig, simulate, write_simulation

SMALL = SimulationConfig(n_donors=30, cells_per_donor=8, n_genes=60, n_snps=100)


@pytest.fixture(scope="module")
def small() -> SimulatedData:
    return simulate(SMALL, seed=3)


@pytest.fixture(scope="module")
def written(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    return out, write_simulation(small, out)


# ---------------------------------------------------------------------------- reproducibility


def test_same_seed_same_data_different_seed_different(small):
    again = simulate(SMALL, seed=3)
    other = simulate(SMALL, seed=4)
    assert (small.adata.X != again.adata.X).nnz == 0
    np.testing.assert_array_equal(small.genotypes, again.genotypes)
    for key in ("D", "V", "W_C", "W_DxC", "W_V", "c", "theta", "library"):
        np.testing.assert_array_equal(small.truth[key], again.truth[key])
    pd.testing.assert_frame_equal(small.truth["effects"], again.truth["effects"])
    assert not np.array_equal(small.genotypes, other.genotypes)
    assert not np.allclose(small.truth["D"], other.truth["D"])
    assert small.adata.shape[1] == other.adata.shape[1]
    assert small.adata.n_obs != other.adata.n_obs or (small.adata.X != other.adata.X).nnz > 0


def test_proteins_do_not_change_rna_or_genetics(small):
    with_prot = simulate(dataclasses.replace(SMALL, n_proteins=5), seed=3)
    assert (with_prot.adata.X != small.adata.X).nnz == 0
    np.testing.assert_array_equal(with_prot.truth["D"], small.truth["D"])


# ---------------------------------------------------------------------------- shapes and truth


def test_shapes_names_and_obs(small):
    cfg = SMALL
    a = small.adata
    n_cells = a.n_obs
    assert a.n_vars == cfg.n_genes
    assert list(a.var_names[:2]) == ["gene_0000", "gene_0001"]
    assert small.donors[0] == "donor_000" and len(small.donors) == cfg.n_donors
    assert small.genotypes.shape == (cfg.n_donors, cfg.n_snps)
    assert set(np.unique(small.genotypes)) <= {0, 1, 2}
    assert list(small.snps.columns) == ["snp", "chrom", "pos", "a1", "a2", "maf"]
    assert small.snps["chrom"].between(1, 22).all()
    assert small.snps["maf"].between(cfg.maf_min, cfg.maf_max).all()
    t = small.truth
    assert t["A"].shape == (cfg.k_c, cfg.k_dxc)
    assert t["D"].shape == (cfg.n_donors, cfg.k_dxc) and t["V"].shape == (cfg.n_donors, cfg.k_v)
    assert t["W_C"].shape == (cfg.k_c, cfg.n_genes)
    assert t["W_DxC"].shape == (cfg.k_dxc, cfg.n_genes)
    assert t["W_V"].shape == (cfg.k_v, cfg.n_genes)
    assert t["c"].shape == (n_cells, cfg.k_c) and t["theta"].shape == (cfg.n_genes,)
    # donors and cell types as strings, every donor has cells, Poisson-varying counts
    assert set(a.obs["donor"].astype(str)) == set(small.donors)
    assert set(a.obs["cell_type"].astype(str)) <= {f"type_{t}" for t in range(cfg.n_cell_types)}
    per_donor = a.obs["donor"].value_counts()
    assert per_donor.min() >= 1 and per_donor.nunique() > 1
    np.testing.assert_allclose(a.obs["true_library"].to_numpy(), t["library"])
    # donor factors standardised
    np.testing.assert_allclose(t["D"].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(t["D"].std(0), 1, atol=1e-12)


def test_A_is_one_hot_and_factors_spread_over_types(small):
    A = small.truth["A"]
    assert set(np.unique(A)) <= {0.0, 1.0}
    np.testing.assert_array_equal(A.sum(axis=0), np.ones(A.shape[1]))
    rows = np.argmax(A, axis=0)
    assert len(set(rows)) == min(SMALL.k_dxc, SMALL.n_cell_types)
    assert rows.max() < SMALL.n_cell_types


def test_cell_type_dominates_softmax(small):
    c = small.truth["c"]
    e = np.exp(c - c.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    types = small.adata.obs["cell_type"].astype(str).str.replace("type_", "").astype(int)
    assert np.mean(np.argmax(probs, axis=1) == types.to_numpy()) > 0.9


def test_loadings_sparse_with_requested_fraction(small):
    t, G = small.truth, SMALL.n_genes
    for key, frac in (("W_C", SMALL.frac_genes_c), ("W_DxC", SMALL.frac_genes_dxc),
                      ("W_V", SMALL.frac_genes_v)):
        np.testing.assert_array_equal((t[key] != 0).sum(axis=1), round(frac * G))


def test_counts_are_sparse_integer_csr(small):
    a = small.adata
    assert sp.issparse(a.X) and a.X.format == "csr"
    assert np.issubdtype(a.X.dtype, np.integer)
    assert (a.layers["counts"] != a.X).nnz == 0
    assert a.X.min() >= 0


def test_interaction_is_expressed_in_counts():
    """A D factor acts through its cell type: its effect there is many times that elsewhere.

    softmax(c) of a type-1 cell still gives dimension 0 a weight of about e^0 / (e^0 + e^3),
    so the factor leaks weakly into type 1; the slope ratio checks the size, not only the sign.
    """
    cfg = SimulationConfig(n_donors=60, cells_per_donor=30, vary_cells_per_donor=False,
                           n_genes=40, n_snps=50, k_dxc=1, k_v=0, n_cell_types=2, k_c=2,
                           loading_scale_dxc=3.0, frac_genes_dxc=0.25, loading_scale_c=0.0,
                           centroid_jitter=0.0, sigma_c=0.1)
    sim = simulate(cfg, seed=11)
    genes = np.flatnonzero(sim.truth["W_DxC"][0] != 0)
    w = sim.truth["W_DxC"][0, genes]
    X = sim.adata.X.toarray().astype(float)
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    obs = sim.adata.obs
    d = sim.truth["D"][:, 0]
    corr, slope = {}, {}
    for t in ("type_0", "type_1"):
        on = (obs["cell_type"] == t).to_numpy()
        donor_mean = pd.DataFrame(X[on][:, genes]).groupby(
            obs["donor"].astype(str).to_numpy()[on]).mean()
        score = donor_mean.to_numpy() @ np.sign(w)
        d_t = d[[sim.donors.index(y) for y in donor_mean.index]]
        corr[t] = np.corrcoef(score, d_t)[0, 1]
        slope[t] = np.polyfit(d_t, score, 1)[0]
    assert corr["type_0"] > 0.8          # A maps factor 0 to cell type 0
    assert slope["type_0"] > 0
    assert abs(slope["type_1"]) < 0.2 * slope["type_0"]


# ---------------------------------------------------------------------------- planted genetics


def test_planted_correlation_matches_h2():
    cfg = SimulationConfig(n_donors=400, cells_per_donor=1, vary_cells_per_donor=False,
                           n_genes=20, n_snps=300, h2_d=0.3, h2_v=0.1, k_dxc=4, k_v=2)
    sim = simulate(cfg, seed=5)
    eff = sim.truth["effects"]
    assert len(eff) == 6 and eff["snp"].is_unique
    assert (eff["kind"] == "D").sum() == 4 and (eff["kind"] == "V").sum() == 2
    n = cfg.n_donors
    g = sim.genotypes.astype(float)
    for _, row in eff.iterrows():
        kind, j = row["factor"].split("_")
        f = sim.truth[kind][:, int(j)]
        h2 = cfg.h2_d if kind == "D" else cfg.h2_v
        r = np.corrcoef(f, g[:, row["snp_index"]])[0, 1]
        se = (1 - h2) / np.sqrt(n)
        assert abs(r - np.sqrt(h2)) < 4 * se, (row["factor"], r)
        # beta is the per-dosage slope; beta_std the per-sd one
        slope = np.polyfit(g[:, row["snp_index"]], f, 1)[0]
        assert abs(slope - row["beta"]) < 4 * se / g[:, row["snp_index"]].std()
        assert row["beta_std"] == pytest.approx(row["beta"] * g[:, row["snp_index"]].std())
        assert row["maf"] == pytest.approx(sim.snps["maf"].iloc[row["snp_index"]])
    # other SNPs are null for D_0: their correlations look like N(0, 1/n)
    causal = set(eff["snp_index"])
    others = [k for k in range(cfg.n_snps) if k not in causal]
    r0 = np.array([np.corrcoef(sim.truth["D"][:, 0], g[:, k])[0, 1] for k in others])
    assert np.abs(r0).max() < 5 / np.sqrt(n)
    assert 0.7 < np.sqrt(n) * r0.std() < 1.3


def test_several_causal_snps_per_factor_and_h2_zero():
    cfg = SimulationConfig(n_donors=50, cells_per_donor=1, n_genes=10, n_snps=40,
                           n_causal_per_factor=3, h2_v=0.0)
    sim = simulate(cfg, seed=2)
    eff = sim.truth["effects"]
    assert set(eff["kind"]) == {"D"}
    assert len(eff) == 3 * cfg.k_dxc and eff["snp"].is_unique
    assert eff.groupby("factor").size().eq(3).all()
    np.testing.assert_allclose(eff["h2"], cfg.h2_d / 3)


def test_counts_follow_negative_binomial_closed_form():
    """One donor, one cell type, no cell-state noise: every cell has the same mean mu_g."""
    cfg = SimulationConfig(n_donors=1, cells_per_donor=4000, vary_cells_per_donor=False,
                           n_genes=50, n_snps=0, k_dxc=0, k_v=0, n_cell_types=1, k_c=2,
                           sigma_c=0.0, sigma_c_continuous=0.0, library_sigma=0.0,
                           median_library=2000.0, theta_median=3.0)
    sim = simulate(cfg, seed=7)
    t = sim.truth
    logits = t["b"] + (np.exp(t["c"][0]) / np.exp(t["c"][0]).sum()) @ t["W_C"]
    mu = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum() * 2000.0
    var = mu + mu**2 / t["theta"]
    x = sim.adata.X.toarray().astype(float)
    n = x.shape[0]
    m, s2 = x.mean(0), x.var(0, ddof=1)
    assert np.all(np.abs(m - mu) / np.sqrt(var / n) < 5)
    mu4 = ((x - m) ** 4).mean(0)
    z_var = (s2 - var) / np.sqrt((mu4 - s2**2) / n)
    assert np.all(np.abs(z_var) < 5)
    # the same data is far from Poisson: overdispersion is there
    assert np.mean((s2 - mu) / np.sqrt((mu4 - s2**2) / n) > 5) > 0.5


# ---------------------------------------------------------------------------- given genotypes


def test_given_real_genotypes_used_as_is():
    rng = np.random.default_rng(0)
    g = rng.binomial(2, 0.3, size=(25, 60)).astype(float)
    g[0, 5] = np.nan
    ids = [f"HG{i:03d}" for i in range(25)]
    snps = pd.DataFrame({"snp": [f"rs{i}" for i in range(60)], "chrom": 3,
                         "pos": np.arange(60) * 100 + 1})
    sim = simulate(SimulationConfig(n_donors=999, n_snps=999, cells_per_donor=3, n_genes=20),
                   seed=1, genotypes=g, donors=ids, snps=snps)
    np.testing.assert_array_equal(sim.genotypes, g)
    assert sim.donors == ids and sim.truth["D"].shape == (25, 4)
    assert set(sim.adata.obs["donor"].astype(str)) == set(ids)
    assert sim.snps["snp"].tolist() == snps["snp"].tolist()
    assert (sim.snps["chrom"] == 3).all() and set(sim.snps["a1"]) == {"A"}
    assert set(sim.truth["effects"]["snp"]) <= set(snps["snp"])
    assert np.isfinite(sim.truth["D"]).all()


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="donors"):
        simulate(SMALL, genotypes=np.zeros((4, 10)), donors=["a", "b"])
    with pytest.raises(InputError, match="genotypes"):
        simulate(SMALL, genotypes=np.full((4, 10), 3.0))
    with pytest.raises(InputError, match="n_cell_types"):
        simulate(dataclasses.replace(SMALL, n_cell_types=9, k_c=8))
    with pytest.raises(InputError, match="n_snps"):
        simulate(dataclasses.replace(SMALL, n_snps=3))
    with pytest.raises(InputError, match="h2_d"):
        simulate(dataclasses.replace(SMALL, h2_d=1.5))
    with pytest.raises(InputError, match="bogus"):
        SimulationConfig.from_dict({"bogus": 1})


# ---------------------------------------------------------------------------- writing


def test_truth_files_written_and_documented(small, written):
    out, paths = written
    truth = out / "truth"
    for name in ("effects", "D", "V", "A", "W_C", "W_DxC", "W_V", "config", "readme"):
        assert paths[name].is_file() and paths[name].parent == truth
    D = pd.read_csv(truth / "D.tsv", sep="\t", index_col=0)
    assert D.index.tolist() == small.donors
    assert D.columns.tolist() == [f"D_{j}" for j in range(SMALL.k_dxc)]
    np.testing.assert_allclose(D.to_numpy(), small.truth["D"])
    V = pd.read_csv(truth / "V.tsv", sep="\t", index_col=0)
    assert V.columns.tolist() == ["V_0", "V_1"] and V.index.tolist() == small.donors
    A = pd.read_csv(truth / "A.tsv", sep="\t", index_col=0)
    np.testing.assert_array_equal(A.to_numpy(), small.truth["A"])
    W = pd.read_csv(truth / "W_DxC.tsv", sep="\t", index_col=0)
    assert W.shape == (SMALL.k_dxc, SMALL.n_genes)
    eff = pd.read_csv(truth / "effects.tsv", sep="\t")
    assert {"factor", "snp", "beta", "beta_std", "maf", "kind"} <= set(eff.columns)
    assert eff["snp"].tolist() == small.truth["effects"]["snp"].tolist()
    cfg = json.loads((truth / "config.json").read_text())
    assert cfg["seed"] == 3
    assert SimulationConfig.from_dict(cfg) == SMALL
    readme = (truth / "README.md").read_text()
    for f in ("effects.tsv", "D.tsv", "V.tsv", "A.tsv", "W_C.tsv", "W_DxC.tsv", "W_V.tsv",
              "config.json", "softmax(c_i) @ A", "count_A1"):
        assert f in readme


def test_h5ad_round_trip(small, written):
    import anndata as ad

    out, paths = written
    back = ad.read_h5ad(paths["expression"])
    assert paths["expression"].name == "expression.h5ad"
    assert (back.X != small.adata.X).nnz == 0 and sp.issparse(back.X)
    assert back.obs["donor"].astype(str).tolist() == small.adata.obs["donor"].astype(str).tolist()


def test_bed_round_trip(small, written):
    from bed_reader import open_bed

    out, paths = written
    with open_bed(paths["bed"], num_threads=1) as bed:
        back = bed.read(dtype="int8")
        assert list(bed.iid) == small.donors
        assert list(bed.sid) == small.snps["snp"].tolist()
        assert list(bed.allele_1) == small.snps["a1"].tolist()
        assert bed.chromosome.astype(int).tolist() == small.snps["chrom"].tolist()
        assert bed.bp_position.tolist() == small.snps["pos"].tolist()
    np.testing.assert_array_equal(back, small.genotypes)


def test_protein_modality_written_as_mudata(tmp_path):
    import mudata as md

    sim = simulate(dataclasses.replace(SMALL, n_proteins=6), seed=1)
    assert sim.mdata is not None and set(sim.mdata.mod) == {"rna", "prot"}
    prot = sim.mdata["prot"]
    assert prot.var_names.tolist()[:2] == ["prot_00", "prot_01"]
    assert prot.obs_names.tolist() == sim.adata.obs_names.tolist()
    assert sp.issparse(prot.X) and np.issubdtype(prot.X.dtype, np.integer)
    assert np.median(prot.obs["true_library"]) == pytest.approx(2000, rel=0.2)
    assert sim.truth["W_C_prot"].shape == (SMALL.k_c, 6)
    paths = write_simulation(sim, tmp_path)
    assert paths["expression"].name == "expression.h5mu"
    with md.set_options(pull_on_update=False):
        back = md.read_h5mu(paths["expression"])
    assert (back["prot"].X != prot.X).nnz == 0
    assert back.obs["donor"].astype(str).tolist() == sim.adata.obs["donor"].astype(str).tolist()
    assert (tmp_path / "truth" / "W_C_prot.tsv").is_file()
    # every file written is one the simulator knows as its own (what --overwrite removes)
    from pyro_livi.simulate import simulation_outputs

    assert {p for p in tmp_path.rglob("*") if p.is_file()} == set(simulation_outputs(tmp_path))


# ---------------------------------------------------------------------------- CLI


def test_cli_writes_files(tmp_path, capsys):
    from pyro_livi.cli import main

    out = tmp_path / "cli"
    rc = main(["simulate", "--out", str(out), "--seed", "4", "--n-donors", "12",
               "--cells-per-donor", "5", "--n-genes", "30", "--n-snps", "40", "--h2-d", "0.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "12 donors" in text and "planted 4 D-SNP" in text
    for f in ("expression.h5ad", "genotypes.bed", "genotypes.bim", "genotypes.fam",
              "truth/effects.tsv", "truth/README.md", "truth/config.json"):
        assert (out / f).is_file()
    cfg = json.loads((out / "truth" / "config.json").read_text())
    assert cfg["config"]["h2_d"] == 0.5 and cfg["n_donors"] == 12
    # the written config.json reproduces the same data
    out2 = tmp_path / "again"
    assert main(["simulate", "--out", str(out2), "--seed", "4", "--config",
                 str(out / "truth" / "config.json")]) == 0
    assert (out / "truth" / "D.tsv").read_text() == (out2 / "truth" / "D.tsv").read_text()


def test_cli_reports_bad_config(tmp_path, capsys):
    from pyro_livi.cli import main

    rc = main(["simulate", "--out", str(tmp_path), "--config", str(tmp_path / "none.json")])
    assert rc == 2 and "--config" in capsys.readouterr().err
    for mode in ("population", "multiome"):
        assert main(["simulate", "--mode", mode, "--seed", "-1", "--out", str(tmp_path / "s")]) == 2
        assert "--seed must be an integer from 0" in capsys.readouterr().err
    rc = main(["simulate", "--mode", "multiome", "--n-peaks", "200", "--out", str(tmp_path / "m")])
    assert rc == 2 and "--n-regulators" in capsys.readouterr().err and not (tmp_path / "m").exists()


POPULATION_ARGS = ["--seed", "1", "--n-donors", "6", "--cells-per-donor", "5", "--n-genes", "20", "--n-snps", "30"]
#: mode -> (arguments, a file it writes, files of an earlier simulation with other options)
MODES = {
    "population": (POPULATION_ARGS, "expression.h5ad", ["expression.h5mu", "truth/W_C_prot.tsv"]),
    "stream": (["--stream", *POPULATION_ARGS], "expression.h5ad", ["expression.h5mu", "truth/links.tsv"]),
    "multiome": (["--mode", "multiome", "--n-cells", "60", "--n-genes", "40", "--n-peaks", "200",
                  "--n-cell-types", "2", "--n-regulators", "2"], "multiome.h5mu",
                 ["expression.h5ad", "genotypes.bed", "truth/cell_state.tsv"]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_cli_refuses_a_simulation_folder_and_overwrite_removes_only_its_files(tmp_path, capsys, mode):
    from pyro_livi.cli import main
    from pyro_livi.simulate import simulation_outputs

    args, written, stale = MODES[mode]
    out = tmp_path / "sim"
    (out / "truth").mkdir(parents=True)
    for name in stale:
        (out / name).write_text("an earlier simulation\n")
    mine = {out / "notes.txt": "mine\n", out / "truth" / "notes.md": "mine too\n"}
    for path, text in mine.items():
        path.write_text(text)
    assert main(["simulate", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and "--overwrite" in err and "another --out" in err
    assert all(name in err for name in stale)
    assert not (out / written).exists() and all((out / name).is_file() for name in stale)  # nothing touched

    assert main(["simulate", "--out", str(out), "--overwrite", *args]) == 0
    assert (out / written).is_file() and (out / "truth" / "config.json").is_file()
    assert not any((out / name).exists() for name in stale)
    assert all(path.read_text() == text for path, text in mine.items())
    # what it wrote is what it knows as its own (and would remove), and a second run is refused
    assert {p for p in out.rglob("*") if p.is_file()} - set(mine) == set(simulation_outputs(out))
    assert main(["simulate", "--out", str(out), *args]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_prepare_simulation_dir(tmp_path):
    from pyro_livi.simulate import prepare_simulation_dir

    assert prepare_simulation_dir(tmp_path / "new") == tmp_path / "new" and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        prepare_simulation_dir(tmp_path / "file")
    (tmp_path / "sim" / "truth").mkdir(parents=True)
    (tmp_path / "sim" / "truth" / "D.tsv").write_text("x")
    with pytest.raises(InputError, match="truth/D.tsv.*overwrite=True"):
        prepare_simulation_dir(tmp_path / "sim")
    prepare_simulation_dir(tmp_path / "sim", overwrite=True)
    assert (tmp_path / "sim").is_dir() and not (tmp_path / "sim" / "truth").exists()  # emptied truth/ removed


def test_demo_config_size():
    cfg = SimulationConfig.demo()
    assert (cfg.n_donors, cfg.n_genes, cfg.n_snps, cfg.k_dxc, cfg.k_v) == (120, 500, 2000, 4, 2)
    assert cfg.cells_per_donor == 40
