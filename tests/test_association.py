"""Association of donor factors with genotypes: agreement with direct glimix-core calls,
closed forms, multiple testing, bad input, plots and the ``associate`` command."""

from __future__ import annotations

import argparse
import json

import jsonschema
import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from bed_reader import to_bed
from scipy import stats

from pyro_livi.analysis.association import (
    RESULT_COLUMNS,
    SNP_COLUMNS,
    KinshipBasis,
    adjust_pvalues,
    associate_factors,
    fit_null_model,
    genomic_inflation,
    inverse_normal_transform,
    scan_block,
    storey_pi0,
    storey_qvalues,
)
from pyro_livi.analysis.gwas_plots import manhattan_plot, qq_plot
from pyro_livi.data.genotypes import Genotypes, PlinkReader, quality_control
from pyro_livi.data.kinship import kinship_from_genotypes
from pyro_livi.errors import InputError


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread(one_blas_thread):
    pass


def results_schema() -> dict:
    from importlib import resources

    return json.loads((resources.files("pyro_livi") / "data_schemas" /
                       "association_results.schema.json").read_text())


def validate_results_tsv(path) -> pd.DataFrame:
    """Read a results TSV and check it row by row against the JSON schema."""
    schema = results_schema()
    table = pd.read_csv(path, sep="\t", dtype={"factor": str, "snp": str, "chrom": str,
                                                "allele_1": str, "allele_2": str})
    assert list(table.columns) == schema["x-columns"]
    validator = jsonschema.Draft202012Validator(schema)
    for row in table.to_dict("records"):
        # an empty cell (NaN when read) is JSON null
        row = {k: (bool(v) if k == "significant" else
                   None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        errors = list(validator.iter_errors(row))
        assert not errors, (row, errors[0].message)
    assert table["significant"].dtype == bool
    return table


# ---------------------------------------------------------------------------- fixtures


def make_data(n=60, m=150, n_factors=3, n_cov=2, seed=0, chroms=("1",)):
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.2, 0.5, m)
    G = rng.binomial(2, freq, size=(n, m)).astype(float)
    donors = [f"d{i:03d}" for i in range(n)]
    chrom = np.repeat(chroms, -(-m // len(chroms)))[:m]
    snps = pd.DataFrame({"snp": [f"rs{j}" for j in range(m)], "chrom": chrom,
                         "pos": np.arange(m) * 1000.0 + 1})
    geno = Genotypes(G, donors, snps, "synthetic")
    F = pd.DataFrame(rng.normal(size=(n, n_factors)), index=donors,
                     columns=[f"D_{k}" for k in range(n_factors)])
    F["D_0"] += 1.5 * (G[:, 3] - G[:, 3].mean())
    cov = pd.DataFrame(rng.normal(size=(n, n_cov)) * [1.0, 30.0][:n_cov] + [0, 50][:n_cov],
                       index=donors, columns=["pc1", "age"][:n_cov])
    Kg = kinship_from_genotypes(rng.binomial(2, 0.3, size=(n, 400)).astype(float))
    K = pd.DataFrame(Kg, index=donors, columns=donors)
    return geno, F, cov, K


def direct_glimix(y, C, K, G):
    """The reference computation with glimix-core, written out.

    As documented in associate_factors: the factor is divided by its sd, covariates are
    standardised, the intercept's null-space direction of a centred kinship gets
    variance 1 (K + 1 1^T / n), null model by ML, candidates by the fast scanner, the
    LRT against the scanner's null lml; standard errors from the single-SNP ``scan``.
    """
    from glimix_core.lmm import LMM
    from numpy_sugar.linalg import economic_qs

    n = len(y)
    sd = np.std(y)
    ys = y / sd
    Cs = (C - C.mean(axis=0)) / C.std(axis=0)
    M = np.column_stack([np.ones(n), Cs])
    QS = economic_qs(K + np.ones((n, n)) / n)
    lmm = LMM(ys, M, QS, restricted=False)
    lmm.fit(verbose=False)
    scanner = lmm.get_fast_scanner()
    r = scanner.fast_scan(G, verbose=False)
    lml0 = scanner.null_lml()
    p = stats.chi2(1).sf(np.clip(2 * (r["lml"] - lml0), 0, None))
    se = np.array([scanner.scan(G[:, [j]])["effsizes1_se"][0] for j in range(G.shape[1])])
    return {"pvalue": p, "beta": r["effsizes1"] * sd, "se": se * sd,
            "fast_scan_se": r["effsizes1_se"] * sd, "lml0": lml0}


# ---------------------------------------------------------------------------- glimix-core


@pytest.mark.parametrize("n_cov", [0, 2])
def test_equals_direct_glimix_core(n_cov):
    geno, F, cov, K = make_data(n_cov=max(n_cov, 1))
    covariates = cov if n_cov else None
    res, rep = associate_factors(F, geno, kinship=K, covariates=covariates,
                                 pvalue_method="lrt", progress=False)
    assert rep["pvalue_method"]["used"] == "lrt"
    assert rep["kinship"]["intercept_null_space_directions_given_variance"] == 1
    tested = res["snp"].unique()
    cols = [geno.snps["snp"].tolist().index(s) for s in tested]
    Gt = geno.dosages[:, cols]
    C = cov.to_numpy() if n_cov else np.empty((len(F), 0))
    for factor in F.columns:
        ref = direct_glimix(F[factor].to_numpy(), C, K.to_numpy(), Gt)
        got = res[res["factor"] == factor]
        assert got["snp"].tolist() == list(tested)
        np.testing.assert_allclose(got["pvalue"], ref["pvalue"], rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(got["beta"], ref["beta"], rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(got["se"], ref["se"], rtol=1e-8, atol=1e-8)
        if n_cov == 0:   # single covariate: glimix-core's fast_scan se is right
            np.testing.assert_allclose(got["se"], ref["fast_scan_se"], rtol=1e-8)
    assert res.loc[res["factor"] == "D_0"].set_index("snp").loc["rs3", "significant"]


def test_glimix_fast_scan_se_lacks_scale_with_covariates():
    """glimix-core 3.1.14 ``fast_scan`` leaves the scale out of effsizes1_se when there
    is more than one covariate; the scan here follows the single-SNP ``scan``."""
    geno, F, cov, K = make_data()
    C = cov.to_numpy()
    ref = direct_glimix(F["D_0"].to_numpy(), C, K.to_numpy(), geno.dosages[:, :10])
    scale_ratio = ref["fast_scan_se"] / ref["se"]
    assert np.abs(scale_ratio - 1).max() > 0.05           # the upstream discrepancy
    Cs = (C - C.mean(0)) / C.std(0)
    M = np.column_stack([np.ones(len(C)), Cs])
    basis = KinshipBasis(K.to_numpy(), M)
    model = fit_null_model(F["D_0"].to_numpy(), M, basis)
    r = scan_block(model, basis.rotate(geno.dosages[:, :10]))
    np.testing.assert_allclose(ref["fast_scan_se"] / r["se"], 1 / np.sqrt(r["scale"]),
                               rtol=1e-8)
    # the null lml computed here equals glimix-core's for well-conditioned covariates
    assert model.lml0 == pytest.approx(model.scanner.null_lml(), abs=1e-9)


def test_centred_identity_kinship_equals_ols():
    """K = I - 11'/n (Gower-normalised, centred): the kinship and residual variances are
    one variance on the contrasts, so the LMM test is the OLS likelihood-ratio test."""
    geno, F, cov, _ = make_data(n=50, m=40)
    n = geno.n_donors
    Kc = np.eye(n) - np.ones((n, n)) / n
    K = pd.DataFrame(Kc, index=geno.donors, columns=geno.donors)
    res, _ = associate_factors(F, geno, kinship=K, covariates=cov, maf=0.0,
                               pvalue_method="lrt", progress=False)
    # the exact small-sample test: statsmodels' OLS t-test (= F-test) of the SNP
    res_f, rep_f = associate_factors(F, geno, kinship=K, covariates=cov, maf=0.0,
                                     progress=False)
    assert rep_f["pvalue_method"]["used"] == "f"            # 50 donors: auto -> F
    res_i, _ = associate_factors(F, geno, kinship="identity", covariates=cov, maf=0.0,
                                 progress=False)
    X0 = sm.add_constant(cov.to_numpy())
    for factor in F.columns:
        y = F[factor].to_numpy()
        got = res[res["factor"] == factor].set_index("snp")
        got_f = res_f[res_f["factor"] == factor].set_index("snp")
        got_i = res_i[res_i["factor"] == factor].set_index("snp")
        f0 = sm.OLS(y, X0).fit()
        for j, snp in enumerate(geno.snps["snp"]):
            if snp not in got.index:
                continue
            f1 = sm.OLS(y, np.column_stack([X0, geno.dosages[:, j]])).fit()
            p = stats.chi2(1).sf(2 * (f1.llf - f0.llf))
            assert got.loc[snp, "pvalue"] == pytest.approx(p, rel=1e-7, abs=1e-10)
            assert got.loc[snp, "beta"] == pytest.approx(f1.params[-1], rel=1e-7)
            for g in (got_f, got_i):
                assert g.loc[snp, "pvalue"] == pytest.approx(f1.pvalues[-1], rel=1e-6,
                                                             abs=1e-12)
                assert g.loc[snp, "beta"] == pytest.approx(f1.params[-1], rel=1e-7)
                assert g.loc[snp, "se"] == pytest.approx(f1.bse[-1], rel=1e-6)


def test_centred_kinship_likelihood_bounded_with_intercept_variance():
    """With K 1 = 0 and an intercept, the ML likelihood grows without bound as the
    residual variance goes to 0; K + 1 1'/n (KinshipBasis) keeps it bounded."""
    from glimix_core.lmm import LMM
    from numpy_sugar.linalg import economic_qs

    rng = np.random.default_rng(0)
    n = 60
    K = kinship_from_genotypes(rng.binomial(2, 0.3, size=(n, 2000)).astype(float))
    y, M = rng.normal(size=n), np.ones((n, 1))

    def lml_at(QS, delta):
        lmm = LMM(y, M, QS, restricted=False)
        lmm.delta = delta
        lmm.fix("delta")
        lmm.fit(verbose=False)
        return lmm.lml()

    raw = [lml_at(economic_qs(K), d) for d in (0.5, 1e-6, 1e-12, 1e-15)]
    assert np.all(np.diff(raw) > 1.0)                     # unbounded towards v1 = 0
    basis = KinshipBasis(K, M)
    assert basis.n_null_fixed_directions == 1
    np.testing.assert_allclose(basis.K, K + np.ones((n, n)) / n)
    fixed = [lml_at(basis.QS, d) for d in (0.5, 1e-6, 1e-12, 1e-15)]
    assert max(fixed[1:]) < fixed[0]


def test_invariant_to_factor_and_covariate_scale():
    geno, F, cov, K = make_data()
    res, _ = associate_factors(F, geno, kinship=K, covariates=cov, progress=False)
    cov2 = cov.assign(age=cov["age"] * 365.25 + 7)
    res2, _ = associate_factors(F * 1e-6, geno, kinship=K, covariates=cov2, progress=False)
    np.testing.assert_allclose(res2["pvalue"], res["pvalue"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res2["beta"], res["beta"] * 1e-6, rtol=1e-6)
    np.testing.assert_allclose(res2["se"], res["se"] * 1e-6, rtol=1e-6)


def test_inverse_normal_on_analysed_donors():
    geno, F, cov, K = make_data()
    extra = pd.DataFrame([[50.0, -3.0, 7.0]], index=["no_genotypes"], columns=F.columns)
    res, rep = associate_factors(pd.concat([F, extra]), geno, kinship=K,
                                 inverse_normal=True, progress=False)
    assert rep["factors"]["inverse_normal"]
    pre = F.apply(lambda col: inverse_normal_transform(col.to_numpy()))
    ref, _ = associate_factors(pre, geno, kinship=K, progress=False)
    pd.testing.assert_frame_equal(res, ref, check_exact=False, rtol=1e-8)


def test_computed_kinship_chunks_and_disk(tmp_path):
    geno, F, cov, _ = make_data(chroms=("1", "2"))
    # loco=False: the all-SNP kinship (the default on two chromosomes is LOCO)
    res, rep = associate_factors(F, geno, covariates=cov, chunk_size=1000, loco=False,
                                 progress=False)
    q, _ = quality_control(geno)
    K = pd.DataFrame(kinship_from_genotypes(q.dosages), index=geno.donors,
                     columns=geno.donors)
    res_k, _ = associate_factors(F, geno, kinship=K, covariates=cov, progress=False)
    pd.testing.assert_frame_equal(res, res_k, check_exact=False, rtol=1e-8)
    assert rep["kinship"]["n_snps_used"] == rep["snp_qc"]["n_snps_kept"]
    res_c, _ = associate_factors(F, geno, covariates=cov, chunk_size=7, loco=False,
                                 progress=False)
    pd.testing.assert_frame_equal(res, res_c, check_exact=False, rtol=1e-8)
    props = {"iid": geno.donors, "sid": geno.snps["snp"].tolist(),
             "chromosome": geno.snps["chrom"].tolist(),
             "bp_position": geno.snps["pos"].astype(int).tolist()}
    to_bed(tmp_path / "g.bed", geno.dosages.astype(np.float32), properties=props)
    with PlinkReader(tmp_path / "g") as reader:
        res_d, _ = associate_factors(F, reader, covariates=cov, chunk_size=11,
                                     loco=False, progress=False)
    same = RESULT_COLUMNS + ["chrom", "pos", "maf"]  # the .bim adds alleles the array lacks
    pd.testing.assert_frame_equal(res[same], res_d[same], check_exact=False, rtol=1e-8)


def test_loco_equals_other_chromosome_kinship():
    geno, F, cov, _ = make_data(m=120, chroms=("1", "2", "3"))
    res, rep = associate_factors(F, geno, covariates=cov, loco=True, progress=False)
    assert rep["kinship"]["mode"] == "leave-one-chromosome-out"
    q, _ = quality_control(geno)
    chrom = q.snps["chrom"].to_numpy()
    for c in ("1", "2", "3"):
        K = kinship_from_genotypes(q.dosages[:, chrom != c])
        Kdf = pd.DataFrame(K, index=geno.donors, columns=geno.donors)
        sub = geno.subset(snp_index=np.flatnonzero(geno.snps["chrom"].to_numpy() == c))
        ref, _ = associate_factors(F, sub, kinship=Kdf, covariates=cov, fdr=0.05,
                                   progress=False)
        got = res[res["snp"].isin(ref["snp"])].reset_index(drop=True)
        np.testing.assert_allclose(got["pvalue"], ref["pvalue"], rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(got["beta"], ref["beta"], rtol=1e-8)
    assert res["snp"].tolist()[:120 // 3] == [s for s in q.snps["snp"]][:120 // 3]
    with pytest.raises(InputError, match="at least two"):
        associate_factors(F, geno.subset(snp_index=slice(0, 40)), loco=True, progress=False)


# ---------------------------------------------------------------------------- statistics


def test_inverse_normal_transform_blom():
    x = np.array([3.0, 1.0, 2.0, 2.0])
    ranks = np.array([4.0, 1.0, 2.5, 2.5])
    np.testing.assert_allclose(inverse_normal_transform(x),
                               stats.norm.ppf((ranks - 3 / 8) / (4 + 1 / 4)))
    z = inverse_normal_transform(np.random.default_rng(0).exponential(size=1001))
    assert z[np.argsort(z)][500] == pytest.approx(0.0, abs=1e-12)


def test_genomic_inflation_closed_form():
    chi = np.array([0.1, 0.5, stats.chi2.ppf(0.5, 1) * 1.3, 5.0, 9.0])
    assert genomic_inflation(stats.chi2.sf(chi, 1)) == pytest.approx(1.3)
    u = (np.arange(1, 100001) - 0.5) / 100000
    assert genomic_inflation(u) == pytest.approx(1.0, abs=1e-3)


def test_bh_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5, 0.2])
    order = np.argsort(p)
    m = len(p)
    raw = p[order] * m / np.arange(1, m + 1)
    adj_sorted = np.minimum.accumulate(raw[::-1])[::-1].clip(max=1)
    expected = np.empty(m)
    expected[order] = adj_sorted
    got, info = adjust_pvalues(p, "bh")
    np.testing.assert_allclose(got, expected)
    from statsmodels.stats.multitest import multipletests

    np.testing.assert_allclose(got, multipletests(p, method="fdr_bh")[1])


def test_storey_pi0_and_qvalues_by_hand():
    p = np.array([0.001, 0.004, 0.02, 0.03, 0.12, 0.21, 0.33, 0.38, 0.47, 0.52, 0.56,
                  0.61, 0.68, 0.74, 0.79, 0.83, 0.88, 0.91, 0.96, 0.99])
    m = p.size
    lam = [0.05 * k for k in range(1, 20)]
    pi0_l, W = [], []
    for l in lam:
        w = sum(1 for x in p if x >= l - 1e-12)
        W.append(w)
        pi0_l.append(w / (m * (1 - l)))
    q10 = np.quantile(pi0_l, 0.1)
    mse = [w / (m ** 2 * (1 - l) ** 2) * (1 - w / m) + (pl - q10) ** 2
           for w, l, pl in zip(W, lam, pi0_l)]
    best = min(pl for pl, e in zip(pi0_l, mse) if e == min(mse))
    assert storey_pi0(p) == pytest.approx(min(best, 1.0))
    q, info = storey_qvalues(p)
    assert info["pi0"] == pytest.approx(storey_pi0(p))
    np.testing.assert_allclose(q, info["pi0"] * adjust_pvalues(p, "bh")[0])
    # large-sample behaviour: uniform -> pi0 ~ 1; half signal -> pi0 ~ 0.5
    rng = np.random.default_rng(3)
    assert storey_pi0(rng.uniform(size=20000)) == pytest.approx(1.0, abs=0.03)
    mix = np.concatenate([rng.uniform(size=10000), rng.uniform(0, 1e-4, size=10000)])
    assert storey_pi0(mix) == pytest.approx(0.5, abs=0.03)
    # too few large p-values: falls back to pi0 = 1 (BH) and says so
    q, info = storey_qvalues(np.array([0.001, 0.01, 0.2]))
    assert info["pi0"] == 1.0 and "Benjamini-Hochberg" in info["pi0_note"]


def test_storey_in_associate():
    geno, F, cov, K = make_data()
    res_bh, _ = associate_factors(F, geno, kinship=K, progress=False)
    res_st, rep = associate_factors(F, geno, kinship=K, fdr_method="storey", progress=False)
    pi0 = rep["multiple_testing"]["pi0"]
    np.testing.assert_allclose(res_st["padj"], pi0 * res_bh["padj"])
    assert rep["multiple_testing"]["over"] == "all factor x SNP pairs together"


# ---------------------------------------------------------------------------- bad input


def test_donor_mismatch_reported_and_excluded():
    geno, F, cov, K = make_data()
    extra = pd.DataFrame(np.random.default_rng(9).normal(size=(2, F.shape[1])),
                         index=["ghost1", "ghost2"], columns=F.columns)
    F2 = pd.concat([F.iloc[5:], extra])
    res, rep = associate_factors(F2, geno, kinship=K, progress=False)
    assert rep["donors"]["factor_donors_without_genotypes"] == ["ghost1", "ghost2"]
    assert rep["donors"]["n_genotyped_donors_without_factors"] == 5
    assert rep["donors"]["n_analysed"] == len(F) - 5
    ref, _ = associate_factors(F.iloc[5:], geno, kinship=K, progress=False)
    pd.testing.assert_frame_equal(res, ref)
    with pytest.raises(InputError) as err:
        associate_factors(extra, geno, kinship=K, progress=False)
    assert "ghost1" in str(err.value) and "d000" in str(err.value)


def test_covariate_donors_mismatch_reported():
    geno, F, cov, K = make_data()
    res, rep = associate_factors(F, geno, kinship=K, covariates=cov.iloc[3:],
                                 progress=False)
    assert rep["covariates"]["donors_without_covariates_excluded"] == ["d000", "d001",
                                                                        "d002"]
    ref, _ = associate_factors(F.iloc[3:], geno, kinship=K, covariates=cov,
                               progress=False)
    pd.testing.assert_frame_equal(res, ref)
    assert ref.equals(res)


def test_covariates_with_nan_named():
    geno, F, cov, K = make_data()
    cov = cov.copy()
    cov.loc["d004", "age"] = np.nan
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, kinship=K, covariates=cov, progress=False)
    assert "'age'" in str(err.value) and "d004" in str(err.value)


def test_non_numeric_covariates_say_how_to_encode():
    geno, F, cov, K = make_data()
    cov = cov.assign(sex=np.where(np.arange(len(cov)) % 2, "F", "M"))
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, kinship=K, covariates=cov, progress=False)
    assert "sex" in str(err.value) and "get_dummies" in str(err.value)


def test_constant_covariate_refused():
    geno, F, cov, K = make_data()
    with pytest.raises(InputError, match="constant"):
        associate_factors(F, geno, kinship=K, covariates=cov.assign(batch=1.0),
                          progress=False)


def test_too_few_donors_for_covariates():
    geno, F, cov, K = make_data(n=60)
    wide = pd.DataFrame(np.random.default_rng(1).normal(size=(60, 3)), index=F.index,
                        columns=["a", "b", "c"])
    with pytest.raises(InputError) as err:
        associate_factors(F.iloc[:5], geno, kinship=K, covariates=wide, progress=False)
    assert "5 analysed donors for 3 covariates" in str(err.value)


def test_zero_variance_factor_excluded():
    geno, F, cov, K = make_data()
    F = F.assign(D_9=2.5)
    res, rep = associate_factors(F, geno, kinship=K, progress=False)
    assert "D_9" not in set(res["factor"])
    assert rep["factors"]["excluded"] == [{"factor": "D_9",
                                           "reason": "zero variance on the analysed donors"}]
    assert rep["factors"]["tested"] == ["D_0", "D_1", "D_2"]


def test_factor_with_missing_value_named():
    geno, F, cov, K = make_data()
    F = F.copy()
    F.loc["d007", "D_1"] = np.nan
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, kinship=K, progress=False)
    assert "D_1" in str(err.value) and "d007" in str(err.value)


def test_bad_kinship_refused():
    geno, F, cov, K = make_data()
    with pytest.raises(InputError, match="not square"):
        associate_factors(F, geno, kinship=K.iloc[:, :-1], progress=False)
    asym = K.copy()
    asym.iloc[0, 1] += 0.2
    with pytest.raises(InputError, match="not symmetric"):
        associate_factors(F, geno, kinship=asym, progress=False)
    w, V = np.linalg.eigh(K.to_numpy())
    w[0] = -1.0
    neg = pd.DataFrame(V @ np.diag(w) @ V.T, index=K.index, columns=K.columns)
    with pytest.raises(InputError, match="not positive semi-definite"):
        associate_factors(F, geno, kinship=neg, progress=False)
    with pytest.raises(InputError) as err:
        associate_factors(F, geno, kinship=K.iloc[2:, 2:], progress=False)
    assert "d000" in str(err.value) and "d001" in str(err.value)
    with pytest.raises(InputError, match="ordered as factors.index"):
        associate_factors(F, geno, kinship=K.to_numpy()[:5, :5], progress=False)
    with pytest.raises(InputError, match="drop one"):
        associate_factors(F, geno, kinship=K, loco=True, progress=False)


def test_options_checked():
    geno, F, cov, K = make_data()
    with pytest.raises(InputError, match="fdr_method"):
        associate_factors(F, geno, kinship=K, fdr_method="bonferroni", progress=False)
    with pytest.raises(InputError, match="fdr"):
        associate_factors(F, geno, kinship=K, fdr=1.5, progress=False)
    nochrom = Genotypes(geno.dosages, geno.donors, geno.snps[["snp"]], "x")
    with pytest.raises(InputError, match="chromosome unknown"):
        associate_factors(F, nochrom, loco=True, progress=False)


# ---------------------------------------------------------------------------- outputs


def test_results_table_and_schema(tmp_path):
    geno, F, cov, K = make_data()
    res, rep = associate_factors(F, geno, kinship=K, covariates=cov, progress=False)
    assert RESULT_COLUMNS == ["factor", "snp", "beta", "se", "pvalue", "padj", "significant"]
    assert SNP_COLUMNS == ["chrom", "pos", "allele_1", "allele_2", "maf"]
    assert list(res.columns) == RESULT_COLUMNS + SNP_COLUMNS
    assert results_schema()["x-columns"] == RESULT_COLUMNS + SNP_COLUMNS
    assert rep["n_tests"] == len(res) == 3 * rep["snp_qc"]["n_snps_kept"]
    assert rep["n_significant"] == int((res["padj"] < 0.05).sum())
    res.to_csv(tmp_path / "r.tsv", sep="\t", index=False)
    back = validate_results_tsv(tmp_path / "r.tsv")
    pd.testing.assert_frame_equal(back[RESULT_COLUMNS], res[RESULT_COLUMNS], check_exact=False,
                                  rtol=1e-12)
    assert back["chrom"].tolist() == res["chrom"].tolist()
    assert back["pos"].tolist() == res["pos"].astype(float).tolist()
    np.testing.assert_allclose(back["maf"], res["maf"], rtol=1e-12)
    assert back["allele_1"].isna().all() and res["allele_1"].isna().all()  # none in the input
    broken = res.copy()
    broken.loc[0, "pvalue"] = 1.5
    broken.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(AssertionError):
        validate_results_tsv(tmp_path / "bad.tsv")


def test_results_carry_chromosome_position_alleles_and_maf():
    """Annotation from the genotypes' SNP table (as a PLINK .bim gives it), MAF of the
    dosages tested (analysed donors only: the factor table lacks five genotyped donors)."""
    geno, F, cov, K = make_data(m=60, chroms=("1", "2"))
    snps = geno.snps.assign(allele_1=[f"A{j}" for j in range(60)], allele_2="G")
    geno = Genotypes(geno.dosages, geno.donors, snps, "synthetic")
    F = F.iloc[5:]
    res, _ = associate_factors(F, geno, kinship="identity", progress=False)
    assert list(res.columns[:7]) == RESULT_COLUMNS and list(res.columns[7:]) == SNP_COLUMNS
    by_snp = res.drop_duplicates("snp").set_index("snp")
    j = 7
    assert by_snp.loc[f"rs{j}", "chrom"] == snps.loc[j, "chrom"]
    assert by_snp.loc[f"rs{j}", "pos"] == int(snps.loc[j, "pos"])
    assert (by_snp.loc[f"rs{j}", "allele_1"], by_snp.loc[f"rs{j}", "allele_2"]) == ("A7", "G")
    freq = geno.dosages[5:, j].mean() / 2
    assert by_snp.loc[f"rs{j}", "maf"] == pytest.approx(min(freq, 1 - freq))
    assert res["maf"].between(0.0, 0.5).all()
    # a dosage table's ALT / REF columns give the counted / other allele
    snps2 = geno.snps.drop(columns=["allele_1", "allele_2"]).assign(REF="C", ALT="T")
    res2, _ = associate_factors(F, Genotypes(geno.dosages, geno.donors, snps2, "t"),
                                kinship="identity", progress=False)
    assert set(res2["allele_1"]) == {"T"} and set(res2["allele_2"]) == {"C"}


def test_manhattan_chromosome_labels_never_overlap():
    """23 chromosomes where chromosome 1 spans nearly the whole axis: the labels of the
    small ones would sit on top of each other; the kept labels' rendered extents do not
    overlap, the first chromosome keeps its label, and the axis says labels were thinned."""
    from pyro_livi.analysis.gwas_plots import manhattan_figure

    chroms = [str(c) for c in range(1, 23)] + ["X"]
    rows = [(f"{c}:{k}", c, (k + 1) * (1e6 if c == "1" else 10.0))
            for c in chroms for k in range(200 if c == "1" else 3)]
    snps = pd.DataFrame(rows, columns=["snp", "chrom", "pos"])
    res = pd.DataFrame({"factor": "D_0", "snp": snps["snp"],
                        "pvalue": np.random.default_rng(0).uniform(size=len(snps)),
                        "significant": False})
    for frame in (snps, snps.assign(pos=1.0 + np.arange(len(snps)) * 1e5)):  # crowded, even
        fig = manhattan_figure(res, frame)
        ax = fig.axes[0]
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        shown = [t for t in ax.get_xticklabels() if t.get_text()]
        boxes = sorted((t.get_window_extent(renderer) for t in shown), key=lambda b: b.x0)
        assert len(shown) >= 2 and shown[0].get_text() == "1"
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 <= right.x0, (left, right)
        if frame is snps:
            assert len(shown) < len(chroms) and "thinned" in ax.get_xlabel()


def test_plots(tmp_path):
    geno, F, cov, K = make_data(chroms=("1", "2", "X"))
    res, rep = associate_factors(F, geno, kinship=K, progress=False)
    for snps, name in ((geno.snps, "m1.png"), (geno.snps[["snp"]], "m2.png")):
        out = manhattan_plot(res, snps, tmp_path / name)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = qq_plot(res["pvalue"], tmp_path / "qq.png", rep["lambda_gc"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- the command


def _parser():
    from pyro_livi.commands.associate import register

    parser = argparse.ArgumentParser(prog="pyro-livi")
    register(parser.add_subparsers(dest="command"))
    return parser


def _run_dir(tmp_path):
    geno, F, cov, _ = make_data(n=40, m=60, n_factors=3, chroms=("1", "2"))
    run = tmp_path / "run"
    run.mkdir()
    F.to_csv(run / "D.tsv", sep="\t")
    V = pd.DataFrame(np.random.default_rng(5).normal(size=(40, 2)), index=F.index,
                     columns=["V_0", "V_1"])
    V.iloc[::-1].to_csv(run / "V.tsv", sep="\t")        # another row order: aligned by id
    cov.to_csv(tmp_path / "cov.tsv", sep="\t")
    props = {"iid": geno.donors, "sid": geno.snps["snp"].tolist(),
             "chromosome": geno.snps["chrom"].tolist(),
             "bp_position": geno.snps["pos"].astype(int).tolist()}
    to_bed(tmp_path / "geno.bed", geno.dosages.astype(np.float32), properties=props)
    return run, geno


def test_cli_end_to_end(tmp_path, capsys):
    run, geno = _run_dir(tmp_path)
    out = tmp_path / "res" / "assoc.tsv"  # its folder does not exist: created, as fit does
    args = _parser().parse_args([
        "associate", "--run", str(run), "--genotypes", str(tmp_path / "geno"),
        "--covariates", str(tmp_path / "cov.tsv"), "--fdr-method", "storey", "--loco",
        "--quiet", "--out", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "tests: 300 (5 factors x 60 SNPs)" in text and "lambda_gc" in text
    table = validate_results_tsv(out)
    assert set(table["factor"]) == {"D_0", "D_1", "D_2", "V_0", "V_1"}
    row = table.set_index(["factor", "snp"]).loc[("D_0", "rs3")]  # the .bim's annotation
    assert (row["chrom"], row["pos"]) == ("1", 3001) and row["allele_1"] and row["allele_2"]
    freq = geno.dosages[:, 3].mean() / 2
    assert row["maf"] == pytest.approx(min(freq, 1 - freq))
    for suffix in ("_manhattan.png", "_qq.png"):
        assert (tmp_path / "res" / f"assoc{suffix}").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "res" / "assoc_report.json").read_text())
    assert report["n_tests"] == 300 and report["options"]["fdr_method"] == "storey"
    assert report["kinship"]["mode"] == "leave-one-chromosome-out"
    assert len(report["inputs"]["factor_files"]) == 2


def test_cli_bad_input_message(tmp_path, capsys):
    run, geno = _run_dir(tmp_path)
    table = pd.DataFrame(geno.dosages.T, columns=geno.donors)
    table.insert(0, "snp_id", geno.snps["snp"])
    table.to_csv(tmp_path / "dos.csv.gz", index=False)
    args = _parser().parse_args([  # the orientation is detected, and said
        "associate", "--run", str(run), "--genotypes", str(tmp_path / "dos.csv.gz"),
        "--no-plots", "--out", str(tmp_path / "r.tsv"), "--quiet"])
    assert args.func(args) == 0
    assert "genotypes: dosage table read as snps_x_donors" in capsys.readouterr().out
    neutral = pd.DataFrame(geno.dosages.T, columns=[f"x{k}" for k in range(geno.n_donors)])
    neutral.insert(0, "id", geno.snps["snp"].str.replace("rs", "v"))
    neutral.to_csv(tmp_path / "neutral.csv", index=False)  # neither ids nor names decide
    args = _parser().parse_args([
        "associate", "--run", str(run), "--genotypes", str(tmp_path / "neutral.csv"),
        "--out", str(tmp_path / "r2.tsv"), "--quiet"])
    assert args.func(args) == 2
    assert "--dosage-orientation" in capsys.readouterr().err
    args = _parser().parse_args([
        "associate", "--run", str(run), "--genotypes", str(tmp_path / "dos.csv.gz"),
        "--dosage-orientation", "snps_x_donors", "--factors", "V", "--no-plots",
        "--out", str(tmp_path / "r3.tsv"), "--quiet"])
    assert args.func(args) == 0
    assert set(validate_results_tsv(tmp_path / "r3.tsv")["factor"]) == {"V_0", "V_1"}
    assert not (tmp_path / "r3_qq.png").exists()


def test_demo_summary_explains_snps_significant_for_several_factors():
    """A planted SNP found by two fitted factors (a split factor) makes more significant
    pairs than SNPs; summary.md says which SNP and factors, and why."""
    from pyro_livi.demo import _split_factor_text, score_recovery

    results = pd.DataFrame({"factor": ["D_0", "D_1", "V_0", "D_2"], "snp": ["s1", "s1", "s2", "s3"],
                            "significant": [True, True, True, False]})
    effects = pd.DataFrame({"snp": ["s1", "s2"], "kind": ["D", "V"]})
    r = score_recovery(results, effects)
    assert (r["n_significant_pairs"], r["n_significant_snps"]) == (3, 2)
    assert r["snps_with_several_factors"] == {"s1": ["D_0", "D_1"]}
    text = _split_factor_text(r)
    assert "3 significant pairs but 2 SNPs:** 1 SNP is" in text and "s1: D_0, D_1" in text
    assert "split factor" in text
    single = score_recovery(results.iloc[1:], effects)
    assert "one fitted factor only" in _split_factor_text(single)
