"""The association at scale: null models of all factors fitted at once (equal to
glimix-core's fits), all factors scanned per SNP chunk with one shared rotation, chunk
size invariance, null calibration, the median-only genomic inflation, and the scan
distributed with Dask (same p-values as in one process)."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pandas as pd
import pytest
from bed_reader import to_bed
from scipy import stats

from pyro_livi.analysis import association_chunks
from pyro_livi.analysis.association import (
    KinshipBasis,
    ScanPlan,
    associate_factors,
    fit_null_models,
    genomic_inflation,
    scan_block,
)
from pyro_livi.data.genotypes import Genotypes, PlinkReader
from pyro_livi.data.kinship import kinship_from_genotypes
from pyro_livi.errors import InputError


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread(one_blas_thread):
    pass


def simulate(n=60, m=120, n_cov=2, heritability=(0.0, 0.3, 0.6, 0.9), seed=0,
             chroms=("1",), kinship_snps=400, effect=0.0):
    """Donors related through a kinship K (from ``kinship_snps`` other SNPs); factor k
    is ``sqrt(h_k) u + sqrt(1 - h_k) e`` with ``u ~ N(0, K)`` plus ``effect`` times
    SNP 3; covariates N(0, 1) shifted and scaled."""
    rng = np.random.default_rng(seed)
    G = rng.binomial(2, rng.uniform(0.1, 0.5, m), size=(n, m)).astype(float)
    donors = [f"d{i:03d}" for i in range(n)]
    chrom = np.repeat(chroms, -(-m // len(chroms)))[:m]
    snps = pd.DataFrame({"snp": [f"rs{j}" for j in range(m)], "chrom": chrom,
                         "pos": np.arange(m) * 100.0 + 1})
    geno = Genotypes(G, donors, snps, "simulated")
    K = kinship_from_genotypes(rng.binomial(2, 0.3, size=(n, kinship_snps)).astype(float))
    w, V = np.linalg.eigh(K)
    L = V * np.sqrt(np.clip(w, 0, None))
    cols = {}
    for k, h in enumerate(heritability):
        y = np.sqrt(h) * (L @ rng.normal(size=n)) + np.sqrt(1 - h) * rng.normal(size=n)
        cols[f"F_{k}"] = y + effect * (G[:, 3] - G[:, 3].mean())
    F = pd.DataFrame(cols, index=donors)
    cov = pd.DataFrame(rng.normal(size=(n, n_cov)) * 3.0 + 10.0, index=donors,
                       columns=[f"c{j}" for j in range(n_cov)])
    return geno, F, cov, pd.DataFrame(K, index=donors, columns=donors)


def design(cov: pd.DataFrame) -> np.ndarray:
    C = cov.to_numpy()
    C = (C - C.mean(axis=0)) / C.std(axis=0) if C.shape[1] else C
    return np.column_stack([np.ones(len(cov)), C])


def glimix_factor(y, M, QS, G, delta=None):
    """glimix-core, factor by factor: ML null fit (or ``delta`` fixed), fast scanner,
    LRT p-values."""
    from glimix_core.lmm import LMM

    ys = y / np.std(y)
    lmm = LMM(ys, M, QS, restricted=False)
    if delta is not None:
        lmm.delta = delta
        lmm.fix("delta")
    lmm.fit(verbose=False)
    scanner = lmm.get_fast_scanner()
    r = scanner.fast_scan(G, verbose=False)
    p = stats.chi2(1).sf(np.clip(2 * (r["lml"] - scanner.null_lml()), 0, None))
    return {"lml": lmm.lml(), "scale": lmm.scale, "delta": lmm.delta, "v0": lmm.v0,
            "v1": lmm.v1, "pvalue": p, "beta": r["effsizes1"] * np.std(y),
            "null_lml": scanner.null_lml()}


# ------------------------------------------------------------------- equality with glimix


# sizes the tool accepts down to its minimum: 10 donors without covariates (8 residual
# df), 12 donors with 2 covariates; kinships of full rank and of rank < n
@pytest.mark.parametrize("n, n_cov, kinship_snps", [(10, 0, 400), (12, 2, 400),
                                                     (40, 1, 400), (150, 3, 400),
                                                     (60, 2, 25)])
def test_null_fits_and_pvalues_equal_glimix_core(n, n_cov, kinship_snps):
    geno, F, cov, K = simulate(n=n, m=40, n_cov=n_cov, seed=n + n_cov,
                               kinship_snps=kinship_snps)
    M = design(cov)
    basis = KinshipBasis(K.to_numpy(), M)
    models = fit_null_models(F.to_numpy(), M, basis, list(F.columns))
    G = geno.dosages[:, np.ptp(geno.dosages, axis=0) > 0]     # polymorphic SNPs
    for k, model in enumerate(models):
        y = F.iloc[:, k].to_numpy()
        ref = glimix_factor(y, M, basis.QS, G)
        # the maximised likelihood: as high as glimix-core's, equal to rounding
        assert model.lml_fit >= ref["lml"] - 1e-9
        assert model.lml_fit == pytest.approx(ref["lml"], abs=1e-8)
        # variances within glimix-core's optimiser tolerance (1e-6 on logit(delta))
        assert model.scale == pytest.approx(ref["scale"], rel=1e-6)
        for v in ("v0", "v1"):
            assert getattr(model, v) == pytest.approx(ref[v], rel=1e-5,
                                                      abs=1e-6 * ref["scale"])
        r = scan_block(model, basis.rotate(G), "lrt")
        np.testing.assert_allclose(r["pvalue"], ref["pvalue"], rtol=5e-6, atol=1e-12)
        np.testing.assert_allclose(r["beta"], ref["beta"], rtol=1e-4,
                                   atol=1e-5 * np.abs(ref["beta"]).max())
        # at the same delta, glimix-core's own algebra gives the same numbers to rounding
        same = glimix_factor(y, M, basis.QS, G, delta=model.delta)
        assert model.lml_fit == pytest.approx(same["lml"], abs=1e-9)
        assert model.scale == pytest.approx(same["scale"], rel=1e-10)
        assert model.lml0 == pytest.approx(same["null_lml"], abs=1e-8)
        np.testing.assert_allclose(r["pvalue"], same["pvalue"], rtol=1e-8, atol=1e-14)
        np.testing.assert_allclose(r["beta"], same["beta"], rtol=1e-7, atol=1e-12)


def test_boundary_fits_are_glimix_cores_bounds():
    """No kinship signal (h = 0) puts delta at 1 - eps, nearly all signal (a factor
    along the kinship's leading direction) at eps, as glimix-core's bounded optimiser
    does."""
    from numpy_sugar import epsilon

    geno, F, cov, K = simulate(n=50, heritability=(0.0,), seed=3)
    M = design(cov)
    basis = KinshipBasis(K.to_numpy(), M)
    top = basis.Q0[:, np.argmax(basis.S0)]          # the kinship's leading direction
    noise = 1e-3 * np.random.default_rng(0).normal(size=50)
    Ymat = np.column_stack([F["F_0"].to_numpy(), 5 * top + 1.0 + noise])
    models = fit_null_models(Ymat, M, basis, ["h0", "kin"])
    ref = [glimix_factor(Ymat[:, k], M, basis.QS, geno.dosages) for k in range(2)]
    for model, r in zip(models, ref):
        assert model.lml_fit == pytest.approx(r["lml"], abs=1e-8)
        assert model.delta == pytest.approx(r["delta"], abs=1e-12)
    assert models[0].delta == pytest.approx(1 - epsilon.tiny, abs=1e-15)
    assert models[1].delta == pytest.approx(epsilon.tiny, abs=1e-15)
    assert models[1].degenerate


@pytest.mark.parametrize("n, n_cov", [(12, 2), (60, 2), (300, 2)])
def test_associate_equals_glimix_factor_by_factor(n, n_cov):
    """The whole association (LRT) against glimix-core called factor by factor."""
    geno, F, cov, K = simulate(n=n, m=60, n_cov=n_cov, seed=7, effect=0.8)
    res, rep = associate_factors(F, geno, kinship=K, covariates=cov, maf=0.0,
                                 pvalue_method="lrt", progress=False)
    M = design(cov)
    QS = KinshipBasis(K.to_numpy(), M).QS
    tested = res["snp"].unique()
    polymorphic = np.ptp(geno.dosages, axis=0) > 0
    assert list(tested) == geno.snps["snp"][polymorphic].tolist()
    for factor in F.columns:
        ref = glimix_factor(F[factor].to_numpy(), M, QS, geno.dosages[:, polymorphic])
        got = res[res["factor"] == factor]
        assert got["snp"].tolist() == list(tested)
        np.testing.assert_allclose(got["pvalue"], ref["pvalue"], rtol=5e-6, atol=1e-12)


def test_scan_plan_equals_one_factor_scans():
    """All factors batched (both tests, rank-deficient kinship, a SNP collinear with a
    covariate) equal the scans of one factor at a time."""
    geno, F, cov, K = simulate(n=60, m=50, seed=11, kinship_snps=30)
    G = geno.dosages.copy()
    cov["c0"] = G[:, 5]                              # SNP 5 duplicates a covariate
    M = design(cov)
    basis = KinshipBasis(K.to_numpy(), M)
    assert basis.Q0.shape[1] < 60                     # rank < n: the (I - Q0 Q0^T) terms
    models = fit_null_models(F.to_numpy(), M, basis, list(F.columns))
    methods = ["lrt", "f", "lrt", "f"]
    plan = ScanPlan(models, basis, methods)
    block = basis.rotate(G)
    r = plan.scan(block)
    for k, (model, method) in enumerate(zip(models, methods)):
        one = scan_block(model, block, method)
        for key in ("beta", "se", "pvalue"):
            np.testing.assert_allclose(r[key][k], one[key], rtol=1e-10, atol=1e-300)
    assert np.isnan(r["pvalue"][:, 5]).all() and np.isfinite(np.delete(r["pvalue"], 5, 1)).all()
    # p-values of a rank-deficient basis equal a direct dense computation at the same
    # variances: GLS with V = v0 K + v1 I (pseudo-inverse), F-test on the SNP
    model, k = models[1], 1
    V = model.v0 * basis.Q0 @ np.diag(basis.S0) @ basis.Q0.T + model.v * np.eye(60)
    Vi = np.linalg.pinv(V)
    y = F.iloc[:, k].to_numpy() / model.y_scale

    def rss(X):
        b = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ y)
        e = y - X @ b
        return e @ Vi @ e, b

    r0, _ = rss(M)
    for j in (0, 17):
        r1, b = rss(np.column_stack([M, G[:, j]]))
        fstat = (r0 - r1) / (r1 / model.df_resid)
        assert r["pvalue"][k, j] == pytest.approx(stats.f(1, model.df_resid).sf(fstat),
                                                  rel=1e-8)
        assert r["beta"][k, j] == pytest.approx(b[-1] * model.y_scale, rel=1e-8)


# ------------------------------------------------------------------- chunks and memory


def write_plink(tmp_path, geno) -> str:
    props = {"iid": geno.donors, "sid": geno.snps["snp"].tolist(),
             "chromosome": geno.snps["chrom"].tolist(),
             "bp_position": geno.snps["pos"].astype(int).tolist()}
    to_bed(tmp_path / "g.bed", geno.dosages.astype(np.float32), properties=props)
    return str(tmp_path / "g")


@pytest.mark.parametrize("kinship", ["given", "loco"])
def test_chunk_size_invariance_and_bounded_reads(tmp_path, monkeypatch, kinship):
    geno, F, cov, K = simulate(n=50, m=90, seed=5, chroms=("1", "2", "3"), effect=0.6)
    geno.dosages[3, 10] = np.nan                      # one missing call (imputed)
    kw = dict(covariates=cov, progress=False,
              kinship=K if kinship == "given" else None)
    ref, rep = associate_factors(F, geno, chunk_size=1000, **kw)
    assert rep["kinship"]["mode"] == ("given" if kinship == "given"
                                      else "leave-one-chromosome-out")
    assert rep["snp_qc"]["n_imputed_calls"] == 1
    widths = []
    read = association_chunks.ChunkSource.read

    def recording_read(self, payload):
        out = read(self, payload)
        widths.append(out.shape[1])
        return out

    monkeypatch.setattr(association_chunks.ChunkSource, "read", recording_read)
    prefix = write_plink(tmp_path, geno)
    for chunk in (1, 7, 40):
        res, rep_c = associate_factors(F, geno, chunk_size=chunk, **kw)
        pd.testing.assert_frame_equal(res, ref, check_exact=False, rtol=1e-10)
        assert rep_c["snp_qc"] == rep["snp_qc"]
        widths.clear()
        with PlinkReader(prefix) as reader:
            res_d, _ = associate_factors(F, reader, chunk_size=chunk, **kw)
        same = [c for c in res.columns if c not in ("allele_1", "allele_2")]
        pd.testing.assert_frame_equal(res_d[same], ref[same], check_exact=False,
                                      rtol=1e-10)
        assert max(widths) <= chunk                   # never more than a chunk in memory
        passes = 1 if kinship == "given" else 2
        assert sum(widths) == passes * geno.n_snps
    if kinship == "loco":
        # per-chromosome kinship parts too large to keep: each chromosome's part is
        # read again before its scan (three passes), same results
        from pyro_livi.analysis import association

        monkeypatch.setattr(association, "LOCO_KINSHIP_PARTS_MAX_BYTES", 0)
        widths.clear()
        with PlinkReader(prefix) as reader:
            res_r, _ = associate_factors(F, reader, chunk_size=7, **kw)
        pd.testing.assert_frame_equal(res_r[same], ref[same], check_exact=False,
                                      rtol=1e-10)
        assert sum(widths) == 3 * geno.n_snps


# ------------------------------------------------------------------- statistics


def test_genomic_inflation_is_the_median_statistic():
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 1000, 1001):
        p = rng.uniform(size=size) ** 1.3
        full = np.median(stats.chi2.isf(p, 1)) / stats.chi2.ppf(0.5, 1)
        assert genomic_inflation(p) == pytest.approx(full, rel=1e-12)
    assert genomic_inflation(np.array([0.5, 0.5, 0.5, 0.2])) == pytest.approx(
        np.median(stats.chi2.isf([0.5, 0.5, 0.5, 0.2], 1)) / stats.chi2.ppf(0.5, 1))


def test_bh_equals_statsmodels_with_ties():
    from statsmodels.stats.multitest import multipletests

    from pyro_livi.analysis.association import bh_adjust

    rng = np.random.default_rng(1)
    for p in (rng.uniform(size=2000) ** 3, np.round(rng.uniform(size=3000), 2),
              np.array([0.01, 0.01, 0.2, 1.0, 0.0]), np.array([0.3])):
        np.testing.assert_array_equal(bh_adjust(p), multipletests(p, method="fdr_bh")[1])


def test_null_pvalues_uniform_with_relatedness():
    """Factors with kinship variance and no genetic effect: p-values uniform (KS), the
    genomic inflation near 1, for the LRT (260 donors) and the F-test (40 donors)."""
    for n, method, seed in ((260, "lrt", 1), (40, "f", 2)):
        geno, F, cov, K = simulate(n=n, m=1500, n_cov=2, seed=seed,
                                   heritability=(0.0, 0.3, 0.6, 0.8), kinship_snps=2000)
        res, rep = associate_factors(F, geno, kinship=K, covariates=cov, maf=0.05,
                                     chunk_size=500, progress=False)
        assert rep["pvalue_method"]["used"] == method
        p = res["pvalue"].to_numpy()
        assert 0.85 <= genomic_inflation(p) <= 1.15
        # SNPs are independent, factors correlated only through K: one KS per factor
        for factor, g in res.groupby("factor"):
            assert stats.kstest(g["pvalue"], "uniform").pvalue > 1e-3
            assert rep["lambda_gc_per_factor"][factor] == pytest.approx(
                genomic_inflation(g["pvalue"]), rel=1e-12)
        assert (p < 0.01).mean() < 0.02


# ------------------------------------------------------------------- Dask


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


def test_dask_scan_equals_single_process(tmp_path, dask_client):
    geno, F, cov, K = simulate(n=50, m=120, seed=9, chroms=("1", "2", "3"), effect=0.7)
    prefix = write_plink(tmp_path, geno)
    for kinship in (None, K):                         # computed LOCO (two passes); given
        local, rep = associate_factors(F, geno, covariates=cov, kinship=kinship,
                                       chunk_size=13, progress=False)
        with PlinkReader(prefix) as reader:
            on_disk, rep_d = associate_factors(F, reader, covariates=cov,
                                               kinship=kinship, chunk_size=13,
                                               progress=False, dask_scheduler=dask_client)
        in_memory, _ = associate_factors(F, geno, covariates=cov, kinship=kinship,
                                         chunk_size=13, progress=False,
                                         dask_scheduler=dask_client.scheduler.address)
        assert rep_d["scan"]["executor"].startswith("Dask cluster")
        pd.testing.assert_frame_equal(in_memory, local, check_exact=False, rtol=1e-12)
        same = [c for c in local.columns if c not in ("allele_1", "allele_2")]
        pd.testing.assert_frame_equal(on_disk[same], local[same], check_exact=False,
                                      rtol=1e-12)
        assert rep_d["snp_qc"] == rep["snp_qc"]
        assert rep_d["lambda_gc"] == pytest.approx(rep["lambda_gc"], rel=1e-12)


def test_scan_tasks_survive_pickling():
    """What a worker receives (chunk source, scan plan) round-trips through pickle."""
    geno, F, cov, K = simulate(n=30, m=20, seed=2)
    M = design(cov)
    basis = KinshipBasis(K.to_numpy(), M)
    plan = ScanPlan(fit_null_models(F.to_numpy(), M, basis, list(F.columns)), basis)
    source = association_chunks.ChunkSource()
    idx = np.arange(20)
    direct = association_chunks.scan_task(geno.dosages, idx, 0.05, source=source,
                                          plan=plan)
    again = association_chunks.scan_task(geno.dosages, idx, 0.05,
                                         source=pickle.loads(pickle.dumps(source)),
                                         plan=pickle.loads(pickle.dumps(plan)))
    for key in ("kept", "beta", "se", "pvalue"):
        np.testing.assert_array_equal(direct[key], again[key])


def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    geno, F, cov, K = simulate(n=30, m=20, seed=2)
    with pytest.raises(InputError, match=r'pip install "pyro-livi\[distributed\]"'):
        associate_factors(F, geno, kinship=K, progress=False,
                          dask_scheduler="tcp://127.0.0.1:8786")


def test_chunk_size_below_one_names_the_flag():
    from pyro_livi.data.genotypes import iter_snp_chunks

    geno, F, cov, K = simulate(n=30, m=20, seed=2)
    fix = r"SNPs per chunk must be >= 1, got 0.*--chunk-size 5000 \(chunk_size=5000\)"
    with pytest.raises(InputError, match=fix):
        associate_factors(F, geno, kinship=K, progress=False, chunk_size=0)
    with pytest.raises(InputError, match=fix):
        next(iter_snp_chunks(geno, 0))


@pytest.mark.slow
def test_cli_on_a_dask_cluster_of_processes(tmp_path, capsys):
    """``pyro-livi associate --dask-scheduler ADDRESS`` with worker processes equals the
    run without it."""
    distributed = pytest.importorskip("distributed")
    from pyro_livi.cli import main

    geno, F, cov, K = simulate(n=50, m=150, seed=4, chroms=("1", "2"), effect=0.7)
    prefix = write_plink(tmp_path, geno)
    run = tmp_path / "run"
    run.mkdir()
    F.rename(columns=lambda c: c.replace("F_", "D_")).to_csv(run / "D.tsv", sep="\t")
    cov.to_csv(tmp_path / "cov.tsv", sep="\t")
    base = ["associate", "--run", str(run), "--genotypes", prefix, "--covariates",
            str(tmp_path / "cov.tsv"), "--chunk-size", "20", "--quiet", "--no-plots"]
    assert main(base + ["--out", str(tmp_path / "local.tsv")]) == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        assert main(base + ["--out", str(tmp_path / "dask.tsv"), "--dask-scheduler",
                            cluster.scheduler_address]) == 0
    local = pd.read_csv(tmp_path / "local.tsv", sep="\t")
    dask = pd.read_csv(tmp_path / "dask.tsv", sep="\t")
    pd.testing.assert_frame_equal(dask, local, check_exact=False, rtol=1e-12)
    assert "Dask cluster" in (tmp_path / "dask_report.json").read_text()
