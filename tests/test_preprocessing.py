"""pyro_livi.preprocessing and ``pyro-livi preprocess``: values against hand computations, the
input left unchanged, raw counts kept, steps recorded; the CITE-seq acceptance run."""

import dataclasses

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyro_livi import preprocessing as pp
from pyro_livi.cli import main
from pyro_livi.errors import InputError
from pyro_livi.paths import shared_data_dir

CITESEQ = shared_data_dir() / "citeseq" / "pbmc10k_cite.h5mu"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def make_mdata(n_cells=60, seed=0):
    rng = np.random.default_rng(seed)
    cells = [f"cell{i}" for i in range(n_cells)]
    rna = ad.AnnData(sp.csr_matrix(rng.negative_binomial(2, 0.3, (n_cells, 50)).astype(np.float32)),
                     obs=pd.DataFrame({"site": np.repeat(["s1", "s2"], n_cells // 2)}, index=cells),
                     var=pd.DataFrame(index=[f"g{j}" for j in range(50)]))
    prot = ad.AnnData(rng.poisson(rng.uniform(1, 40, 6), (n_cells, 6)).astype(np.float32),
                      obs=pd.DataFrame(index=cells),
                      var=pd.DataFrame(index=[f"p{j}" for j in range(6)]))
    peaks = rng.poisson(rng.uniform(0.0, 0.4, 80), (n_cells, 80)).astype(np.float32)
    peaks[:, :5] = 0
    peaks[0, :3] = 1  # open in 1 of 60 cells (< 3%)
    atac = ad.AnnData(sp.csr_matrix(peaks), obs=pd.DataFrame(index=cells),
                      var=pd.DataFrame(index=[f"k{j}" for j in range(80)]))
    return md.MuData({"rna": rna, "prot": prot, "atac": atac})


def snapshot(adata):
    return {"X": dense(adata.X).copy(), "layers": {k: dense(v).copy() for k, v in adata.layers.items()},
            "obs": adata.obs.copy(), "var": adata.var.copy(), "uns": sorted(adata.uns)}


def assert_unchanged(adata, before):
    now = snapshot(adata)
    np.testing.assert_array_equal(now["X"], before["X"])
    assert now["layers"].keys() == before["layers"].keys()
    pd.testing.assert_frame_equal(now["obs"], before["obs"])
    pd.testing.assert_frame_equal(now["var"], before["var"])
    assert now["uns"] == before["uns"]


def hand_clr(c, axis=1):
    return np.log1p(c / np.exp(np.log1p(c).mean(axis=axis, keepdims=True)))


def hand_tfidf(c):
    tf = 1e4 * c / c.sum(1, keepdims=True)
    return np.log1p(tf) * np.log1p(c.shape[0] / c.sum(0))


def test_single_steps_match_hand_computations_and_leave_the_input_unchanged():
    mdata = make_mdata()
    rna, prot, atac = (mdata.mod[m] for m in ("rna", "prot", "atac"))
    before = {m: snapshot(a) for m, a in mdata.mod.items()}
    c = dense(rna.X).astype(np.float64)

    kept = pp.keep_counts(rna)
    np.testing.assert_array_equal(dense(kept.layers["counts"]), c)
    lognorm = pp.log1p(pp.normalize_total(kept))
    np.testing.assert_allclose(dense(lognorm.X), np.log1p(1e4 * c / c.sum(1, keepdims=True)),
                               rtol=1e-5)
    np.testing.assert_array_equal(dense(lognorm.layers["counts"]), c)

    p = dense(prot.X).astype(np.float64)
    per_cell = pp.clr(pp.keep_counts(prot))
    np.testing.assert_allclose(per_cell.X, hand_clr(p, axis=1), rtol=1e-5)
    assert not np.allclose(per_cell.X, hand_clr(p, axis=0), rtol=1e-3)
    np.testing.assert_allclose(pp.clr(pp.keep_counts(prot), axis=0).X, hand_clr(p, axis=0), rtol=1e-5)
    sparse_in = pp.clr(pp.keep_counts(ad.AnnData(sp.csr_matrix(prot.X))))
    np.testing.assert_allclose(sparse_in.X, hand_clr(p, axis=1), rtol=1e-5)

    a = dense(atac.X).astype(np.float64)
    filtered = pp.filter_peaks(pp.keep_counts(atac), 0.03)
    open_frac = (a > 0).mean(0)
    np.testing.assert_array_equal(filtered.var_names, atac.var_names[open_frac >= 0.03])
    assert {"k0", "k1", "k2"}.isdisjoint(filtered.var_names)  # open in 1/60 cells only
    kept_a = a[:, open_frac >= 0.03]
    tfidf = pp.tfidf(filtered)
    np.testing.assert_allclose(dense(tfidf.X), hand_tfidf(kept_a), rtol=1e-5)
    np.testing.assert_array_equal(dense(pp.binarize(filtered).X), (kept_a > 0).astype(float))
    np.testing.assert_array_equal(dense(tfidf.layers["counts"]), kept_a)

    for name, adata in mdata.mod.items():
        assert_unchanged(adata, before[name])
        assert pp.RECORD_KEY not in adata.uns
    assert [s["step"] for s in pp.preprocessing_steps(tfidf)] == ["keep_counts", "filter_peaks",
                                                                   "tfidf"]
    assert pp.preprocessing_steps(tfidf)[1]["params"]["min_cells"] == 2


def test_highly_variable_genes_count_batch_and_counts_layer():
    rna = pp.keep_counts(make_mdata().mod["rna"])
    hvg = pp.highly_variable_genes(rna, 20, batch_key="site")
    assert hvg.n_vars == 20 and hvg.var["highly_variable"].all()
    assert "highly_variable_nbatches" in hvg.var  # ranked per batch
    np.testing.assert_array_equal(dense(hvg.layers["counts"]), dense(rna[:, hvg.var_names].X))
    step = pp.preprocessing_steps(hvg)[-1]
    assert step["step"] == "highly_variable_genes"
    assert step["params"]["batch_key"] == "site" and step["params"]["n_selected"] == 20
    marked = pp.highly_variable_genes(rna, 20, subset=False)
    assert marked.n_vars == 50 and marked.var["highly_variable"].sum() == 20


def test_preprocess_mudata_records_steps_keeps_counts_and_leaves_input_unchanged(tmp_path):
    mdata = make_mdata()
    before = {m: snapshot(a) for m, a in mdata.mod.items()}
    out = pp.preprocess(mdata, rna="lognorm_hvg", prot="clr", atac="binary", n_top_genes=20,
                        batch_key="site", subsample_n=40, seed=3)
    for name, adata in mdata.mod.items():
        assert_unchanged(adata, before[name])
    assert mdata.n_obs == 60 and pp.RECORD_KEY not in mdata.uns

    assert out.n_obs == 40 and out.mod["rna"].n_vars == 20
    for name, adata in out.mod.items():
        src = mdata.mod[name][out.obs_names, adata.var_names]
        np.testing.assert_array_equal(dense(adata.layers["counts"]), dense(src.X))
    np.testing.assert_allclose(out.mod["prot"].X, hand_clr(dense(mdata.mod["prot"][out.obs_names].X)),
                               rtol=1e-5)
    steps = pp.preprocessing_steps(out)
    assert [(s["step"], s["modality"]) for s in steps] == [
        ("subsample", "*"), ("keep_counts", "rna"), ("normalize_total", "rna"), ("log1p", "rna"),
        ("highly_variable_genes", "rna"), ("keep_counts", "prot"), ("clr", "prot"),
        ("keep_counts", "atac"), ("filter_peaks", "atac"), ("binarize", "atac")]
    assert steps[0]["params"] == {"n": 40, "seed": 3, "n_before": 60}
    assert steps[2]["params"]["target_sum"] == 1e4
    prot_steps = pp.preprocessing_steps(out.mod["prot"])
    assert [s["step"] for s in prot_steps] == ["subsample", "keep_counts", "clr"]

    atac = pp.preprocess(mdata, atac="tfidf").mod["atac"]
    np.testing.assert_allclose(dense(atac.X), hand_tfidf(dense(atac.layers["counts"]).astype(float)),
                               rtol=1e-5)

    path = tmp_path / "out.h5mu"
    out.write(path)
    back = md.read_h5mu(path)
    assert [s["step"] for s in pp.preprocessing_steps(back)] == [s["step"] for s in steps]
    assert pp.preprocessing_steps(back.mod["rna"])[-1]["params"]["n_top_genes"] == 20


def test_subsample_is_seeded_and_keeps_order():
    mdata = make_mdata()
    a = pp.subsample(mdata, 25, seed=1)
    assert a.n_obs == 25 and list(a.obs_names) == sorted(a.obs_names, key=lambda s: int(s[4:]))
    assert list(pp.subsample(mdata, 25, seed=1).obs_names) == list(a.obs_names)
    assert list(pp.subsample(mdata, 25, seed=2).obs_names) != list(a.obs_names)
    assert pp.subsample(mdata.mod["rna"], fraction=0.5).n_obs == 30
    with pytest.raises(InputError, match="cannot draw 61"):
        pp.subsample(mdata, 61)


def test_assemble_aligns_barcodes_and_reports_dropped_cells(tmp_path):
    mdata = make_mdata()
    rna = mdata.mod["rna"][5:].copy()
    prot = mdata.mod["prot"][:50][::-1].copy()  # cell49..cell0: reversed, lacks cell50..cell59
    rna.write_h5ad(tmp_path / "rna.h5ad")
    prot.write_h5ad(tmp_path / "prot.h5ad")
    files = {"rna": tmp_path / "rna.h5ad", "prot": tmp_path / "prot.h5ad"}
    inner = pp.assemble(files)
    expected = [f"cell{i}" for i in range(5, 50)]
    assert list(inner.obs_names) == expected
    assert list(inner.mod["prot"].obs_names) == expected
    np.testing.assert_array_equal(inner.mod["prot"].X, mdata.mod["prot"][expected].X)
    step = pp.preprocessing_steps(inner)[0]
    assert step["step"] == "assemble" and step["params"]["dropped_cells"] == {"rna": 10, "prot": 5}
    assert pp.preprocessing_steps(inner.mod["rna"])[0]["step"] == "assemble"
    outer = pp.assemble(files, join="outer")
    assert outer.n_obs == 60


def test_bad_input_raises_input_error_naming_file_field_and_fix():
    mdata = make_mdata()
    with pytest.raises(InputError) as err:
        pp.normalize_total(mdata.mod["rna"], source="x.h5mu")
    assert err.value.source == "x.h5mu" and err.value.field == "layers['counts']"
    assert "keep_counts" in err.value.fix
    lognorm = pp.log1p(pp.normalize_total(mdata.mod["rna"], layer=None))
    with pytest.raises(InputError, match="non-integer value"):
        pp.keep_counts(lognorm)
    with pytest.raises(InputError, match="negative"):
        pp.clr(ad.AnnData(-np.ones((3, 2), dtype=np.int64)), layer=None)
    with pytest.raises(InputError, match="no modality 'adt'") as err:
        pp.preprocess(mdata, adt="clr", source="x.h5mu")
    assert err.value.field == "mod['adt']"
    with pytest.raises(InputError, match="unknown recipe 'zscore'"):
        pp.preprocess(mdata, rna="zscore")
    with pytest.raises(InputError, match="no such .obs column"):
        pp.preprocess(mdata, rna="lognorm_hvg", n_top_genes=10, batch_key="donor")


def test_cli_assembles_preprocesses_and_names_flags_in_errors(tmp_path, capsys):
    mdata = make_mdata()
    mdata.mod["rna"][3:].copy().write_h5ad(tmp_path / "rna.h5ad")
    mdata.mod["prot"].write_h5ad(tmp_path / "adt.h5ad")
    out = tmp_path / "out.h5mu"
    code = main(["preprocess", "--assemble", f"rna={tmp_path / 'rna.h5ad'}",
                 f"adt={tmp_path / 'adt.h5ad'}", "--rna", "lognorm_hvg", "--n-top-genes", "15",
                 "--recipe", "adt=clr", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dropped per modality: {'rna': 0, 'adt': 3}" in printed
    result = md.read_h5mu(out)
    assert result.n_obs == 57 and result.mod["rna"].n_vars == 15
    assert "counts" in result.mod["adt"].layers
    code = main(["preprocess", "--assemble", f"rna={tmp_path / 'rna.h5ad'}",  # assembling alone
                 f"adt={tmp_path / 'adt.h5ad'}", "--join", "outer", "--out", str(tmp_path / "outer.h5mu")])
    assert code == 0 and md.read_h5mu(tmp_path / "outer.h5mu").n_obs == 60

    code = main(["preprocess", "--data", str(out), "--out", str(out), "--rna", "lognorm"])
    assert code == 2 and "--out" in capsys.readouterr().err
    pp.log1p(pp.normalize_total(mdata.mod["rna"], layer=None)).write_h5ad(tmp_path / "lognorm.h5ad")
    code = main(["preprocess", "--data", str(tmp_path / "lognorm.h5ad"), "--out",
                 str(tmp_path / "x.h5ad"), "--rna", "lognorm", "--counts-layer", "raw"])
    err = capsys.readouterr().err
    assert code == 2 and "lognorm.h5ad: field 'X'" in err and "non-integer" in err
    assert "--counts-layer" in err
    mdata.write(tmp_path / "in.h5mu")
    code = main(["preprocess", "--data", str(tmp_path / "in.h5mu"), "--out", str(tmp_path / "x.h5mu"),
                 "--prot", "zscore"])
    err = capsys.readouterr().err
    assert code == 2 and "zscore" in err and "give --prot one of" in err
    assert not (tmp_path / "x.h5mu").exists()


@pytest.mark.skipif(not CITESEQ.exists(), reason=f"shared CITE-seq data absent ({CITESEQ}); see "
                    "../shared/data/README.md")
def test_citeseq_acceptance_lognorm_hvg_rna_clr_proteins_counts_kept(tmp_path, capsys):
    out = tmp_path / "pbmc10k_pp.h5mu"
    code = main(["preprocess", "--data", str(CITESEQ), "--out", str(out), "--rna", "lognorm_hvg",
                 "--n-top-genes", "2000", "--prot", "clr"])
    assert code == 0, capsys.readouterr().err
    raw = md.read_h5mu(CITESEQ)
    result = md.read_h5mu(out)
    rna, prot = result.mod["rna"], result.mod["prot"]
    assert rna.n_vars == 2000 and prot.n_vars == raw.mod["prot"].n_vars
    assert list(result.obs_names) == list(raw.obs_names)

    counts = raw.mod["rna"].X
    totals = np.asarray(counts.sum(1)).ravel()
    kept = raw.mod["rna"][:, rna.var_names].X
    assert (dense(rna.layers["counts"]) == dense(kept)).all()
    rows = np.arange(0, raw.n_obs, 97)
    np.testing.assert_allclose(dense(rna.X[rows]),
                               np.log1p(1e4 * dense(kept[rows]) / totals[rows, None]), rtol=1e-4)
    np.testing.assert_array_equal(prot.layers["counts"], raw.mod["prot"].X)
    np.testing.assert_allclose(prot.X, hand_clr(raw.mod["prot"].X.astype(np.float64)), rtol=1e-4)

    steps = [(s["step"], s["modality"]) for s in pp.preprocessing_steps(result)]
    assert steps == [("keep_counts", "rna"), ("normalize_total", "rna"), ("log1p", "rna"),
                     ("highly_variable_genes", "rna"), ("keep_counts", "prot"), ("clr", "prot")]

    from pyro_livi.data import DatasetSpec, read_dataset

    required = {f.name for f in dataclasses.fields(DatasetSpec)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    spec = {"modalities": {"rna": "counts"}}
    if "donor_key" in required:  # the spec may not need a donor column
        spec["donor_key"] = "batch"
    dataset = read_dataset(out, DatasetSpec(**spec))
    assert dataset.n_cells == raw.n_obs
    assert [str(n) for n in dataset.feature_names["rna"]] == list(rna.var_names)
