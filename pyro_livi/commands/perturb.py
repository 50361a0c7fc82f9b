"""``pyro-livi perturb``: perturbation explainability of a fitted run: set one input feature of
one cell to a new value, pass the cell through the model N times, and rank the output features
by how often their prediction changes state; writes a table and a bar chart."""

from __future__ import annotations

import argparse
import sys

from pyro_livi.errors import InputError


def register(subparsers) -> argparse.ArgumentParser:
    from ..analysis.perturb import DEFAULT_MARGINS, DEFAULT_PSEUDOCOUNT, DEFAULT_THRESHOLD, RULES
    from ._help import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "perturb", formatter_class=DefaultsHelpFormatter,
        help="perturbation explainability: which outputs respond when one input feature of a cell is set",
        description="Load RUN_DIR/model.pt and the data as the run was fitted, set input feature --gene of "
        "one cell (--cell, or the cell of --cell-type with the highest mean --markers expression) to "
        "--value, pass the cell through the model --passes times with latents drawn from the posterior, "
        "and count for every output feature how often its prediction changes state against the "
        "unperturbed cell's prediction (latents at their posterior means): the change frequency, split "
        "into gained and lost. Decision rules by likelihood: 'state' (bernoulli: the probability crosses "
        "--threshold by more than --margin), 'fold' (counts: |log2 fold change| >= --margin), 'shift' "
        "(normal: |shift| >= --margin noise sd). Writes OUT/perturbation.tsv (ranked table), "
        "OUT/perturbation.png (bar chart: blue gained, red lost) and OUT/perturbation.json.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="directory written by `pyro-livi fit`")
    p.add_argument("--data", required=True, metavar="FILE",
                   help=".h5ad or .h5mu file the run was fitted on (same modalities and features)")
    p.add_argument("--cell", default=None, metavar="ID",
                   help="id (obs_names) of the cell to perturb; or use --cell-type with --label-key and --markers")
    p.add_argument("--cell-type", default=None, metavar="T",
                   help="perturb the representative cell of this type: the cell of type T with the highest "
                   "mean expression of --markers")
    p.add_argument("--label-key", default=None, metavar="KEY", help=".obs column holding the cell types")
    p.add_argument("--markers", default=None, metavar="M1,M2",
                   help="comma-separated marker features of --cell-type")
    p.add_argument("--gene", required=True, metavar="G",
                   help="input feature to set (a gene, or a feature of another modality: peak, protein)")
    p.add_argument("--value", required=True, type=float, metavar="V",
                   help="its new value, in the units the model reads (raw counts for count modalities)")
    p.add_argument("--input-modality", default=None, metavar="M",
                   help="modality of --gene (default: the modality holding it)")
    p.add_argument("--output-modality", default=None, metavar="M1,M2",
                   help="comma-separated modalities whose predictions are scored (default: every modality "
                   "other than the input's; the input's own for one-modality data)")
    p.add_argument("--passes", type=int, default=100, metavar="N", help="stochastic passes through the model")
    p.add_argument("--seed", type=int, default=0, help="random seed of the passes")
    p.add_argument("--rule", default="auto", choices=("auto", *RULES),
                   help="decision rule of a change (auto: state for bernoulli, fold for counts, shift otherwise)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="decision threshold of the 'state' rule, on the predicted mean (probability)")
    p.add_argument("--margin", type=float, default=None,
                   help="robustness margin around the decision threshold (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_MARGINS.items())
                   + "; state: probability units, fold: log2 units, shift: noise sd units)")
    p.add_argument("--pseudocount", type=float, default=DEFAULT_PSEUDOCOUNT,
                   help="pseudocount of the 'fold' rule, counts")
    p.add_argument("--top", type=int, default=20, metavar="K", help="features shown in the bar chart")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created when missing)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from ..analysis.perturb import perturb
    from .evaluate import load_run

    try:
        if args.cell is None and args.cell_type is None:
            raise InputError("<arguments>", "--cell", "no cell given",
                             "give --cell ID, or --cell-type T with --label-key KEY and --markers M1,M2")
        if args.cell is not None and (args.cell_type or args.markers):
            raise InputError("<arguments>", "--cell", "both --cell and --cell-type/--markers were given",
                             "give either --cell, or --cell-type with --label-key and --markers")
        if args.cell_type is not None and (args.label_key is None or args.markers is None):
            missing = "--label-key" if args.label_key is None else "--markers"
            raise InputError("<arguments>", missing, "--cell-type needs --label-key and --markers",
                             f"add {missing} (the .obs column of the types; the comma-separated markers)")
        if args.top < 1:
            raise InputError("<arguments>", "--top", f"must be >= 1, got {args.top}", "give a positive number")
        labels = [args.label_key] if args.label_key else None
        model, dataset, _, meta = load_run(args.run, args.data, label_keys=labels)
        outputs = None if args.output_modality is None else [m.strip() for m in args.output_modality.split(",")]
        torch.manual_seed(args.seed)
        result = perturb(model, dataset, feature=args.gene, value=args.value, cell=args.cell,
                         cell_type=args.cell_type, label_key=args.label_key, markers=args.markers,
                         input_modality=args.input_modality, output_modalities=outputs, n_passes=args.passes,
                         seed=args.seed, rule=args.rule, threshold=args.threshold, margin=args.margin,
                         pseudocount=args.pseudocount)
    except InputError as err:
        flag = {"cell": "--cell", "feature": "--gene", "value": "--value", "n_passes": "--passes",
                "input_modality": "--input-modality", "output_modalities": "--output-modality",
                "markers": "--markers", "label_key": "--label-key", "cell_type": "--cell-type",
                "margin": "--margin", "rule": "--rule"}.get(err.field)
        if flag is not None:
            err = InputError(err.source, flag, err.problem, err.fix)
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = result.write(args.out, top=args.top)
    where = (f"cell {result.cell}" if "cell" in result.selection else
             f"cell {result.cell} (representative {result.selection['cell_type']}, mean marker score "
             f"{result.selection['marker_score']:.3g})")
    print(f"{meta['model']}: {result.feature} ({result.input_modality}) {result.original_value:g} -> "
          f"{result.value:g} in {where}, {result.n_passes} passes")
    changed = result.table[result.table["frequency"] > 0]
    print(f"{len(changed)} of {len(result.table)} output features changed in at least one pass; top:")
    for row in result.table.head(5).itertuples():
        print(f"  {row.rank:>3} {row.feature} ({row.modality}): f = {row.frequency:.2f} "
              f"(gained {row.gained:.2f}, lost {row.lost:.2f}; unperturbed {row.null_frequency:.2f})")
    print(f"table: {paths['table']}")
    print(f"figure: {paths['figure']}")
    return 0
