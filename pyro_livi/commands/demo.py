"""``pyro-livi demo``: the main job on the built-in simulated population."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="simulate a population with planted trans-eQTLs, fit LIVI, test its factors",
        description="Simulate the built-in default population (no downloads), fit LIVI, test every "
        "donor factor against every SNP, and write results, plots and summary.md to --out.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation and the fit")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, seed=args.seed, progress=not args.quiet)
    return 0
