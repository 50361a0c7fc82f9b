"""The ``associate`` job: a fitted run's donor factors against genotypes, files in, files out.

A run directory holds ``D.tsv`` and/or ``V.tsv``: tab-separated, first column the donor
ids, header the factor names (``D_0, D_1, ...``, ``V_0, ...``). :func:`run_associate`
reads them, tests every factor against every SNP (:func:`associate_factors`) and writes

- ``RESULTS.tsv``: columns ``factor, snp, beta, se, pvalue, padj, significant, chrom,
  pos, allele_1, allele_2, maf`` (``data_schemas/association_results.schema.json``; the
  SNP annotations are empty when the genotypes lack them),
- ``RESULTS_manhattan.png`` and ``RESULTS_qq.png``,
- ``RESULTS_report.json``: inputs, options, donor matching, exclusions, QC counts,
  n_tests, n_significant, lambda_gc.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from pyro_livi.analysis.association import associate_factors
from pyro_livi.analysis.gwas_plots import manhattan_plot, qq_plot
from pyro_livi.data.genotypes import PlinkReader, is_plink, open_genotypes
from pyro_livi.data.kinship import read_kinship
from pyro_livi.errors import InputError
from pyro_livi.outputs import refuse_earlier_outputs

FACTOR_FILES = {"D": "D.tsv", "V": "V.tsv"}


def _read_id_table(path: Path, sep: str) -> pd.DataFrame:
    """A table whose first column holds donor ids (kept as str); values as str."""
    try:
        table = pd.read_csv(path, sep=sep, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(path, "table", f"cannot parse: {err}", "give a table with a "
                         "header row, donor ids in the first column") from err
    if table.shape[1] < 2:
        raise InputError(path, "columns", f"{table.shape[1]} column(s)", "give donor ids "
                         "in the first column and at least one value column (check the "
                         "separator)")
    first = table.columns[0]
    if table[first].isna().any():
        raise InputError(path, first, "empty donor id", "give every row a donor id")
    return table.set_index(first)


def read_factor_table(path) -> pd.DataFrame:
    """Read ``D.tsv`` / ``V.tsv``: donors (index, str) x factors, float64.

    Non-numeric values -> InputError naming the column and the donor.
    """
    path = Path(path)
    table = _read_id_table(path, "\t")
    out = {}
    for c in table.columns:
        num = pd.to_numeric(table[c], errors="coerce")
        bad = num.isna() & table[c].notna()
        if bad.any():
            donor = table.index[bad.to_numpy()][0]
            raise InputError(path, c, f"non-numeric value {table[c][bad].iloc[0]!r} for "
                             f"donor {donor!r}", "factor tables hold numbers only")
        out[c] = num.to_numpy(np.float64)
    return pd.DataFrame(out, index=table.index.astype(str))


def read_run_factors(run_dir, which: Literal["D", "V", "all"] = "all"
                     ) -> tuple[pd.DataFrame, list[str]]:
    """Donors x factors of a run directory: ``D.tsv``, ``V.tsv`` or both (``all``: the
    ones present, side by side). Returns the table and the files used."""
    run_dir = Path(run_dir)
    if which not in ("D", "V", "all"):
        raise InputError(run_dir, "factors", f"unknown choice {which!r}", "use D, V or all")
    if not run_dir.is_dir():
        raise InputError(run_dir, "--run", "not a directory", "pass the run directory "
                         "holding D.tsv / V.tsv (run_dir in Python)")
    names = ["D", "V"] if which == "all" else [which]
    paths = [run_dir / FACTOR_FILES[k] for k in names]
    present = [p for p in paths if p.exists()]
    if which != "all" and not present:
        raise InputError(paths[0], "factors", "file not found", f"the run directory has no "
                         f"{paths[0].name}; choose --factors from what it holds")
    if not present:
        held = sorted(p.name for p in run_dir.iterdir())[:8]
        raise InputError(run_dir, "--run", f"the run directory has no donor factor tables "
                         f"(neither D.tsv nor V.tsv; it holds {held}): only donor models "
                         "have donor factors to test against genotypes", "pass (--run; "
                         "run_dir in Python) the run directory of a donor model: LIVI, "
                         "MultiSLIVI or DMLIVI (`pyro-livi fit --model livi`, "
                         "`multislivi` or `dmlivi`)")
    tables = [read_factor_table(p) for p in present]
    if len(tables) == 2:
        a, b = tables
        if set(a.index) != set(b.index):
            only_d = sorted(set(a.index) - set(b.index))[:5]
            only_v = sorted(set(b.index) - set(a.index))[:5]
            raise InputError(run_dir, "donor ids", f"D.tsv and V.tsv hold different donors "
                             f"(only in D: {only_d}, only in V: {only_v})", "use factor "
                             "tables of the same run, or test one with --factors D|V")
        clash = sorted(set(a.columns) & set(b.columns))
        if clash:
            raise InputError(run_dir, "factor names", f"names in both D.tsv and V.tsv: "
                             f"{clash[:5]}", "give the factors distinct names (D_k, V_k)")
        table = pd.concat([a, b.loc[a.index]], axis=1)
    else:
        table = tables[0]
    return table, [str(p) for p in present]


def read_covariates(path) -> pd.DataFrame:
    """Donor covariates: CSV (``.csv``) or tab-separated; first column donor ids.

    Columns that parse as numbers become float; others stay text (and are refused with
    advice on encoding by the association).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "path", "file not found", "pass an existing covariate table")
    name = path.name.lower()
    sep = "," if name.endswith(".csv") or name.endswith(".csv.gz") else "\t"
    table = _read_id_table(path, sep)
    out = {}
    for c in table.columns:
        num = pd.to_numeric(table[c], errors="coerce")
        out[c] = num if not (num.isna() & table[c].notna()).any() else table[c]
    return pd.DataFrame(out, index=table.index.astype(str))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if math.isnan(x) or math.isinf(x) else x
    return x


