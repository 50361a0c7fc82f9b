"""Genotype readers (PLINK, dosage tables), donor matching and SNP QC."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from bed_reader import to_bed

from pyro_livi.data.genotypes import (
    Genotypes,
    PlinkReader,
    iter_snp_chunks,
    match_donors,
    quality_control,
    read_dosage_table,
    read_genotypes,
    read_plink,
)
from pyro_livi.errors import InputError
from pyro_livi.paths import shared_data_dir

DATA = shared_data_dir()


def _write_plink(tmp_path, dos, *, bim=True, iids=None, sids=None, chrom=None, pos=None):
    n, m = dos.shape
    props = {"iid": iids or [f"S{i}" for i in range(n)], "fid": ["F"] * n,
             "sid": sids or [f"rs{j}" for j in range(m)],
             "chromosome": chrom or ["1"] * m,
             "bp_position": pos if pos is not None else list(range(100, 100 + m))}
    bed = tmp_path / "g.bed"
    to_bed(bed, dos.astype(np.float32), properties=props)
    if not bim:
        (tmp_path / "g.bim").unlink()
    return bed


@pytest.fixture
def dosages():
    rng = np.random.default_rng(0)
    dos = rng.integers(0, 3, size=(9, 13)).astype(float)
    dos[2, 3] = np.nan
    return dos


# ---------------------------------------------------------------------------- PLINK


def test_read_plink_values_ids_and_annotation(tmp_path, dosages):
    bed = _write_plink(tmp_path, dosages, chrom=["1"] * 6 + ["2"] * 7)
    for path in (bed, tmp_path / "g"):
        g = read_plink(path)
        np.testing.assert_array_equal(g.dosages, dosages)
        assert g.donors == [f"S{i}" for i in range(9)]
        assert g.snps["snp"].tolist() == [f"rs{j}" for j in range(13)]
        assert g.snps["chrom"].tolist() == ["1"] * 6 + ["2"] * 7
        assert g.snps["pos"].tolist() == list(range(100, 113))
        assert g.dosages.dtype == np.float64


def test_read_plink_subset_and_chunks(tmp_path, dosages):
    bed = _write_plink(tmp_path, dosages)
    sub = read_plink(bed, sid_index=np.array([1, 4, 5]))
    np.testing.assert_array_equal(sub.dosages, dosages[:, [1, 4, 5]])
    assert sub.snps["snp"].tolist() == ["rs1", "rs4", "rs5"]
    donors = ["S4", "S0", "S7"]
    chunks = list(iter_snp_chunks(bed, 5, donors))
    assert [c.n_snps for c in chunks] == [5, 5, 3]
    np.testing.assert_array_equal(np.hstack([c.dosages for c in chunks]),
                                  dosages[[4, 0, 7]])
    assert all(c.donors == donors for c in chunks)
    with PlinkReader(bed) as reader:
        part = reader.read(slice(2, 4), ["S8"])
    np.testing.assert_array_equal(part.dosages, dosages[[8], 2:4])


def test_read_plink_without_bim_needs_variant_count(tmp_path, dosages):
    bed = _write_plink(tmp_path, dosages, bim=False)
    with pytest.raises(InputError) as err:
        read_plink(bed)
    msg = str(err.value)
    assert "variant_count" in msg and "--variant-count" in msg and "implies 13" in msg
    g = read_plink(bed, variant_count=13)
    np.testing.assert_array_equal(g.dosages, dosages)
    assert g.snps["snp"].tolist() == [str(j) for j in range(13)]
    assert g.snps["chrom"].isna().all() and g.snps["pos"].isna().all()
    with pytest.raises(InputError, match="file size"):
        read_plink(bed, variant_count=12)


def test_read_plink_missing_files(tmp_path, dosages):
    with pytest.raises(InputError, match="file not found"):
        read_plink(tmp_path / "nothing")
    bed = _write_plink(tmp_path, dosages)
    (tmp_path / "g.fam").unlink()
    with pytest.raises(InputError, match="fam"):
        read_plink(bed)


def test_read_plink_duplicate_snp_ids(tmp_path, dosages):
    sids = [f"rs{j}" for j in range(12)] + ["rs0"]
    bed = _write_plink(tmp_path, dosages, sids=sids)
    with pytest.raises(InputError, match="make_unique"):
        read_plink(bed)
    g = read_plink(bed, duplicate_snps="make_unique")
    assert g.snps["snp"].tolist()[-1] == "rs0#2"
    assert g.report["n_duplicate_snp_ids_renamed"] == 1


# ---------------------------------------------------------------------------- tables


def _snps_x_donors_frame():
    return pd.DataFrame({
        "snp_id": ["a", "b", "c"], "CHR": [1, 1, 2], "POS": [10, 20, 5],
        "gene_id": ["G1", "G1", "G2"], "D1": [0, 1, 2], "D2": [2.0, np.nan, 1.0],
        "D3": [1, 1, 0]})


@pytest.mark.parametrize("name,sep", [("t.csv", ","), ("t.csv.gz", ","), ("t.tsv", "\t"),
                                      ("t.tsv.gz", "\t")])
def test_read_dosage_table_snps_x_donors(tmp_path, name, sep):
    path = tmp_path / name
    _snps_x_donors_frame().to_csv(path, sep=sep, index=False)
    g = read_dosage_table(path, orientation="snps_x_donors")
    assert g.donors == ["D1", "D2", "D3"]
    np.testing.assert_array_equal(g.dosages, [[0, 1, 2], [2, np.nan, 1], [1, 1, 0]])
    assert g.snps["snp"].tolist() == ["a", "b", "c"]
    assert g.snps["chrom"].tolist() == ["1", "1", "2"]
    assert g.snps["pos"].tolist() == [10, 20, 5]
    assert g.snps["gene_id"].tolist() == ["G1", "G1", "G2"]


def test_read_dosage_table_donors_x_snps(tmp_path):
    frame = pd.DataFrame({"donor": ["D1", "D2"], "rs1": [0, 2], "rs2": [1.5, 0.5]})
    path = tmp_path / "d.tsv"
    frame.to_csv(path, sep="\t", index=False)
    g = read_dosage_table(path, orientation="donors_x_snps")
    assert g.donors == ["D1", "D2"]
    assert g.snps["snp"].tolist() == ["rs1", "rs2"]
    np.testing.assert_array_equal(g.dosages, [[0, 1.5], [2, 0.5]])


def test_repeated_snp_columns_of_a_donors_x_snps_table_follow_duplicate_snps(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("donor,rs1,rs2,rs1\nD1,0,1,2\nD2,2,1,0\n")
    with pytest.raises(InputError, match="SNP ids.*--duplicate-snps make_unique.*open_genotypes"):
        read_dosage_table(path, orientation="donors_x_snps")
    for policy in ("make_unique", "auto"):
        g = read_dosage_table(path, orientation="donors_x_snps", duplicate_snps=policy)
        assert g.snps["snp"].tolist() == ["rs1", "rs2", "rs1#2"]
        np.testing.assert_array_equal(g.dosages, [[0, 1, 2], [2, 1, 0]])
        assert g.report["n_duplicate_snp_ids_renamed"] == 1
        assert ("repeat an earlier SNP id" in " ".join(g.report.get("notes", []))) == (policy == "auto")
    path.write_text("donor,rs1,donor\nD1,0,1\nD2,2,1\n")
    with pytest.raises(InputError, match="header columns"):
        read_dosage_table(path, orientation="donors_x_snps", duplicate_snps="make_unique")


def test_read_dosage_table_bad_values(tmp_path):
    frame = _snps_x_donors_frame().astype({"D2": object})
    frame.loc[1, "D2"] = "AG"
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        read_dosage_table(path, orientation="snps_x_donors")
    assert "bad.csv" in str(err.value) and "'D2'" in str(err.value)
    assert "non-numeric" in str(err.value) and "annotation_columns" in str(err.value)
    assert "--dosage-orientation" in str(err.value)
    frame = _snps_x_donors_frame()
    frame.loc[2, "D3"] = 3
    frame.to_csv(path, index=False)
    with pytest.raises(InputError) as err:
        read_dosage_table(path, orientation="snps_x_donors")
    assert "'D3'" in str(err.value) and "outside [0, 2]" in str(err.value)


def test_read_dosage_table_options_checked(tmp_path):
    path = tmp_path / "t.csv"
    _snps_x_donors_frame().to_csv(path, index=False)
    g = read_dosage_table(path)  # detected from the snp_id / CHR / POS columns, and said
    assert g.donors == ["D1", "D2", "D3"]
    assert "snps_x_donors" in g.report["notes"][0] and "CHR" in g.report["notes"][0]
    with pytest.raises(InputError, match="orientation"):
        read_dosage_table(path, orientation="rows")
    with pytest.raises(InputError, match="snp_id_column"):
        read_dosage_table(path, orientation="snps_x_donors", snp_id_column="rsid")


def test_read_dosage_table_duplicates(tmp_path):
    frame = _snps_x_donors_frame()
    frame.loc[2, "snp_id"] = "a"
    path = tmp_path / "dup.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(InputError, match="duplicate_snps='make_unique'"):
        read_dosage_table(path, orientation="snps_x_donors")
    g = read_dosage_table(path, orientation="snps_x_donors", duplicate_snps="make_unique")
    assert g.snps["snp"].tolist() == ["a", "b", "a#2"]
    path = tmp_path / "dupdonor.csv"
    with open(path, "w") as fh:
        fh.write("snp_id,D1,D1\nx,0,1\n")
    with pytest.raises(InputError, match="duplicated"):
        read_dosage_table(path, orientation="snps_x_donors")


def test_dosage_orientation_is_detected_when_unambiguous(tmp_path):
    # donors x SNPs: the header after the first column holds SNP ids
    frame = pd.DataFrame({"IID": ["D1", "D2", "D3"], "rs1": [0, 2, 1], "1:12345": [1.5, 0.5, 0]})
    path = tmp_path / "dxs.tsv"
    frame.to_csv(path, sep="\t", index=False)
    g = read_dosage_table(path, orientation="auto")
    assert g.donors == ["D1", "D2", "D3"] and g.snps["snp"].tolist() == ["rs1", "1:12345"]
    assert "donors_x_snps" in g.report["notes"][0] and "rs1" in g.report["notes"][0]
    # SNPs x donors without annotation columns: the first column holds SNP ids
    path = tmp_path / "sxd.csv"
    frame.set_index("IID").T.rename_axis("variant").reset_index().to_csv(path, index=False)
    g = read_dosage_table(path)
    assert g.donors == ["D1", "D2", "D3"] and g.snps["snp"].tolist() == ["rs1", "1:12345"]
    assert "'variant' holds SNP ids" in g.report["notes"][0]
    # neutral names: only the donors of the factors decide
    neutral = pd.DataFrame({"id": ["a", "b"], "x1": [0, 1], "x2": [2, 1]})
    path = tmp_path / "neutral.csv"
    neutral.to_csv(path, index=False)
    with pytest.raises(InputError, match="--dosage-orientation"):
        read_dosage_table(path)
    g = read_dosage_table(path, donors=["x1", "x2", "x9"])
    assert g.donors == ["x1", "x2"] and "donor ids of the factors" in g.report["notes"][0]
    g = read_dosage_table(path, donors=["a", "b"])
    assert g.donors == ["a", "b"] and g.snps["snp"].tolist() == ["x1", "x2"]
    # an explicit orientation wins over detection and adds no note
    g = read_dosage_table(tmp_path / "dxs.tsv", orientation="donors_x_snps")
    assert g.donors == ["D1", "D2", "D3"] and "notes" not in g.report


def test_duplicate_snp_ids_auto_policy(tmp_path):
    frame = pd.DataFrame({
        "snp_id": ["a", "b", "a", "c", "c"], "CHR": [1, 1, 1, 2, 2], "POS": [10, 20, 10, 5, 5],
        "gene_id": ["G1", "G1", "G2", "G3", "G4"], "D1": [0, 1, 0, 2, 1], "D2": [2, 1, 2, 1, 1],
        "D3": [1, 1, 1, 0, 0]})
    path = tmp_path / "dup.csv"
    frame.to_csv(path, index=False)
    g = read_dosage_table(path, duplicate_snps="auto")
    # row 3 repeats a's id, position and dosages (another gene): one copy kept; c's two rows
    # differ in dosages: both kept, the second renamed
    assert g.snps["snp"].tolist() == ["a", "b", "c", "c#2"]
    assert g.report["n_repeated_snp_rows_dropped"] == 1
    assert g.report["n_duplicate_snp_ids_renamed"] == 1
    notes = " ".join(g.report["notes"])
    assert "kept one copy" in notes and "renamed id#2" in notes
    with pytest.raises(InputError, match="make_unique"):  # explicit error still refuses
        read_dosage_table(path, duplicate_snps="error")
    g = read_dosage_table(path, duplicate_snps="make_unique")
    assert g.snps["snp"].tolist() == ["a", "b", "a#2", "c", "c#2"]


def test_read_genotypes_dispatch(tmp_path, dosages):
    bed = _write_plink(tmp_path, dosages)
    assert read_genotypes(tmp_path / "g").n_snps == 13
    assert read_genotypes(bed, sid_index=slice(0, 2)).n_snps == 2
    path = tmp_path / "t.csv.gz"
    _snps_x_donors_frame().to_csv(path, index=False)
    assert read_genotypes(path, orientation="snps_x_donors").n_donors == 3
    with pytest.raises(InputError, match="neither a PLINK"):
        read_genotypes(tmp_path / "x.vcf")


def test_genotypes_container_rejects_bad_values():
    with pytest.raises(InputError, match="outside"):
        Genotypes(np.array([[0.0, 2.5]]), ["d"], pd.DataFrame({"snp": ["a", "b"]}), "x")
    with pytest.raises(InputError, match="donor ids"):
        Genotypes(np.zeros((2, 1)), ["d", "d"], pd.DataFrame({"snp": ["a"]}), "x")


# ---------------------------------------------------------------------------- donors, QC


def test_match_donors_orders_and_reports(dosages):
    g = Genotypes(dosages, [f"S{i}" for i in range(9)],
                  pd.DataFrame({"snp": [f"r{j}" for j in range(13)]}), "geno")
    sub, rep = match_donors(g, ["S3", "X1", "S0", "X2"])
    assert sub.donors == ["S3", "S0"]
    np.testing.assert_array_equal(sub.dosages, dosages[[3, 0]])
    assert rep["n_expression_donors"] == 4 and rep["n_genotyped"] == 9
    assert rep["n_matched"] == 2 and rep["unmatched_expression"] == ["X1", "X2"]
    assert rep["unmatched_genotype"] == 7
    with pytest.raises(InputError) as err:
        match_donors(g, ["X1", "X2"], source="expr.h5ad")
    msg = str(err.value)
    assert "X1" in msg and "S0" in msg and "expr.h5ad" in msg


def test_quality_control_counts_and_imputation():
    dos = np.array([
        [0, 1, np.nan, 1, 0, 0],
        [1, 1, np.nan, 1, 0, 2],
        [2, 1, np.nan, np.nan, 0, 1],
        [np.nan, 1, np.nan, 0, 1, 0],
    ], dtype=float)
    # SNP0: ok with one missing call; SNP1: monomorphic; SNP2: all missing;
    # SNP3: ok, one missing; SNP4: freq 1/8 = 0.125; SNP5: ok
    g = Genotypes(dos, list("abcd"), pd.DataFrame({"snp": [f"s{j}" for j in range(6)]}), "x")
    q, rep = quality_control(g, maf=0.2)
    assert rep["n_all_missing"] == 1 and rep["n_monomorphic"] == 1
    assert rep["n_low_maf"] == 1 and rep["n_snps_kept"] == 3
    assert rep["n_missing_calls"] == 4 + 2 and rep["n_imputed_calls"] == 2
    assert q.snps["snp"].tolist() == ["s0", "s3", "s5"]
    assert q.dosages[3, 0] == pytest.approx(1.0)          # mean of 0, 1, 2
    assert q.dosages[2, 1] == pytest.approx(2.0 / 3.0)    # mean of 1, 1, 0
    assert not np.isnan(q.dosages).any()
    _, rep = quality_control(g, maf=0.1)
    assert rep["n_low_maf"] == 0 and rep["n_snps_kept"] == 4


# ---------------------------------------------------------------------------- real data


def _need(path):
    return pytest.mark.skipif(not (DATA / path).exists(),
                              reason=f"shared dataset {path} not present")


@_need("genotypes/onek1k_chr22/chr22.n94.bed")
def test_real_chr22_without_bim():
    bed = DATA / "genotypes/onek1k_chr22/chr22.n94.bed"
    with pytest.raises(InputError, match="implies 143083"):
        read_plink(bed)
    g = read_plink(bed, variant_count=143083)
    assert g.dosages.shape == (94, 143083)
    assert g.donors[0] == "682_683"
    assert not np.isnan(g.dosages).any()
    feats = pd.read_csv(DATA / "genotypes/onek1k_chr22/donor_features.n94.tsv", sep="\t",
                        dtype={"iid": str})
    assert set(feats["iid"]) == set(g.donors)


@_need("genotypes/1000g_eur/AGT.bed")
def test_real_1000g_agt():
    g = read_plink(DATA / "genotypes/1000g_eur/AGT")
    assert g.dosages.shape == (503, 361)
    assert g.snps["chrom"].unique().tolist() == ["1"]
    assert g.snps["pos"].notna().all()


@_need("genotypes/snpstats/testdata_autosomes.bed")
def test_real_snpstats_missing_calls_imputed():
    g = read_plink(DATA / "genotypes/snpstats/testdata_autosomes")
    assert g.dosages.shape == (400, 9445)
    frac = np.isnan(g.dosages).mean()
    assert frac == pytest.approx(0.134, abs=0.001)
    q, rep = quality_control(g)
    assert rep["n_missing_calls"] == int(np.isnan(g.dosages).sum())
    assert rep["n_imputed_calls"] > 0 and rep["n_all_missing"] > 0
    assert rep["n_snps_kept"] + rep["n_all_missing"] + rep["n_monomorphic"] + \
        rep["n_low_maf"] == 9445
    assert not np.isnan(q.dosages).any()


@_need("donors/onek1k_40donors_dosage.csv.gz")
def test_real_onek1k_40donors_dosage_table():
    path = DATA / "donors/onek1k_40donors_dosage.csv.gz"
    g = read_genotypes(path, orientation="snps_x_donors", duplicate_snps="make_unique")
    with gzip.open(path, "rt") as fh:
        n_rows = sum(1 for _ in fh) - 1
    assert g.dosages.shape == (40, n_rows)
    assert g.donors[:2] == ["SAMP1", "SAMP2"]
    assert {"cell_type", "gene_id"} <= set(g.snps.columns)
    assert g.snps["chrom"].notna().all() and g.snps["pos"].notna().all()
    assert g.report["n_duplicate_snp_ids_renamed"] > 0


@_need("donors/onek1k_bcells_100donors_dosage.csv.gz")
def test_real_onek1k_bcells_dosage_table():
    b = read_genotypes(DATA / "donors/onek1k_bcells_100donors_dosage.csv.gz",
                       orientation="snps_x_donors", duplicate_snps="make_unique")
    assert b.n_donors == 100 and b.n_snps == 2406
    assert "gene_name" in b.snps.columns
