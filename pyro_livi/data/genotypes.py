"""Genotype input: PLINK 1 binary filesets and dosage tables, donor matching, SNP QC.

Every genotype matrix here is donors x SNPs, float64, holding allele dosages in [0, 2]
(copies of the counted allele) with NaN for a missing call. What an input must hold is
described in ``data_schemas/genotypes.schema.json``; each reader checks its options
against that schema and reports problems as :class:`~pyro_livi.errors.InputError`
naming the file, the field and the fix.

Large PLINK files need not be loaded whole: :class:`PlinkReader` reads any subset of
SNPs and donors on demand, and :func:`iter_snp_chunks` walks the SNPs in blocks.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal, Sequence

import jsonschema
import numpy as np
import pandas as pd

from pyro_livi.errors import InputError

SCHEMA_NAME = "genotypes.schema.json"

#: Lower-cased column names that mark a chromosome / position column of a dosage table.
CHROM_NAMES = ("chr", "chrom", "chromosome", "#chrom")
POS_NAMES = ("pos", "position", "bp", "bp_position")
#: Lower-cased column names taken as SNP annotation (not donors) in a snps_x_donors table
#: when ``annotation_columns`` is not given.
DEFAULT_ANNOTATION_NAMES = CHROM_NAMES + POS_NAMES + (
    "cell_type", "gene", "gene_id", "gene_name", "ref", "alt", "a1", "a2",
    "allele_1", "allele_2",
)
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
DUPLICATE_POLICIES = ("error", "make_unique", "auto")
#: What a SNP id looks like when a dosage table's orientation is detected from its names:
#: rs numbers, or chromosome:position ids (``1:150133323``, ``chr1_1234_A_G``).
SNP_ID_PATTERN = re.compile(r"^(rs\d+|(chr)?([0-9]{1,2}|X|Y|XY|MT?)[:_]\d+([:_].*)?)$",
                            re.IGNORECASE)


def genotypes_schema() -> dict:
    """The JSON Schema of a genotype input (``data_schemas/genotypes.schema.json``)."""
    text = (resources.files("pyro_livi") / "data_schemas" / SCHEMA_NAME).read_text()
    return json.loads(text)


def _dosage_bounds() -> tuple[float, float]:
    schema = genotypes_schema()
    return float(schema["x-dosage-min"]), float(schema["x-dosage-max"])


def _validate_descriptor(descriptor: dict, source: str) -> None:
    """Check reader options against the schema branch of their format."""
    schema = genotypes_schema()
    branch = next(b for b in schema["oneOf"]
                  if b["properties"]["format"]["const"] == descriptor["format"])
    validator = jsonschema.Draft202012Validator({**branch, "$defs": schema["$defs"]})
    error = jsonschema.exceptions.best_match(validator.iter_errors(descriptor))
    if error is None:
        return
    name = error.path[0] if error.path else (error.validator_value[0]
                                             if error.validator == "required" else "")
    desc = branch["properties"].get(name, {}).get("description")
    if desc is None and name in ("duplicate_snps",):
        desc = schema["$defs"]["duplicate_snps"]["description"]
    raise InputError(source, name or "options", error.message,
                     f"give a valid value ({desc or branch.get('title')})")


# --------------------------------------------------------------------------------------
# the container
# --------------------------------------------------------------------------------------


@dataclass
class Genotypes:
    """Dosages of a set of donors at a set of SNPs.

    Attributes
    ----------
    dosages : ndarray, shape (n_donors, n_snps), float64
        Allele dosage in [0, 2]; NaN marks a missing call.
    donors : list of str, length n_donors
        Donor ids, in the row order of ``dosages``.
    snps : DataFrame, n_snps rows
        One row per SNP, in the column order of ``dosages``: ``snp`` (unique id, str),
        ``chrom`` (str or None when unknown), ``pos`` (base-pair position, float, NaN when
        unknown), then any further annotation columns of the source.
    source : str
        Where the genotypes came from (a path), used in error messages.
    report : dict
        What the reader did that changed ids (e.g. duplicate SNP ids renamed); empty if
        nothing.
    """

    dosages: np.ndarray
    donors: list[str]
    snps: pd.DataFrame
    source: str
    report: dict = field(default_factory=dict)

    def __post_init__(self):
        self.source = str(self.source)
        dos = np.asarray(self.dosages)
        if dos.ndim != 2:
            raise InputError(self.source, "dosages", f"expected a 2-D donors x SNPs array, "
                             f"got shape {dos.shape}", "pass an array of shape "
                             "(n_donors, n_snps)")
        if not np.issubdtype(dos.dtype, np.number) or np.issubdtype(dos.dtype, np.complexfloating):
            raise InputError(self.source, "dosages", f"dtype {dos.dtype} is not real-valued",
                             "pass numeric dosages in [0, 2] (NaN for a missing call)")
        self.dosages = np.asarray(dos, dtype=np.float64)
        self.donors = [str(d) for d in self.donors]
        if len(self.donors) != self.dosages.shape[0]:
            raise InputError(self.source, "donors", f"{len(self.donors)} donor ids for "
                             f"{self.dosages.shape[0]} dosage rows",
                             "give one donor id per row of dosages")
        snps = self.snps
        if isinstance(snps, (list, tuple, np.ndarray, pd.Index)):
            snps = pd.DataFrame({"snp": list(snps)})
        snps = snps.reset_index(drop=True).copy()
        if "snp" not in snps.columns:
            raise InputError(self.source, "snps", "the SNP table has no 'snp' column",
                             "give a DataFrame with columns snp, chrom, pos")
        snps["snp"] = snps["snp"].astype(str)
        if "chrom" not in snps.columns:
            snps["chrom"] = None
        if "pos" not in snps.columns:
            snps["pos"] = np.nan
        snps["pos"] = pd.to_numeric(snps["pos"]).astype(np.float64)
        first = ["snp", "chrom", "pos"]
        self.snps = snps[first + [c for c in snps.columns if c not in first]]
        if len(self.snps) != self.dosages.shape[1]:
            raise InputError(self.source, "snps", f"{len(self.snps)} SNP rows for "
                             f"{self.dosages.shape[1]} dosage columns",
                             "give one SNP row per column of dosages")
        _check_unique(self.donors, self.source, "donor ids",
                      "give every donor once (remove or rename duplicated donors)")
        _check_unique(self.snps["snp"].tolist(), self.source, "SNP ids",
                      "make SNP ids unique (or read with duplicate_snps='make_unique')")
        _check_dosage_values(self.dosages, self.source, self.donors,
                             self.snps["snp"].tolist())

    @property
    def n_donors(self) -> int:
        return self.dosages.shape[0]

    @property
    def n_snps(self) -> int:
        return self.dosages.shape[1]

    def subset(self, donors: Sequence[str] | None = None, snp_index=None) -> "Genotypes":
        """Restrict (and order) to ``donors`` (ids, all present) and/or ``snp_index``."""
        rows = slice(None) if donors is None else _donor_positions(self.donors, donors,
                                                                   self.source)
        cols = slice(None) if snp_index is None else snp_index
        return Genotypes(self.dosages[:, cols][rows],
                         self.donors if donors is None else [str(d) for d in donors],
                         self.snps.iloc[cols], self.source, dict(self.report))


def _check_unique(ids: list[str], source: str, what: str, fix: str) -> None:
    seen, dups = set(), []
    for i in ids:
        if i in seen:
            dups.append(i)
        seen.add(i)
    if dups:
        raise InputError(source, what, f"{len(dups)} duplicated, e.g. "
                         f"{sorted(set(dups))[:5]}", fix)


def _check_dosage_values(dos: np.ndarray, source: str, donors: list[str],
                         snps: list[str]) -> None:
    lo, hi = _dosage_bounds()
    bad = np.isinf(dos) | (dos < lo) | (dos > hi)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(source, "dosages", f"{int(bad.sum())} values outside [{lo:g}, "
                         f"{hi:g}], e.g. {dos[r, c]!r} for donor {donors[r]!r} at SNP "
                         f"{snps[c]!r}", "dosages must count allele copies (0, 1, 2 or "
                         "an expected dosage in between); missing calls must be empty/NA")


def _donor_positions(have: Sequence[str], want: Sequence[str], source: str) -> np.ndarray:
    pos = {d: i for i, d in enumerate(have)}
    missing = [str(d) for d in want if str(d) not in pos]
    if missing:
        raise InputError(source, "donors", f"{len(missing)} requested donors have no "
                         f"genotypes, e.g. {missing[:5]}",
                         "match donors first (match_donors) or request genotyped donors only")
    return np.array([pos[str(d)] for d in want], dtype=np.int64)


def _dedupe_ids(ids: list[str], policy: str, source: str) -> tuple[list[str], int]:
    """Apply the duplicate-SNP policy; returns the ids and how many were renamed."""
    counts: dict[str, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    dups = [i for i, n in counts.items() if n > 1]
    if not dups:
        return ids, 0
    if policy not in ("make_unique", "auto"):
        raise InputError(source, "SNP ids", f"{len(dups)} SNP ids occur more than once "
                         f"(e.g. {dups[:5]})", "make SNP ids unique in the file, or read "
                         "it with duplicate_snps='make_unique' (CLI: --duplicate-snps "
                         "make_unique; Python: open_genotypes(path, duplicate_snps="
                         "'make_unique') and pass the result) to keep each as its own "
                         "variant, renamed id#2, id#3, ...")
    seen: dict[str, int] = {}
    taken = set(ids)
    out, renamed = [], 0
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        if seen[i] == 1:
            out.append(i)
            continue
        k = seen[i]
        new = f"{i}#{k}"
        while new in taken:
            k += 1
            new = f"{i}#{k}"
        taken.add(new)
        out.append(new)
        renamed += 1
    return out, renamed


# --------------------------------------------------------------------------------------
# PLINK
# --------------------------------------------------------------------------------------


def _plink_paths(prefix_or_bed) -> tuple[Path, Path, Path]:
    p = Path(prefix_or_bed)
    bed = p if p.suffix == ".bed" else Path(str(p) + ".bed")
    return bed, bed.with_suffix(".fam"), bed.with_suffix(".bim")


class PlinkReader:
    """Lazy access to a PLINK 1 binary fileset (``.bed`` + ``.fam``, ``.bim`` optional).

    Parameters
    ----------
    prefix_or_bed : path
        ``data/chr22`` or ``data/chr22.bed``.
    variant_count : int, optional
        Number of SNPs; required when there is no ``.bim`` (SNP ids then are the 0-based
        indices ``"0", "1", ...``), checked against the ``.bim`` and the file size
        otherwise.
    duplicate_snps : {"error", "make_unique"}
        Policy for SNP ids occurring more than once in the ``.bim``.

    Attributes
    ----------
    donors : list of str
        The ``.fam`` IID column (2nd column).
    snps : DataFrame
        ``snp, chrom, pos, allele_1, allele_2`` (from the ``.bim``; dosages count
        ``allele_1``); chromosome ``"0"`` and position 0 (PLINK's "unknown") become
        None / NaN.
    """

    def __init__(self, prefix_or_bed, *, variant_count: int | None = None,
                 duplicate_snps: Literal["error", "make_unique"] = "error"):
        from bed_reader import open_bed

        bed, fam, bim = _plink_paths(prefix_or_bed)
        self.source = str(bed)
        if not bed.exists():
            raise InputError(bed, "bed", "file not found", "pass an existing PLINK prefix "
                             "(path without extension) or .bed path")
        if not fam.exists():
            raise InputError(fam, "fam", "file not found beside the .bed", "put the .fam "
                             "(one line per donor: FID IID father mother sex phenotype) "
                             "next to the .bed with the same stem")
        has_bim = bim.exists()
        descriptor = {"format": "plink", "bed": str(bed), "fam": str(fam),
                      "bim": str(bim) if has_bim else None, "variant_count": variant_count,
                      "duplicate_snps": _schema_policy(duplicate_snps)}
        if variant_count is not None and not isinstance(variant_count, (int, np.integer)):
            raise InputError(bed, "variant_count", f"{variant_count!r} is not an integer",
                             "pass the number of SNPs as an integer")
        if variant_count is not None:
            descriptor["variant_count"] = int(variant_count)
        n_donors = _count_lines(fam)
        if n_donors == 0:
            raise InputError(fam, "fam", "no donors (empty file)", "give a .fam with one "
                             "line per donor")
        bytes_per_snp = math.ceil(n_donors / 4)
        size = bed.stat().st_size
        implied = (size - 3) / bytes_per_snp
        if not has_bim and variant_count is None:
            hint = (f" (the file size implies {int(implied)})" if implied == int(implied)
                    else "")
            raise InputError(bed, "variant_count", "there is no .bim beside the .bed, so "
                             "the number of SNPs is unknown", "pass variant_count=N "
                             f"(CLI: --variant-count N){hint}, or add the .bim")
        _validate_descriptor(descriptor, self.source)
        with open(bed, "rb") as fh:
            magic = fh.read(3)
        if magic != b"\x6c\x1b\x01":
            raise InputError(bed, "bed", f"not a SNP-major PLINK 1 .bed (magic bytes "
                             f"{magic.hex()})", "convert with plink --make-bed")
        self._bed = open_bed(bed, iid_count=n_donors,
                             sid_count=None if has_bim else int(variant_count))
        n_snps = self._bed.sid_count
        if variant_count is not None and int(variant_count) != n_snps:
            raise InputError(bed, "variant_count", f"variant_count={variant_count} but the "
                             f".bim lists {n_snps} SNPs", "drop variant_count or fix it")
        if size != 3 + bytes_per_snp * n_snps:
            raise InputError(bed, "bed", f"file size {size} bytes does not fit {n_donors} "
                             f"donors x {n_snps} SNPs (expected "
                             f"{3 + bytes_per_snp * n_snps})", "check variant_count / "
                             "the .bim and .fam belong to this .bed"
                             + (f"; the size implies {int(implied)} SNPs"
                                if implied == int(implied) else ""))
        self.donors = [str(i) for i in self._bed.iid]
        _check_unique(self.donors, fam, "IID", "give every donor a unique IID (2nd "
                      "column of the .fam)")
        report: dict = {}
        if has_bim:
            ids = [str(s) for s in self._bed.sid]
            ids, renamed = _dedupe_ids(ids, duplicate_snps, str(bim))
            if renamed:
                report["n_duplicate_snp_ids_renamed"] = renamed
                if duplicate_snps == "auto":
                    report.setdefault("notes", []).append(
                        f"{renamed} repeated SNP ids in the .bim: kept each as its own "
                        "variant, renamed id#2, id#3, ... (--duplicate-snps error refuses them)")
            chrom = [None if str(c) in ("0", "") else str(c) for c in self._bed.chromosome]
            pos = np.asarray(self._bed.bp_position, dtype=np.float64)
            pos[pos <= 0] = np.nan
            self.snps = pd.DataFrame({"snp": ids, "chrom": chrom, "pos": pos,
                                      "allele_1": [str(a) for a in self._bed.allele_1],
                                      "allele_2": [str(a) for a in self._bed.allele_2]})
        else:
            self.snps = pd.DataFrame({"snp": [str(i) for i in range(n_snps)],
                                      "chrom": [None] * n_snps,
                                      "pos": np.full(n_snps, np.nan)})
            report["snp_ids"] = "0-based indices (no .bim)"
        self.report = report

    @property
    def n_donors(self) -> int:
        return len(self.donors)

    @property
    def n_snps(self) -> int:
        return len(self.snps)

    def read(self, snp_index=None, donors: Sequence[str] | None = None) -> Genotypes:
        """Dosages of ``donors`` (ids, in that order; default all) at ``snp_index``.

        ``snp_index``: a slice, an integer array or a boolean mask over the SNPs
        (default all).
        """
        cols = slice(None) if snp_index is None else snp_index
        if isinstance(cols, np.ndarray) and cols.dtype == bool:
            cols = np.flatnonzero(cols)
        if donors is None:
            rows, ids = slice(None), self.donors
        else:
            rows, ids = _donor_positions(self.donors, donors, self.source), list(donors)
        dos = self._bed.read(index=np.s_[rows, cols], dtype="float64", order="C")
        return Genotypes(dos, ids, self.snps.iloc[cols], self.source, dict(self.report))

    def close(self) -> None:
        self._bed.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def read_plink(prefix_or_bed, *, variant_count: int | None = None, sid_index=None,
               duplicate_snps: Literal["error", "make_unique"] = "error") -> Genotypes:
    """Read a PLINK 1 binary fileset into memory (see :class:`PlinkReader`).

    ``sid_index`` (slice, integer array or boolean mask) reads a subset of SNPs only.
    Dosages count ``allele_1`` of the ``.bim`` (bed-reader's ``count_A1=True``).
    """
    reader = PlinkReader(prefix_or_bed, variant_count=variant_count,
                         duplicate_snps=duplicate_snps)
    try:
        return reader.read(sid_index)
    finally:
        reader.close()


# --------------------------------------------------------------------------------------
# dosage tables
# --------------------------------------------------------------------------------------


def _table_sep(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in TABLE_SUFFIXES:
        raise InputError(path, "path", "unknown table format", "use .csv / .csv.gz "
                         "(comma-separated) or .tsv / .txt (.gz) (tab-separated)")
    return TABLE_SUFFIXES[suffixes[-1]]


def _raw_header(path: Path, sep: str) -> list[str]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rt", newline="") as fh:
        return next(csv.reader(fh, delimiter=sep), [])


def _schema_policy(policy: str) -> str:
    """The schema knows error / make_unique; auto is checked here and validated as make_unique."""
    if policy == "auto":
        return "make_unique"
    return policy


def detect_orientation(header: Sequence[str], first_values: Sequence, *,
                       donors: Sequence[str] | None = None,
                       snp_id_column: str = "snp_id") -> tuple[str, str, str | None]:
    """Orientation of a dosage table from its header and first column, when unambiguous.

    In this order: the donor ids ``donors`` (e.g. a run's factor donors) among the column
    names but not the first column's values (``snps_x_donors``), or the reverse
    (``donors_x_snps``); a column named ``snp_id_column`` or a recognised SNP annotation
    (``CHR``, ``POS``, ``gene_id``, ...; ``snps_x_donors``); every column name after the
    first shaped like a SNP id (``rs123``, ``1:12345``) and no first-column value so
    (``donors_x_snps``), or the reverse (``snps_x_donors``, the first column holding the
    SNP ids). Returns ``(orientation, reason, snp id column or None)``; raises
    InputError naming ``--dosage-orientation`` when none of these decides.
    """
    header = [str(c) for c in header]
    values = [str(v) for v in first_values if v is not None and v == v]
    if donors:
        want = {str(d) for d in donors}
        in_header = [c for c in header if c in want]
        in_rows = [v for v in values if v in want]
        if in_header and not in_rows:
            return ("snps_x_donors", f"{len(in_header)} column names are donor ids of the "
                    f"factors (e.g. {in_header[0]!r})",
                    None if snp_id_column in header else header[0])
        if in_rows and not in_header:
            return ("donors_x_snps", f"{len(in_rows)} values of the first column "
                    f"{header[0]!r} are donor ids of the factors (e.g. {in_rows[0]!r})", None)
    named = [c for c in header if c == snp_id_column
             or c.strip().lower() in DEFAULT_ANNOTATION_NAMES]
    if named:
        return ("snps_x_donors", "the header has SNP columns (" + ", ".join(named[:4]) + ")",
                None)
    rest = header[1:]
    snp_cols = [c for c in rest if SNP_ID_PATTERN.match(c.strip())]
    snp_rows = [v for v in values if SNP_ID_PATTERN.match(v.strip())]
    if rest and len(snp_cols) == len(rest) and not snp_rows:
        return ("donors_x_snps", f"the column names after {header[0]!r} look like SNP ids "
                f"(e.g. {rest[0]!r})", None)
    if values and len(snp_rows) == len(values) and not snp_cols:
        return ("snps_x_donors", f"the first column {header[0]!r} holds SNP ids (e.g. "
                f"{values[0]!r})", header[0])
    raise InputError("dosage table", "orientation", "cannot tell whether rows are SNPs or "
                     f"donors (header starts {header[:5]}, first column starts "
                     f"{values[:3]})", "pass --dosage-orientation snps_x_donors (one row per "
                     "SNP) or donors_x_snps (one row per donor); orientation= in Python")


def read_dosage_table(path, *, orientation: Literal["snps_x_donors", "donors_x_snps", "auto"]
                      | None = None,
                      snp_id_column: str = "snp_id", donor_id_column: str | None = None,
                      annotation_columns: Sequence[str] | None = None,
                      duplicate_snps: Literal["error", "make_unique", "auto"] = "error",
                      donors: Sequence[str] | None = None) -> Genotypes:
    """Read a CSV/TSV dosage table (gzip or not; separator from the extension).

    ``orientation="snps_x_donors"``: rows are SNPs; ``snp_id_column`` holds the SNP ids,
    the annotation columns (default: the recognised names listed in the schema, e.g.
    ``CHR``, ``POS``, ``gene_id``, ``cell_type``) describe the SNP and every other column
    is a donor. ``orientation="donors_x_snps"``: rows are donors; ``donor_id_column``
    (default the first column) holds donor ids and every other non-annotation column is
    a SNP. ``orientation=None`` or ``"auto"``: detected (:func:`detect_orientation`; the
    optional ``donors``, e.g. the donors of the factors, help), and said in
    ``report["notes"]``. Empty / NA cells are missing calls (NaN); any other non-numeric
    value or a value outside [0, 2] is an InputError naming the column.

    ``duplicate_snps``: ``"error"`` refuses repeated SNP ids, ``"make_unique"`` keeps
    every row as its own variant (``id#2``, ...), ``"auto"`` keeps one copy of rows that
    repeat an earlier row's id, position and dosages, renames the rest as make_unique and
    says so in ``report["notes"]``.
    """
    path = Path(path)
    source = str(path)
    if duplicate_snps not in DUPLICATE_POLICIES:
        raise InputError(path, "duplicate_snps", f"unknown policy {duplicate_snps!r}",
                         f"use one of {list(DUPLICATE_POLICIES)}")
    detect = orientation in (None, "auto")
    if detect and not path.exists():
        raise InputError(path, "path", "file not found", "pass an existing dosage table")
    sep = _table_sep(path) if detect else None
    notes: list[str] = []
    if detect:
        header = _raw_header(path, sep)
        if not header:
            raise InputError(path, "header", "the file is empty", "give a table with a header")
        first = pd.read_csv(path, sep=sep, dtype=str, usecols=[0]).iloc[:, 0].tolist()
        try:
            orientation, reason, id_col = detect_orientation(
                header, first, donors=donors, snp_id_column=snp_id_column)
        except InputError as err:
            raise InputError(path, "orientation", err.problem, err.fix) from None
        notes.append(f"dosage table read as {orientation} ({reason}); "
                     "--dosage-orientation overrides")
        if id_col is not None and snp_id_column not in header:
            snp_id_column = id_col
    descriptor = {"format": "dosage_table", "path": str(path), "orientation": orientation,
                  "snp_id_column": snp_id_column, "donor_id_column": donor_id_column,
                  "annotation_columns": None if annotation_columns is None
                  else list(annotation_columns), "duplicate_snps": _schema_policy(duplicate_snps)}
    _validate_descriptor(descriptor, source)
    if not path.exists():
        raise InputError(path, "path", "file not found", "pass an existing dosage table")
    sep = _table_sep(path)
    header = _raw_header(path, sep)
    if not header:
        raise InputError(path, "header", "the file is empty", "give a table with a header")
    if orientation == "snps_x_donors":  # SNP columns repeated in donors x SNPs: duplicate_snps
        _check_unique(header, source, "header columns", "give every column a unique name")
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=True)
    if len(table.columns) != len(header) or (orientation == "snps_x_donors" and list(table.columns) != header):
        raise InputError(path, "header", "rows have more fields than the header",
                         "check the separator (comma for .csv, tab for .tsv/.txt)")
    written = dict(zip(table.columns, header))  # pandas renames repeated names: a, a.1
    report: dict = {"notes": notes} if notes else {}
    if orientation == "snps_x_donors":
        if snp_id_column not in table.columns:
            raise InputError(path, snp_id_column, f"no such column (columns start "
                             f"{header[:8]})", "pass snp_id_column=<the SNP id column>")
        if annotation_columns is None:
            annot = [c for c in header if c != snp_id_column
                     and c.strip().lower() in DEFAULT_ANNOTATION_NAMES]
        else:
            annot = [c for c in annotation_columns if c != snp_id_column]
            missing = [c for c in annot if c not in table.columns]
            if missing:
                raise InputError(path, "annotation_columns", f"columns {missing} not in "
                                 "the table", "list existing columns only")
        value_cols = [c for c in header if c != snp_id_column and c not in annot]
        if not value_cols:
            raise InputError(path, "donor columns", "no donor columns left after the SNP "
                             "id and annotation columns", "check annotation_columns")
        if table[snp_id_column].isna().any():
            row = int(np.flatnonzero(table[snp_id_column].isna())[0])
            raise InputError(path, snp_id_column, f"empty SNP id in data row {row + 1}",
                             "give every SNP an id")
        values = _numeric_block(table, value_cols, path, lambda r: table[snp_id_column].iat[r])
        if duplicate_snps == "auto":
            table, values = _drop_repeated_rows(table, values, snp_id_column, annot, report)
        ids, renamed = _dedupe_ids(table[snp_id_column].tolist(), duplicate_snps, source)
        if renamed:
            report["n_duplicate_snp_ids_renamed"] = renamed
            if duplicate_snps == "auto":
                report.setdefault("notes", []).append(
                    f"{renamed} rows repeat an earlier SNP id with other dosages or position: "
                    "kept each as its own variant, renamed id#2, id#3, ... "
                    "(--duplicate-snps error refuses them)")
        snps = pd.DataFrame({"snp": ids})
        chrom_col = next((c for c in annot if c.strip().lower() in CHROM_NAMES), None)
        pos_col = next((c for c in annot if c.strip().lower() in POS_NAMES), None)
        snps["chrom"] = (table[chrom_col].where(table[chrom_col].notna(), None).tolist()
                         if chrom_col else None)
        if pos_col:
            pos = pd.to_numeric(table[pos_col], errors="coerce")
            bad = pos.isna() & table[pos_col].notna()
            if bad.any():
                r = int(np.flatnonzero(bad)[0])
                raise InputError(path, pos_col, f"non-numeric position "
                                 f"{table[pos_col].iat[r]!r} in data row {r + 1}",
                                 "give base-pair positions as integers (empty if unknown)")
            snps["pos"] = pos.to_numpy(np.float64)
        else:
            snps["pos"] = np.nan
        for c in annot:
            if c not in (chrom_col, pos_col):
                snps[c] = table[c].to_numpy()
        return Genotypes(values.T, value_cols, snps, source, report)

    # donors_x_snps
    id_col = donor_id_column if donor_id_column is not None else header[0]
    if id_col not in table.columns:
        raise InputError(path, id_col, f"no such column (columns start {header[:8]})",
                         "pass donor_id_column=<the donor id column>")
    annot = [c for c in (annotation_columns or []) if c != id_col]
    missing = [c for c in annot if c not in table.columns]
    if missing:
        raise InputError(path, "annotation_columns", f"columns {missing} not in the table",
                         "list existing columns only")
    _check_unique([h for h in header if h == id_col or h in annot], source, "header columns",
                  "give the donor id and annotation columns unique names")
    value_cols = [c for c in table.columns if written[c] != id_col and written[c] not in annot]
    if not value_cols:
        raise InputError(path, "SNP columns", "no SNP columns", "give one column per SNP")
    if table[id_col].isna().any():
        row = int(np.flatnonzero(table[id_col].isna())[0])
        raise InputError(path, id_col, f"empty donor id in data row {row + 1}",
                         "give every donor an id")
    values = _numeric_block(table, value_cols, path, lambda r: table[id_col].iat[r])
    ids, renamed = _dedupe_ids([written[c] for c in value_cols], duplicate_snps, source)
    if renamed:
        report["n_duplicate_snp_ids_renamed"] = renamed
        if duplicate_snps == "auto":
            report.setdefault("notes", []).append(
                f"{renamed} columns repeat an earlier SNP id: kept each as its own variant, renamed "
                "id#2, id#3, ... (--duplicate-snps error refuses them)")
    snps = pd.DataFrame({"snp": ids, "chrom": [None] * len(ids), "pos": np.nan})
    return Genotypes(values, table[id_col].tolist(), snps, source, report)


def _drop_repeated_rows(table: pd.DataFrame, values: np.ndarray, id_col: str,
                        annot: list[str], report: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows that repeat an earlier row's SNP id, chromosome / position and dosages (the
    same variant listed twice, e.g. once per gene) are dropped; the count goes to
    ``report``."""
    ids = table[id_col]
    if not ids.duplicated().any():
        return table, values
    coords = [c for c in annot if c.strip().lower() in CHROM_NAMES + POS_NAMES]
    key = pd.concat([ids.reset_index(drop=True), table[coords].reset_index(drop=True),
                     pd.DataFrame(values)], axis=1, ignore_index=True)
    repeat = key.duplicated(keep="first").to_numpy()
    if not repeat.any():
        return table, values
    report["n_repeated_snp_rows_dropped"] = int(repeat.sum())
    report.setdefault("notes", []).append(
        f"{int(repeat.sum())} rows repeat an earlier row's SNP id, position and dosages: "
        "kept one copy of each")
    return table.loc[~repeat].reset_index(drop=True), values[~repeat]


def _numeric_block(table: pd.DataFrame, cols: list[str], path: Path, row_name) -> np.ndarray:
    """Columns ``cols`` as float64; non-numeric or out-of-range cells -> InputError."""
    lo, hi = _dosage_bounds()
    raw = table[cols]
    num = raw.apply(pd.to_numeric, errors="coerce")
    bad = num.isna().to_numpy() & raw.notna().to_numpy()
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(path, cols[c], f"non-numeric dosage {raw.iat[r, c]!r} (row "
                         f"{row_name(r)!r}); {int(bad[:, c].sum())} such cells in this "
                         "column", f"dosages must be numbers in [{lo:g}, {hi:g}], missing "
                         "calls empty or NA; if the table holds one row per SNP or per donor the "
                         "other way round, give --dosage-orientation (dosage_orientation= in "
                         "Python) or leave it to auto; if this column is not a dosage column, "
                         "list it in annotation_columns (read_dosage_table in Python)")
    values = num.to_numpy(np.float64)
    out = np.isinf(values) | (values < lo) | (values > hi)
    if out.any():
        r, c = np.argwhere(out)[0]
        raise InputError(path, cols[c], f"dosage {values[r, c]:g} outside [{lo:g}, {hi:g}] "
                         f"(row {row_name(r)!r}); {int(out[:, c].sum())} such cells in "
                         "this column", "dosages must count allele copies (0..2)")
    return values


# --------------------------------------------------------------------------------------
# dispatch and chunks
# --------------------------------------------------------------------------------------


def is_plink(path) -> bool:
    """True for a ``.bed`` path or a prefix with a ``.bed`` beside it."""
    p = Path(path)
    return p.suffix == ".bed" or Path(str(p) + ".bed").exists()


def open_genotypes(path, *, variant_count: int | None = None,
                   duplicate_snps: Literal["error", "make_unique"] = "error",
                   **table_options) -> "PlinkReader | Genotypes":
    """A lazy :class:`PlinkReader` for PLINK input, an in-memory :class:`Genotypes` for a
    dosage table (``table_options`` go to :func:`read_dosage_table`)."""
    if is_plink(path):
        if table_options:
            raise InputError(path, "options", f"options {sorted(table_options)} apply to "
                             "dosage tables, not PLINK", "drop them")
        return PlinkReader(path, variant_count=variant_count, duplicate_snps=duplicate_snps)
    if variant_count is not None:
        raise InputError(path, "variant_count", "variant_count applies to PLINK .bed input "
                         "only", "drop it for a dosage table")
    p = Path(path)
    name = p.name.lower()
    if not any(name.endswith(s) or name.endswith(s + ".gz") for s in TABLE_SUFFIXES):
        raise InputError(path, "path", "neither a PLINK .bed / prefix (no .bed found) nor a "
                         ".csv/.tsv/.txt(.gz) dosage table", "pass a PLINK prefix or .bed, "
                         "or a dosage table")
    return read_dosage_table(path, duplicate_snps=duplicate_snps, **table_options)


def read_genotypes(path, **options) -> Genotypes:
    """Read genotypes into memory, dispatching on the path.

    ``.bed`` or a prefix with a ``.bed`` beside it -> :func:`read_plink` (options
    ``variant_count``, ``sid_index``, ``duplicate_snps``); ``.csv/.tsv/.txt(.gz)`` ->
    :func:`read_dosage_table` (options ``orientation``, ...).
    """
    if is_plink(path):
        return read_plink(path, **options)
    source = open_genotypes(path, **options)
    return source


def iter_snp_chunks(source, chunk_size: int, donors: Sequence[str] | None = None, *,
                    variant_count: int | None = None, **table_options) -> Iterator[Genotypes]:
    """Yield consecutive blocks of at most ``chunk_size`` SNPs as :class:`Genotypes`.

    ``source``: a path (PLINK blocks are read from disk one at a time), a
    :class:`PlinkReader` or a :class:`Genotypes`. ``donors``: ids (all genotyped) giving
    the rows and their order; default all donors.
    """
    if chunk_size < 1:
        raise InputError("<arguments>", "chunk_size", f"SNPs per chunk must be >= 1, got {chunk_size}",
                         "give a positive number of SNPs per chunk: --chunk-size 5000 (chunk_size=5000)")
    own = False
    if isinstance(source, (str, Path)):
        source = open_genotypes(source, variant_count=variant_count, **table_options)
        own = isinstance(source, PlinkReader)
    try:
        for start in range(0, source.n_snps, chunk_size):
            sl = slice(start, min(start + chunk_size, source.n_snps))
            if isinstance(source, PlinkReader):
                yield source.read(sl, donors)
            else:
                yield source.subset(donors, sl)
    finally:
        if own:
            source.close()


# --------------------------------------------------------------------------------------
# donors and QC
# --------------------------------------------------------------------------------------


#: Refuse a donor match that keeps less than this fraction of the smaller donor set
#: (unless ``allow_partial_donor_match``).
MIN_MATCH_FRACTION = 0.5
PARTIAL_MATCH_FIX = ("to analyse only the matched donors on purpose, pass "
                     "allow_partial_donor_match=True (CLI: --allow-partial-donor-match)")


def _canonical_id(s: str) -> str:
    """Lower case, whitespace trimmed and collapsed, digit runs without leading zeros
    (``'1.0'`` -> ``'1'``): the spelling-insensitive form of a donor id."""
    t = re.sub(r"\s+", " ", str(s).strip().lower())
    return re.sub(r"\d+(?:\.0+)?(?!\d)", lambda m: str(int(m.group().split(".")[0])), t)


def _id_parts(canonical: str) -> list[str]:
    """The two halves of an ``FID_IID`` / ``FID IID`` / ``FID-IID`` id, else []."""
    parts = re.split(r"[_\s:-]+", canonical)
    return parts if len(parts) == 2 and all(parts) else []


def _difference(a: str, b: str) -> str:
    """How two ids that denote the same donor differ (a short label)."""
    def ws(x):
        return re.sub(r"\s+", " ", x.strip())

    def digits(x):
        return re.sub(r"\d+(?:\.0+)?(?!\d)", lambda m: str(int(m.group().split(".")[0])), x)

    kinds = []
    if ws(a) != a or ws(b) != b:
        kinds.append("whitespace")
    da, db = digits(ws(a)), digits(ws(b))
    if da != db and da.lower() == db.lower():
        kinds.append("case")
    runs_a, runs_b = re.findall(r"\d+(?:\.\d+)?", a), re.findall(r"\d+(?:\.\d+)?", b)
    if runs_a != runs_b and len(runs_a) == len(runs_b):
        if [r.split(".")[0] for r in runs_a] != [r.split(".")[0] for r in runs_b]:
            kinds.append("leading zeros")
        if any("." in r for r in runs_a + runs_b):
            kinds.append("integer written as a decimal")
    if _canonical_id(a) != _canonical_id(b):
        kinds.append("FID_IID form")
    return ", ".join(kinds) or "formatting"


def formatting_pairs(ids: Sequence[str], other: Sequence[str], limit: int = 5
                     ) -> tuple[int, list[str]]:
    """Ids of ``ids`` without an exact match in ``other`` that match an unmatched id of
    ``other`` after normalising the spelling (case, whitespace, leading zeros, ``1`` vs
    ``1.0``, ``FID_IID`` vs ``IID``). Returns the count and up to ``limit`` examples
    written ``'a' vs 'b' (kind)``."""
    have = set(other)
    want = set(ids)
    left = [i for i in ids if i not in have]
    right = [i for i in other if i not in want]
    if not left or not right:
        return 0, []
    by_key: dict[str, str] = {}
    by_part: dict[str, str] = {}
    for r in right:
        c = _canonical_id(r)
        by_key.setdefault(c, r)
        for part in _id_parts(c):
            by_part.setdefault(part, r)
    n, examples = 0, []
    for a in left:
        c = _canonical_id(a)
        b = by_key.get(c) or by_part.get(c)
        if b is None:
            b = next((by_key[p] for p in _id_parts(c) if p in by_key), None)
        if b is None:
            continue
        n += 1
        if len(examples) < limit:
            examples.append(f"{a!r} vs {b!r} ({_difference(a, b)})")
    return n, examples


def compare_donor_ids(ids: Sequence, other: Sequence, *, source, what: str,
                      other_what: str, allow_partial: bool = False,
                      field: str = "donor ids") -> dict:
    """Match the donors of one input (``ids``, e.g. a factor table) to another's
    (``other``, e.g. the genotypes) and refuse matches that are probably wrong.

    Never coerces ids. Raises :class:`InputError` (``source``, ``field``) when no donor
    matches; and, unless ``allow_partial``, when an unmatched id of one side equals an
    unmatched id of the other after normalising its spelling (case, whitespace, leading
    zeros, ``1`` vs ``1.0``, ``FID_IID``: they would be silently split), or when the
    matched donors are fewer than ``MIN_MATCH_FRACTION`` of the smaller of the two sets.
    The message gives the counts on each side, examples of unmatched ids and the
    formatting hint. Returns a report: ``n_<what>``, counts, examples, ``matched``.
    """
    ids = [str(i) for i in ids]
    other = [str(i) for i in other]
    have, want = set(other), set(ids)
    matched = [i for i in ids if i in have]
    un_left = [i for i in ids if i not in have]
    un_right = [i for i in other if i not in want]
    n_fmt, fmt = formatting_pairs(ids, other)
    report = {"n_left": len(ids), "n_right": len(other), "n_matched": len(matched),
              "matched": matched, "unmatched_left": un_left,
              "n_unmatched_right": len(un_right),
              "examples_unmatched_right": un_right[:5],
              "n_differing_only_by_formatting": n_fmt,
              "examples_differing_only_by_formatting": fmt,
              "allow_partial_donor_match": bool(allow_partial)}
    counts = (f"{len(matched)} of the {len(ids)} donors of {what} match the "
              f"{len(other)} donors of {other_what}; unmatched ids of {what}: "
              f"{len(un_left)}, e.g. {un_left[:5]}; of {other_what}: {len(un_right)}, "
              f"e.g. {un_right[:5]}")
    hint = (f"; {n_fmt} unmatched ids differ only by formatting, e.g. {', '.join(fmt)}"
            if n_fmt else "")
    same_ids = ("write the donor ids the same way in both inputs" +
                (" (the ids above differ only by formatting: fix the spelling in one "
                 "file; ids are never rewritten silently)" if n_fmt else ""))
    if not matched:
        raise InputError(source, field, f"none of the {len(ids)} donors of {what} is in "
                         f"{other_what}: {what} ids look like {ids[:5]}, {other_what} ids "
                         f"look like {other[:5]}{hint}", same_ids + " (e.g. the .fam IID "
                         "column, or the header of the dosage table)")
    if allow_partial:
        return report
    smaller = min(len(ids), len(other))
    if n_fmt:
        raise InputError(source, field, counts + hint, same_ids + "; " + PARTIAL_MATCH_FIX)
    if len(matched) < MIN_MATCH_FRACTION * smaller:
        raise InputError(source, field, counts + f" (only {len(matched)} of the smaller "
                         f"set of {smaller}; at least {MIN_MATCH_FRACTION:.0%} must match)",
                         same_ids + "; " + PARTIAL_MATCH_FIX)
    return report


def match_donors(genotypes, donor_ids: Sequence, *, source: str = "expression data",
                 allow_partial_donor_match: bool = False):
    """Restrict genotypes to ``donor_ids`` that have genotypes, in the order of ``donor_ids``.

    ``genotypes``: a :class:`Genotypes` (returned restricted) or a :class:`PlinkReader`
    (returned as is; use the report's ``matched`` list as ``donors`` when reading).

    Returns ``(genotypes, report)``, report keys: ``n_expression_donors``,
    ``n_genotyped``, ``n_matched``, ``matched`` (ids, in order), ``unmatched_expression``
    (ids without genotypes), ``unmatched_genotype`` (count of genotyped donors not
    requested), ``examples_unmatched_genotype``, ``n_differing_only_by_formatting`` and
    examples. No match at all, ids that differ only by formatting, or a match of less
    than half the smaller donor set -> InputError with examples of both id sets
    (:func:`compare_donor_ids`); the last two are allowed with
    ``allow_partial_donor_match=True``.
    """
    ids = [str(d) for d in donor_ids]
    _check_unique(ids, source, "donor ids", "give every donor once")
    rep = compare_donor_ids(ids, genotypes.donors, source=genotypes.source, what=source,
                            other_what="the genotypes",
                            allow_partial=allow_partial_donor_match)
    matched = rep["matched"]
    report = {
        "n_expression_donors": len(ids),
        "n_genotyped": len(genotypes.donors),
        "n_matched": len(matched),
        "matched": matched,
        "unmatched_expression": rep["unmatched_left"],
        "unmatched_genotype": rep["n_unmatched_right"],
        "examples_unmatched_genotype": rep["examples_unmatched_right"],
        "n_differing_only_by_formatting": rep["n_differing_only_by_formatting"],
        "examples_differing_only_by_formatting":
            rep["examples_differing_only_by_formatting"],
    }
    if isinstance(genotypes, Genotypes):
        return genotypes.subset(matched), report
    return genotypes, report


@dataclass
class QCBlock:
    """Result of :func:`qc_dosage_block` on one block of SNPs.

    ``keep``: bool (n_snps,), SNPs passing QC; ``dosages``: (n_donors, keep.sum()) with
    missing calls mean-imputed; ``counts``: exclusions and imputed calls.
    """

    keep: np.ndarray
    dosages: np.ndarray
    counts: dict


def qc_dosage_block(dosages: np.ndarray, maf: float, copy: bool = True) -> QCBlock:
    """QC one donors x SNPs block (see :func:`quality_control` for the rules).

    ``copy=False``: the returned dosages may be the (float64, C-ordered) input itself
    when every SNP is kept and no call is missing (no copy of a large block).
    """
    if not 0.0 <= maf < 0.5:
        raise InputError("maf", "maf", f"{maf} is not in [0, 0.5)",
                         "give a minor-allele frequency from 0 up to (not including) 0.5, e.g. "
                         "--maf 0.05 (maf=0.05 in Python)")
    dos = np.asarray(dosages, dtype=np.float64)
    total = dos.sum(axis=0)
    if not np.isnan(total).any():
        # no missing call (the common case): one pass each for the sums, min and max
        n_obs = np.full(dos.shape[1], dos.shape[0])
        all_missing = np.zeros(dos.shape[1], dtype=bool)
        mean = total / max(dos.shape[0], 1)
        lo, hi = dos.min(axis=0, initial=np.inf), dos.max(axis=0, initial=-np.inf)
        miss = None
        n_missing = 0
    else:
        miss = np.isnan(dos)
        n_obs = (~miss).sum(axis=0)
        all_missing = n_obs == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(all_missing, np.nan,
                            np.nansum(dos, axis=0) / np.maximum(n_obs, 1))
            lo = np.where(all_missing, np.nan,
                          np.nanmin(np.where(miss, np.inf, dos), axis=0))
            hi = np.where(all_missing, np.nan,
                          np.nanmax(np.where(miss, -np.inf, dos), axis=0))
        n_missing = int(miss.sum())
    mono = ~all_missing & (hi == lo)
    freq = mean / 2.0
    minor = np.minimum(freq, 1.0 - freq)
    low = ~all_missing & ~mono & (minor < maf)
    keep = ~all_missing & ~mono & ~low
    # np.compress keeps the C order (dos[:, keep] would return a transposed layout)
    kept = dos if keep.all() and not copy else np.compress(keep, dos, axis=1)
    n_imputed = 0
    if miss is not None:
        kmiss = miss[:, keep]
        n_imputed = int(kmiss.sum())
        if n_imputed:
            kept = np.where(kmiss, mean[keep][None, :], kept)
    counts = {
        "n_snps_in": int(dos.shape[1]),
        "n_all_missing": int(all_missing.sum()),
        "n_monomorphic": int(mono.sum()),
        "n_low_maf": int(low.sum()),
        "n_snps_kept": int(keep.sum()),
        "n_missing_calls": n_missing,
        "n_imputed_calls": n_imputed,
    }
    return QCBlock(keep, np.ascontiguousarray(kept), counts)


def merge_qc_counts(total: dict | None, counts: dict) -> dict:
    """Add the counts of one block to a running total."""
    if total is None:
        return dict(counts)
    return {k: total[k] + counts[k] for k in total}


def quality_control(genotypes: Genotypes, *, maf: float = 0.05) -> tuple[Genotypes, dict]:
    """SNP QC on the donors present in ``genotypes``.

    Per SNP: drop it when every call is missing; drop it when its observed calls show
    no variation (monomorphic, zero variance); drop it when its minor-allele frequency
    ``min(f, 1 - f)``, ``f = mean observed dosage / 2``, is below ``maf``; otherwise
    replace its missing calls by its mean observed dosage. Each exclusion is counted.

    Returns the QC'd genotypes (no NaN) and a report with ``n_snps_in``,
    ``n_all_missing``, ``n_monomorphic``, ``n_low_maf``, ``n_snps_kept``,
    ``n_missing_calls``, ``n_imputed_calls``, ``maf``, ``n_donors`` and examples
    (up to 5 ids) of each exclusion.
    """
    block = qc_dosage_block(genotypes.dosages, maf)
    report = dict(block.counts)
    report["maf"] = maf
    report["n_donors"] = genotypes.n_donors
    dos = genotypes.dosages
    n_obs = (~np.isnan(dos)).sum(axis=0)
    ids = genotypes.snps["snp"].to_numpy()
    all_missing = n_obs == 0
    report["examples_all_missing"] = ids[all_missing][:5].tolist()
    dropped = ~block.keep & ~all_missing
    report["examples_dropped_monomorphic_or_low_maf"] = ids[dropped][:5].tolist()
    out = Genotypes(block.dosages, genotypes.donors, genotypes.snps.iloc[block.keep],
                    genotypes.source, dict(genotypes.report))
    return out, report
