"""Null calibration and power of the factor x SNP association on real genotypes.

SNPs in linkage disequilibrium give correlated p-values within one phenotype, so the
Kolmogorov-Smirnov tests use (nearly) independent p-values: one randomly chosen SNP per
phenotype and region (different phenotypes are independent). The genomic inflation is
taken over all pairs. Seeds are fixed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pyro_livi.analysis.association import associate_factors, genomic_inflation
from pyro_livi.data.genotypes import Genotypes, read_genotypes, read_plink
from pyro_livi.paths import shared_data_dir

DATA = shared_data_dir()
G1K = DATA / "genotypes" / "1000g_eur"
ONEK1K = DATA / "donors" / "onek1k_bcells_100donors_dosage.csv.gz"
REGIONS = ("AGT", "LCT", "TTN")

need_1000g = pytest.mark.skipif(not all((G1K / f"{r}.bed").exists() for r in REGIONS),
                                reason="shared 1000 Genomes regions (genotypes/1000g_eur) "
                                "not present")
need_onek1k = pytest.mark.skipif(not ONEK1K.exists(), reason="shared OneK1K dosage table "
                                 "(donors/onek1k_bcells_100donors_dosage.csv.gz) not present")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread(one_blas_thread):
    pass


@pytest.fixture(scope="module")
def g1k():
    parts = [read_plink(G1K / r) for r in REGIONS]
    assert all(p.donors == parts[0].donors for p in parts)
    snps = pd.concat([p.snps.assign(region=r) for p, r in zip(parts, REGIONS)],
                     ignore_index=True)
    return Genotypes(np.hstack([p.dosages for p in parts]), parts[0].donors, snps,
                     "1000g_eur AGT+LCT+TTN")


def _independent_pick(res, region_of, seed):
    """One random SNP per (factor, region): independent across factors and regions."""
    frame = res.assign(region=res["snp"].map(region_of))
    return frame.groupby(["factor", "region"]).sample(1, random_state=seed)["pvalue"]


@need_1000g
def test_null_calibration_1000g_random_phenotypes(g1k):
    # the median over LD-correlated SNPs is noisy (sd ~0.06 with 60 phenotypes on these
    # three regions, also for plain least squares): 240 phenotypes bring it to ~0.03
    rng = np.random.default_rng(2024)
    n_pheno = 240
    F = pd.DataFrame(rng.normal(size=(g1k.n_donors, n_pheno)), index=g1k.donors,
                     columns=[f"f{k}" for k in range(n_pheno)])
    res, rep = associate_factors(F, g1k, loco=True, progress=False)
    assert rep["snp_qc"]["n_snps_in"] == 361 + 607 + 733
    lam = genomic_inflation(res["pvalue"])
    assert 0.9 <= lam <= 1.1, lam
    assert rep["lambda_gc"] == pytest.approx(lam)
    region_of = dict(zip(g1k.snps["snp"], g1k.snps["region"]))
    picked = _independent_pick(res, region_of, seed=7)
    assert len(picked) == 3 * n_pheno
    assert stats.kstest(picked, "uniform").pvalue > 0.01
    # nothing significant at FDR 5% on pure noise (BH controls the FDR; with every
    # hypothesis null it controls the family-wise error at 5%)
    assert rep["n_significant"] == 0


@need_1000g
def test_all_snp_kinship_on_few_regions_is_conservative(g1k):
    """Known limitation of the default kinship on a handful of regions: the tested SNPs
    dominate K, part of their signal is absorbed by the random effect and the test is
    conservative (never anti-conservative); the leave-one-chromosome-out kinship is
    calibrated on the same phenotypes."""
    rng = np.random.default_rng(11)
    F = pd.DataFrame(rng.normal(size=(g1k.n_donors, 40)), index=g1k.donors,
                     columns=[f"f{k}" for k in range(40)])
    res_all, _ = associate_factors(F, g1k, loco=False, progress=False)   # all-SNP kinship
    res_loco, _ = associate_factors(F, g1k, loco=True, progress=False)
    lam_all = genomic_inflation(res_all["pvalue"])
    lam_loco = genomic_inflation(res_loco["pvalue"])
    assert lam_all < lam_loco
    assert (res_all["pvalue"] < 0.05).mean() <= 0.05


@need_onek1k
def test_null_calibration_onek1k_permuted_phenotypes():
    geno = read_genotypes(ONEK1K, orientation="snps_x_donors", duplicate_snps="make_unique")
    assert geno.n_donors == 100
    rng = np.random.default_rng(99)
    # a phenotype with a real genetic effect; permuting donors breaks the link to the
    # genotypes and keeps the phenotype's distribution
    j = 10
    g = geno.dosages[:, j]
    base = 0.5 * (g - g.mean()) / g.std() + rng.normal(size=geno.n_donors)
    n_perm = 100
    F = pd.DataFrame({f"perm{k}": rng.permutation(base) for k in range(n_perm)},
                     index=geno.donors)
    res, rep = associate_factors(F, geno, progress=False)
    lam = genomic_inflation(res["pvalue"])
    assert 0.9 <= lam <= 1.1, lam
    one_per_factor = res.groupby("factor").sample(1, random_state=3)["pvalue"]
    assert len(one_per_factor) == n_perm
    assert stats.kstest(one_per_factor, "uniform").pvalue > 0.01
    # within one factor the SNP rows are permuted, nearly independent genotype vectors
    first = res[res["factor"] == "perm0"]["pvalue"]
    assert len(first) == rep["snp_qc"]["n_snps_kept"]
    assert stats.kstest(first, "uniform").pvalue > 0.01


@need_1000g
def test_power_planted_snp_1000g(g1k):
    rng = np.random.default_rng(5)
    target = "rs2281951"                       # an AGT SNP with MAF > 0.05
    j = g1k.snps["snp"].tolist().index(target)
    g = g1k.dosages[:, j]
    assert 0.05 < min(g.mean() / 2, 1 - g.mean() / 2)
    y = 0.5 * (g - g.mean()) / g.std() + rng.normal(size=g1k.n_donors)
    noise = rng.normal(size=(g1k.n_donors, 3))
    F = pd.DataFrame(np.column_stack([y, noise]), index=g1k.donors,
                     columns=["D_0", "D_1", "D_2", "D_3"])
    for loco in (False, True):
        res, rep = associate_factors(F, g1k, loco=loco, progress=False)
        hit = res[(res["factor"] == "D_0") & (res["snp"] == target)].iloc[0]
        assert hit["significant"] and hit["pvalue"] < 1e-8
        assert hit["beta"] > 0
        top = res.loc[res["pvalue"].idxmin()]
        assert top["factor"] == "D_0"
        assert not res[res["factor"] != "D_0"]["significant"].any()
