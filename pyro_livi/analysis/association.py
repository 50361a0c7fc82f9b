"""Genetic association of donor factors (seed 001, eq. 19; DESIGN section 4).

For each donor factor k (a column of D or V), over the donors with factors and
genotypes::

    d_k = g beta + M alpha + u + eps,   u ~ N(0, v0 K),  eps ~ N(0, v1 I)

with M = [intercept, covariates] and K the kinship. Per factor the null model (no SNP)
is fitted by maximum likelihood with glimix-core (``LMM(y, M, QS, restricted=False)``),
which fixes the ratio v0 / v1; every SNP g is then tested as glimix-core's fast scanner
does (fixed ratio; alpha, beta and the overall scale re-estimated) and

    p = chi2(1).sf(2 * (lml_alt - lml_null)).

How this differs from calling ``scanner.fast_scan`` directly (each checked in
``tests/test_association.py`` against glimix-core):

- the scan's algebra is vectorised over SNPs and shares the kinship rotation between
  factors (glimix-core loops over SNPs in Python when there are covariates); lml and
  effect sizes agree with ``fast_scan`` to rounding;
- standard errors include the alternative model's scale, as glimix-core's single-SNP
  ``scan`` does (its ``fast_scan`` omits it when there is more than one covariate);
- the null lml uses the same exact algebra as the alternatives (glimix-core's null solve
  truncates directions of badly conditioned covariates, which would inflate every LRT);
- the factor is divided by its sd and covariates are standardised before fitting
  (same models; glimix-core's absolute variance floors of 1.5e-8 then cannot act on a
  small-valued factor); beta and se are reported in factor units;
- a centred kinship (K 1 = 0) gets variance 1 along the intercept
  (:class:`KinshipBasis`), without which the ML likelihood is unbounded as v1 -> 0.

Multiple testing is done over all factor x SNP pairs together: Benjamini-Hochberg
(default) or Storey q-values. A pair is significant when its adjusted p-value is
below ``fdr``.

Reliability rules (issue 11; each one is tested in ``tests/test_association_reliability.py``):

- p-values: the ML likelihood-ratio statistic is about ``n / df`` times the exact F
  statistic near the null (``df = n - rank(M) - 1``), so its genomic inflation is about
  ``n / df`` (5.3 at 40 donors with 30 PCs, 1.2 with 5 PCs, 1.05 with none) and its
  tail worse. ``pvalue_method="auto"`` uses it only when ``df >= 50 (rank(M) + 1)``
  and the exact F-test of the same fit otherwise, and for any factor whose null model
  is degenerate (residual variance ~ 0). Fewer than ``MIN_DONORS`` (10) donors or
  ``MIN_RESIDUAL_DF`` (5) residual degrees of freedom are refused.
- donors: ids are matched exactly as text; ids that differ only by formatting or a
  match of less than half the smaller donor set are refused unless
  ``allow_partial_donor_match`` (:func:`~pyro_livi.data.genotypes.compare_donor_ids`).
- kinship: leave-one-chromosome-out by default when every SNP has a chromosome and
  there are at least two; a computed kinship needs ``MIN_KINSHIP_SNPS`` (20) SNPs not
  tested with it, or ``max(50, n_donors)`` SNPs when the tested SNPs are part of it
  (proximal contamination); ``kinship="identity"`` for unrelated donors.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from pyro_livi.data.genotypes import (
    Genotypes,
    MIN_MATCH_FRACTION,
    PlinkReader,
    compare_donor_ids,
    match_donors,
    merge_qc_counts,
    open_genotypes,
    qc_dosage_block,
)
from pyro_livi.data.kinship import KinshipAccumulator, align_kinship, validate_kinship
from pyro_livi.errors import InputError

#: Columns of the results table, in order (``data_schemas/association_results.schema.json``).
RESULT_COLUMNS = ["factor", "snp", "beta", "se", "pvalue", "padj", "significant"]
#: SNP columns that follow :data:`RESULT_COLUMNS`: chromosome, base-pair position, the
#: counted allele and the other one (empty when the genotypes do not have them), and the
#: minor-allele frequency of the dosages tested (analysed donors, after QC).
SNP_COLUMNS = ["chrom", "pos", "allele_1", "allele_2", "maf"]
#: Lower-cased dosage-table annotation names read as the counted / the other allele
#: (dosages of a VCF-derived table count ALT).
_ALLELE_1_NAMES = ("allele_1", "a1", "alt")
_ALLELE_2_NAMES = ("allele_2", "a2", "ref")
FDR_METHODS = ("bh", "storey")
PVALUE_METHODS = ("auto", "lrt", "f")
#: ``pvalue_method="auto"`` uses the asymptotic likelihood-ratio test only when the
#: residual degrees of freedom ``df = n - rank(M) - 1`` are at least this many times
#: the number of fixed effects of the alternative model (``rank(M) + 1``), i.e. when
#: ``n / df <= 1.02``; otherwise the exact F-test. See :func:`choose_pvalue_method`.
LRT_DF_PER_PARAMETER = 50
#: Fewest donors / residual degrees of freedom the association accepts.
MIN_DONORS = 10
MIN_RESIDUAL_DF = 5
#: A computed kinship needs at least this many QC'd SNPs that are not tested with it
#: (leave-one-chromosome-out) ...
MIN_KINSHIP_SNPS = 20
#: ... and, when the tested SNPs are part of it (all-SNP kinship), at least
#: ``max(MIN_ALL_SNP_KINSHIP_SNPS, n_donors)``.
MIN_ALL_SNP_KINSHIP_SNPS = 50
#: A null model whose residual variance is below this fraction of the total variance
#: is degenerate (all variance on the kinship).
DEGENERATE_RESIDUAL_FRACTION = 1e-4
#: Lambda grid of Storey's pi0 estimator (as in the qvalue R package).
STOREY_LAMBDAS = np.round(np.arange(1, 20) * 0.05, 2)


# --------------------------------------------------------------------------------------
# small statistics
# --------------------------------------------------------------------------------------


def inverse_normal_transform(x) -> np.ndarray:
    """Rank-based inverse normal transform (Blom): ``Phi^-1((r - 3/8) / (n + 1/4))``.

    ``x``: 1-D, finite; ties get their average rank. Returns float64, same length.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("inverse_normal_transform needs finite values")
    r = stats.rankdata(x, method="average")
    return stats.norm.ppf((r - 0.375) / (x.size + 0.25))


