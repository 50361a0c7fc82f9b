"""Reading expression data: the spec, the checks, sparse/backed access, MuData, donor index."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_livi.data import (Batch, DatasetSpec, DonorIndex, SingleCellDataset,
                            read_dataset)
from pyro_livi.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # mudata 0.3 update() notice

SPEC = {"modalities": {"rna": None}, "donor_key": "donor"}


def make_adata(n_cells=60, n_genes=20, n_donors=6, seed=0, fmt="csr") -> ad.AnnData:
    """Poisson counts with every cell non-empty; obs donor, batch, cell_type."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.5, size=(n_cells, n_genes)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[fmt](x)
    obs = pd.DataFrame(
        {
            "donor": [f"D{i % n_donors}" for i in range(n_cells)],
            "batch": pd.Categorical(["b1", "b2", "b3"][i % 3] for i in range(n_cells)),
            "cell_type": [["T", "B"][i % 2] for i in range(n_cells)],
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=matrix, obs=obs, var=var)


def make_mudata(n_cells=40, seed=1) -> md.MuData:
    rna = make_adata(n_cells, 15, seed=seed)
    rng = np.random.default_rng(seed + 1)
    p = rng.poisson(20, size=(n_cells, 4)).astype(np.float32) + 1
    prot = ad.AnnData(X=p, obs=pd.DataFrame(index=rna.obs_names.copy()),
                      var=pd.DataFrame(index=[f"p{j}" for j in range(4)]))
    mdata = md.MuData({"rna": rna, "prot": prot})
    mdata.obs["donor"] = rna.obs["donor"].to_numpy()
    return mdata


def raises(match_field: str, match_fix: str, fn, *args, **kwargs) -> str:
    """Run ``fn`` expecting an InputError naming ``match_field`` and containing ``match_fix``."""
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert f"field '{match_field}'" in msg, msg
    assert "Fix:" in msg and match_fix in msg.split("Fix:", 1)[1], msg
    return msg


# --------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------


def test_spec_round_trip_and_json(tmp_path):
    spec = DatasetSpec({"rna": None, "prot": "counts"}, "donor", ["batch"], ["cell_type"],
                       ["prot"])
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert DatasetSpec.from_json(path) == spec


def test_spec_missing_required_field():
    msg = raises("modalities", "add 'modalities'", DatasetSpec.from_dict, {"donor_key": "donor"})
    assert "required" in msg


def test_spec_donor_key_is_optional():
    spec = DatasetSpec.from_dict({"modalities": {"rna": None}})
    assert spec.donor_key is None and DatasetSpec.from_dict(spec.to_dict()) == spec


def test_spec_unknown_field_named():
    raises("donor_keys", "allowed fields", DatasetSpec.from_dict,
           {"modalities": {"rna": None}, "donor_key": "d", "donor_keys": "x"})


def test_spec_wrong_types_named():
    raises("modalities.rna", "layer", DatasetSpec.from_dict,
           {"modalities": {"rna": 3}, "donor_key": "d"})
    raises("covariate_keys", "list of .obs columns", DatasetSpec.from_dict,
           {"modalities": {"rna": None}, "donor_key": "d", "covariate_keys": "batch"})
    raises("modalities", "modality", DatasetSpec.from_dict, {"modalities": {}, "donor_key": "d"})
    raises("modalities", "without ':'", DatasetSpec.from_dict,
           {"modalities": {"rna:x": None}, "donor_key": "d"})


def test_spec_optional_modalities_checked():
    raises("optional_modalities", "keys of 'modalities'", DatasetSpec.from_dict,
           {"modalities": {"rna": None}, "donor_key": "d", "optional_modalities": ["prot"]})
    raises("optional_modalities", "first", DatasetSpec.from_dict,
           {"modalities": {"rna": None, "prot": None}, "donor_key": "d",
            "optional_modalities": ["rna"]})


def test_spec_direct_construction_validated_and_bad_json(tmp_path):
    with pytest.raises(InputError, match="donor_key"):
        DatasetSpec({"rna": None}, "")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    raises("<file>", "JSON syntax", DatasetSpec.from_json, bad)


# --------------------------------------------------------------------------------------
# Reading: the happy path
# --------------------------------------------------------------------------------------


def test_read_anndata_basic_fields():
    adata = make_adata()
    spec = dict(SPEC, covariate_keys=["batch"], label_keys=["cell_type"])
    ds = read_dataset(adata, spec)
    assert isinstance(ds, SingleCellDataset)
    assert ds.source == "<in-memory AnnData>"
    assert ds.n_cells == 60 and ds.modalities == ["rna"] and ds.n_features == {"rna": 20}
    assert list(ds.feature_names["rna"]) == list(adata.var_names)
    assert list(ds.obs.columns) == ["donor", "batch", "cell_type"]
    assert ds.obs_names.equals(adata.obs_names)
    assert ds.donor_index.ids == [f"D{i}" for i in range(6)]
    assert np.array_equal(ds.donor_codes, [i % 6 for i in range(60)])
    assert ds.covariate_categories == {"batch": ["b1", "b2", "b3"]}
    assert ds.covariate_codes.shape == (60, 1)
    assert np.array_equal(ds.covariate_codes[:, 0], [i % 3 for i in range(60)])
    assert ds.present["rna"].all()
    assert ds.donor_cell_counts().to_dict() == {f"D{i}": 10 for i in range(6)}


def test_size_factors_equal_row_sums():
    adata = make_adata()
    ds = read_dataset(adata, SPEC)
    expected = np.asarray(adata.X.sum(axis=1)).ravel()
    assert np.array_equal(ds.size_factors["rna"], expected)
    b = ds.batch(np.arange(10, 20))
    assert torch.equal(b.size_factor["rna"], b.x["rna"].sum(1))


def test_sparse_stays_sparse_and_batch_is_dense_at_batch_size():
    adata = make_adata()
    ds = read_dataset(adata, SPEC)
    held = ds._matrices["rna"].matrix
    assert sp.issparse(held) and held.format == "csr"
    assert held is adata.X  # referenced, not copied or densified
    idx = np.array([7, 3, 3, 50])
    b = ds.batch(idx)
    assert isinstance(b, Batch)
    assert b.x["rna"].shape == (4, 20) and b.x["rna"].dtype == torch.float32
    assert np.array_equal(b.x["rna"].numpy(), adata.X[idx].toarray())
    assert b.n_cells == 60 and torch.equal(b.index, torch.tensor([7, 3, 3, 50]))
    assert b.donor.dtype == torch.int64 and b.covariates.shape == (4, 0)
    assert b.present["rna"].dtype == torch.bool


def test_csc_converted_once_and_reported():
    adata = make_adata(fmt="csc")
    with pytest.warns(UserWarning, match="CSC; converted once to CSR"):
        ds = read_dataset(adata, SPEC)
    assert ds._matrices["rna"].matrix.format == "csr"
    assert any("CSC" in note for note in ds.notes)
    assert adata.X.format == "csc"  # the user's matrix is untouched
    ref = read_dataset(make_adata(fmt="csr"), SPEC)
    assert torch.equal(ds.batch(np.arange(60)).x["rna"], ref.batch(np.arange(60)).x["rna"])


def test_dense_and_integer_counts_accepted():
    adata = make_adata(fmt="dense")
    adata.X = adata.X.astype(np.int32)
    ds = read_dataset(adata, SPEC)
    assert ds._matrices["rna"].kind == "dense"
    assert np.array_equal(ds.batch(np.arange(5)).x["rna"].numpy(), adata.X[:5])


def test_layer_is_read_and_user_object_not_modified():
    adata = make_adata()
    counts = adata.X.copy()
    adata.layers["counts"] = counts
    adata.X = sp.csr_matrix(np.log1p(counts.toarray()))  # normalised values in .X
    before_obs = adata.obs.copy()
    ds = read_dataset(adata, {"modalities": {"rna": "counts"}, "donor_key": "donor",
                              "covariate_keys": ["batch"], "label_keys": ["cell_type"]})
    assert np.array_equal(ds.batch(np.arange(60)).x["rna"].numpy(), counts.toarray())
    ds.obs["cell_type"] = "changed"  # the dataset's obs is a copy
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    assert list(adata.layers.keys()) == ["counts"]


def test_subset_keeps_index_and_categories():
    adata = make_adata()
    ds = read_dataset(adata, dict(SPEC, covariate_keys=["batch"]))
    idx = np.array([4, 10, 22, 35])
    sub = ds.subset(idx)
    assert sub.n_cells == 4 and sub.donor_index is ds.donor_index
    assert sub.covariate_categories == ds.covariate_categories
    assert sub.obs_names.equals(ds.obs_names[idx])
    a, b = sub.batch(np.arange(4)), ds.batch(idx)
    assert torch.equal(a.x["rna"], b.x["rna"]) and torch.equal(a.donor, b.donor)
    assert a.n_cells == 4
    assert sub.donor_cell_counts().sum() == 4 and len(sub.donor_cell_counts()) == 6
    mask = np.zeros(60, dtype=bool)
    mask[idx] = True
    assert ds.subset(mask).obs_names.equals(sub.obs_names)
    with pytest.raises(InputError, match="repeated"):
        ds.subset([1, 1])
    with pytest.raises(InputError, match="outside"):
        ds.batch([60])


def test_counts_sample():
    ds = read_dataset(make_adata(), SPEC)
    s = ds.counts_sample("rna", n=25, seed=3)
    assert s.shape == (25, 20) and s.dtype == np.float32
    assert np.array_equal(s, ds.counts_sample("rna", n=25, seed=3))
    assert ds.counts_sample("rna", n=1000).shape == (60, 20)


# --------------------------------------------------------------------------------------
# Backed files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_backed_h5ad_same_batches_as_in_memory(tmp_path, fmt):
    adata = make_adata(fmt=fmt)
    path = tmp_path / "x.h5ad"
    adata.write_h5ad(path)
    mem = read_dataset(path, dict(SPEC, covariate_keys=["batch"]))
    bk = read_dataset(path, dict(SPEC, covariate_keys=["batch"]), backed=True)
    assert bk.backed and not mem.backed
    assert bk._matrices["rna"].kind == ("backed_sparse" if fmt == "csr" else "backed_dense")
    assert np.array_equal(bk.size_factors["rna"], mem.size_factors["rna"])
    idx = np.array([59, 2, 17, 2, 40])  # unsorted, repeated
    a, b = bk.batch(idx), mem.batch(idx)
    for field in ("index", "donor", "covariates"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(a.x["rna"], b.x["rna"])
    assert torch.equal(a.size_factor["rna"], b.size_factor["rna"])


def test_backed_checks_every_value(tmp_path, monkeypatch):
    import pyro_livi.data.expression as expression
    adata = make_adata()
    adata.X.data[-1] = 2.5  # last stored value of the last row
    path = tmp_path / "x.h5ad"
    adata.write_h5ad(path)
    monkeypatch.setattr(expression, "BACKED_CHUNK_VALUES", 100)  # several chunks
    msg = raises("adata.X", "raw integer counts", read_dataset, path, SPEC, backed=True)
    assert "among all" in msg and "2.5" in msg


def test_backed_csc_rejected(tmp_path):
    path = tmp_path / "x.h5ad"
    make_adata(fmt="csc").write_h5ad(path)
    raises("adata.X", "tocsr", read_dataset, path, SPEC, backed=True)


def test_backed_needs_a_path():
    raises("backed", "path", read_dataset, make_adata(), SPEC, backed=True)


def test_file_errors(tmp_path):
    raises("<file>", "existing", read_dataset, tmp_path / "nope.h5ad", SPEC)
    other = tmp_path / "x.csv"
    other.write_text("a,b")
    raises("<file>", ".h5ad", read_dataset, other, SPEC)
    raises("data", "AnnData", read_dataset, np.zeros((3, 3)), SPEC)


# --------------------------------------------------------------------------------------
# One test per bad input
# --------------------------------------------------------------------------------------


def test_negative_counts():
    adata = make_adata()
    adata.X.data[3] = -1
    msg = raises("adata.X", "raw integer counts", read_dataset, adata, SPEC)
    assert "negative" in msg


def test_non_integer_counts_suggest_layer():
    adata = make_adata()
    adata.X.data[:] = np.log1p(adata.X.data)
    msg = raises("adata.X", "modalities={'rna': 'counts'}", read_dataset, adata, SPEC)
    assert "not integers" in msg and "among all" in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_counts(bad):
    adata = make_adata()
    adata.X.data[5] = bad
    msg = raises("adata.X", "NaN/inf", read_dataset, adata, SPEC)
    assert "1 among all" in msg and "in cell 'cell" in msg


def test_one_bad_value_among_a_million_is_caught_with_its_cell_and_feature():
    """Every stored value is checked (no sampling): a dense float32 matrix of 10^6 values with
    one 2.5 is refused before training, naming the cell and the feature."""
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(1000, 1000)).astype(np.float32) + 1
    x[731, 417] = 2.5
    adata = ad.AnnData(x)
    adata.obs_names = [f"cell{i}" for i in range(1000)]
    adata.var_names = [f"g{j}" for j in range(1000)]
    msg = raises("adata.X", "raw integer counts", read_dataset, adata, {"modalities": {"rna": None}})
    assert "1 among all 1,000,000 stored values" in msg and "'cell731'" in msg and "'g417'" in msg


def test_continuous_modality_checked_for_finite_values_only():
    adata = make_adata()
    adata.X.data[:] = np.log1p(adata.X.data) - 0.5  # log-normalised-like, some negative
    spec = {"modalities": {"rna": None}, "continuous_modalities": ["rna"]}
    data = read_dataset(adata, spec)
    assert (data.size_factors["rna"] == 1.0).all() and data.donor_index is None
    batch = data.batch(np.arange(4))
    assert batch.donor is None and torch.allclose(batch.x["rna"], torch.from_numpy(adata.X[:4].toarray()))
    adata.X.data[3] = np.nan
    raises("adata.X", "NaN/inf", read_dataset, adata, spec)


def test_non_numeric_counts():
    adata = make_adata(fmt="dense")
    adata.X = adata.X > 0
    raises("adata.X", "raw integer counts", read_dataset, adata, SPEC)


def test_zero_total_cells_reported():
    adata = make_adata()
    x = adata.X.toarray()
    x[[4, 9]] = 0
    adata.X = sp.csr_matrix(x)
    msg = raises("adata.X", "sc.pp.filter_cells(adata, min_counts=1)", read_dataset, adata, SPEC)
    assert "2 of 60 cells have zero total" in msg and "'cell4'" in msg and "'cell9'" in msg


def test_duplicate_cell_ids():
    adata = make_adata()
    adata.obs_names = ["same"] * 2 + list(adata.obs_names[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        msg = raises("adata.obs_names", "obs_names_make_unique()", read_dataset, adata, SPEC)
    assert "'same'" in msg


def test_missing_donor_key_lists_columns():
    msg = raises("obs['indiv'] (donor_key)", "set 'donor_key'", read_dataset, make_adata(),
                 {"modalities": {"rna": None}, "donor_key": "indiv"})
    assert "['donor', 'batch', 'cell_type']" in msg


def test_nan_donors_counted():
    adata = make_adata()
    adata.obs["donor"] = adata.obs["donor"].astype(object)
    adata.obs.iloc[[1, 2, 3], 0] = np.nan
    msg = raises("obs['donor'] (donor_key)", "drop them", read_dataset, adata, SPEC)
    assert "3 cell(s) have no donor id" in msg


def test_missing_covariate_and_label_keys():
    raises("obs['plate'] (covariate_keys)", "set 'covariate_keys'", read_dataset, make_adata(),
           dict(SPEC, covariate_keys=["plate"]))
    raises("obs['celltype'] (label_keys)", "set 'label_keys'", read_dataset, make_adata(),
           dict(SPEC, label_keys=["celltype"]))


def test_nan_covariate():
    adata = make_adata()
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories([]).astype(object)
    adata.obs.iloc[0, 1] = None
    raises("obs['batch'] (covariate_keys)", "fill in", read_dataset, adata,
           dict(SPEC, covariate_keys=["batch"]))


def test_missing_layer_lists_layers():
    adata = make_adata()
    adata.layers["raw"] = adata.X.copy()
    msg = raises("adata.layers['counts']", "null for .X", read_dataset, adata,
                 {"modalities": {"rna": "counts"}, "donor_key": "donor"})
    assert "['raw']" in msg


def test_anndata_with_two_modalities():
    raises("modalities", "MuData", read_dataset, make_adata(),
           {"modalities": {"rna": None, "prot": None}, "donor_key": "donor"})


def test_single_cell_donors_warn():
    adata = make_adata()
    adata.obs["donor"] = adata.obs["donor"].astype(object)
    adata.obs.iloc[0, 0] = "lonely"
    with pytest.warns(UserWarning, match=r"1 donor\(s\) have a single cell: \['lonely'\]"):
        ds = read_dataset(adata, SPEC)
    assert "lonely" in ds.donor_index


# --------------------------------------------------------------------------------------
# Re-applying a fitted model's donor index and covariate categories
# --------------------------------------------------------------------------------------


def test_donor_index_round_trip_and_encode():
    idx = DonorIndex.from_values(["b", "a", "c", "a", 7])
    assert idx.ids == ["7", "a", "b", "c"] and len(idx) == 4 and idx.code("b") == 2
    assert DonorIndex.from_dict(json.loads(json.dumps(idx.to_dict()))) == idx
    assert np.array_equal(idx.encode(["c", "7", "a"]), [3, 0, 1])
    assert idx.encode(np.array(["a"])).dtype == np.int64
    with pytest.raises(InputError, match="duplicate"):
        DonorIndex(["a", "a"])
    with pytest.raises(InputError, match="missing donor id"):
        DonorIndex.from_values(["a", None])


def test_unseen_donor_error():
    idx = DonorIndex(["D0", "D1"])
    msg = raises("donor", "keep only cells of donors", idx.encode, ["D0", "D7", "D9"],
                 source="x.h5ad")
    assert "['D7', 'D9']" in msg and "trained on other donors" in msg


def test_reapplied_donor_index_and_categories():
    train = read_dataset(make_adata(), dict(SPEC, covariate_keys=["batch"]))
    new = make_adata(30, seed=5, n_donors=3)  # donors D0..D2 only
    ds = read_dataset(new, dict(SPEC, covariate_keys=["batch"]),
                      donor_index=train.donor_index,
                      covariate_categories=train.covariate_categories)
    assert ds.donor_index == train.donor_index and len(ds.donor_cell_counts()) == 6
    assert ds.donor_cell_counts()["D5"] == 0
    assert np.array_equal(ds.donor_codes, [i % 3 for i in range(30)])

    unseen = make_adata(30, n_donors=8)
    msg = raises("obs['donor']", "keep only cells of donors", read_dataset, unseen, SPEC,
                 donor_index=train.donor_index)
    assert "trained on other donors" in msg
    other_batch = make_adata()
    other_batch.obs["batch"] = "b9"
    raises("obs['batch'] (covariate_keys)", "trained categories", read_dataset, other_batch,
           dict(SPEC, covariate_keys=["batch"]), covariate_categories={"batch": ["b1", "b2"]})
    raises("covariate_categories", "spec the model was fitted with", read_dataset,
           make_adata(), SPEC, covariate_categories={"batch": ["b1"]})


# --------------------------------------------------------------------------------------
# MuData
# --------------------------------------------------------------------------------------

MU_SPEC = {"modalities": {"rna": None, "prot": None}, "donor_key": "donor"}


def test_mudata_two_modalities():
    mdata = make_mudata()
    ds = read_dataset(mdata, MU_SPEC)
    assert ds.source == "<in-memory MuData>" and ds.modalities == ["rna", "prot"]
    assert ds.n_features == {"rna": 15, "prot": 4}
    b = ds.batch(np.array([3, 0]))
    assert np.array_equal(b.x["prot"].numpy(), mdata.mod["prot"].X[[3, 0]])
    assert torch.equal(b.size_factor["prot"], b.x["prot"].sum(1))


def test_mudata_donor_key_from_modality_obs():
    mdata = make_mudata()
    mdata.obs = mdata.obs.drop(columns=["donor"])
    ds = read_dataset(mdata, dict(MU_SPEC, label_keys=["cell_type"]))  # from mod['rna'].obs
    assert len(ds.donor_index) == 6 and "cell_type" in ds.obs


def test_mudata_missing_modality_lists_available():
    msg = raises("modalities", "name modalities of the MuData", read_dataset, make_mudata(),
                 {"modalities": {"rna": None, "adt": None}, "donor_key": "donor"})
    assert "['rna', 'prot']" in msg


def test_mudata_different_order():
    mdata = make_mudata()
    prot = mdata.mod["prot"]
    mdata.mod["prot"] = prot[prot.obs_names[::-1]].copy()
    raises("mdata.mod['prot'].obs_names", "reorder it", read_dataset, mdata, MU_SPEC)


def test_mudata_different_cells():
    mdata = make_mudata()
    mdata.mod["prot"] = mdata.mod["prot"][:30].copy()
    msg = raises("mdata.mod['prot'].obs_names", "optional_modalities", read_dataset,
                 mdata, MU_SPEC)
    assert "10 cell(s) of 'rna' are missing from 'prot'" in msg
    assert "--optional-modalities prot on the CLI" in msg and "`pyro-livi models`" in msg


def test_mudata_optional_modality_missing_some_cells():
    mdata = make_mudata()
    prot = mdata.mod["prot"]
    keep = prot.obs_names[::2][::-1]  # half the cells, in another order
    mdata.mod["prot"] = prot[keep].copy()
    ds = read_dataset(mdata, dict(MU_SPEC, optional_modalities=["prot"]))
    assert ds.n_cells == 40
    assert np.array_equal(ds.present["prot"], np.arange(40) % 2 == 0)
    assert ds.present["rna"].all()
    b = ds.batch(np.arange(6))
    assert b.present["prot"].tolist() == [True, False, True, False, True, False]
    assert (b.x["prot"][1] == 0).all() and (b.x["prot"][3] == 0).all()
    assert np.array_equal(b.x["prot"][2].numpy(), prot[ds.obs_names[2]].X.ravel())
    expected_sf = prot.X.sum(1)[prot.obs_names.get_indexer(ds.obs_names[[0, 2, 4]])]
    assert np.array_equal(b.size_factor["prot"][[0, 2, 4]].numpy(), expected_sf)
    assert (b.size_factor["prot"][[1, 3, 5]] == 1).all()  # placeholder for absent cells
    sample = ds.counts_sample("prot", n=100)
    assert sample.shape == (20, 4) and (sample.sum(1) > 0).all()


def test_mudata_optional_modality_extra_cells():
    mdata = make_mudata()
    rna = mdata.mod["rna"]
    mdata.mod["rna"] = rna[5:].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata.update()
    msg = raises("mdata.mod['prot'].obs_names", "drop them from 'prot'", read_dataset, mdata,
                 dict(MU_SPEC, optional_modalities=["prot"]))
    assert "5 cell(s)" in msg


def test_mudata_zero_cells_in_one_modality():
    mdata = make_mudata()
    mdata.mod["prot"].X[7] = 0
    msg = raises("mdata.mod['prot'].X", "from every modality", read_dataset, mdata, MU_SPEC)
    assert "1 of 40 cells have zero total count in modality 'prot'" in msg


def test_mudata_backed_file(tmp_path):
    mdata = make_mudata()
    path = tmp_path / "x.h5mu"
    mdata.write(path)
    mem = read_dataset(path, MU_SPEC)
    bk = read_dataset(path, MU_SPEC, backed=True)
    assert bk.backed
    idx = np.array([9, 1, 30])
    a, b = bk.batch(idx), mem.batch(idx)
    for m in ("rna", "prot"):
        assert torch.equal(a.x[m], b.x[m])
        assert torch.equal(a.size_factor[m], b.size_factor[m])


# --------------------------------------------------------------------------------------
# Messages name the fix in both interfaces and list what is available (issue 11, case 6)
# --------------------------------------------------------------------------------------


def test_log_normalised_x_lists_layers_and_suggests_the_counts_layer():
    adata = make_adata()
    adata.layers["raw_counts"] = adata.X.copy()
    adata.layers["norm"] = adata.X.multiply(0.5).tocsr()
    adata.X = adata.X.copy()
    adata.X.data = np.log1p(adata.X.data)
    msg = raises("adata.X", "modalities={'rna': 'raw_counts'} in Python, --layer raw_counts or "
                 "--modalities rna:raw_counts on the CLI", read_dataset, adata, SPEC)
    assert "layers of modality 'rna': ['raw_counts', 'norm']" in msg
    assert "layer 'raw_counts' holds integer counts" in msg


def test_non_count_x_without_layers_says_so():
    adata = make_adata()
    adata.X.data = adata.X.data / 7.0
    msg = raises("adata.X", "--layer counts", read_dataset, adata, SPEC)
    assert "modality 'rna' has no layers besides .X" in msg


def test_missing_layer_names_both_forms_and_the_counts_layer():
    adata = make_adata()
    adata.layers["umi"] = adata.X.copy()
    msg = raises("adata.layers['counts']", "--layer umi", read_dataset, adata,
                 {"modalities": {"rna": "counts"}, "donor_key": "donor"})
    assert "layer 'umi' holds integer counts" in msg and "modalities={'rna': 'umi'} in Python" in msg


def test_unknown_obs_columns_name_the_flag_and_the_keyword():
    msg = raises("obs['Donor'] (donor_key)", "--donor-key on the CLI, donor_key= in Python", read_dataset,
                 make_adata(), {"modalities": {"rna": None}, "donor_key": "Donor"})
    assert "did you mean 'donor'?" in msg
    raises("obs['plate'] (covariate_keys)", "--covariate-keys on the CLI, covariate_keys= in Python",
           read_dataset, make_adata(), dict(SPEC, covariate_keys=["plate"]))
    raises("obs['celltype'] (label_keys)", "--label-keys on the CLI, label_keys= in Python",
           read_dataset, make_adata(), dict(SPEC, label_keys=["celltype"]))


def test_unknown_modality_names_the_flag_and_the_keyword():
    msg = raises("modalities", "--modalities rna,prot on the CLI, modalities={'rna': None, 'prot': None} in "
                 "Python", read_dataset, make_mudata(), {"modalities": {"rna": None, "adt": None},
                                                         "donor_key": "donor"})
    assert "available: ['rna', 'prot']" in msg


def test_proteins_in_obsm_get_a_conversion_hint():
    """scvi-tools keeps CITE-seq proteins in .obsm['protein_expression']; asking an AnnData for two
    modalities says how to make the MuData this package reads."""
    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(2.0, size=(20, 6)).astype(np.float32)))
    adata.obsm["protein_expression"] = pd.DataFrame(rng.poisson(5, size=(20, 3)), index=adata.obs_names)
    with pytest.raises(InputError, match=r"obsm\['protein_expression'\].*mudata.MuData"):
        read_dataset(adata, {"modalities": {"rna": None, "prot": None}})
