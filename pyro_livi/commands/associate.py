"""``pyro-livi associate``: test a run's donor factors against genotypes (LMM)."""

from __future__ import annotations

import argparse
import sys

from pyro_livi.errors import InputError


def register(subparsers) -> argparse.ArgumentParser:
    from ._help import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "associate",
        help="test donor factors (D, V) against genotypes with a linear mixed model",
        formatter_class=DefaultsHelpFormatter,
        description="Test every donor factor of a fitted run (D.tsv, V.tsv) against every "
        "SNP with a linear mixed model, d_k = g beta + M alpha + u + eps with "
        "u ~ N(0, sigma_u^2 K) (K: donor kinship; M: intercept and covariates), fitted by "
        "maximum likelihood as glimix-core does (all factors at once, one rotation of "
        "each chunk of SNPs shared by all factors); multiple testing over all factor x SNP "
        "pairs together. Writes "
        "RESULTS.tsv (with chromosome, position, alleles and MAF when the genotypes have "
        "them), <stem>_manhattan.png, <stem>_qq.png and <stem>_report.json; the folder of "
        "RESULTS.tsv is created when missing.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="run directory holding D.tsv and/or V.tsv (donor ids in the first "
                   "column, factor names in the header)")
    p.add_argument("--genotypes", required=True, metavar="PLINK_PREFIX_OR_TABLE",
                   help="PLINK prefix or .bed (+ .fam, .bim optional), or a dosage table "
                   "(.csv/.tsv/.txt, gz allowed; allele dosages 0..2)")
    p.add_argument("--variant-count", type=int, default=None, metavar="N",
                   help="number of SNPs of a .bed that has no .bim (PLINK input only)")
    p.add_argument("--dosage-orientation", choices=["auto", "snps_x_donors", "donors_x_snps"],
                   default="auto",
                   help="layout of a dosage table: one row per SNP (snps_x_donors) or one row "
                   "per donor (donors_x_snps); auto detects it from the donor ids of the run "
                   "and the column names (snp_id, CHR, POS, ...) and says what it found")
    p.add_argument("--duplicate-snps", choices=["auto", "error", "make_unique"],
                   default="auto",
                   help="SNP ids that occur more than once: error refuses them; make_unique "
                   "keeps each as its own variant, renamed id#2, id#3, ...; auto keeps one "
                   "copy of rows that repeat an id with the same dosages and renames the rest "
                   "(as make_unique), and says what it did")
    p.add_argument("--kinship", default=None, metavar="FILE|identity",
                   help="donor x donor kinship table (first column and header: donor ids), "
                   "or 'identity' for unrelated donors; default: computed from the QC'd "
                   "genotypes (leave-one-chromosome-out when the SNPs lie on several "
                   "chromosomes; refused when it would rest on too few SNPs)")
    p.add_argument("--loco", action=argparse.BooleanOptionalAction, default=None,
                   help="leave-one-chromosome-out kinship computed from the genotypes "
                   "(default: on when every SNP has a chromosome and there are at least "
                   "two); --no-loco forces one kinship from all SNPs, tested SNPs included")
    p.add_argument("--pvalue-method", choices=["auto", "lrt", "f"], default="auto",
                   help="auto: likelihood-ratio test when there are many donors per fixed "
                   "effect, else the exact F-test; lrt or f to force one")
    p.add_argument("--allow-partial-donor-match", action="store_true",
                   help="analyse the matching donors even when donor ids differ only by "
                   "formatting (01 vs 1, case, FID_IID) or fewer than half of them match")
    p.add_argument("--covariates", default=None, metavar="FILE",
                   help="donor covariate table (first column donor ids; numeric columns)")
    p.add_argument("--fdr", type=float, default=0.05, metavar="RATE",
                   help="false discovery rate threshold (a fraction, 0..1)")
    p.add_argument("--fdr-method", choices=["bh", "storey"], default="bh",
                   help="multiple testing: Benjamini-Hochberg (bh) or Storey q-values")
    p.add_argument("--factors", choices=["D", "V", "all"], default="all",
                   help="which factor tables to test (all: every one present)")
    p.add_argument("--inverse-normal", action="store_true",
                   help="rank-based inverse normal transform of each factor")
    p.add_argument("--maf", type=float, default=0.05, metavar="FRACTION",
                   help="minor-allele-frequency threshold (a fraction, at least 0 and below 0.5); rarer SNPs "
                   "are left out")
    p.add_argument("--chunk-size", type=int, default=5000, metavar="SNPS",
                   help="SNPs read and tested per block (bounds memory: about "
                   "8 x donors x SNPS bytes per block, plus the results)")
    p.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                   help="run the passes over SNP chunks on a Dask cluster: the address of "
                   "its scheduler (e.g. tcp://host:8786; needs pip install "
                   "\"pyro-livi[distributed]\"); PLINK files must be readable by every "
                   "worker at the same path. Same results as without it")
    p.add_argument("--no-plots", action="store_true", help="skip the Manhattan / QQ plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="RESULTS.tsv",
                   help="results table (its folder is created when missing)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results, plots and report of an earlier run at --out (refused without it)")
    p.set_defaults(func=run)
    return p


