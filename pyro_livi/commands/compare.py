"""``pyro-livi compare``: fit several models of the zoo on one dataset and tabulate seed 002's
metrics side by side."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    from ._help import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "compare", help="fit several models on the same cells and compare them (ARI, NMI, silhouette, ...)",
        formatter_class=DefaultsHelpFormatter,
        description="Fit each model on the same training cells (each modality given as the model prefers: "
        "raw counts, or log-normalised RNA / CLR proteins), then write OUT/compare.md, OUT/compare.tsv and "
        "OUT/umap_grid.png: ARI, NMI, silhouette, graph connectivity, isolated-label silhouette, the label "
        "probe, held-out NLL per modality, training time and cells/s. Finished models are reused when the "
        "command is run again with the same OUT.")
    p.add_argument("--data", required=True, help=".h5ad or .h5mu file with raw counts")
    p.add_argument("--models", required=True, help="comma-separated model names (`pyro-livi models`)")
    p.add_argument("--label-key", default=None,
                   help=".obs column of cell labels (default: Leiden clusters of the log-normalised first modality)")
    p.add_argument("--modalities", default=None, help="comma-separated modalities to use (default: all)")
    p.add_argument("--donor-key", default=None, help=".obs column with donor ids (models with donor factors)")
    p.add_argument("--covariate-keys", nargs="*", default=[], help="categorical .obs covariates (e.g. batch)")
    p.add_argument("--epochs", type=int, default=100, help="epochs of each model's last stage")
    p.add_argument("--batch-size", type=int, default=256, help="cells per minibatch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction of cells held out")
    p.add_argument("--options", default=None,
                   help='JSON of per-model options, e.g. \'{"scvi": {"n_latent": 20}}\'')
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the fits and the metrics")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..analysis.compare import compare
    from ..errors import InputError

    try:
        options = json.loads(args.options) if args.options else None
    except json.JSONDecodeError as err:
        raise InputError("<arguments>", "--options", f"not valid JSON ({err})",
                         'give a JSON object, e.g. \'{"scvi": {"n_latent": 20}}\'') from err
    table = compare(args.data, [m.strip() for m in args.models.split(",") if m.strip()], args.out,
                    label_key=args.label_key, donor_key=args.donor_key, covariate_keys=args.covariate_keys,
                    modalities=args.modalities.split(",") if args.modalities else None, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, test_fraction=args.test_fraction,
                    options=options)
    print(table.to_string(index=False))
    print(f"report: {args.out}/compare.md")
    return 0