def genomic_inflation(pvalues) -> float:
    """Genomic inflation ``lambda_gc = median(chi2_1.isf(p)) / chi2_1.ppf(0.5)``.

    NaN for an empty input.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    if np.isnan(p).any():
        raise ValueError("genomic_inflation: NaN p-values")
    return float(np.median(stats.chi2.isf(p, 1)) / stats.chi2.ppf(0.5, 1))


def storey_pi0(pvalues, lambdas: Sequence[float] = STOREY_LAMBDAS) -> float:
    """Storey's estimate of the proportion of true nulls, pi0.

    For each lambda in the grid, ``pi0(lambda) = #{p >= lambda} / (m (1 - lambda))``;
    the lambda minimising the closed-form bootstrap estimate of the mean squared error
    (Storey, Taylor & Siegmund 2004; the ``pi0.method = "bootstrap"`` of the qvalue R
    package)::

        MSE(lambda) = W / (m^2 (1 - lambda)^2) * (1 - W / m) + (pi0(lambda) - q10)^2

    with ``W = #{p >= lambda}`` and ``q10`` the 10% quantile of the pi0(lambda) values,
    is chosen (the smallest pi0 on ties) and the result capped at 1. Returns a value in
    [0, 1]; 0 means the estimator failed (fewer p-values than the grid needs).
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    m = p.size
    if m == 0:
        raise ValueError("storey_pi0: no p-values")
    lam = np.asarray(lambdas, dtype=np.float64)
    W = np.array([(p >= l).sum() for l in lam], dtype=np.float64)
    pi0 = W / (m * (1.0 - lam))
    if lam.size == 1:
        return float(min(pi0[0], 1.0))
    q10 = np.quantile(pi0, 0.1)
    mse = (W / (m ** 2 * (1.0 - lam) ** 2)) * (1.0 - W / m) + (pi0 - q10) ** 2
    return float(min(pi0[mse == mse.min()].min(), 1.0))


def bh_adjust(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels ``multipletests(fdr_bh)``)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=np.float64).ravel()
    if p.size == 0:
        return p.copy()
    return multipletests(p, method="fdr_bh")[1]


def storey_qvalues(pvalues, pi0: float | None = None) -> tuple[np.ndarray, dict]:
    """Storey q-values: ``q = pi0 * BH-adjusted p`` (as qvalue's ``pfdr = FALSE``).

    ``pi0`` defaults to :func:`storey_pi0`. When the estimate is 0 (too few large
    p-values) pi0 = 1 is used instead (q-values equal BH) and the info says so.
    Returns ``(q, info)`` with info ``pi0`` and ``pi0_note``.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    info = {"pi0": None, "pi0_note": ""}
    if p.size == 0:
        return p.copy(), info
    if pi0 is None:
        pi0 = storey_pi0(p)
        if pi0 <= 0:
            info["pi0_note"] = ("Storey pi0 estimate was 0 (no p-value above the lambda "
                                "grid); used pi0 = 1, i.e. Benjamini-Hochberg")
            pi0 = 1.0
    if not 0 < pi0 <= 1:
        raise ValueError(f"pi0 must be in (0, 1], got {pi0}")
    info["pi0"] = float(pi0)
    return pi0 * bh_adjust(p), info


def adjust_pvalues(pvalues, method: str = "bh") -> tuple[np.ndarray, dict]:
    """Multiple-testing adjustment: ``"bh"`` (Benjamini-Hochberg) or ``"storey"``."""
    if method == "bh":
        return bh_adjust(pvalues), {"pi0": None, "pi0_note": ""}
    if method == "storey":
        return storey_qvalues(pvalues)
    raise InputError("fdr_method", "fdr_method", f"unknown method {method!r}",
                     f"use one of {FDR_METHODS}")


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------


def _ids(index) -> list[str]:
    return [str(i) for i in index]


def _duplicated(ids: Sequence[str]) -> list[str]:
    counts = Counter(ids)
    return sorted(i for i, k in counts.items() if k > 1)


def check_factors(factors: pd.DataFrame, source: str = "factors") -> pd.DataFrame:
    """Validate a donors x factors table; returns it float64 with str index/columns."""
    if not isinstance(factors, pd.DataFrame):
        raise InputError(source, "factors", f"expected a DataFrame, got "
                         f"{type(factors).__name__}", "pass donors (index) x factors")
    if factors.shape[0] == 0 or factors.shape[1] == 0:
        raise InputError(source, "factors", f"empty table (shape {factors.shape})",
                         "give at least one donor and one factor")
    f = factors.copy()
    f.index = _ids(f.index)
    f.columns = _ids(f.columns)
    for ids, what in ((list(f.index), "donor ids"), (list(f.columns), "factor names")):
        dup = _duplicated(ids)
        if dup:
            raise InputError(source, what, f"duplicated: {dup[:5]}", "make them unique")
    bad = [c for c in f.columns if not pd.api.types.is_numeric_dtype(f[c])
           or pd.api.types.is_bool_dtype(f[c])]
    if bad:
        raise InputError(source, bad[0], f"non-numeric factor columns {bad[:5]}",
                         "factor values must be numbers (donors x factors table of floats)")
    f = f.astype(np.float64)
    for c in f.columns:
        badrows = ~np.isfinite(f[c].to_numpy())
        if badrows.any():
            donors = list(f.index[badrows])
            raise InputError(source, c, f"missing or non-finite values for donors "
                             f"{donors[:10]}", "give every donor a finite value, or drop "
                             "those donors from the factor table")
    return f


def check_covariates(covariates: pd.DataFrame, donors: Sequence[str],
                     source: str = "covariates") -> tuple[np.ndarray, list[str], dict]:
    """Validate covariates for ``donors`` (already restricted to donors that have them).

    Returns the (n_donors, n_covariates) float matrix, the column names and a report.
    Non-numeric columns, NaN values, constant columns and linearly dependent columns
    -> InputError.
    """
    cov = covariates.loc[list(donors)]
    nonnum = [c for c in cov.columns if not (pd.api.types.is_numeric_dtype(cov[c]))]
    if nonnum:
        raise InputError(source, nonnum[0], f"non-numeric covariate columns {nonnum}",
                         "encode categorical covariates as numbers: one 0/1 indicator "
                         "column per level except one (e.g. pandas.get_dummies(df, "
                         "columns=[...], drop_first=True, dtype=float)); sex as 0/1")
    C = cov.to_numpy(np.float64)
    for j, c in enumerate(cov.columns):
        bad = ~np.isfinite(C[:, j])
        if bad.any():
            raise InputError(source, c, f"missing (NaN) or non-finite values for donors "
                             f"{list(np.asarray(cov.index)[bad][:10])}", "fill or impute "
                             "the values, or drop those donors from the covariate table")
    const = [c for j, c in enumerate(cov.columns) if np.ptp(C[:, j]) == 0]
    if const:
        raise InputError(source, const[0], f"constant covariate columns {const} (they "
                         "duplicate the intercept on the analysed donors)", "drop them")
    M = np.column_stack([np.ones(len(donors)), C])
    rank = np.linalg.matrix_rank(M)
    if rank < M.shape[1]:
        raise InputError(source, "columns", f"covariates plus intercept have rank {rank} "
                         f"< {M.shape[1]} columns (linearly dependent columns among "
                         f"{list(cov.columns)})", "drop redundant columns (e.g. one level "
                         "of each one-hot encoded variable)")
    return C, list(cov.columns), {"columns": list(cov.columns)}


# --------------------------------------------------------------------------------------
# the null model
# --------------------------------------------------------------------------------------


class KinshipBasis:
    """Economic eigendecomposition of one kinship, shared by every factor's null model.

    ``K = Q0 diag(S0) Q0^T`` with ``S0 > sqrt(machine eps)`` (numpy-sugar
    ``economic_qs``); ``QS`` is the tuple glimix-core's ``LMM`` takes.

    Null space of K inside the fixed effects. A kinship computed from centred genotypes
    has ``K 1 = 0``: the intercept direction has no kinship variance. Under maximum
    likelihood the fixed effects fit that direction exactly, so the likelihood grows
    without bound as the residual variance v1 -> 0 (the ``-rank_deficiency * log v1 / 2``
    term of the log-determinant), and glimix-core's optimiser can stop at v1 ~ 1e-16 with
    a degenerate fast scanner. When ``M`` (n, c) is given, every direction of ``span(M)``
    in the null space of K (found as ``M b`` with ``Q0^T M b = 0``) gets kinship variance 1:
    ``K + U U^T`` with U an orthonormal basis of those directions. For the centred
    kinship this adds ``1 1^T / n``, which leaves its Gower factor unchanged; the
    residuals of every model are orthogonal to these directions, so only the bounded
    log-determinant term changes. ``n_null_fixed_directions`` counts the directions
    treated.
    """

    def __init__(self, K: np.ndarray, M: np.ndarray | None = None):
        from numpy_sugar.linalg import economic_qs

        K = np.asarray(K, dtype=np.float64)
        QS = economic_qs(K)
        self.n_null_fixed_directions = 0
        if M is not None:
            U = _null_fixed_directions(QS[0][0], np.asarray(M, dtype=np.float64))
            if U.shape[1]:
                self.n_null_fixed_directions = int(U.shape[1])
                K = K + U @ U.T
                QS = economic_qs(K)
        self.K = K
        self.QS = QS
        self.Q0 = np.ascontiguousarray(QS[0][0])
        self.S0 = np.asarray(QS[1], dtype=np.float64)
        self.n = self.Q0.shape[0]

    def rotate(self, G: np.ndarray) -> "RotatedBlock":
        """Quantities of a (n, m) SNP block shared by all factors' scans."""
        G = np.asarray(G, dtype=np.float64)
        Q0tG = self.Q0.T @ G
        PG = G - self.Q0 @ Q0tG
        return RotatedBlock(G, Q0tG, np.einsum("ij,ij->j", PG, PG))


