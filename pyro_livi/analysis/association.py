"""Genetic association of donor factors (seed 001, eq. 19; DESIGN section 4).

For each donor factor k (a column of D or V), over the donors with factors and
genotypes::

    d_k = g beta + M alpha + u + eps,   u ~ N(0, v0 K),  eps ~ N(0, v1 I)

with M = [intercept, covariates] and K the kinship. Per factor the null model (no SNP)
is fitted by maximum likelihood, the fit of glimix-core's ``LMM(y, M, QS,
restricted=False)``, which fixes the ratio v0 / v1; every SNP g is then tested as
glimix-core's fast scanner does (fixed ratio; alpha, beta and the overall scale
re-estimated) and

    p = chi2(1).sf(2 * (lml_alt - lml_null)).

How this differs from calling glimix-core factor by factor (each checked in
``tests/test_association.py`` and ``tests/test_association_scale.py`` against
glimix-core):

- the null models of all factors are fitted at once (:func:`fit_null_models`: the
  profile likelihood over v1 / (v0 + v1) on a grid, then bisection on its derivative,
  in the kinship's eigenbasis) instead of one optimiser call each; the likelihoods
  agree to rounding, the variances and p-values to glimix-core's optimiser tolerance
  (1e-6 in logit of the ratio; p-values to ~1e-6 relative);
- the scan's algebra is vectorised over SNPs and factors (:class:`ScanPlan`): one
  chunk of SNPs is rotated once, ``Q0^T G``, and tested against every factor by two
  matrix products (glimix-core loops over SNPs in Python when there are covariates);
  lml and effect sizes agree with ``fast_scan`` to rounding at the same variances;
- standard errors include the alternative model's scale, as glimix-core's single-SNP
  ``scan`` does (its ``fast_scan`` omits it when there is more than one covariate);
- the null lml uses the same exact algebra as the alternatives (glimix-core's null solve
  truncates directions of badly conditioned covariates, which would inflate every LRT);
- the factor is divided by its sd and covariates are standardised before fitting
  (same models; glimix-core's absolute variance floors of 1.5e-8 then cannot act on a
  small-valued factor); beta and se are reported in factor units;
- a centred kinship (K 1 = 0) gets variance 1 along the intercept
  (:class:`KinshipBasis`), without which the ML likelihood is unbounded as v1 -> 0.

Genotypes are read by chunks of SNPs (bounded memory), in this process or as the tasks
of a Dask cluster (:mod:`pyro_livi.analysis.association_chunks`; ``dask_scheduler``).

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

from collections import Counter
from dataclasses import dataclass, field
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
)
from pyro_livi.analysis.association_chunks import (
    ChunkSource,
    make_executor,
    progress as _bar,
    qc_kinship_task,
    scan_task,
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
#: is degenerate (all variance on the kinship). Not with a kinship proportional to the
#: identity, where kinship and residual variance cannot be told apart.
DEGENERATE_RESIDUAL_FRACTION = 1e-4
#: A computed leave-one-chromosome-out kinship keeps one donors x donors accumulator per
#: chromosome from the first pass over the SNPs when they take at most this many bytes
#: together; otherwise each chromosome's part is read again before its scan.
LOCO_KINSHIP_PARTS_MAX_BYTES = 2 * 1024 ** 3
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

    ``chi2_1.isf`` is decreasing, so the median statistic is that of the median
    p-value: only the one or two middle p-values (found by partial sorting) are
    transformed. NaN for an empty input.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    if np.isnan(p).any():
        raise ValueError("genomic_inflation: NaN p-values")
    half = p.size // 2
    if p.size % 2:
        middle = np.partition(p, half)[half:half + 1]
    else:
        part = np.partition(p, (half - 1, half))
        middle = part[half - 1:half + 1]
    return float(np.mean(stats.chi2.isf(middle, 1)) / stats.chi2.ppf(0.5, 1))


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
    # sorted here once and put back by index (statsmodels would sort twice); the order
    # of tied p-values does not change their adjusted values
    order = np.argsort(p)
    out = np.empty_like(p)
    out[order] = multipletests(p[order], method="fdr_bh", is_sorted=True)[1]
    return out


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
    ``economic_qs``); ``QS`` is the tuple glimix-core's ``LMM`` takes (``((Q0, Q1), S0)``;
    ``Q1`` is None when directions were added as below, glimix-core does not use it).

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
    treated. Those directions are orthogonal to ``Q0``, so ``K + U U^T`` has the
    eigenvectors ``[Q0, U]`` with eigenvalues ``[S0, 1]``: one eigendecomposition
    (``O(n^3)``) per kinship.
    """

    def __init__(self, K: np.ndarray, M: np.ndarray | None = None):
        from numpy_sugar.linalg import economic_qs

        K = np.asarray(K, dtype=np.float64)
        QS = economic_qs(K)
        Q0, S0 = QS[0][0], np.asarray(QS[1], dtype=np.float64)
        self.n_null_fixed_directions = 0
        if M is not None:
            U = _null_fixed_directions(Q0, np.asarray(M, dtype=np.float64))
            if U.shape[1]:
                # U lies in the null space of K: K + U U^T has eigenvectors [Q0, U]
                # with eigenvalues [S0, 1] (U made exactly orthogonal to Q0 first)
                self.n_null_fixed_directions = int(U.shape[1])
                K = K + U @ U.T
                U, _ = np.linalg.qr(U - Q0 @ (Q0.T @ U))
                Q0 = np.concatenate([Q0, U], axis=1)
                S0 = np.concatenate([S0, np.ones(U.shape[1])])
                QS = ((Q0, None), S0)
        self.K = K
        self.QS = QS
        self.Q0 = np.ascontiguousarray(Q0)
        self.S0 = S0
        self.n = self.Q0.shape[0]

    def rotate(self, G: np.ndarray) -> "RotatedBlock":
        """Quantities of a (n, m) SNP block shared by all factors' scans.

        ``Q0^T G`` is the one product of order ``n r m`` a block costs; the squared norms
        of ``(I - Q0 Q0^T) G`` are computed (a second such product) only when the kinship
        has rank ``r < n``; with full rank they are 0.
        """
        G = np.asarray(G, dtype=np.float64)
        Q0tG = self.Q0.T @ G
        if self.Q0.shape[1] < self.n:
            PG = G - self.Q0 @ Q0tG
            PGsq = np.einsum("ij,ij->j", PG, PG)
        else:
            PGsq = np.zeros(G.shape[1])
        return RotatedBlock(G, Q0tG, PGsq)


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
    of ``(I - Q0 Q0^T) G`` (m,; zeros when the kinship has full rank)."""

    G: np.ndarray
    Q0tG: np.ndarray
    PGsq: np.ndarray


@dataclass
class NullModel:
    """Fitted null LMM of one factor and what its scan needs.

    The null model ``y ~ N(M alpha, s ((1 - delta) K + delta I))`` (``v0 = s (1 - delta)``,
    ``v1 = s delta``) is fitted by maximum likelihood as glimix-core's
    ``LMM(y, M, QS, restricted=False).fit()`` does, for all factors at once
    (:func:`fit_null_models`); ``y`` is the factor divided by ``y_scale`` (its sd) so
    that the absolute variance floors (1.5e-8) cannot act on a small-valued factor;
    ``beta``/``se`` are reported back in factor units.

    Attributes: ``lml0`` (null log marginal likelihood at the fitted variances, computed
    with the same algebra as the scan's alternative models; it equals glimix-core's
    ``scanner.null_lml()`` whenever glimix-core's least-squares solve keeps every
    direction of M, see :func:`fit_null_model`), ``lml_fit`` (the maximised profile
    likelihood, glimix-core's ``lmm.lml()``), ``delta`` and ``scale`` (glimix-core's
    parameters), ``v0`` / ``v1`` (kinship / residual variance, in units of the scaled
    factor), ``scanner`` (glimix-core's ``FastScanner`` at these variances, built on
    first use, for cross-checks) and the precomputed products of the scan (``D0``,
    ``v``, ``Q0tM``, ``PM``, ...).
    """

    factor: str
    lml0: float
    v0: float
    v1: float
    y_scale: float
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
    #: glimix-core's parametrisation: ``delta = v1 / (v0 + v1)``, ``scale = v0 + v1``
    delta: float = float("nan")
    scale: float = float("nan")
    #: the maximised log marginal likelihood of the fit (glimix-core's ``lmm.lml()``)
    lml_fit: float = float("nan")
    _ys: np.ndarray | None = field(default=None, repr=False)
    _M: np.ndarray | None = field(default=None, repr=False)
    _basis: "KinshipBasis | None" = field(default=None, repr=False)
    _scanner: object = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return self.PM.shape[0]

    @property
    def scanner(self):
        """glimix-core's ``FastScanner`` for this null model (what
        ``LMM.get_fast_scanner()`` returns at these variances); built on first use."""
        if self._scanner is None:
            from glimix_core.lmm import FastScanner

            b = self._basis
            self._scanner = FastScanner(self._ys, self._M, ((b.Q0,), self.v0 * b.S0),
                                        self.v1)
        return self._scanner


def _safe_log(x):
    from numpy_sugar import epsilon

    return np.log(np.clip(x, epsilon.small, np.inf))


#: logit(delta) grid of the vectorised null fit (:func:`fit_null_models`); the
#: largest profile likelihood on it is refined by bisection on the derivative.
NULL_FIT_LOGIT_GRID = np.concatenate([[-30.0, -24.0, -18.0, -14.0],
                                      np.arange(-11.0, 11.001, 0.5),
                                      [14.0, 18.0, 24.0, 30.0]])
#: Bisection steps of the refinement (the bracket, two grid steps wide, shrinks to
#: about 1e-14 in logit(delta)).
NULL_FIT_BISECTIONS = 48


def _logit_to_delta(x):
    """glimix-core's ``delta`` of a logit (clamped to ``[eps, 1 - eps]``)."""
    from numpy_sugar import epsilon

    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(x))
        d = np.where(x > 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return np.clip(d, epsilon.tiny, 1.0 - epsilon.tiny)


class _ProfileML:
    """The ML profile log-likelihood of ``y_k ~ N(M b, s ((1 - delta) K + delta I))`` over
    delta, with ``b`` and ``s`` at their optimum, for K factors at once, in the
    eigenbasis of K (``K = Q0 diag(S0) Q0^T``, rank r)::

        D0 = (1 - delta) S0 + delta,   B = Q0 D0^-1 Q0^T + (I - Q0 Q0^T) / delta
        b = (M^T B M)^-1 M^T B y,      s = (y^T B y - y^T B M b) / n
        lml = -(n log(2 pi) + n + n log s + sum log D0 + (n - r) log delta) / 2

    (glimix-core's ``LMM``, ``restricted=False``) and its derivative in
    ``x = logit(delta)`` (envelope theorem: ``ds/ddelta = (y - M b)^T (dB/ddelta)
    (y - M b) / n``).
    """

    def __init__(self, Ys: np.ndarray, M: np.ndarray, basis: "KinshipBasis"):
        Q0, S0 = basis.Q0, basis.S0
        self.n, self.r = Q0.shape
        self.S0 = S0
        self.Q0ty = np.ascontiguousarray((Q0.T @ Ys).T)            # (K, r)
        self.Q0tM = Q0.T @ M                                       # (r, c)
        c = M.shape[1]
        self.c = c
        self.QQ = (self.Q0tM[:, :, None] * self.Q0tM[:, None, :]).reshape(self.r, c * c)
        K = Ys.shape[1]
        if self.r < self.n:
            Py = Ys - Q0 @ self.Q0ty.T
            PM = M - Q0 @ self.Q0tM
            self.yPy = np.einsum("ik,ik->k", Py, Py)
            self.MPy = (PM.T @ Py).T                               # (K, c)
            self.MPM = PM.T @ PM
        else:
            self.yPy, self.MPy, self.MPM = np.zeros(K), np.zeros((K, c)), np.zeros((c, c))

    def __call__(self, x: np.ndarray):
        """Profile lml, its derivative in logit(delta), scale s, delta, b (K, c)."""
        from numpy_sugar import epsilon

        n, r, c = self.n, self.r, self.c
        delta = _logit_to_delta(np.asarray(x, dtype=np.float64))
        D0 = (1.0 - delta)[:, None] * self.S0[None, :] + delta[:, None]
        W = 1.0 / D0
        WQy = W * self.Q0ty
        yBy = np.einsum("kr,kr->k", WQy, self.Q0ty) + self.yPy / delta
        MBy = WQy @ self.Q0tM + self.MPy / delta[:, None]
        MBM = (W @ self.QQ).reshape(-1, c, c) + self.MPM[None] / delta[:, None, None]
        b = np.linalg.solve(MBM, MBy[:, :, None])[:, :, 0]
        s = np.maximum((yBy - np.einsum("kc,kc->k", MBy, b)) / n, epsilon.small)
        logdet = np.log(D0).sum(axis=1) + (n - r) * np.log(delta)
        lml = -(n * np.log(2 * np.pi) + n + n * np.log(s) + logdet) / 2.0
        res = self.Q0ty - b @ self.Q0tM.T                         # Q0^T (y - M b)
        rPr = (self.yPy - 2.0 * np.einsum("kc,kc->k", b, self.MPy)
               + np.einsum("ki,ij,kj->k", b, self.MPM, b))
        one_s = 1.0 - self.S0
        ds = -(np.einsum("kr,r->k", res * res * W * W, one_s) + rPr / delta ** 2) / n
        dlogdet = W @ one_s + (n - r) / delta
        dlml = -(n * ds / s + dlogdet) / 2.0
        return lml, dlml * delta * (1.0 - delta), s, delta, b


def _maximise_profile(profile: _ProfileML, K: int) -> np.ndarray:
    """logit(delta) maximising each factor's profile likelihood: the best point of
    :data:`NULL_FIT_LOGIT_GRID`, then bisection on the sign of the derivative inside
    the two neighbouring grid intervals. A maximum beyond the grid's ends (the
    likelihood still rising there) is put at glimix-core's bound: delta = eps or
    1 - eps."""
    grid = NULL_FIT_LOGIT_GRID
    values = np.stack([profile(np.full(K, g))[0] for g in grid])      # (grid, K)
    values = np.where(np.isfinite(values), values, -np.inf)
    best = values.argmax(axis=0)
    lo = grid[np.maximum(best - 1, 0)]
    hi = grid[np.minimum(best + 1, grid.size - 1)]
    a, b = lo.copy(), hi.copy()
    for _ in range(NULL_FIT_BISECTIONS):
        mid = 0.5 * (a + b)
        rising = profile(mid)[1] > 0
        a = np.where(rising, mid, a)
        b = np.where(rising, b, mid)
    x = 0.5 * (a + b)
    lml_x = profile(x)[0]
    # keep the grid point where it is better (a bracket without an interior maximum)
    x = np.where(np.isfinite(lml_x) & (lml_x >= values[best, np.arange(K)]), x, grid[best])
    end_lo = (best == 0) & (np.abs(x - grid[0]) < 1e-9)
    end_hi = (best == grid.size - 1) & (np.abs(x - grid[-1]) < 1e-9)
    if end_lo.any() or end_hi.any():
        slope = profile(x)[1]
        x = np.where(end_lo & (slope < 0), -np.inf, x)
        x = np.where(end_hi & (slope > 0), np.inf, x)
    return x


def fit_null_models(Y: np.ndarray, M: np.ndarray, basis: "KinshipBasis",
                    factors: Sequence[str] | None = None) -> list[NullModel]:
    """Fit the null LMM of every factor (columns of ``Y``) at once and precompute
    their scans.

    ``Y``: (n, K) factor values; ``M``: (n, c) intercept + covariates (well scaled:
    :func:`associate_factors` standardises covariate columns); ``basis``: the kinship's
    :class:`KinshipBasis`; ``factors``: K names.

    Each factor is divided by its sd and its maximum-likelihood null model
    ``y ~ N(M alpha, s ((1 - delta) K + delta I))`` is the one glimix-core's
    ``LMM(y, M, QS, restricted=False).fit()`` looks for: the profile likelihood over
    delta (alpha and s at their closed-form optimum) is maximised, here for all factors
    in one batched computation in the eigenbasis of K (:class:`_ProfileML`): evaluated
    on the grid :data:`NULL_FIT_LOGIT_GRID` of logit(delta), then refined by bisection
    on its derivative. glimix-core maximises the same function with Brent's method
    stopped at a tolerance of 1e-6 in logit(delta); the two fits agree in
    log-likelihood to rounding and in variances and p-values to that tolerance
    (``tests/test_association_scale.py``).

    The null lml used by the scan is computed with the same exact algebra as the
    alternative models (see :func:`fit_null_model`). Returns one :class:`NullModel` per
    factor.
    """
    from numpy_sugar import epsilon

    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    M = np.asarray(M, dtype=np.float64)
    n, K = Y.shape
    factors = [str(f) for f in (factors if factors is not None else range(K))]
    y_scale = Y.std(axis=0)
    Ys = Y / y_scale[None, :]
    profile = _ProfileML(Ys, M, basis)
    x = _maximise_profile(profile, K)
    lml_fit, _, scale, delta, _ = profile(x)
    v0 = scale * (1.0 - delta)
    v1 = scale * delta
    # the scan's covariance: Q0 diag(v0 S0) Q0^T + v I, v = v1 floored to 0 (as
    # glimix-core's fast scanner)
    v = np.where(v1 > epsilon.small, v1, 0.0)
    Q0, S0 = basis.Q0, basis.S0
    r = Q0.shape[1]
    D0 = v0[:, None] * S0[None, :] + v[:, None]                           # (K, r)
    with np.errstate(divide="ignore"):
        static = (-n * np.log(2 * np.pi) - n - _safe_log(D0).sum(axis=1)
                  - (n - r) * _safe_log(v))
    Q0tM = profile.Q0tM
    Q0ty = profile.Q0ty                                                    # (K, r)
    PM = M - Q0 @ Q0tM
    Py = Ys - Q0 @ Q0ty.T                                                  # (n, K)
    W = 1.0 / D0
    A = (W @ profile.QQ).reshape(K, M.shape[1], M.shape[1])
    a = (W * Q0ty) @ Q0tM
    yTBy = np.einsum("kr,kr->k", W * Q0ty, Q0ty)
    pos = v > 0
    if pos.any():
        A[pos] += (PM.T @ PM)[None] / v[pos, None, None]
        a[pos] += (Py[:, pos].T @ PM) / v[pos, None]
        yTBy[pos] += np.einsum("ik,ik->k", Py[:, pos], Py[:, pos]) / v[pos]
    A_pinv = np.linalg.pinv((A + np.swapaxes(A, 1, 2)) / 2.0, hermitian=True)
    bstar0 = np.maximum(yTBy - np.einsum("ki,kij,kj->k", a, A_pinv, a), epsilon.tiny)
    lml0 = (static - n * _safe_log(bstar0 / n)) / 2.0
    rank_m = int(np.linalg.matrix_rank(M))
    n_eff = np.where(pos, n, r)
    # with K proportional to I only v0 S0 + v1 is identified: no split of it is degenerate
    split_identified = r < n or np.ptp(S0) > 1e-8 * S0.max()
    degenerate = split_identified & (v1 <= DEGENERATE_RESIDUAL_FRACTION * (v0 + v1))
    return [NullModel(factors[k], float(lml0[k]), float(v0[k]), float(v1[k]),
                      float(y_scale[k]), D0[k], float(v[k]), float(static[k]), Q0tM, PM,
                      Q0ty[k], Py[:, k].copy(), A_pinv[k], a[k], float(bstar0[k]),
                      int(n_eff[k] - rank_m - 1), bool(degenerate[k]), float(delta[k]),
                      float(scale[k]), float(lml_fit[k]), Ys[:, k].copy(), M, basis)
            for k in range(K)]


def fit_null_model(y: np.ndarray, M: np.ndarray, basis: "KinshipBasis",
                   factor: str = "") -> NullModel:
    """Fit the null LMM of one factor and precompute its scan
    (:func:`fit_null_models` with one factor).

    ``y``: (n,) factor values; ``M``: (n, c) intercept + covariates (well scaled:
    :func:`associate_factors` standardises covariate columns); ``basis``: the kinship's
    :class:`KinshipBasis`.

    The null lml is computed with the same algebra as the alternative models rather
    than taken from glimix-core's ``scanner.null_lml()``: glimix-core solves the null
    normal equations with a truncated least squares (``rcond = 1.5e-8``) that drops
    directions of a badly conditioned ``M^T B M``, while the alternative models are
    solved exactly; mixing the two would inflate every likelihood ratio.
    """
    return fit_null_models(np.asarray(y, dtype=np.float64)[:, None], M, basis, [factor])[0]


class ScanPlan:
    """The scan of every factor against SNP blocks, one kinship, all factors batched.

    Built from the factors' :class:`NullModel` (same kinship basis) and the test of each
    (``"lrt"`` or ``"f"``). For SNP g and factor k, with ``B_k`` the fast scanner's fixed
    covariance inverse and ``r_k = y_k - M alpha_k`` the null residual, the scan needs
    ``d = g^T B_k g``, ``num = r_k^T B_k g`` and ``P = M^T B_k g``; with
    ``R_k^T R_k = (M^T B_k M)^+``::

        s = d - |R_k P|^2,   alpha = num / s,   bstar = bstar0 - num alpha

    (the Schur complement of :func:`scan_block`). In the eigenbasis every one of these is
    a row vector times ``Q0^T G``, so a block of m SNPs costs the rotation ``Q0^T G``
    (shared by all factors; :meth:`KinshipBasis.rotate`) plus two products with
    ``K (c + 2)`` rows: ``[r_k / D0_k ; R_k M^T / D0_k] Q0^T G`` and
    ``(1 / D0_k) (Q0^T G)^2`` (c = columns of M). A kinship of rank ``r < n`` adds the
    terms of ``(I - Q0 Q0^T)`` (``/ v_k``). Picklable: a Dask worker scans with it.
    """

    def __init__(self, models: Sequence[NullModel], basis: "KinshipBasis",
                 methods: Sequence[str] | None = None):
        models = list(models)
        if not models:
            raise ValueError("ScanPlan needs at least one null model")
        methods = list(methods) if methods is not None else ["lrt"] * len(models)
        for mth in methods:
            if mth not in ("lrt", "f"):
                raise ValueError(f"method must be 'lrt' or 'f', got {mth!r}")
        self.factors = [m.factor for m in models]
        self.Q0 = basis.Q0
        n, r = self.Q0.shape
        self.n, self.r = n, r
        K = len(models)
        Q0tM = models[0].Q0tM
        c = Q0tM.shape[1]
        D0 = np.stack([m.D0 for m in models])                             # (K, r)
        self.Wd = 1.0 / D0
        self.v = np.array([m.v for m in models])
        A_pinv = np.stack([m.A_pinv for m in models])                     # (K, c, c)
        a = np.stack([m.a for m in models])
        b0 = np.einsum("kij,kj->ki", A_pinv, a)                           # (K, c)
        lam, V = np.linalg.eigh((A_pinv + np.swapaxes(A_pinv, 1, 2)) / 2.0)
        R = np.sqrt(np.clip(lam, 0.0, None))[:, :, None] * np.swapaxes(V, 1, 2)
        Q0tres = np.stack([m.Q0ty for m in models]) - b0 @ Q0tM.T          # (K, r)
        rows_num = Q0tres * self.Wd
        rows_P = np.einsum("kij,rj,kr->kir", R, Q0tM, self.Wd)            # (K, c, r)
        self.T = np.ascontiguousarray(np.concatenate([rows_num,
                                                      rows_P.reshape(K * c, r)]))
        self.c = c
        self.extra = r < n and bool((self.v > 0).any())
        if self.extra:
            PM = models[0].PM
            inv_v = np.where(self.v > 0, 1.0 / np.where(self.v > 0, self.v, 1.0), 0.0)
            Pres = np.stack([m.Py for m in models]) - b0 @ PM.T               # (K, n)
            self.Pres = Pres * inv_v[:, None]
            self.RP = R * inv_v[:, None, None]                               # (K, c, c)
            self.PM = PM
            self.inv_v = inv_v
        self.bstar0 = np.array([m.bstar0 for m in models])
        self.static = np.array([m.static_lml for m in models])
        self.lml0 = np.array([m.lml0 for m in models])
        self.y_scale = np.array([m.y_scale for m in models])
        self.df = np.array([m.df_resid for m in models])
        self.methods = np.array(methods)

    @property
    def n_factors(self) -> int:
        return len(self.factors)

    def rotate(self, G: np.ndarray) -> RotatedBlock:
        """As :meth:`KinshipBasis.rotate`."""
        G = np.asarray(G, dtype=np.float64)
        Q0tG = self.Q0.T @ G
        if self.r < self.n:
            PG = G - self.Q0 @ Q0tG
            return RotatedBlock(G, Q0tG, np.einsum("ij,ij->j", PG, PG))
        return RotatedBlock(G, Q0tG, np.zeros(G.shape[1]))

    def scan(self, block: RotatedBlock, full: bool = False) -> dict:
        """Test every SNP of ``block`` against every factor.

        Returns (K, m) arrays ``beta`` and ``se`` (factor units per allele) and
        ``pvalue`` of each factor's test; with ``full`` also ``lml``, ``scale``,
        ``pvalue_lrt``, ``pvalue_f``, ``se_lrt`` and ``se_f`` (both tests for every
        factor). Pairs whose SNP is collinear with the covariates (``s`` not positive)
        are NaN.
        """
        from numpy_sugar import epsilon
        from scipy import special

        K, c, n = self.n_factors, self.c, self.n
        Q0tG = block.Q0tG
        m = Q0tG.shape[1]
        d = self.Wd @ (Q0tG * Q0tG)
        Z = self.T @ Q0tG
        num = Z[:K]
        P = Z[K:].reshape(K, c, m)
        if self.extra:
            d = d + self.inv_v[:, None] * block.PGsq[None, :]
            num = num + self.Pres @ block.G
            P = P + np.einsum("kij,jm->kim", self.RP, self.PM.T @ block.G)
        s = d - np.einsum("kim,kim->km", P, P)
        ok = s > 1e-10 * np.maximum(d, np.finfo(float).tiny)
        with np.errstate(divide="ignore", invalid="ignore"):
            s_ok = np.where(ok, s, np.nan)
            alpha = num / s_ok
            bstar = np.clip(self.bstar0[:, None] - num * alpha, epsilon.tiny, np.inf)
        def rows(mask):
            return slice(None) if mask.all() else np.flatnonzero(mask)

        is_lrt = self.methods == "lrt"
        is_f = (self.methods == "f") & (self.df >= 1)
        out = {}
        parts = []                                   # (rows, p, se) of each test
        with np.errstate(divide="ignore", invalid="ignore"):
            k = rows(is_lrt | full)
            if (is_lrt | full).any():
                scale = bstar[k] / n
                lml = (self.static[k, None] - n * _safe_log(scale)) / 2.0
                lrt = np.clip(2.0 * (lml - self.lml0[k, None]), 0.0, None)
                # chi2(1).sf(x) = erfc(sqrt(x / 2)) (scipy's chdtrc is ~100x slower)
                p_lrt = np.where(ok[k], special.erfc(np.sqrt(lrt / 2.0)), np.nan)
                se_lrt = np.sqrt(scale / s_ok[k])
                parts.append((k, is_lrt, p_lrt, se_lrt))
                if full:
                    out.update(lml=lml, scale=scale, pvalue_lrt=p_lrt, se_lrt=se_lrt)
            f_mask = (self.methods == "f") | full
            f_mask &= self.df >= 1
            if f_mask.any():
                k = rows(f_mask)
                df = self.df[k, None].astype(np.float64)
                sigma2 = bstar[k] / df
                fstat = np.clip(self.bstar0[k, None] - bstar[k], 0.0, None) / sigma2
                p_f = np.where(ok[k], special.fdtrc(1.0, df, fstat), np.nan)
                se_f = np.sqrt(sigma2 / s_ok[k])
                parts.append((k, is_f, p_f, se_f))
                if full:
                    pf_all = np.full((K, m), np.nan)
                    sf_all = np.full((K, m), np.nan)
                    pf_all[k], sf_all[k] = p_f, se_f
                    out.update(pvalue_f=pf_all, se_f=sf_all)
        if full and "pvalue_f" not in out:
            out.update(pvalue_f=np.full((K, m), np.nan), se_f=np.full((K, m), np.nan))
        if len(parts) == 1 and isinstance(parts[0][0], slice) and parts[0][1].all():
            pvalue, se = parts[0][2], parts[0][3]      # one test for every factor
        else:
            pvalue = np.full((K, m), np.nan)
            se = np.full((K, m), np.nan)
            for k, use, p_k, se_k in parts:
                idx = np.arange(K)[k]
                sel = use[idx]
                pvalue[idx[sel]] = p_k[sel]
                se[idx[sel]] = se_k[sel]
        out.update(beta=alpha * self.y_scale[:, None], se=se * self.y_scale[:, None],
                   pvalue=pvalue)
        return out


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
    ``s`` is not positive (collinear with the covariates) gets NaN. (Several factors at
    once: :class:`ScanPlan`, which computes the same.)

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
    if not isinstance(block, RotatedBlock):
        raise TypeError("scan_block takes KinshipBasis.rotate(G)")
    if method not in ("lrt", "f"):
        raise ValueError(f"method must be 'lrt' or 'f', got {method!r}")
    if model._basis is None:
        raise ValueError("scan_block needs a NullModel from fit_null_model(s)")
    r = ScanPlan([model], model._basis, [method]).scan(block, full=True)
    se = r["se_lrt"] if method == "lrt" else r["se_f"]
    return {"lml": r["lml"][0], "beta": r["beta"][0], "se": se[0] * model.y_scale,
            "pvalue": r["pvalue"][0], "pvalue_lrt": r["pvalue_lrt"][0],
            "pvalue_f": r["pvalue_f"][0], "scale": r["scale"][0]}


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


def _snp_annotations(snps: pd.DataFrame, maf: np.ndarray) -> dict:
    """Per SNP (rows of the genotypes' SNP table), the :data:`SNP_COLUMNS` of the
    results: chromosome, position, the two alleles (None where the genotypes do not
    have them) and ``maf`` (the MAF of the tested dosages, one value per SNP)."""
    snps = snps.reset_index(drop=True)
    lowered = {str(c).strip().lower(): c for c in snps.columns}

    def column(names):
        found = next((lowered[n] for n in names if n in lowered), None)
        if found is None:
            return np.full(len(snps), None, dtype=object)
        return snps[found].astype(object).where(snps[found].notna(), None).to_numpy(object)

    return {"chrom": column(("chrom",)),
            "pos": pd.to_numeric(snps["pos"]).round().astype("Int64").array,
            "allele_1": column(_ALLELE_1_NAMES), "allele_2": column(_ALLELE_2_NAMES),
            "maf": np.asarray(maf, dtype=np.float64)}


def _index_chunks(index: np.ndarray, chunk_size: int):
    for start in range(0, len(index), chunk_size):
        yield index[start:start + chunk_size]


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
                      progress: bool = True,
                      dask_scheduler=None) -> tuple[pd.DataFrame, dict]:
    """Test every donor factor against every SNP with a linear mixed model.

    Parameters
    ----------
    factors : DataFrame, donors (index = donor ids) x factors
        Factor values (e.g. the columns of LIVI's D and V).
    genotypes : Genotypes, PlinkReader or path
        Dosages. A :class:`PlinkReader` (or a PLINK path) is read from disk in chunks of
        ``chunk_size`` SNPs (bed-reader column windows): once (the scan, QC included)
        with a given kinship, twice with a computed one (QC + kinship, then the scan),
        so memory stays bounded by a chunk for large files (plus the results).
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
        SNPs per block (CLI ``--chunk-size``): one block is read, rotated by the
        kinship's eigenvectors once (``Q0^T G``) and tested against every factor at
        once (:class:`ScanPlan`). Results do not depend on it (to rounding).
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
    dask_scheduler : str, distributed.Client or None
        Run the passes over SNP chunks on a Dask cluster (``dask.distributed``; install
        with ``pip install "pyro-livi[distributed]"``): a scheduler address such as
        ``"tcp://host:8786"`` (CLI ``--dask-scheduler``) or a ``Client``. Each chunk is
        one task (:mod:`pyro_livi.analysis.association_chunks`); the kinship, the null
        models and the results table stay in this process. PLINK files must be readable
        by the workers at the same path. The p-values equal those of the
        single-process scan. Default None: this process.

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
        raise InputError("fdr", "fdr", f"{fdr} is not in (0, 1)",
                         "give the false discovery rate as a fraction, e.g. --fdr 0.05 (fdr=0.05 in Python)")
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
        raise InputError("<arguments>", "chunk_size", f"SNPs per chunk must be >= 1, got {chunk_size}",
                         "give a positive number of SNPs per chunk: --chunk-size 5000 (chunk_size=5000)")
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
                          bool(allow_partial_donor_match), dask_scheduler)
    finally:
        if own_reader:
            genotypes.close()


def _associate(factors, geno, kinship, covariates, inverse_normal, fdr, fdr_method,
               chunk_size, maf, loco, progress, pvalue_method="auto",
               allow_partial=False, dask_scheduler=None):
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
    source = ChunkSource.from_genotypes(geno, donors)
    all_idx = np.arange(geno.n_snps)
    chrom = geno.snps["chrom"].to_numpy(dtype=object)
    chrom_text = pd.Series(chrom, dtype=object)
    unknown = (chrom_text.isna() | chrom_text.astype(str).str.strip().isin(
        ["", "0", "nan", "None"])).to_numpy(bool)
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
    executor = make_executor(dask_scheduler)
    report["scan"] = {"executor": executor.description, "chunk_size": chunk_size}
    try:
        return _passes(report, factors, geno, donors, source, executor, groups, loco,
                       loco_default, K_given, kinship, kin_report, M, n, tested, ys,
                       method, pvalue_method, maf, chunk_size, progress, unknown, chrom,
                       fdr, fdr_method)
    finally:
        executor.close()


def _chunk_args(source, geno, index, chunk_size, maf, *extra):
    """Arguments of the chunk tasks over SNP indices ``index`` (generator)."""
    for idx in _index_chunks(index, chunk_size):
        yield (source.payload(geno, idx), idx, maf,
               *(e[idx] if isinstance(e, np.ndarray) else e for e in extra))


def _passes(report, factors, geno, donors, source, executor, groups, loco, loco_default,
            K_given, kinship, kin_report, M, n, tested, ys, method, pvalue_method, maf,
            chunk_size, progress, unknown, chrom, fdr, fdr_method):
    """The passes over the SNPs (QC + kinship when computed, then the scan of each
    kinship group) and the results table."""
    n_chunks = -(-geno.n_snps // chunk_size)
    qc_total = None
    acc = parts = None
    code_of = {label: i for i, (label, _) in enumerate(groups)}
    # ---- pass 1 (computed kinship only): SNP QC counts + kinship from the QC'd SNPs
    if K_given is None:
        acc = KinshipAccumulator(n)
        codes = False
        if loco and len(groups) * n * n * 8 <= LOCO_KINSHIP_PARTS_MAX_BYTES:
            codes = np.empty(geno.n_snps, dtype=np.int64)
            for label, idx in groups:
                codes[idx] = code_of[label]
            parts = {i: KinshipAccumulator(n) for i in range(len(groups))}
        kept_all = []
        args = _chunk_args(source, geno, np.arange(geno.n_snps), chunk_size, maf, True,
                           codes if parts is not None else None)
        for r in _bar(executor.map(qc_kinship_task, args, source=source), n_chunks,
                      "QC + kinship", progress):
            qc_total = merge_qc_counts(qc_total, r["counts"])
            kept_all.append(r["kept"])
            if r["kinship"] is None:
                continue
            if parts is None:
                acc.merge(r["kinship"])
            else:
                for code, part in r["kinship"].items():
                    parts[code].merge(part)
        if parts is not None:
            for code in range(len(groups)):
                acc.merge(parts[code])
        qc_total = dict(qc_total or {})
        qc_total["maf"] = maf
        report["snp_qc"] = qc_total
        if qc_total.get("n_snps_kept", 0) == 0:
            _raise_no_snp(geno, n, qc_total)
        kept_mask = np.zeros(geno.n_snps, dtype=bool)
        kept_mask[np.concatenate(kept_all)] = True
        if loco:
            kin_report = {"source": "computed from the QC'd genotypes of the analysed "
                          "donors", "mode": "leave-one-chromosome-out",
                          "n_snps_used": acc.n_snps_used,
                          "loco_chosen_by": ("default (SNPs on several chromosomes)"
                                             if loco_default else "loco=True"),
                          "n_snps_used_per_chromosome_left_out": {}}
            _check_loco_kinship_snps(geno, groups, np.flatnonzero(kept_mask), acc, n)
        else:
            kin_report = {"source": "computed from the QC'd genotypes of the analysed "
                          "donors", "mode": "all SNPs", "n_snps_used": acc.n_snps_used,
                          "note": "the kinship contains the tested SNPs (proximal "
                                  "contamination): conservative on a few regions"}
            _check_all_snp_kinship(geno, acc.n_snps_used, n, unknown, chrom, loco_default)
    else:
        kin_report["mode"] = "given" if not isinstance(kinship, str) else "identity"
        kept_mask = None
    switched: set = set()
    # ---- per kinship group (all SNPs, or one chromosome): null models, then the scan
    Y = np.column_stack([ys[c] for c in tested])
    null_dirs: dict = {}
    null_report: dict = {c: {} for c in tested}
    maf_all = np.full(geno.n_snps, np.nan)
    got = {"idx": [], "beta": [], "se": [], "pvalue": []}
    for label, idx in groups:
        if kept_mask is not None and not kept_mask[idx].any():
            continue                              # nothing to test on this chromosome
        if K_given is not None:
            K = K_given
        elif loco:
            if parts is not None:
                part = parts[code_of[label]]
            else:                                 # parts too large to keep: re-read
                part = KinshipAccumulator(n)
                args = _chunk_args(source, geno, idx, chunk_size, maf, True, None)
                for r in executor.map(qc_kinship_task, args, source=source):
                    if r["kinship"] is not None:
                        part.merge(r["kinship"])
            K = acc.without(part)
            kin_report["n_snps_used_per_chromosome_left_out"][label] = (
                acc.n_snps_used - part.n_snps_used)
        else:
            K = acc.result()
        basis = KinshipBasis(K, M)
        null_dirs[label] = basis.n_null_fixed_directions
        models = fit_null_models(Y, M, basis, tested)
        for m in models:
            null_report[m.factor][label] = {
                "lml0": m.lml0, "kinship_variance": m.v0 * m.y_scale ** 2,
                "residual_variance": m.v1 * m.y_scale ** 2,
                "kinship_fraction": m.v0 / (m.v0 + m.v1),
                "residual_df": m.df_resid, "degenerate": m.degenerate}
            _check_null_model(m, basis, label, n)
        plan = ScanPlan(models, basis, [_scan_method(m, method, pvalue_method, switched)
                                        for m in models])
        desc = "scan" if label == "all" else f"scan chrom {label}"
        args = _chunk_args(source, geno, idx, chunk_size, maf)
        for r in _bar(executor.map(scan_task, args, source=source, plan=plan),
                      -(-len(idx) // chunk_size), desc, progress):
            if K_given is not None:
                qc_total = merge_qc_counts(qc_total, r["counts"])
            if r["kept"].size == 0:
                continue
            maf_all[r["kept"]] = r["maf"]
            got["idx"].append(r["kept"])
            for key in ("beta", "se", "pvalue"):
                got[key].append(r[key])
    if K_given is not None:
        qc_total = dict(qc_total or {})
        qc_total["maf"] = maf
        report["snp_qc"] = qc_total
        if qc_total.get("n_snps_kept", 0) == 0:
            _raise_no_snp(geno, n, qc_total)
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
    # ---- results: factors in input order, SNPs in genotype order
    idx_all = np.concatenate(got["idx"])
    stacked = [np.concatenate(got[key], axis=1) for key in ("beta", "se", "pvalue")]
    if idx_all.size > 1 and not (np.diff(idx_all) > 0).all():   # chromosome groups
        order = np.argsort(idx_all, kind="stable")
        idx_all = idx_all[order]
        stacked = [x[:, order] for x in stacked]
    snp_pos = idx_all
    beta, se, pvalue = stacked
    K_f, m_t = beta.shape
    # untestable pairs (non-finite statistics, e.g. a SNP collinear with covariates)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(beta) & np.isfinite(se) & np.isfinite(pvalue) & (se > 0)
    snp_ids = geno.snps["snp"].to_numpy()
    names = np.array(tested, dtype=object)
    all_finite = bool(finite.all())
    bad_k, bad_j = (np.empty(0, int), np.empty(0, int)) if all_finite else np.nonzero(~finite)
    report["untestable_pairs"] = {
        "n": int(bad_k.size),
        "examples": [{"factor": names[k], "snp": snp_ids[snp_pos[j]]}
                     for k, j in zip(bad_k[:5], bad_j[:5])],
        "reason": "non-finite or zero standard error (SNP collinear with the covariates)"}
    ann = _snp_annotations(geno.snps, maf_all)
    if all_finite:                        # factor-major order = the arrays' row order
        factor_col = np.repeat(names, m_t)
        rows = np.tile(snp_pos, K_f)
        beta_v, se_v, pv = beta.ravel(), se.ravel(), pvalue.ravel()
    else:
        kk, jj = np.nonzero(finite)
        factor_col, rows = names[kk], snp_pos[jj]
        beta_v, se_v, pv = beta[kk, jj], se[kk, jj], pvalue[kk, jj]
    padj, info = adjust_pvalues(pv, fdr_method)
    padj = np.clip(padj, 0.0, 1.0)
    # one block per column (copy=False): no consolidation copy of millions of rows
    res = pd.DataFrame({"factor": factor_col, "snp": snp_ids[rows], "beta": beta_v,
                        "se": se_v, "pvalue": pv, "padj": padj, "significant": padj < fdr,
                        **{c: ann[c].take(rows) for c in SNP_COLUMNS}}, copy=False)
    report["multiple_testing"] = {"method": fdr_method, "fdr": fdr, **info,
                                  "over": "all factor x SNP pairs together"}
    report["n_tests"] = int(len(res))
    report["n_significant"] = int(np.count_nonzero(res["significant"].to_numpy()))
    report["lambda_gc"] = genomic_inflation(pv)
    report["lambda_gc_per_factor"] = _lambda_per_row(names, pvalue, finite, all_finite)
    return res, report


def _lambda_per_row(names, pvalue: np.ndarray, finite: np.ndarray, all_finite: bool) -> dict:
    """:func:`genomic_inflation` of each row of ``pvalue`` (its finite entries); rows
    without any are left out. Without non-finite entries, the middle p-values of all
    rows are found by one partial sort."""
    K, m = pvalue.shape
    if not all_finite or m == 0:
        return {names[k]: genomic_inflation(pvalue[k, finite[k]])
                for k in range(K) if finite[k].any()}
    half = m // 2
    if m % 2:
        middle = np.partition(pvalue, half, axis=1)[:, half:half + 1]
    else:
        middle = np.partition(pvalue, (half - 1, half), axis=1)[:, half - 1:half + 1]
    lam = stats.chi2.isf(middle, 1).mean(axis=1) / stats.chi2.ppf(0.5, 1)
    return {names[k]: float(lam[k]) for k in range(K)}


def _raise_no_snp(geno, n: int, qc_total: dict):
    raise InputError(geno.source, "SNPs", f"no SNP passes QC on the {n} analysed donors "
                     f"({qc_total})", "lower maf or check the genotypes")
