"""``pyro-livi causal``: the causal read-out of a fitted CMC-VAE run (latent graph, RNA -> protein
versus protein -> RNA asymmetry of matched pairs, prior-edge asymmetry, figures)."""

from __future__ import annotations


def register(subparsers) -> None:
    from ._help import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "causal", formatter_class=DefaultsHelpFormatter,
        help="CMC-VAE run: latent graph, RNA -> protein vs protein -> RNA effects, prior-edge asymmetry",
        description="Load RUN_DIR/model.pt (a `pyro-livi fit --model cmcvae` run) and write: OUT/graph.tsv "
        "(every allowed edge of the latent graph with its weight, and whether it passes the model's edge "
        "threshold), OUT/nodes.tsv (top-loaded features of each latent node), OUT/asymmetry_pairs.tsv "
        "(in-silico interventions through (I - A^T)^{-1}: the effect of each gene on its matched protein "
        "and back), OUT/asymmetry_prior.tsv (the same for prior edges, source -> target and back), "
        "OUT/asymmetry_tests.tsv (Wilcoxon signed-rank test of |forward| - |reverse| across pairs, "
        "two-sided), OUT/asymmetry.png and OUT/graph.png.")
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="directory written by `pyro-livi fit --model cmcvae`")
    p.add_argument("--pairs", default=None, metavar="FILE",
                   help="TSV/CSV of matched pairs with columns gene, protein (default: the 12 pairs of "
                   "citeseq/pbmc10k_cite.h5mu, e.g. CD4/CD4_TotalSeqB; every name must be a feature of the run)")
    p.add_argument("--prior", default=None, metavar="FILE",
                   help="TSV/CSV of prior edges with columns source, target, optional sign (default: the "
                   "prior edges the model was fitted with; none: no prior-edge test)")
    p.add_argument("--prior-unknown", default="error", choices=("error", "drop"),
                   help="prior edges naming a feature absent from the run: refuse, or leave them out")
    p.add_argument("--alpha", type=float, default=0.05, metavar="LEVEL",
                   help="test level at which a direction is called (a fraction, 0..1)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created when missing)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis.causal import causal_analysis
    from ..errors import InputError

    if not 0.0 < args.alpha < 1.0:
        raise InputError("<arguments>", "--alpha", f"must be in (0, 1), got {args.alpha}",
                         "give a test level such as 0.05")
    result = causal_analysis(args.run, pairs=args.pairs, prior=args.prior, prior_unknown=args.prior_unknown,
                             out=args.out, alpha=args.alpha)
    kept = result.graph[result.graph["in_graph"]]
    print(f"latent graph: {len(kept)} edges with |weight| >= threshold "
          f"({', '.join(f'{b}: {n}' for b, n in kept['block'].value_counts().sort_index().items()) or 'none'})")
    with_columns = ["test", "n", "p_value", "median_abs_forward", "median_abs_reverse", "direction"]
    print(result.tests[with_columns].to_string(index=False))
    for path in result.files:
        print(f"wrote {path}")
    return 0