def _null_fixed_directions(Q0: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Orthonormal basis (n, k) of ``span(M)`` intersected with the null space of K
    (``Q0`` spans the range of K)."""
    Um, sm, _ = np.linalg.svd(M, full_matrices=False)
    Um = Um[:, sm > sm.max() * 1e-10]
    # components of span(M) orthogonal to range(K): singular vectors of Q0^T Um whose
    # singular value is ~0
    _, st, Vt = np.linalg.svd(Q0.T @ Um, full_matrices=True)
    st = np.concatenate([st, np.zeros(Um.shape[1] - st.size)])
    null = Vt[st < 1e-8].T
    if null.shape[1] == 0:
        return np.zeros((M.shape[0], 0))
    U, _ = np.linalg.qr(Um @ null)
    return U


@dataclass
class RotatedBlock:
    """``G`` (n, m), ``Q0tG = Q0^T G`` (r, m) and ``PGsq``: squared norms of the columns
    of ``(I - Q0 Q0^T) G`` (m,)."""

    G: np.ndarray
    Q0tG: np.ndarray
    PGsq: np.ndarray


@dataclass
class NullModel:
    """Fitted null LMM of one factor and what its scan needs.

    The null model ``y ~ N(M alpha, v0 K + v1 I)`` is fitted by glimix-core
    (``LMM(y, M, QS, restricted=False).fit()``); ``y`` is the factor divided by
    ``y_scale`` (its sd) so that glimix-core's absolute variance floors (1.5e-8) cannot
    act on a small-valued factor; ``beta``/``se`` are reported back in factor units.

    Attributes: ``lml0`` (null log marginal likelihood at the fitted variances, computed
    with the same algebra as the scan's alternative models; it equals glimix-core's
    ``scanner.null_lml()`` whenever glimix-core's least-squares solve keeps every
    direction of M, see :func:`fit_null_model`), ``v0`` / ``v1`` (kinship / residual
    variance, in units of the scaled factor), ``scanner`` (glimix-core's
    ``FastScanner``, kept for cross-checks) and the precomputed products of the scan
    (``D0``, ``v``, ``Q0tM``, ``PM``, ...).
    """

    factor: str
    lml0: float
    v0: float
    v1: float
    y_scale: float
    scanner: object
    D0: np.ndarray
    v: float
    static_lml: float
    Q0tM: np.ndarray
    PM: np.ndarray
    Q0ty: np.ndarray
    Py: np.ndarray
    A_pinv: np.ndarray
    a: np.ndarray
    bstar0: float
    #: residual degrees of freedom of the alternative model, ``n_eff - rank(M) - 1``
    #: (``n_eff = n``, or the rank of the kinship when the residual variance is 0)
    df_resid: int = 0
    #: residual variance < DEGENERATE_RESIDUAL_FRACTION of the total (all on the kinship)
    degenerate: bool = False

    @property
    def n(self) -> int:
        return self.PM.shape[0]


def _safe_log(x):
    from numpy_sugar import epsilon

    return np.log(np.clip(x, epsilon.small, np.inf))


def fit_null_model(y: np.ndarray, M: np.ndarray, basis: "KinshipBasis",
                   factor: str = "") -> NullModel:
    """Fit the null LMM of one factor with glimix-core and precompute its scan.

    ``y``: (n,) factor values; ``M``: (n, c) intercept + covariates (well scaled:
    :func:`associate_factors` standardises covariate columns); ``basis``: the kinship's
    :class:`KinshipBasis`.

    The null lml is computed here rather than taken from ``scanner.null_lml()``:
    glimix-core solves the null normal equations with a truncated least squares
    (``rcond = 1.5e-8``) that drops directions of a badly conditioned ``M^T B M``, while
    the alternative models are solved exactly; mixing the two would inflate every
    likelihood ratio.
    """
    from glimix_core.lmm import LMM
    from numpy_sugar import epsilon

    y = np.asarray(y, dtype=np.float64)
    M = np.asarray(M, dtype=np.float64)
    y_scale = float(np.std(y))
    ys = y / y_scale
    lmm = LMM(ys, M, basis.QS, restricted=False)
    lmm.fit(verbose=False)
    scanner = lmm.get_fast_scanner()
    v0, v1 = float(lmm.v0), float(lmm.v1)
    # the fast scanner's covariance: Q0 diag(v0 S0) Q0^T + v I, with v = v1 floored to 0
    v = v1 if v1 > epsilon.small else 0.0
    D0 = v0 * basis.S0 + v
    n, r = basis.Q0.shape
    static = -n * np.log(2 * np.pi) - n - _safe_log(D0).sum() - (n - r) * _safe_log(v)
    Q0tM = basis.Q0.T @ M
    Q0ty = basis.Q0.T @ ys
    PM = M - basis.Q0 @ Q0tM
    Py = ys - basis.Q0 @ Q0ty

    def bdot(Q0tu, Pu, Q0tw, Pw):
        out = Q0tu.T @ (Q0tw / D0[:, None] if Q0tw.ndim == 2 else Q0tw / D0)
        if v > 0:
            out = out + Pu.T @ Pw / v
        return out

    A = bdot(Q0tM, PM, Q0tM, PM)
    a = bdot(Q0tM, PM, Q0ty, Py)
    yTBy = float(bdot(Q0ty, Py, Q0ty, Py))
    A_pinv = np.linalg.pinv((A + A.T) / 2.0, hermitian=True)
    bstar0 = max(float(yTBy - a @ A_pinv @ a), epsilon.tiny)
    lml0 = (static - n * _safe_log(bstar0 / n)) / 2.0
    rank_m = int(np.linalg.matrix_rank(M))
    n_eff = n if v > 0 else r
    degenerate = bool(v1 <= DEGENERATE_RESIDUAL_FRACTION * (v0 + v1))
    return NullModel(factor, float(lml0), v0, v1, y_scale, scanner, D0, v,
                     float(static), Q0tM, PM, Q0ty, Py, A_pinv, a, bstar0,
                     int(n_eff - rank_m - 1), degenerate)


def scan_block(model: NullModel, block: "RotatedBlock | np.ndarray",
               method: str = "lrt") -> dict:
    """Test every SNP of a block against one factor.

    For SNP g, with B = (Q0 diag(D0) Q0^T + v I)^-1 the fast scanner's fixed
    covariance, the alternative model's generalised least squares fit
    ``E = [M, g]``, ``(E^T B E) b = E^T B y`` is solved for all SNPs at once through the
    Schur complement ``s = g^T B g - g^T B M (M^T B M)^+ M^T B g``::

        alpha = (g^T B y - g^T B M (M^T B M)^+ M^T B y) / s
        bstar = bstar0 - s alpha^2,   scale = bstar / n
        lml   = (static - n log scale) / 2,   se(alpha) = sqrt(scale / s)
        p     = chi2(1).sf(2 (lml - lml0))

    These are the equations of glimix-core's ``FastScanner.fast_scan`` (same lml and
    effect sizes to rounding), vectorised over SNPs and with the standard error scaled by
    the alternative model's scale, as glimix-core's single-SNP ``scan`` does (its
    ``fast_scan`` omits that factor when there is more than one covariate). A SNP whose
    ``s`` is not positive (collinear with the covariates) gets NaN.

    ``method="f"``: the exact small-sample test of the same fit. With the variance ratio
    of the null model held fixed (as the fast scanner does), the alternative is a
    generalised least-squares regression with covariance known up to scale, and::

        F = (bstar0 - bstar) / (bstar / df),   df = n - rank(M) - 1,
        p = F(1, df).sf(F),   se = sqrt(bstar / df / s)   (t = beta / se, t^2 = F)

    which is exact when the ratio is known (for a kinship of zero weight it is the OLS
    F-test) and tends to the LRT as df grows; the LRT's ``2 (lml - lml0) = n log(bstar0
    / bstar)`` is ``n / df`` times larger near the null, so it is anti-conservative
    when covariates use a noticeable share of the donors.

    Returns arrays (m,): ``lml``, ``beta`` and ``se`` (factor units per allele),
    ``pvalue`` (of ``method``), ``pvalue_lrt``, ``pvalue_f``, ``scale``.
    """
    from numpy_sugar import epsilon

    if not isinstance(block, RotatedBlock):
        raise TypeError("scan_block takes KinshipBasis.rotate(G)")
    W = block.Q0tG / model.D0[:, None]
    d = np.einsum("ij,ij->j", block.Q0tG, W)
    q = model.Q0ty @ W
    P = model.Q0tM.T @ W
    if model.v > 0:
        d = d + block.PGsq / model.v
        q = q + (model.Py @ block.G) / model.v
        P = P + (model.PM.T @ block.G) / model.v
    AP = model.A_pinv @ P
    s = d - np.einsum("ij,ij->j", P, AP)
    num = q - model.a @ AP
    ok = s > 1e-10 * np.maximum(d, np.finfo(float).tiny)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(ok, num / np.where(ok, s, 1.0), np.nan)
        bstar = np.clip(model.bstar0 - np.where(ok, num * alpha, np.nan), epsilon.tiny, np.inf)
        scale = bstar / model.n
        lml = (model.static_lml - model.n * _safe_log(scale)) / 2.0
        se = np.sqrt(scale / np.where(ok, s, np.nan))
    lrt = np.clip(2.0 * (lml - model.lml0), 0.0, None)
    p = stats.chi2(1).sf(lrt)
    p[~ok] = np.nan
    df = model.df_resid
    if df >= 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma2 = bstar / df
            fstat = np.clip(model.bstar0 - bstar, 0.0, None) / sigma2
            p_f = stats.f(1, df).sf(fstat)
            se_f = np.sqrt(sigma2 / np.where(ok, s, np.nan))
        p_f[~ok] = np.nan
    else:
        p_f = np.full_like(p, np.nan)
        se_f = np.full_like(p, np.nan)
    if method == "lrt":
        pvalue, se_out = p, se
    elif method == "f":
        pvalue, se_out = p_f, se_f
    else:
        raise ValueError(f"method must be 'lrt' or 'f', got {method!r}")
    return {"lml": lml, "beta": alpha * model.y_scale, "se": se_out * model.y_scale,
            "pvalue": pvalue, "pvalue_lrt": p, "pvalue_f": p_f, "scale": scale}


def choose_pvalue_method(n_donors: int, rank_m: int, method: str = "auto") -> str:
    """The test ``pvalue_method`` resolves to for ``n_donors`` and ``rank(M)`` fixed
    effects (intercept + covariates).

    ``auto``: the asymptotic LRT when ``df = n - rank(M) - 1 >= LRT_DF_PER_PARAMETER *
    (rank(M) + 1)``, else the exact F-test. For ordinary least squares the LRT's
    statistic is ``n log(1 + F / df)``: near the null ``n / df`` times the F statistic,
    so its genomic inflation is about ``n / df`` and its tail is worse (size at 1e-3:
    1.44 x nominal at 40 donors without covariates, 3.0 x at 40 donors with 5
    covariates, 150 x at 40 donors with 30 covariates). At the threshold ``n / df <=
    1.02`` the LRT's size at 1e-3 is within ~1.2 x nominal.
    """
    if method not in PVALUE_METHODS:
        raise InputError("pvalue_method", "pvalue_method", f"unknown method {method!r}",
                         f"use one of {PVALUE_METHODS} (CLI: --pvalue-method)")
    if method != "auto":
        return method
    df = n_donors - rank_m - 1
    return "lrt" if df >= LRT_DF_PER_PARAMETER * (rank_m + 1) else "f"


# --------------------------------------------------------------------------------------
# the scan
# --------------------------------------------------------------------------------------


def _annotate_snps(res: pd.DataFrame, snps: pd.DataFrame, maf: np.ndarray) -> pd.DataFrame:
    """``res`` with :data:`SNP_COLUMNS` appended from the genotypes' SNP table and the MAF
    of the tested dosages (``maf``: one value per row of ``snps``)."""
    snps = snps.reset_index(drop=True)
    lowered = {str(c).strip().lower(): c for c in snps.columns}

    def column(names):
        found = next((lowered[n] for n in names if n in lowered), None)
        return (snps[found].astype(object).where(snps[found].notna(), None)
                if found is not None else pd.Series([None] * len(snps)))

    table = pd.DataFrame({
        "chrom": column(("chrom",)), "pos": pd.to_numeric(snps["pos"]).round().astype("Int64"),
        "allele_1": column(_ALLELE_1_NAMES), "allele_2": column(_ALLELE_2_NAMES),
        "maf": maf})
    table.index = snps["snp"].astype(str).to_numpy()
    extra = table.reindex(res["snp"].astype(str).to_numpy()).reset_index(drop=True)
    return pd.concat([res.reset_index(drop=True), extra], axis=1)[RESULT_COLUMNS + SNP_COLUMNS]


def _index_chunks(index: np.ndarray, chunk_size: int):
    for start in range(0, len(index), chunk_size):
        yield index[start:start + chunk_size]


def _qc_chunks(geno, donors: list[str], index: np.ndarray, chunk_size: int, maf: float):
    """Yield (original SNP indices kept, QC'd (n_donors, kept) block, qc counts).

    ``geno``: a :class:`Genotypes` already restricted to ``donors`` (in that order) or a
    :class:`PlinkReader` (read from disk chunk by chunk). ``index``: SNP indices to walk.
    """
    for idx in _index_chunks(index, chunk_size):
        if isinstance(geno, PlinkReader):
            contiguous = idx[-1] - idx[0] + 1 == len(idx)
            sel = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
            dos = geno.read(sel, donors).dosages
        else:
            dos = geno.dosages[:, idx]
        block = qc_dosage_block(dos, maf)
        yield idx[block.keep], block.dosages, block.counts


def _progress(iterable, total, desc, enabled):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=sys.stderr,
                leave=False)


def _check_all_snp_kinship(geno, m: int, n: int, unknown: np.ndarray, chrom,
                           loco_default: bool) -> None:
    """The all-SNP kinship contains the tested SNPs: refuse it on too few SNPs."""
    need = max(MIN_ALL_SNP_KINSHIP_SNPS, n)
    if m >= need:
        return
    n_chrom = len(set(np.asarray(chrom, dtype=str)[~unknown].tolist()))
    if unknown.all():
        loco_fix = ("or give every SNP its chromosome (a .bim, or a CHR column in the "
                    "dosage table) with SNPs on several chromosomes, so that a "
                    "leave-one-chromosome-out kinship is used")
    elif n_chrom >= 2 and not loco_default:
        loco_fix = "or drop loco=False (CLI: --no-loco) to use the leave-one-chromosome-out default"
    else:
        loco_fix = ("or add SNPs on other chromosomes and use loco=True (CLI: --loco), "
                    "so that no SNP is tested with a kinship that contains it")
    raise InputError(geno.source, "kinship", f"the default kinship would be computed from "
                     f"only {m} QC'd SNPs, which are also the SNPs tested; a kinship needs "
                     f"at least max({MIN_ALL_SNP_KINSHIP_SNPS}, number of donors) = {need} "
                     "such SNPs, otherwise it absorbs the tested SNPs' effects (proximal "
                     "contamination: real associations lose their significance)",
                     "give a kinship computed from genome-wide SNPs (kinship=DataFrame; "
                     "CLI: --kinship FILE), or kinship='identity' (CLI: --kinship "
                     f"identity) for unrelated donors, {loco_fix}")


def _check_loco_kinship_snps(geno, groups, kept: np.ndarray, acc, n: int) -> None:
    """Each leave-one-chromosome-out kinship needs MIN_KINSHIP_SNPS SNPs."""
    kept_set = np.zeros(geno.n_snps, dtype=bool)
    kept_set[kept] = True
    total = int(kept_set.sum())
    for label, idx in groups:
        m_c = int(kept_set[idx].sum())
        if m_c and total - m_c < MIN_KINSHIP_SNPS:
            raise InputError(geno.source, "kinship", f"the leave-one-chromosome-out "
                             f"kinship for the {m_c} SNPs of chromosome {label} would "
                             f"rest on the {total - m_c} QC'd SNPs of the other "
                             f"chromosomes (at least {MIN_KINSHIP_SNPS} are needed)",
                             "give a kinship computed from genome-wide SNPs (CLI: "
                             "--kinship FILE), or --kinship identity for unrelated "
                             "donors, or add SNPs on the other chromosomes")


def _check_null_model(m: "NullModel", basis: "KinshipBasis", label: str, n: int) -> None:
    """Refuse a null model the scan cannot use (see :func:`_scan_method`)."""
    where = "" if label == "all" else f" (kinship without chromosome {label})"
    r = basis.Q0.shape[1]
    if m.v == 0 and r < n:
        raise InputError("kinship", "null model", f"degenerate null model for factor "
                         f"{m.factor!r}{where}: residual variance 0 and a kinship of rank "
                         f"{r} < {n} donors, so {n - r} directions of the data would be "
                         "ignored", "use a kinship from more SNPs (CLI: --kinship FILE), "
                         "--kinship identity, or fewer covariates")


def _scan_method(model: "NullModel", method: str, requested: str, switched: set) -> str:
    """The test of one factor's scan: ``method`` (:func:`choose_pvalue_method`), except
    that with ``pvalue_method="auto"`` a degenerate null model (residual variance below
    ``DEGENERATE_RESIDUAL_FRACTION`` of the total: all variance on the kinship, common
    when covariates use many of the donors' degrees of freedom) switches the factor to
    the exact F-test, whose calibration does not rest on the ML variance estimates."""
    if method == "lrt" and requested == "auto" and model.degenerate:
        switched.add(model.factor)
        return "f"
    return method


def associate_factors(factors: pd.DataFrame, genotypes, *, kinship=None,
                      covariates: pd.DataFrame | None = None, inverse_normal: bool = False,
                      fdr: float = 0.05, fdr_method: str = "bh", chunk_size: int = 5000,
                      maf: float = 0.05, loco: bool | None = None,
                      pvalue_method: str = "auto",
                      allow_partial_donor_match: bool = False,
                      progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Test every donor factor against every SNP with a linear mixed model.

    Parameters
    ----------
    factors : DataFrame, donors (index = donor ids) x factors
        Factor values (e.g. the columns of LIVI's D and V).
    genotypes : Genotypes, PlinkReader or path
        Dosages. A :class:`PlinkReader` (or a PLINK path) is read from disk in chunks of
        ``chunk_size`` SNPs, twice (QC + kinship, then the scan), so memory stays
        bounded for large files.
    kinship : DataFrame (donor ids as index and columns), array, ``"identity"`` or None
        Donor relatedness. An array must be ordered as ``factors.index``.
        ``"identity"``: unrelated donors (K = I; the test is then the least-squares
        regression test). Default: computed from the QC'd genotypes of the analysed
        donors (:class:`~pyro_livi.data.kinship.KinshipAccumulator`), leave one
        chromosome out when the SNPs lie on several chromosomes (see ``loco``). A
        computed kinship must rest on enough SNPs: at least ``MIN_KINSHIP_SNPS`` (20) per
        leave-one-chromosome-out kinship, and at least ``max(50, n_donors)`` when the
        tested SNPs are part of it (one chromosome, or chromosomes unknown); with fewer
        it absorbs the tested SNPs' effects (proximal contamination) and InputError
        says what to give instead.
    covariates : DataFrame, donors (index) x covariates, optional
        Numeric donor-level covariates (e.g. genotype PCs, sex as 0/1, age); an
        intercept is always added.
    inverse_normal : bool
        Rank-based inverse normal transform of each factor (over the analysed donors).
    fdr : float
        Significance threshold on the adjusted p-value.
    fdr_method : {"bh", "storey"}
        Benjamini-Hochberg or Storey q-values, over all factor x SNP pairs together.
    chunk_size : int
        SNPs per block.
    maf : float
        Minor-allele-frequency threshold of the SNP QC
        (:func:`~pyro_livi.data.genotypes.quality_control` rules), on the analysed donors.
    loco : bool or None
        Leave-one-chromosome-out kinship: SNPs of chromosome c are tested with the
        kinship of the SNPs on every other chromosome (null models refitted per
        chromosome), so a tested SNP is never part of its own kinship. Needs the
        chromosome of every SNP and at least two chromosomes; not with ``kinship``.
        Default None: leave-one-chromosome-out when no kinship is given and every SNP
        has a known chromosome with at least two chromosomes present, else one kinship
        from all QC'd SNPs. ``False`` forces the all-SNP kinship (DESIGN section 4),
        which contains the tested SNPs: on a few regions rather than a genome the test
        becomes conservative (lambda_gc < 1) and loses power.
    pvalue_method : {"auto", "lrt", "f"}
        ``lrt``: the asymptotic likelihood-ratio test ``chi2(1).sf(2 (lml_alt -
        lml_null))`` (DESIGN section 4); ``f``: the exact F-test of the same fit
        (:func:`scan_block`); ``auto`` (default): the LRT when the residual degrees of
        freedom are large enough for it to be calibrated, else the F-test
        (:func:`choose_pvalue_method`).
    allow_partial_donor_match : bool
        Analyse the donors that match even when donor ids differ only by formatting
        (``'1'`` vs ``'01'``, case, whitespace, ``FID_IID``) or less than half of the
        smaller donor set matches (factor table vs genotypes, covariates). Default
        False: such matches raise InputError, since they usually mean the ids are
        spelled differently.
    progress : bool
        Progress bars on stderr.

    Returns
    -------
    results : DataFrame
        Columns ``factor, snp, beta, se, pvalue, padj, significant`` then ``chrom, pos,
        allele_1, allele_2, maf`` (:data:`SNP_COLUMNS`; missing annotations are empty);
        one row per tested factor x SNP pair, factors in input order, SNPs in genotype
        order. ``beta``/``se``
        are in factor units per allele copy (of the transformed factor with
        ``inverse_normal``).
    report : dict
        Donor matching, covariate and kinship handling, SNP QC counts, tested and
        excluded factors, null-model variances, the p-value test used
        (``pvalue_method``), n_tests, n_significant, pi0 (Storey), lambda_gc overall and
        per factor, and ``warnings`` (e.g. degenerate null models).

    Donors and factors that cannot be used are excluded and reported (never silently
    dropped); inputs that would give wrong p-values raise InputError: fewer than
    ``MIN_DONORS`` donors or ``MIN_RESIDUAL_DF`` residual degrees of freedom, donor
    ids that only half match, a computed kinship from too few SNPs, a degenerate null
    model that the scan cannot use.
    """
    if not 0 < fdr < 1:
        raise InputError("fdr", "fdr", f"{fdr} is not in (0, 1)", "use e.g. fdr=0.05")
    if loco and kinship is not None:
        raise InputError("kinship", "loco", "loco=True computes the kinship from the "
                         "genotypes, but a kinship was given", "drop one of the two")
    if isinstance(kinship, str) and kinship != "identity":
        raise InputError("kinship", "kinship", f"unknown kinship {kinship!r}", "pass a "
                         "donors x donors DataFrame or array, 'identity' (unrelated "
                         "donors), or None (computed from the genotypes); on the CLI "
                         "--kinship FILE or --kinship identity")
    if pvalue_method not in PVALUE_METHODS:
        raise InputError("pvalue_method", "pvalue_method", f"unknown method "
                         f"{pvalue_method!r}", f"use one of {PVALUE_METHODS}")
    if fdr_method not in FDR_METHODS:
        raise InputError("fdr_method", "fdr_method", f"unknown method {fdr_method!r}",
                         f"use one of {FDR_METHODS}")
    if int(chunk_size) < 1:
        raise InputError("chunk_size", "chunk_size", f"{chunk_size} < 1", "use >= 1")
    chunk_size = int(chunk_size)
    factors = check_factors(factors)
    own_reader = False
    if isinstance(genotypes, (str, Path)):
        genotypes = open_genotypes(genotypes)
        own_reader = isinstance(genotypes, PlinkReader)
    if not isinstance(genotypes, (Genotypes, PlinkReader)):
        raise InputError("genotypes", "genotypes", f"unsupported type "
                         f"{type(genotypes).__name__}", "pass a Genotypes (read_genotypes), "
                         "a PlinkReader or a PLINK path")
    try:
        return _associate(factors, genotypes, kinship, covariates, inverse_normal, fdr,
                          fdr_method, chunk_size, maf, loco, progress, pvalue_method,
                          bool(allow_partial_donor_match))
    finally:
        if own_reader:
            genotypes.close()


def _associate(factors, geno, kinship, covariates, inverse_normal, fdr, fdr_method,
               chunk_size, maf, loco, progress, pvalue_method="auto",
               allow_partial=False):
    report: dict = {"genotypes": geno.source, "warnings": []}
    # ---- donors: factors x genotypes
    _, match = match_donors(geno, list(factors.index), source="the factor table",
                            allow_partial_donor_match=allow_partial)
    donors = list(match["matched"])
    report["donors"] = {
        "n_factor_donors": match["n_expression_donors"],
        "n_genotyped": match["n_genotyped"],
        "n_matched": match["n_matched"],
        "factor_donors_without_genotypes": match["unmatched_expression"],
        "n_genotyped_donors_without_factors": match["unmatched_genotype"],
        "examples_genotyped_donors_without_factors":
            match["examples_unmatched_genotype"],
        "n_ids_differing_only_by_formatting": match["n_differing_only_by_formatting"],
        "allow_partial_donor_match": allow_partial,
    }
    if match["n_differing_only_by_formatting"] or (
            match["n_matched"] < MIN_MATCH_FRACTION * min(match["n_expression_donors"],
                                          match["n_genotyped"])):
        report["warnings"].append(
            f"partial donor match allowed: {match['n_matched']} of "
            f"{match['n_expression_donors']} factor donors matched the "
            f"{match['n_genotyped']} genotyped donors; "
            + (", ".join(match["examples_differing_only_by_formatting"])
               or "no formatting differences"))
    # ---- covariates
    cov_report: dict = {"given": covariates is not None, "columns": []}
    if covariates is not None:
        if not isinstance(covariates, pd.DataFrame):
            raise InputError("covariates", "covariates", "expected a DataFrame",
                             "pass donors (index) x covariates")
        covariates = covariates.copy()
        covariates.index = _ids(covariates.index)
        covariates.columns = _ids(covariates.columns)
        ids = list(covariates.index)
        dup = _duplicated(ids)
        if dup:
            raise InputError("covariates", "donor ids", f"duplicated: {dup[:5]}",
                             "give every donor once")
        have = set(ids)
        no_cov = [d for d in donors if d not in have]
        if len(no_cov) == len(donors):
            raise InputError("covariates", "donor ids", f"none of the {len(donors)} "
                             f"analysed donors has covariates: donor ids look like "
                             f"{donors[:5]}, covariate ids look like {ids[:5]}",
                             "use the same donor ids as the factor table")
        cmp = compare_donor_ids(donors, ids, source="covariates",
                                what="the factor table (genotyped donors)",
                                other_what="the covariates", allow_partial=allow_partial)
        cov_report["n_ids_differing_only_by_formatting"] = cmp[
            "n_differing_only_by_formatting"]
        donors = [d for d in donors if d in have]
        cov_report["donors_without_covariates_excluded"] = no_cov
        cov_report["n_covariate_donors_not_analysed"] = len(have - set(donors))
    # ---- kinship (user-given): check it covers the donors
    K_given = None
    kin_report: dict = {}
    if isinstance(kinship, str):          # "identity" (checked above)
        K_given = np.eye(len(donors))
        kin_report = {"source": "identity (unrelated donors)"}
    elif kinship is not None:
        if isinstance(kinship, pd.DataFrame):
            Kdf = validate_kinship(kinship, "kinship")
        else:
            arr = np.asarray(kinship)
            if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] != len(factors):
                raise InputError("kinship", "shape", f"kinship array of shape {arr.shape} "
                                 f"for {len(factors)} factor donors", "pass a DataFrame "
                                 "with donor ids as index and columns, or an (n, n) array "
                                 "ordered as factors.index")
            Kdf = validate_kinship(arr, "kinship", list(factors.index))
        K_given = align_kinship(Kdf, donors, "kinship")
        kin_report = {"source": "given", "n_kinship_donors_not_analysed":
                      len(set(Kdf.index) - set(donors))}
    # ---- design matrix
    n = len(donors)
    n_cov = 0 if covariates is None else covariates.shape[1]
    dropped = (f" ({len(match['unmatched_expression'])} factor donors had no genotypes"
               + (f", {len(cov_report.get('donors_without_covariates_excluded', []))} "
                  "no covariates" if covariates is not None else "") + ")")
    if n <= n_cov + 2:
        raise InputError("donors", "n_donors", f"{n} analysed donors for {n_cov} "
                         "covariates + intercept + SNP: no residual degrees of freedom"
                         + dropped, "use more donors than covariates + 2 (drop covariates "
                         "or add donors)")
    if n < MIN_DONORS:
        raise InputError("donors", "n_donors", f"only {n} analysed donors{dropped}; the "
                         f"association needs at least {MIN_DONORS}: on fewer, a donor "
                         "factor's distribution cannot be checked and one donor can make "
                         "a SNP significant", "analyse at least "
                         f"{MIN_DONORS} donors (check that the donor ids of the factor "
                         "table, genotypes and covariates match)")
    df_resid = n - (n_cov + 1) - 1
    if df_resid < MIN_RESIDUAL_DF:
        raise InputError("covariates", "columns", f"{n} analysed donors for {n_cov} "
                         f"covariates + intercept + SNP leave {df_resid} residual degrees "
                         f"of freedom (at least {MIN_RESIDUAL_DF} are needed): the "
                         "covariates nearly saturate the donors, the null model "
                         "degenerates (all variance on the kinship) and no test is "
                         "calibrated", f"use at most {n - 2 - MIN_RESIDUAL_DF} covariates "
                         f"for {n} donors (e.g. the first few genotype PCs), or add "
                         "donors")
    if covariates is not None:
        C, cov_cols, _ = check_covariates(covariates, donors)
        cov_report["columns"] = cov_cols
    else:
        C = np.empty((n, 0))
    # covariates standardised (same column space with the intercept, so the same
    # models; better conditioned normal equations)
    C = (C - C.mean(axis=0)) / C.std(axis=0) if C.shape[1] else C
    M = np.column_stack([np.ones(n), C])
    rank_m = int(np.linalg.matrix_rank(M))
    method = choose_pvalue_method(n, rank_m, pvalue_method)
    report["pvalue_method"] = {
        "requested": pvalue_method, "used": method, "residual_df": n - rank_m - 1,
        "rule": f"auto: LRT when residual df >= {LRT_DF_PER_PARAMETER} x (intercept + "
                "covariates + SNP), else the exact F-test"}
    report["covariates"] = cov_report
    report["donors"]["n_analysed"] = n
    report["donors"]["analysed"] = donors
    # ---- factors: zero variance excluded; optional inverse-normal transform
    Y = factors.loc[donors]
    tested, excluded = [], []
    for c in Y.columns:
        y = Y[c].to_numpy()
        spread = np.ptp(y)
        if spread == 0 or np.std(y) <= 1e-12 * np.abs(y).max():
            excluded.append({"factor": c, "reason": "zero variance on the analysed donors"})
        else:
            tested.append(c)
    report["factors"] = {"n_given": int(Y.shape[1]), "tested": tested, "excluded": excluded,
                         "inverse_normal": bool(inverse_normal)}
    if not tested:
        raise InputError("factors", "factors", "every factor has zero variance on the "
                         f"{n} analysed donors", "check the factor table (a trained model "
                         "gives varying donor factors)")
    ys = {c: (inverse_normal_transform(Y[c].to_numpy()) if inverse_normal
              else Y[c].to_numpy(np.float64)) for c in tested}
    # ---- genotypes of the analysed donors (in memory: restricted once)
    if isinstance(geno, Genotypes):
        geno = geno.subset(donors)
    all_idx = np.arange(geno.n_snps)
    n_chunks = -(-geno.n_snps // chunk_size)
    chrom = geno.snps["chrom"].to_numpy(dtype=object)
    unknown = np.array([c is None or (isinstance(c, float) and np.isnan(c))
                        or str(c).strip() in ("", "0", "nan", "None") for c in chrom],
                       dtype=bool)
    loco_default = loco is None
    if loco is None:
        loco = bool(K_given is None and not unknown.any()
                    and len(set(np.asarray(chrom, dtype=str).tolist())) >= 2)
    if loco:
        if unknown.any():
            raise InputError(geno.source, "chrom", f"chromosome unknown for "
                             f"{int(unknown.sum())} SNPs, e.g. "
                             f"{geno.snps['snp'].to_numpy()[unknown][:5].tolist()}",
                             "a leave-one-chromosome-out kinship needs the chromosome of "
                             "every SNP (a .bim, or a chromosome column in the dosage "
                             "table); otherwise drop loco")
        chrom = chrom.astype(str)
        labels = list(dict.fromkeys(chrom.tolist()))
        if len(labels) < 2:
            raise InputError(geno.source, "chrom", f"all SNPs are on chromosome "
                             f"{labels[0]!r}", "a leave-one-chromosome-out kinship needs "
                             "SNPs on at least two chromosomes; drop loco (or give a "
                             "kinship file)")
        groups = [(c, np.flatnonzero(chrom == c)) for c in labels]
    else:
        groups = [("all", all_idx)]
    # ---- pass 1: SNP QC counts (+ kinship from the QC'd genotypes)
    acc = KinshipAccumulator(n) if K_given is None else None
    qc_total = None
    kept_all = []
    for kept, block, counts in _progress(_qc_chunks(geno, donors, all_idx, chunk_size,
                                                    maf),
                                         n_chunks, "QC" + (" + kinship" if acc else ""),
                                         progress):
        qc_total = merge_qc_counts(qc_total, counts)
        kept_all.append(kept)
        if acc is not None and block.shape[1]:
            acc.add(block)
    qc_total = dict(qc_total or {})
    qc_total["maf"] = maf
    report["snp_qc"] = qc_total
    if qc_total.get("n_snps_kept", 0) == 0:
        raise InputError(geno.source, "SNPs", f"no SNP passes QC on the {n} analysed donors "
                         f"({qc_total})", "lower maf or check the genotypes")
    if K_given is not None:
        kin_report["mode"] = "given" if not isinstance(kinship, str) else "identity"
    elif loco:
        kin_report = {"source": "computed from the QC'd genotypes of the analysed donors",
                      "mode": "leave-one-chromosome-out", "n_snps_used": acc.n_snps_used,
                      "loco_chosen_by": ("default (SNPs on several chromosomes)"
                                         if loco_default else "loco=True"),
                      "n_snps_used_per_chromosome_left_out": {}}
        _check_loco_kinship_snps(geno, groups, np.concatenate(kept_all), acc, n)
    else:
        kin_report = {"source": "computed from the QC'd genotypes of the analysed donors",
                      "mode": "all SNPs", "n_snps_used": acc.n_snps_used,
                      "note": "the kinship contains the tested SNPs (proximal "
                              "contamination): conservative on a few regions"}
        _check_all_snp_kinship(geno, acc.n_snps_used, n, unknown, chrom, loco_default)
    switched: set = set()
    # ---- per kinship group (all SNPs, or one chromosome): null models, then the scan
    parts = {c: {"idx": [], "beta": [], "se": [], "pvalue": []} for c in tested}
    null_dirs: dict = {}
    null_report: dict = {c: {} for c in tested}
    maf_all = np.full(geno.n_snps, np.nan)
    kept_mask = np.zeros(geno.n_snps, dtype=bool)
    kept_mask[np.concatenate(kept_all)] = True
    for label, idx in groups:
        if not kept_mask[idx].any():          # nothing to test on this chromosome
            continue
        if K_given is not None:
            K = K_given
        elif loco:
            part = KinshipAccumulator(n)
            for _, block, _ in _qc_chunks(geno, donors, idx, chunk_size, maf):
                if block.shape[1]:
                    part.add(block)
            K = acc.without(part)
            kin_report["n_snps_used_per_chromosome_left_out"][label] = (
                acc.n_snps_used - part.n_snps_used)
        else:
            K = acc.result()
        basis = KinshipBasis(K, M)
        null_dirs[label] = basis.n_null_fixed_directions
        models = [fit_null_model(ys[c], M, basis, c) for c in tested]
        for m in models:
            null_report[m.factor][label] = {
                "lml0": m.lml0, "kinship_variance": m.v0 * m.y_scale ** 2,
                "residual_variance": m.v1 * m.y_scale ** 2,
                "kinship_fraction": m.v0 / (m.v0 + m.v1),
                "residual_df": m.df_resid, "degenerate": m.degenerate}
            _check_null_model(m, basis, label, n)
        desc = "scan" if label == "all" else f"scan chrom {label}"
        for kept, block, _ in _progress(_qc_chunks(geno, donors, idx, chunk_size, maf),
                                        -(-len(idx) // chunk_size), desc, progress):
            if block.shape[1] == 0:
                continue
            freq = block.mean(axis=0) / 2.0
            maf_all[kept] = np.minimum(freq, 1.0 - freq)
            rotated = basis.rotate(block)
            for model in models:
                r = scan_block(model, rotated, _scan_method(model, method, pvalue_method,
                                                            switched))
                parts[model.factor]["idx"].append(kept)
                for key in ("beta", "se", "pvalue"):
                    parts[model.factor][key].append(r[key])
    degenerate = sorted({f for f, v in null_report.items()
                         for x in v.values() if x["degenerate"]})
    report["pvalue_method"]["n_factors_with_degenerate_null_model"] = len(degenerate)
    report["pvalue_method"]["factors_switched_to_f"] = sorted(switched)
    if switched:
        report["warnings"].append(
            f"{len(switched)} factors have a degenerate null model (residual variance ~0, "
            "all variance on the kinship), e.g. " + ", ".join(sorted(switched)[:5]) +
            "; their p-values use the exact F-test instead of the likelihood-ratio test")
    if degenerate and method == "lrt" and pvalue_method == "lrt":
        report["warnings"].append(
            f"{len(degenerate)} factors have a degenerate null model (residual variance "
            "~0), e.g. " + ", ".join(degenerate[:5]) + "; the likelihood-ratio test "
            "requested with pvalue_method='lrt' can be inflated there: use "
            "pvalue_method='auto' (CLI: --pvalue-method auto)")
    kin_report["intercept_null_space_directions_given_variance"] = (
        null_dirs if loco else null_dirs["all"])
    report["kinship"] = kin_report
    report["null_models"] = (null_report if loco else
                             {c: v["all"] for c, v in null_report.items()})
    snp_ids = geno.snps["snp"].to_numpy()
    frames = []
    for c in tested:
        idx = np.concatenate(parts[c]["idx"])
        order = np.argsort(idx, kind="stable")
        frames.append(pd.DataFrame({
            "factor": c, "snp": snp_ids[idx[order]],
            "beta": np.concatenate(parts[c]["beta"])[order],
            "se": np.concatenate(parts[c]["se"])[order],
            "pvalue": np.concatenate(parts[c]["pvalue"])[order],
        }))
    res = pd.concat(frames, ignore_index=True)
    # ---- untestable pairs (non-finite statistics, e.g. a SNP collinear with covariates)
    finite = np.isfinite(res[["beta", "se", "pvalue"]].to_numpy()).all(axis=1)
    finite &= res["se"].to_numpy() > 0
    untestable = res.loc[~finite, ["factor", "snp"]]
    report["untestable_pairs"] = {"n": int((~finite).sum()),
                                  "examples": untestable.head(5).to_dict("records"),
                                  "reason": "non-finite or zero standard error (SNP "
                                            "collinear with the covariates)"}
    res = res.loc[finite].reset_index(drop=True)
    padj, info = adjust_pvalues(res["pvalue"].to_numpy(), fdr_method)
    res["padj"] = np.clip(padj, 0.0, 1.0)
    res["significant"] = res["padj"].to_numpy() < fdr
    res = _annotate_snps(res[RESULT_COLUMNS], geno.snps, maf_all)
    report["multiple_testing"] = {"method": fdr_method, "fdr": fdr, **info,
                                  "over": "all factor x SNP pairs together"}
    report["n_tests"] = int(len(res))
    report["n_significant"] = int(res["significant"].sum())
    report["lambda_gc"] = genomic_inflation(res["pvalue"].to_numpy())
    report["lambda_gc_per_factor"] = {c: genomic_inflation(g["pvalue"].to_numpy())
                                      for c, g in res.groupby("factor", sort=False)}
    return res, report