def output_paths(out) -> dict[str, Path]:
    """Paths written for results file ``out``: results, manhattan, qq, report."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix else out
    return {"results": out, "manhattan": Path(f"{stem}_manhattan.png"),
            "qq": Path(f"{stem}_qq.png"), "report": Path(f"{stem}_report.json")}


def prepare_outputs(out, *, overwrite: bool = False) -> dict[str, Path]:
    """:func:`output_paths` of ``out``, checked before any work: its folder is created when
    missing. Raises InputError (field ``--out``) when ``out`` is a folder, when a folder above it
    is a file, and when any of the files already exists and not ``overwrite`` (``--overwrite``),
    so that earlier results are never replaced silently."""
    paths = output_paths(out)
    results = paths["results"]
    if results.is_dir():
        raise InputError(results, "--out", "is a folder; it names the results table (a file)",
                         f"give a file name, e.g. --out {results / 'associations.tsv'}")
    blocked = next((p for p in results.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise InputError(results, "--out", f"cannot be written: {blocked} is a file, not a folder",
                         "choose an --out whose folders are folders")
    if not overwrite:  # with it, the files are replaced once the scan has succeeded
        refuse_earlier_outputs(results.parent, [p for p in paths.values() if p.exists()],
                               "holds the results of an earlier association",
                               "add --overwrite (overwrite=True) to replace them, or choose another --out")
    try:
        results.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(results, "--out", f"cannot create the output folder ({err.strerror})",
                         "choose another --out") from err
    return paths


def run_associate(run_dir, genotypes, *, out, variant_count: int | None = None,
                  dosage_orientation: str | None = "auto", duplicate_snps: str = "auto",
                  kinship=None, covariates=None, fdr: float = 0.05, fdr_method: str = "bh",
                  factors: Literal["D", "V", "all"] = "all", inverse_normal: bool = False,
                  maf: float = 0.05, loco: bool | None = None, chunk_size: int = 5000,
                  pvalue_method: str = "auto", allow_partial_donor_match: bool = False,
                  progress: bool = True, plots: bool = True, dask_scheduler=None,
                  overwrite: bool = False) -> tuple[pd.DataFrame, dict]:
    """Test a run's donor factors against genotypes and write results, plots and report.

    Parameters
    ----------
    run_dir : path
        Directory with ``D.tsv`` and/or ``V.tsv``.
    genotypes : path
        PLINK prefix or ``.bed`` (read in chunks; ``variant_count`` when there is no
        ``.bim``), or a dosage table (``dosage_orientation``: ``"auto"`` detects it from
        the factors' donor ids and the column names; ``duplicate_snps``: ``"auto"`` keeps
        one copy of repeated rows and renames other repeated ids, see
        :func:`~pyro_livi.data.genotypes.read_dosage_table`; what was detected is in the
        report's ``genotype_reader.notes``).
    out : path
        Results TSV; plots and report are written beside it (:func:`output_paths`); its
        folder is created when missing. Checked before the scan (:func:`prepare_outputs`):
        earlier results there are refused unless ``overwrite``.
    kinship : path or "identity", optional
        Donor x donor kinship table, or ``"identity"`` for unrelated donors; default
        computed from the genotypes.
    covariates : path, optional
        Donor covariate table (numeric columns).
    dask_scheduler : str or distributed.Client, optional
        Run the passes over SNP chunks on a Dask cluster (its scheduler address, e.g.
        ``"tcp://host:8786"``); same results as in this process.
    Other options: see :func:`~pyro_livi.analysis.association.associate_factors`.

    Returns the results table and the report (also written as JSON).
    """
    paths = prepare_outputs(out, overwrite=overwrite)
    table, used = read_run_factors(run_dir, factors)
    if is_plink(genotypes):
        if dosage_orientation not in (None, "auto"):
            raise InputError(genotypes, "dosage_orientation", "applies to dosage tables, "
                             "not PLINK input", "drop --dosage-orientation")
        geno = PlinkReader(genotypes, variant_count=variant_count,
                           duplicate_snps=duplicate_snps)
    else:
        geno = open_genotypes(genotypes, variant_count=variant_count,
                              duplicate_snps=duplicate_snps, orientation=dosage_orientation,
                              donors=list(table.index))
    try:
        K = (read_kinship(kinship) if kinship is not None and str(kinship) != "identity"
             else kinship)
        C = read_covariates(covariates) if covariates is not None else None
        results, report = associate_factors(
            table, geno, kinship=K, covariates=C, inverse_normal=inverse_normal, fdr=fdr,
            fdr_method=fdr_method, chunk_size=chunk_size, maf=maf, loco=loco,
            pvalue_method=pvalue_method,
            allow_partial_donor_match=allow_partial_donor_match, progress=progress,
            dask_scheduler=dask_scheduler)
        snps = geno.snps
        reader_report = dict(geno.report)
    finally:
        if isinstance(geno, PlinkReader):
            geno.close()
    report = {
        "inputs": {"run_dir": str(run_dir), "factor_files": used,
                   "genotypes": str(genotypes), "kinship": None if kinship is None
                   else str(kinship), "covariates": None if covariates is None
                   else str(covariates)},
        "options": {"fdr": fdr, "fdr_method": fdr_method, "factors": factors,
                    "inverse_normal": inverse_normal, "maf": maf, "loco": loco,
                    "pvalue_method": pvalue_method,
                    "allow_partial_donor_match": allow_partial_donor_match,
                    "variant_count": variant_count, "dosage_orientation": dosage_orientation,
                    "duplicate_snps": duplicate_snps, "chunk_size": chunk_size,
                    "dask_scheduler": (dask_scheduler if dask_scheduler is None
                                       or isinstance(dask_scheduler, str)
                                       else type(dask_scheduler).__name__)},
        "genotype_reader": reader_report,
        **report,
        "outputs": {k: str(v) for k, v in paths.items() if plots or k in ("results", "report")},
    }
    results.to_csv(paths["results"], sep="\t", index=False)
    if plots:
        manhattan_plot(results, snps, paths["manhattan"], fdr=fdr)
        qq_plot(results["pvalue"].to_numpy(), paths["qq"], report["lambda_gc"])
    paths["report"].write_text(json.dumps(_jsonable(report), indent=2))
    return results, report