def summary(report: dict) -> str:
    """Short text summary of an association report."""
    d = report["donors"]
    lines = [
        f"tests: {report['n_tests']} ({len(report['factors']['tested'])} factors x "
        f"{report['snp_qc']['n_snps_kept']} SNPs)",
        f"significant ({report['multiple_testing']['method']}, FDR "
        f"{report['multiple_testing']['fdr']:g}): {report['n_significant']}",
        f"lambda_gc: {report['lambda_gc']:.3f}",
        f"p-values: {report['pvalue_method']['used']} "
        f"({report['pvalue_method']['residual_df']} residual df); kinship: "
        f"{report['kinship'].get('mode', report['kinship'].get('source'))}",
        f"donors analysed: {d['n_analysed']} (factor donors without genotypes: "
        f"{len(d['factor_donors_without_genotypes'])}; genotyped donors without factors: "
        f"{d['n_genotyped_donors_without_factors']}"
        + (f"; without covariates: "
           f"{len(report['covariates'].get('donors_without_covariates_excluded', []))}"
           if report["covariates"]["given"] else "") + ")",
        f"SNPs excluded by QC: {report['snp_qc']['n_all_missing']} all missing, "
        f"{report['snp_qc']['n_monomorphic']} monomorphic, {report['snp_qc']['n_low_maf']} "
        f"MAF < {report['snp_qc']['maf']:g}; imputed calls: "
        f"{report['snp_qc']['n_imputed_calls']}",
    ]
    if report["factors"]["excluded"]:
        lines.append("factors excluded: " + ", ".join(
            f"{e['factor']} ({e['reason']})" for e in report["factors"]["excluded"]))
    if report["untestable_pairs"]["n"]:
        lines.append(f"untestable pairs left out: {report['untestable_pairs']['n']}")
    note = report["multiple_testing"].get("pi0_note")
    if note:
        lines.append(note)
    n_deg = report["pvalue_method"].get("n_factors_with_degenerate_null_model", 0)
    if n_deg:
        test = ("the likelihood-ratio test, as --pvalue-method lrt asked"
                if report["pvalue_method"]["requested"] == "lrt" else "the exact F-test")
        lines.append(f"null models with residual variance ~0 (degenerate): {n_deg} of "
                     f"{len(report['factors']['tested'])} factors (their p-values from {test})")
    for warning in report.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def genotype_notes(report: dict) -> list[str]:
    """What the genotype reader detected or changed (orientation, duplicate SNP ids)."""
    reader = report.get("genotype_reader", {})
    return [f"genotypes: {text}" for text in reader.get("notes", [])]


def run(args) -> int:
    from pyro_livi.analysis.associate_run import output_paths, run_associate

    try:
        _, report = run_associate(
            args.run, args.genotypes, out=args.out, variant_count=args.variant_count,
            dosage_orientation=args.dosage_orientation, duplicate_snps=args.duplicate_snps,
            kinship=args.kinship, covariates=args.covariates, fdr=args.fdr,
            fdr_method=args.fdr_method, factors=args.factors,
            inverse_normal=args.inverse_normal, maf=args.maf, loco=args.loco,
            chunk_size=args.chunk_size, pvalue_method=args.pvalue_method,
            allow_partial_donor_match=args.allow_partial_donor_match,
            progress=not args.quiet, plots=not args.no_plots,
            dask_scheduler=args.dask_scheduler, overwrite=args.overwrite)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in genotype_notes(report):
        print(note)
    print(summary(report))
    written = output_paths(args.out)
    print("wrote: " + ", ".join(str(p) for k, p in written.items()
                                if not (args.no_plots and k in ("manhattan", "qq"))))
    return 0
