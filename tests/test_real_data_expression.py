"""Reading the shared real datasets (skipped when ../shared/data is absent).

What the files hold (inspected with anndata 0.12 / mudata 0.3):
- donors/onek1k_40donors_7811cells.h5ad: raw counts in .X (CSR float32, integer values),
  obs indiv (40 donors SAMPn), cell_type (4), sex, age; no layers.
- donors/onek1k_bcells_100donors_3726cells.h5ad: raw counts in .X (CSR float32), 817 genes,
  obs cell_type, indiv (100 donors), sex, age, slingPseudotime_1.
- citeseq/pbmc10k_cite.h5mu: rna (CSR float32, 4,000 genes) and prot (dense float32, 14
  proteins), same 6,855 cells in the same order; the only obs column is `batch`
  ("pbmc_10k_protein_v3" for every cell, i.e. one donor), seen globally as rna:batch and
  prot:batch. No donor column.
- multiome/pbmc_multiome_1000cells.h5mu: atac (174 peaks) and rna (45 genes), CSR float32,
  same 1,000 cells; no obs columns; 19 cells have zero ATAC counts over these 174 peaks.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pyro_livi.data import MinibatchLoader, read_dataset
from pyro_livi.errors import InputError
from pyro_livi.paths import shared_data_dir

DATA = shared_data_dir()
pytestmark = pytest.mark.filterwarnings(
    "ignore:The HDF5 file was not created by muon/mudata",  # the shared files predate mudata
    "ignore::FutureWarning",  # mudata 0.3 update() notice
    "ignore:Element .* was written without encoding metadata",  # old anndata encoding
)


def need(relpath: str):
    path = DATA / relpath
    return pytest.mark.skipif(not path.exists(),
                              reason=f"shared real data not found: {path} "
                              "(set PYRO_LIVI_DATA or place ../shared/data)")


ONEK1K = "donors/onek1k_40donors_7811cells.h5ad"
BCELLS = "donors/onek1k_bcells_100donors_3726cells.h5ad"
CITE = "citeseq/pbmc10k_cite.h5mu"
MULTIOME = "multiome/pbmc_multiome_1000cells.h5mu"


@need(ONEK1K)
def test_onek1k_40_donors():
    spec = {"modalities": {"rna": None}, "donor_key": "indiv", "covariate_keys": ["sex"],
            "label_keys": ["cell_type"]}
    ds = read_dataset(DATA / ONEK1K, spec)
    assert ds.n_cells == 7811 and ds.n_features == {"rna": 1000}
    assert len(ds.donor_index) == 40
    assert ds.donor_cell_counts().sum() == 7811
    assert ds.covariate_categories == {"sex": ["1", "2"]}
    assert ds.obs["cell_type"].nunique() == 4
    assert (ds.size_factors["rna"] > 0).all()
    batch = next(iter(MinibatchLoader(ds, batch_size=256, seed=0)))
    assert batch.x["rna"].shape == (256, 1000)
    assert torch.equal(batch.size_factor["rna"], batch.x["rna"].sum(1))


@need(ONEK1K)
def test_onek1k_backed_matches_in_memory():
    spec = {"modalities": {"rna": None}, "donor_key": "indiv"}
    mem = read_dataset(DATA / ONEK1K, spec)
    bk = read_dataset(DATA / ONEK1K, spec, backed=True)
    assert bk.backed
    assert np.array_equal(bk.size_factors["rna"], mem.size_factors["rna"])
    idx = MinibatchLoader(mem, batch_size=300, seed=2).order(0)[:300]
    assert torch.equal(bk.batch(idx).x["rna"], mem.batch(idx).x["rna"])


@need(ONEK1K)
def test_onek1k_wrong_donor_key_lists_columns():
    with pytest.raises(InputError) as info:
        read_dataset(DATA / ONEK1K, {"modalities": {"rna": None}, "donor_key": "donor"})
    msg = str(info.value)
    assert str(DATA / ONEK1K) in msg and "'indiv'" in msg and "donor_key" in msg


@need(BCELLS)
def test_onek1k_bcells_100_donors():
    ds = read_dataset(DATA / BCELLS, {"modalities": {"rna": None}, "donor_key": "indiv",
                                      "label_keys": ["cell_type"]})
    assert len(ds.donor_index) == 100
    assert ds.n_cells == 3726 and ds.n_features == {"rna": 817}


@need(CITE)
def test_pbmc10k_cite_rna_prot():
    import mudata as md

    spec = {"modalities": {"rna": None, "prot": None}, "donor_key": "batch"}
    ds = read_dataset(DATA / CITE, spec)  # `batch` is found in mod['rna'].obs
    assert ds.n_cells == 6855 and ds.n_features == {"rna": 4000, "prot": 14}
    assert ds.donor_index.ids == ["pbmc_10k_protein_v3"]  # one donor
    assert all(ds.present[m].all() for m in ds.modalities)
    b = ds.batch(np.arange(64))
    assert torch.equal(b.size_factor["prot"], b.x["prot"].sum(1))

    # No donor column: the missing key is an error listing what obs holds ...
    with pytest.raises(InputError) as info:
        read_dataset(DATA / CITE, dict(spec, donor_key="donor"))
    assert "rna:batch" in str(info.value) and "donor_key" in str(info.value)
    # ... and a donor column added to an in-memory copy is read.
    mdata = md.read_h5mu(DATA / CITE)
    mdata.obs["donor"] = "pbmc10k"
    ds2 = read_dataset(mdata, dict(spec, donor_key="donor"))
    assert ds2.donor_index.ids == ["pbmc10k"]
    assert np.array_equal(ds2.size_factors["rna"], ds.size_factors["rna"])


@need(MULTIOME)
def test_multiome_rna_atac():
    import mudata as md

    spec = {"modalities": {"rna": None, "atac": None}, "donor_key": "donor"}
    mdata = md.read_h5mu(DATA / MULTIOME)
    mdata.obs["donor"] = "d1"
    # 19 cells have no ATAC counts over the 174 peaks kept in this file.
    with pytest.raises(InputError) as info:
        read_dataset(mdata, spec)
    assert "19 of 1,000 cells have zero total count in modality 'atac'" in str(info.value)
    # Following the fix (drop them from every modality) makes it readable.
    totals = np.asarray(mdata.mod["atac"].X.sum(1)).ravel()
    bad = mdata.mod["atac"].obs_names[totals == 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = mdata[~mdata.obs_names.isin(bad)].copy()
    ds = read_dataset(kept, spec)
    assert ds.n_cells == 981 and ds.n_features == {"rna": 45, "atac": 174}
    assert ds.modalities == ["rna", "atac"]
    b = ds.batch(np.arange(981))
    assert torch.equal(b.size_factor["atac"], b.x["atac"].sum(1))
