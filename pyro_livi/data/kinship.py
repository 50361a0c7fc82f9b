"""Kinship (genetic relatedness) matrices: computed from genotypes, read from a file, checked.

A kinship matrix K is donors x donors, symmetric positive semi-definite, and is the
covariance (up to scale) of the random genetic effect u ~ N(0, sigma_u^2 K) of the
association model (seed 001, eq. 19).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from pyro_livi.errors import InputError

#: Relative tolerances of :func:`validate_kinship`.
SYMMETRY_RTOL = 1e-6
PSD_RTOL = 1e-8


def gower_factor(K: np.ndarray) -> float:
    """Gower's factor ``(n - 1) / (trace(K) - 1^T K 1 / n)``.

    ``K * gower_factor(K)`` has mean sample variance 1 under ``N(0, K)``: the
    expected sample variance of ``u ~ N(0, K)`` is ``(trace(K) - 1^T K 1 / n) / (n - 1)``.
    """
    n = K.shape[0]
    denom = np.trace(K) - K.sum() / n
    if not denom > 0:
        raise InputError("kinship", "K", f"cannot Gower-normalise: trace(K) - 1'K1/n = "
                         f"{denom:.3g} is not positive", "the kinship carries no variance; "
                         "check the genotypes")
    return (n - 1) / denom


class KinshipAccumulator:
    """Build ``K = Z Z^T / n_snps`` block by block over SNPs, then Gower-normalise.

    ``Z`` is the standardised genotype matrix: each SNP mean-imputed, centred to mean 0
    and scaled to sd 1 (population sd, ddof=0); SNPs with zero variance are skipped and
    counted. Memory: one n x n matrix plus one block.
    """

    def __init__(self, n_donors: int):
        self.n_donors = int(n_donors)
        self._ZZt = np.zeros((self.n_donors, self.n_donors))
        self.n_snps_used = 0
        self.n_snps_skipped = 0

    def add(self, dosages: np.ndarray) -> None:
        """Add a (n_donors, n_block) block of dosages (NaN = missing, mean-imputed)."""
        G = np.asarray(dosages, dtype=np.float64)
        if G.ndim != 2 or G.shape[0] != self.n_donors:
            raise ValueError(f"block of shape {G.shape}, expected ({self.n_donors}, m)")
        miss = np.isnan(G)
        n_obs = (~miss).sum(axis=0)
        with np.errstate(invalid="ignore"):
            mean = np.nansum(G, axis=0) / np.maximum(n_obs, 1)
        G = np.where(miss, mean[None, :], G)
        G = G - mean[None, :]
        sd = np.sqrt((G ** 2).mean(axis=0))
        scale = np.abs(mean) + 1.0
        ok = (n_obs > 0) & (sd > 1e-12 * scale)
        self.n_snps_skipped += int((~ok).sum())
        if ok.any():
            Z = G[:, ok] / sd[ok][None, :]
            self._ZZt += Z @ Z.T
            self.n_snps_used += int(ok.sum())

    def merge(self, other: "KinshipAccumulator") -> "KinshipAccumulator":
        """Add the SNPs accumulated in ``other`` (other SNPs, same donors) to this one;
        returns self. Blocks accumulated apart (e.g. on the workers of a cluster) and
        merged give the kinship of all their SNPs."""
        if other.n_donors != self.n_donors:
            raise ValueError("accumulators over different donors")
        self._ZZt += other._ZZt
        self.n_snps_used += other.n_snps_used
        self.n_snps_skipped += other.n_snps_skipped
        return self

    def result(self) -> np.ndarray:
        """The Gower-normalised kinship, shape (n_donors, n_donors)."""
        return self._finish(self._ZZt, self.n_snps_used)

    def without(self, part: "KinshipAccumulator") -> np.ndarray:
        """Kinship from the SNPs of this accumulator minus those added to ``part``.

        Used for leave-one-chromosome-out kinships: ``total.without(chromosome)`` is the
        Gower-normalised ``Z Z^T / m`` over the SNPs of every other chromosome (``part``
        must hold a subset of the SNPs added here, standardised the same way).
        """
        if part.n_donors != self.n_donors:
            raise ValueError("accumulators over different donors")
        return self._finish(self._ZZt - part._ZZt, self.n_snps_used - part.n_snps_used)

    @staticmethod
    def _finish(ZZt: np.ndarray, m: int) -> np.ndarray:
        if m <= 0:
            raise InputError("genotypes", "dosages", "no SNP with non-zero variance to "
                             "compute a kinship from", "give polymorphic SNPs (for a "
                             "leave-one-chromosome-out kinship: SNPs on at least two "
                             "chromosomes) or a kinship file")
        K = ZZt / m
        K = (K + K.T) / 2.0
        return K * gower_factor(K)


def kinship_from_genotypes(dosages: np.ndarray, *, block_size: int = 10_000) -> np.ndarray:
    """Kinship from a donors x SNPs dosage matrix (NaN = missing call).

    Standardise each SNP (mean imputation, mean 0, sd 1; zero-variance SNPs skipped),
    ``K = Z Z^T / n_snps``, then Gower-normalise:
    ``K * (n - 1) / (trace(K) - 1^T K 1 / n)``. Returns shape (n_donors, n_donors).
    """
    dosages = np.asarray(dosages, dtype=np.float64)
    acc = KinshipAccumulator(dosages.shape[0])
    for start in range(0, dosages.shape[1], block_size):
        acc.add(dosages[:, start:start + block_size])
    return acc.result()


def kinship_from_blocks(blocks: Iterable[np.ndarray], n_donors: int) -> tuple[np.ndarray, dict]:
    """As :func:`kinship_from_genotypes`, from an iterable of (n_donors, m) blocks.

    Returns ``(K, report)`` with ``n_snps_used`` and ``n_snps_skipped`` (zero variance).
    """
    acc = KinshipAccumulator(n_donors)
    for block in blocks:
        acc.add(block)
    return acc.result(), {"n_snps_used": acc.n_snps_used,
                          "n_snps_skipped": acc.n_snps_skipped}


def validate_kinship(K, source: str = "kinship",
                     donors: Sequence[str] | None = None) -> pd.DataFrame:
    """Check a kinship and return it as a donor-indexed DataFrame.

    ``K``: a DataFrame (index and columns = donor ids) or an array (then ``donors``
    names its rows/columns). Raises InputError when it is not square, its row and column
    ids differ (as sets; same ids in another order are aligned to the rows), it has
    duplicated ids, non-finite or non-numeric values, it is not symmetric (max |K - K^T|
    > 1e-6 max |K|) or not positive semi-definite (min eigenvalue < -1e-8 max eigenvalue).
    The returned matrix is ``(K + K^T) / 2``.
    """
    source = str(source)
    if isinstance(K, pd.DataFrame):
        rows = [str(i) for i in K.index]
        cols = [str(c) for c in K.columns]
        if K.shape[0] != K.shape[1]:
            raise InputError(source, "shape", f"kinship is {K.shape[0]} x {K.shape[1]}, not "
                             "square", "give a donors x donors matrix with donor ids as "
                             "first column and header")
        for ids, what in ((rows, "row ids"), (cols, "column ids")):
            dup = sorted(i for i, k in Counter(ids).items() if k > 1)
            if dup:
                raise InputError(source, what, f"duplicated ids {dup[:5]}",
                                 "give every donor once")
        if set(rows) != set(cols):
            only_r = sorted(set(rows) - set(cols))[:5]
            only_c = sorted(set(cols) - set(rows))[:5]
            raise InputError(source, "donor ids", f"row ids and column ids differ (rows "
                             f"only: {only_r}, columns only: {only_c})", "use the same "
                             "donor ids for rows (first column) and columns (header)")
        frame = K.copy()
        frame.index, frame.columns = rows, cols
        frame = frame.loc[rows, rows]
        non_num = [c for c, dt in frame.dtypes.items() if not pd.api.types.is_numeric_dtype(dt)]
        if non_num:
            raise InputError(source, "values", f"non-numeric values in columns "
                             f"{non_num[:5]}", "kinship entries must be numbers")
        M = frame.to_numpy(np.float64)
    else:
        M = np.asarray(K, dtype=np.float64)
        if M.ndim != 2 or M.shape[0] != M.shape[1]:
            raise InputError(source, "shape", f"kinship has shape {M.shape}, not square",
                             "give a donors x donors matrix")
        if donors is None:
            rows = [str(i) for i in range(M.shape[0])]
        else:
            rows = [str(d) for d in donors]
            if len(rows) != M.shape[0]:
                raise InputError(source, "shape", f"kinship is {M.shape[0]} x "
                                 f"{M.shape[1]} but {len(rows)} donors were given",
                                 "give one row/column per donor, in the donors' order")
    if not np.all(np.isfinite(M)):
        raise InputError(source, "values", f"{int((~np.isfinite(M)).sum())} non-finite "
                         "entries", "kinship entries must be finite numbers")
    scale = np.abs(M).max() if M.size else 0.0
    asym = np.abs(M - M.T).max() if M.size else 0.0
    if asym > SYMMETRY_RTOL * max(scale, 1e-300):
        i, j = np.unravel_index(np.argmax(np.abs(M - M.T)), M.shape)
        raise InputError(source, "values", f"kinship is not symmetric: K[{rows[i]!r}, "
                         f"{rows[j]!r}] = {M[i, j]:.6g} but K[{rows[j]!r}, {rows[i]!r}] = "
                         f"{M[j, i]:.6g}", "give a symmetric matrix (e.g. (K + K.T) / 2)")
    M = (M + M.T) / 2.0
    if M.size and _clearly_psd(M):
        return pd.DataFrame(M, index=rows, columns=rows)
    eig = np.linalg.eigvalsh(M)
    if eig.size and eig.min() < -PSD_RTOL * max(eig.max(), 1e-300):
        raise InputError(source, "values", f"kinship is not positive semi-definite: "
                         f"smallest eigenvalue {eig.min():.3g}, largest {eig.max():.3g}",
                         "give a valid relatedness matrix (e.g. computed from genotypes); "
                         "clip negative eigenvalues to 0 if it is a numerical artefact")
    return pd.DataFrame(M, index=rows, columns=rows)


def _clearly_psd(M: np.ndarray) -> bool:
    """True when the symmetric ``M`` passes the positive semi-definiteness rule of
    :func:`validate_kinship` (``min eigenvalue >= -PSD_RTOL * max eigenvalue``) by a
    Cholesky factorisation of ``M + PSD_RTOL * lam I``, ``lam`` a Rayleigh quotient
    (a lower bound of the largest eigenvalue, from a few power iterations): about ten
    times cheaper than the eigenvalues. False means "not shown", not "not PSD" (the
    caller then computes the eigenvalues)."""
    x = np.random.default_rng(0).standard_normal(M.shape[0])
    for _ in range(20):
        y = M @ x
        norm = np.linalg.norm(y)
        if not norm > 0:
            return False
        x = y / norm
    lam = float(x @ M @ x)
    if not lam > 0:
        return False
    try:
        np.linalg.cholesky(M + PSD_RTOL * lam * np.eye(M.shape[0]))
    except np.linalg.LinAlgError:
        return False
    return True


def align_kinship(K: pd.DataFrame, donors: Sequence[str], source: str = "kinship") -> np.ndarray:
    """Rows/columns of a validated kinship for ``donors`` (in that order).

    Donors absent from the kinship -> InputError listing them.
    """
    from pyro_livi.data.genotypes import formatting_pairs

    donors = [str(d) for d in donors]
    have = set(K.index)
    missing = [d for d in donors if d not in have]
    if missing:
        n_fmt, fmt = formatting_pairs(donors, list(K.index))
        hint = (f"; {n_fmt} of them differ from a kinship id only by formatting, e.g. "
                f"{', '.join(fmt)}" if n_fmt else "")
        raise InputError(source, "donor ids", f"{len(missing)} of the {len(donors)} "
                         f"analysed donors are missing from the kinship ({len(K.index)} "
                         f"donors, ids look like {list(K.index)[:5]}): "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}{hint}",
                         ("write the donor ids the same way in the kinship and the factor "
                          "table; " if n_fmt else "") + "give a kinship covering every "
                         "analysed donor, or drop --kinship to compute it from the "
                         "genotypes")
    return K.loc[donors, donors].to_numpy(np.float64)


def read_kinship(path, donors: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a donors x donors kinship table and reorder it to ``donors``.

    File: CSV (``.csv``) or tab-separated (anything else), gzip allowed; first column =
    donor ids (index), header = donor ids. Validated with :func:`validate_kinship`;
    donors missing from it -> InputError listing them. Returns a DataFrame indexed by
    donor ids (``donors`` order when given, else the file's).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path", "file not found", "pass an existing kinship table")
    name = path.name.lower()
    sep = "," if name.endswith(".csv") or name.endswith(".csv.gz") else "\t"
    try:
        frame = pd.read_csv(path, sep=sep, index_col=0, dtype={0: str})
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise InputError(path, "table", f"cannot parse: {err}", "give a donors x donors "
                         "table, first column donor ids, header donor ids") from err
    frame.index = frame.index.astype(str)
    frame.columns = [str(c) for c in frame.columns]
    K = validate_kinship(frame, str(path))
    if donors is None:
        return K
    donors = [str(d) for d in donors]
    return pd.DataFrame(align_kinship(K, donors, str(path)), index=donors, columns=donors)
