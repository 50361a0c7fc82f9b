"""``pyro-livi demo``: the main job on the built-in simulated population."""

from __future__ import annotations


def register(subparsers) -> None:
    from ._help import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "demo", formatter_class=DefaultsHelpFormatter, help="simulate a population with planted trans-eQTLs, fit LIVI, test its factors",
        description="Simulate the built-in default population (no downloads), fit LIVI, test every "
        "donor factor against every SNP, and write results, plots and summary.md to --out.")
    p.add_argument("--out", required=True, help="output folder (created when missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation and the fit (an integer)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller population (80 donors, ~2,000 cells, 200 genes, 500 SNPs) and model "
                   "for a first look in well under a minute")
    p.add_argument("--quiet", action="store_true", help="no progress output (the closing result line is still printed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier demo in --out (refused without it; other files stay)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, seed=args.seed, progress=not args.quiet, quick=args.quick, overwrite=args.overwrite)
    return 0
