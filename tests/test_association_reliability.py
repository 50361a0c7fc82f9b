"""No silent wrong answers in ``associate`` (issue 11, cases 1 and 2).

1. Donor ids that half-match (``1`` vs ``01``, case, whitespace, FID_IID) are refused
   with counts, examples and a formatting hint, unless asked for explicitly; p-values
   are calibrated at every donor / covariate count that is accepted (exact F-test
   below the LRT's range), and the rest is refused with a message that says why.
2. A kinship computed from too few SNPs (that are also the tested SNPs) is refused with
   the fix; leave-one-chromosome-out is the default on several chromosomes.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pyro_livi.analysis.association import associate_factors, genomic_inflation
from pyro_livi.analysis.associate_run import read_run_factors
from pyro_livi.data.genotypes import (Genotypes, compare_donor_ids, quality_control,
                                      read_genotypes)
from pyro_livi.data.kinship import kinship_from_genotypes
from pyro_livi.errors import InputError
from pyro_livi.paths import shared_data_dir

DONORS = shared_data_dir() / "donors"
DOSAGE40 = DONORS / "onek1k_40donors_dosage.csv.gz"
PCS40 = DONORS / "onek1k_40donors_genotype_pcs.csv"
need_onek1k40 = pytest.mark.skipif(not (DOSAGE40.exists() and PCS40.exists()),
                                   reason="shared OneK1K 40-donor files not present")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread(one_blas_thread):
    pass


def _geno(n=40, m=60, seed=0, donors=None, chroms=("1", "2")):
    rng = np.random.default_rng(seed)
    G = rng.binomial(2, rng.uniform(0.2, 0.5, m), size=(n, m)).astype(float)
    donors = donors or [f"d{i:03d}" for i in range(n)]
    chrom = np.repeat(chroms, -(-m // len(chroms)))[:m] if chroms else [None] * m
    snps = pd.DataFrame({"snp": [f"rs{j}" for j in range(m)], "chrom": chrom})
    return Genotypes(G, donors, snps, "geno.bed")


def _factors(index, k=3, seed=1):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(len(index), k)), index=index,
                        columns=[f"D_{j}" for j in range(k)])


# ------------------------------------------------------------------ 1a: donor ids


def test_leading_zero_ids_refused_with_hint_then_allowed():
    """fit writes donors 1..40 (integer donor column); the genotypes say 01..40: only
    10..40 match exactly. Refused although 31 of 40 match, because 9 ids differ only
    by formatting; allowed explicitly, the run uses the 31 and says so."""
    geno = _geno(donors=[f"{i:02d}" for i in range(1, 41)])
    F = _factors(list(range(1, 41)))                 # int ids, as pandas reads them
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, kinship="identity", progress=False)
    msg = str(err.value)
    assert "31 of the 40 donors of the factor table match the 40 donors" in msg
    assert "'1' vs '01' (leading zeros)" in msg and "9 unmatched ids" in msg
    assert "allow_partial_donor_match=True" in msg and "--allow-partial-donor-match" in msg
    assert err.value.source == "geno.bed" and err.value.field == "donor ids"
    res, rep = associate_factors(F, geno, kinship="identity", progress=False,
                                 allow_partial_donor_match=True)
    assert rep["donors"]["n_analysed"] == 31
    assert rep["donors"]["n_ids_differing_only_by_formatting"] == 9
    assert any("partial donor match allowed" in w for w in rep["warnings"])


def test_small_fraction_matched_refused():
    geno = _geno(n=40)
    ids = geno.donors[:12] + [f"other{i}" for i in range(18)]     # 12 of 30 = 40 %
    F = _factors(ids)
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, kinship="identity", progress=False)
    msg = str(err.value)
    assert "12 of the 30 donors" in msg and "at least 50%" in msg and "other0" in msg
    _, rep = associate_factors(F, geno, kinship="identity", progress=False,
                               allow_partial_donor_match=True)
    assert rep["donors"]["n_analysed"] == 12


@pytest.mark.parametrize("left, right, kind", [
    (["S1", "S2"], ["s1", "s2"], "case"),
    (["S1 ", "S2"], ["S1", " S2"], "whitespace"),
    (["FAM1_S1", "FAM2_S2"], ["S1", "S2"], "FID_IID form"),
    (["1", "2"], ["1.0", "2.0"], "integer written as a decimal"),
])
def test_formatting_kinds_named(left, right, kind):
    ids = left + [f"x{i}" for i in range(10)]
    other = right + [f"x{i}" for i in range(10)]
    with pytest.raises(InputError) as err:
        compare_donor_ids(ids, other, source="cov.tsv", what="the factor table",
                          other_what="the covariates")
    assert f"({kind})" in str(err.value) and "2 unmatched ids" in str(err.value)
    rep = compare_donor_ids(ids, other, source="cov.tsv", what="the factor table",
                            other_what="the covariates", allow_partial=True)
    assert rep["n_matched"] == 10 and rep["n_differing_only_by_formatting"] == 2


def test_unrelated_unmatched_ids_are_not_called_formatting():
    rep = compare_donor_ids(["samp_1", "samp_2", "a", "b"], ["samp_3", "a", "b"],
                            source="g", what="f", other_what="g")
    assert rep["n_differing_only_by_formatting"] == 0 and rep["n_matched"] == 2


def test_covariate_and_kinship_ids_checked():
    geno = _geno(n=40)
    F = _factors(geno.donors)
    cov = pd.DataFrame({"pc1": np.arange(40.0)},
                       index=[d.upper() if i < 5 else d for i, d in enumerate(geno.donors)])
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, kinship="identity", covariates=cov, progress=False)
    assert err.value.source == "covariates"
    assert "'d000' vs 'D000' (case)" in str(err.value)
    K = pd.DataFrame(np.eye(40), index=[d.replace("d0", "d") for d in geno.donors],
                     columns=[d.replace("d0", "d") for d in geno.donors])
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, kinship=K, progress=False)
    assert "differ from a kinship id only by formatting" in str(err.value)
    assert "leading zeros" in str(err.value)


# ------------------------------------------------------------------ 1b: donor / covariate counts


@pytest.mark.parametrize("n, n_cov, expect", [
    (9, 0, "needs at least 10"),
    (10, 5, "leave 3 residual degrees of freedom"),
    (20, 30, "no residual degrees of freedom"),
    (10, 30, "no residual degrees of freedom"),
    (36, 30, "leave 4 residual degrees of freedom"),
])
def test_too_few_donors_or_too_many_covariates_refused(n, n_cov, expect):
    geno = _geno(n=60)
    F = _factors(geno.donors[:n])
    rng = np.random.default_rng(2)
    cov = pd.DataFrame(rng.normal(size=(60, n_cov)), index=geno.donors,
                       columns=[f"PC{j}" for j in range(n_cov)]) if n_cov else None
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, kinship="identity", covariates=cov, progress=False)
    msg = str(err.value)
    assert expect in msg
    if "residual degrees of freedom (at least" in msg:
        assert f"use at most {n - 7} covariates" in msg


@pytest.fixture(scope="module")
def onek1k40():
    geno = read_genotypes(DOSAGE40, orientation="snps_x_donors", duplicate_snps="make_unique")
    pcs = pd.read_csv(PCS40, index_col=0)
    pcs.index = pcs.index.astype(str)
    q, _ = quality_control(geno)
    return q, pcs


def _null_run(q, pcs, n, n_cov, n_factors, seed, method="auto"):
    rng = np.random.default_rng(seed)
    donors = q.donors[:n]
    sub = q.subset(donors)
    K = pd.DataFrame(kinship_from_genotypes(sub.dosages), index=donors, columns=donors)
    snps = np.sort(rng.choice(q.n_snps, 16, replace=False))
    F = pd.DataFrame(rng.normal(size=(n, n_factors)), index=donors,
                     columns=[f"f{k}" for k in range(n_factors)])
    cov = pcs.loc[donors].iloc[:, :n_cov] if n_cov else None
    res, rep = associate_factors(F, sub.subset(snp_index=snps), kinship=K, covariates=cov,
                                 pvalue_method=method, progress=False)
    one = res.groupby("factor").sample(1, random_state=seed)["pvalue"]
    return genomic_inflation(res["pvalue"]), stats.kstest(one, "uniform").pvalue, rep


@need_onek1k40
@pytest.mark.slow
@pytest.mark.parametrize("n, n_cov", [(10, 0), (20, 0), (20, 5), (40, 0), (40, 5), (40, 30)])
def test_null_calibration_grid(onek1k40, n, n_cov):
    """Real (permuted) genotypes and PCs, random factors, the real kinship: lambda_gc
    and KS (one SNP per factor) at every accepted donor x covariate count; the
    combinations 10 x 5, 10 x 30 and 20 x 30 are refused (test above)."""
    q, pcs = onek1k40
    lam, ks, rep = _null_run(q, pcs, n, n_cov, 200, seed=n * 100 + n_cov)
    assert rep["pvalue_method"]["used"] == "f"        # all below the LRT's range
    assert 0.85 <= lam <= 1.15, lam
    assert ks > 0.01, ks


@need_onek1k40
@pytest.mark.parametrize("n, n_cov, lam_min", [(40, 30, 3.0), (20, 5, 1.3)])
def test_forced_lrt_is_inflated_where_auto_uses_f(onek1k40, n, n_cov, lam_min):
    """What the grid protects against: the asymptotic LRT on the same kind of data
    (expected inflation about n / df: 5.0 at 40 x 30, 1.54 at 20 x 5)."""
    q, pcs = onek1k40
    lam, ks, rep = _null_run(q, pcs, n, n_cov, 80, seed=7, method="lrt")
    assert rep["pvalue_method"]["used"] == "lrt"
    assert lam > lam_min
    if n_cov == 30:
        assert ks < 0.01


@need_onek1k40
def test_onek1k_40_donors_30_pcs_default_is_calibrated(onek1k40):
    """The issue's case: 40 donors, 30 genotype PCs, default settings. Before: lambda
    5.3 and 11,779 of 40,980 significant. Now: LOCO kinship, exact F-test, degenerate
    null models counted."""
    q, pcs = onek1k40
    rng = np.random.default_rng(40)
    F = pd.DataFrame(rng.normal(size=(40, 6)), index=q.donors,
                     columns=[f"D_{k}" for k in range(6)])
    res, rep = associate_factors(F, q, covariates=pcs, progress=False)
    assert rep["kinship"]["mode"] == "leave-one-chromosome-out"
    assert rep["pvalue_method"]["used"] == "f" and rep["pvalue_method"]["residual_df"] == 8
    assert 0.85 <= rep["lambda_gc"] <= 1.15, rep["lambda_gc"]
    assert rep["n_significant"] == 0
    assert "n_factors_with_degenerate_null_model" in rep["pvalue_method"]


def test_lrt_kept_with_many_donors_per_parameter():
    geno = _geno(n=120, m=30)
    F = _factors(geno.donors)
    _, rep = associate_factors(F, geno, kinship="identity", progress=False)
    assert rep["pvalue_method"]["used"] == "lrt"          # df 118 >= 50 x 2
    cov = pd.DataFrame({"a": np.arange(120.0)}, index=geno.donors)
    _, rep = associate_factors(F, geno, kinship="identity", covariates=cov, progress=False)
    assert rep["pvalue_method"]["used"] == "f"            # df 117 < 50 x 3


def test_identity_kinship_reports_no_degenerate_null_model():
    """With K = I the kinship and residual variances cannot be told apart: whichever split the
    null fit lands on, no factor is called degenerate nor switched to another test."""
    geno = _geno(n=40, m=30)
    for seed in range(3):
        F = _factors(geno.donors, seed=seed)
        _, rep = associate_factors(F, geno, kinship="identity", progress=False)
        assert rep["pvalue_method"]["n_factors_with_degenerate_null_model"] == 0
        assert rep["pvalue_method"]["factors_switched_to_f"] == []
        assert not any("degenerate" in w for w in rep["warnings"])


# ------------------------------------------------------------------ 2: kinship from few SNPs


def _planted(n=60, m=1, seed=3, beta=1.5, chroms=("1",)):
    geno = _geno(n=n, m=m, seed=seed, chroms=chroms)
    rng = np.random.default_rng(seed + 1)
    g = geno.dosages[:, 0]
    y = beta * (g - g.mean()) + rng.normal(size=n)
    return geno, pd.DataFrame({"D_0": y}, index=geno.donors)


@pytest.mark.parametrize("m, chroms", [(1, ("1",)), (20, ("1",)), (49, None)])
def test_kinship_from_few_tested_snps_refused(m, chroms):
    geno, F = _planted(m=m, chroms=chroms)
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, progress=False)
    msg = str(err.value)
    assert f"only {m} QC'd SNPs" in msg and "proximal contamination" in msg
    assert "--kinship FILE" in msg and "--kinship identity" in msg
    assert ("--loco" in msg) if chroms else ("chromosome" in msg)


def test_identity_kinship_keeps_the_planted_effect():
    """The issue's case: beta 1.5, 60 donors, one SNP. With a kinship from that SNP
    p was 0.21 (refused now); with the identity the effect is found."""
    geno, F = _planted(m=1)
    res, rep = associate_factors(F, geno, kinship="identity", progress=False)
    assert rep["kinship"]["mode"] == "identity"
    p_id = res["pvalue"].iloc[0]
    assert p_id < 1e-5 and res["significant"].iloc[0]
    # why the default is refused: the kinship of the tested SNP itself (given here
    # explicitly) absorbs the effect
    own = pd.DataFrame(kinship_from_genotypes(geno.dosages), index=geno.donors,
                       columns=geno.donors)
    p_own = associate_factors(F, geno, kinship=own, progress=False)[0]["pvalue"].iloc[0]
    assert p_own > 1e3 * p_id


def test_loco_default_on_small_snp_sets_power_and_calibration():
    """40 SNPs on two chromosomes (20 each): the default is leave-one-chromosome-out
    (each kinship from the other chromosome's 20 SNPs); power equals the identity
    kinship's order of magnitude and null factors are calibrated (with the all-SNP
    kinship of 18 SNPs lambda_gc was 0.28)."""
    geno, F = _planted(m=40, chroms=("1", "2"))
    res, rep = associate_factors(F, geno, progress=False)
    assert rep["kinship"]["mode"] == "leave-one-chromosome-out"
    assert rep["kinship"]["loco_chosen_by"].startswith("default")
    p_loco = res.set_index("snp").loc["rs0", "pvalue"]
    p_id = associate_factors(F, geno, kinship="identity", progress=False)[0] \
        .set_index("snp").loc["rs0", "pvalue"]
    assert p_loco < 1e-5 and p_loco < 1e2 * p_id
    rng = np.random.default_rng(8)
    N = pd.DataFrame(rng.normal(size=(60, 150)), index=geno.donors,
                     columns=[f"n{k}" for k in range(150)])
    null, rep = associate_factors(N, geno, progress=False)
    assert 0.85 <= genomic_inflation(null["pvalue"]) <= 1.15
    one = null.groupby("factor").sample(1, random_state=1)["pvalue"]
    assert stats.kstest(one, "uniform").pvalue > 0.01
    with pytest.raises(InputError, match="--no-loco"):
        associate_factors(F, geno, loco=False, progress=False)


def test_loco_kinship_needs_snps_on_other_chromosomes():
    geno, F = _planted(m=60, chroms=("1",) * 50 + ("2",) * 10)
    chrom = np.array(["1"] * 50 + ["2"] * 10)
    geno = Genotypes(geno.dosages, geno.donors, geno.snps.assign(chrom=chrom), "g.bed")
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, progress=False)
    assert "chromosome 1 would rest on the 10 QC'd SNPs" in str(err.value)


# ------------------------------------------------------------------ run directories, CLI


def _parser():
    from pyro_livi.commands.associate import register

    parser = argparse.ArgumentParser(prog="pyro-livi")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_run_without_donor_factors_refused(tmp_path, capsys):
    run = tmp_path / "scvi_run"
    run.mkdir()
    (run / "cell_state.tsv").write_text("cell\tz0\nc1\t0.1\n")
    with pytest.raises(InputError) as err:
        read_run_factors(run)
    msg = str(err.value)
    assert err.value.field == "--run" and "only donor models have donor factors" in msg
    for name in ("LIVI", "MultiSLIVI", "DMLIVI", "livi", "multislivi", "dmlivi"):
        assert name in msg
    geno = _geno(n=40, m=60)
    geno_table = pd.DataFrame(geno.dosages.T, columns=geno.donors)
    geno_table.insert(0, "snp_id", geno.snps["snp"])
    geno_table.to_csv(tmp_path / "g.csv", index=False)
    args = _parser().parse_args(["associate", "--run", str(run), "--genotypes",
                                 str(tmp_path / "g.csv"), "--dosage-orientation",
                                 "snps_x_donors", "--out", str(tmp_path / "r.tsv"),
                                 "--quiet"])
    assert args.func(args) == 2
    assert "--run" in capsys.readouterr().err


def test_cli_half_matching_ids_then_flags(tmp_path, capsys):
    geno = _geno(n=40, m=60, donors=[f"{i:02d}" for i in range(1, 41)])
    run = tmp_path / "run"
    run.mkdir()
    _factors(list(range(1, 41))).to_csv(run / "D.tsv", sep="\t")
    table = pd.DataFrame(geno.dosages.T, columns=geno.donors)
    table.insert(0, "snp_id", geno.snps["snp"])
    table.to_csv(tmp_path / "g.csv", index=False)
    base = ["associate", "--run", str(run), "--genotypes", str(tmp_path / "g.csv"),
            "--dosage-orientation", "snps_x_donors", "--no-plots", "--quiet",
            "--out", str(tmp_path / "r.tsv")]
    args = _parser().parse_args(base)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "'1' vs '01' (leading zeros)" in err and "--allow-partial-donor-match" in err
    args = _parser().parse_args(base + ["--allow-partial-donor-match", "--kinship",
                                        "identity", "--pvalue-method", "f"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "donors analysed: 31" in out and "p-values: f" in out
    assert "warning: partial donor match allowed" in out
    assert _parser().parse_args(base + ["--no-loco"]).loco is False
    assert _parser().parse_args(base).loco is None


def test_summary_names_the_test_of_factors_with_a_degenerate_null_model():
    from pyro_livi.commands.associate import summary

    geno = _geno(n=40, m=30)
    _, rep = associate_factors(_factors(geno.donors), geno, kinship="identity", progress=False)
    rep["pvalue_method"]["n_factors_with_degenerate_null_model"] = 2
    for requested, test in (("auto", "the exact F-test"), ("lrt", "the likelihood-ratio test, as --pvalue-method lrt")):
        rep["pvalue_method"]["requested"] = requested
        line = next(s for s in summary(rep).splitlines() if "degenerate" in s)
        assert f"2 of 3 factors (their p-values from {test}" in line
