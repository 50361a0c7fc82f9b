"""``pyro-livi evaluate``: evaluate a fitted run on data (probes, graph metrics, reconstruction,
posterior predictive checks, UMAPs) and write report.md, metrics.tsv and PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pyro_livi.errors import InputError


def register(subparsers) -> argparse.ArgumentParser:
    from ._help import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "evaluate", formatter_class=DefaultsHelpFormatter,
        help="evaluate a fitted run: probes, graph metrics, reconstruction NLL, predictive checks",
        description="Load RUN_DIR/model.pt, re-read the data with the run's modalities, donor "
        "index and covariate categories, and evaluate the model: logistic-regression probes "
        "from the cell state to each label (and from 15 PCs of log-normalised counts as a "
        "baseline), graph metrics (ARI, NMI, silhouette, graph connectivity, isolated-label "
        "silhouette), reconstruction NLL (on the run's validation cells when it has a split), "
        "posterior predictive checks and UMAPs, printing a line per step with its time. "
        "Writes OUT/report.md, OUT/metrics.tsv and PNGs.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="directory written by `pyro-livi fit`")
    p.add_argument("--data", required=True, help=".h5ad or .h5mu file with raw counts and the labels")
    p.add_argument("--donor-key", default=None,
                   help=".obs column with donor ids (default: the one the run was fitted with)")
    p.add_argument("--label-keys", nargs="*", default=None, metavar="KEY",
                   help=".obs columns to probe and score, e.g. cell_type (default: the run's "
                   "label keys); the donor column is added when the run has donors")
    p.add_argument("--n-cells", type=int, default=None, metavar="N",
                   help="evaluate a random subset of N cells (seeded by --seed; default: every cell)")
    p.add_argument("--n-pcs", type=int, default=15, metavar="N",
                   help="principal components of the baseline latent (default: 15)")
    p.add_argument("--ppc-cells", type=int, default=1000,
                   metavar="N", help="cells in the posterior predictive checks (default: 1000)")
    p.add_argument("--ppc-samples", type=int, default=20, metavar="N",
                   help="replicated data sets drawn in the posterior predictive checks (default: 20)")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP pictures (the slowest step)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the cell subset, probes, graphs and predictive draws")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created when missing)")
    p.set_defaults(func=run)
    return p


def load_run(run_dir, data, *, donor_key: str | None = None, label_keys=None):
    """``(model, dataset, history, meta)``: a fitted run and the data re-read as it was fitted.

    The data are read with the run's modalities and layers, its donor index (when it has
    donors) and covariate categories; ``label_keys`` (default: the run's) are kept in
    ``dataset.obs``. ``meta["validation_cells"]`` holds the ids of the run's validation cells
    when it has a split (``split.tsv``); ``meta["data_differs"]`` describes how the data differ
    from those the run was fitted on (cell and feature counts, ids hash: :func:`~pyro_livi.rundir.
    data_fingerprint`), None when they are the same or the run has no checkpoint to tell.
    """
    import pandas as pd

    from ..data import DatasetSpec, read_dataset
    from ..persistence import MODEL_FILE, load_model
    from ..rundir import data_fingerprint, fitted_data_fingerprint
    from ..run import SPLIT_FILE

    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        raise InputError(run_dir, MODEL_FILE, "no saved model in this directory",
                         "give a RUN_DIR written by `pyro-livi fit`")
    model, meta = load_model(run_dir)
    saved = meta.get("spec")
    if saved is None:
        if donor_key is None and meta["donor_index"] is not None:
            raise InputError(run_dir / MODEL_FILE, "spec", "the run has no saved dataset spec, so "
                             "its donor key is unknown", "pass --donor-key")
        saved = {"modalities": {m: None for m in meta["feature_names"]}, "donor_key": donor_key}
    spec = dict(saved)
    if meta["donor_index"] is not None:
        spec["donor_key"] = donor_key or saved.get("donor_key")
    elif donor_key is not None:
        raise InputError(run_dir / MODEL_FILE, "--donor-key", f"the run's model ({meta['model']}) was fitted "
                         "without donors", "leave out --donor-key, or add the donor column to --label-keys")
    keys = list(saved.get("label_keys", [])) if label_keys is None else list(label_keys)
    spec["label_keys"] = [k for k in dict.fromkeys(keys) if k != spec.get("donor_key")]
    dataset = read_dataset(data, DatasetSpec.from_dict(spec), donor_index=meta["donor_index"],
                           covariate_categories=meta["covariate_categories"])
    for modality, names in meta["feature_names"].items():
        got = [str(n) for n in dataset.feature_names[modality]]
        if got != list(names):
            raise InputError(dataset.source, f"var_names of modality '{modality}'",
                             f"{len(got)} features that differ from the {len(names)} the model "
                             "was fitted on",
                             "evaluate on data with the same features in the same order")
    fitted = fitted_data_fingerprint(run_dir)
    now = data_fingerprint(dataset)
    meta["data_differs"] = None if fitted is None or fitted == now else (
        f"{now['n_cells']} cells, features {now['n_features']}, ids hash {now['ids_sha256']} here; "
        f"{fitted['n_cells']} cells, features {fitted['n_features']}, ids hash {fitted['ids_sha256']} fitted")
    history_path = run_dir / "history.tsv"
    history = pd.read_csv(history_path, sep="\t") if history_path.is_file() else None
    split_path = run_dir / SPLIT_FILE
    if split_path.is_file():
        split = pd.read_csv(split_path, sep="\t", index_col=0)["set"]
        meta["validation_cells"] = split.index[split == "validation"].astype(str)
    return model, dataset, history, meta


def run(args) -> int:
    import torch

    from ..analysis.report import CELL_STATE, evaluate

    try:
        model, dataset, history, meta = load_run(args.run, args.data, donor_key=args.donor_key,
                                                 label_keys=args.label_keys)
        if args.n_cells is not None:
            if args.n_cells < 10:
                raise InputError("<arguments>", "--n-cells", f"must be >= 10, got {args.n_cells}",
                                 "give a larger subset, or leave it out to use every cell")
            if args.n_cells < dataset.n_cells:
                rng = np.random.default_rng(args.seed)
                dataset = dataset.subset(np.sort(rng.choice(dataset.n_cells, args.n_cells, replace=False)))
        context = {"run": str(args.run), "model": meta["model"]}
        if meta["data_differs"]:
            print(f"warning: --data differs from the data the run was fitted on ({meta['data_differs']}); "
                  "held-out cells are matched by cell id, and cells the run did not hold out may or may not "
                  "have been trained on", file=sys.stderr)
            context["data"] = f"differs from the data the run was fitted on ({meta['data_differs']})"
            if meta.get("validation_cells") is None:
                context["reconstruction cells"] = ("every evaluated cell; the data differ from the fitted "
                                                   "data, so which of them the model trained on is unknown")
        torch.manual_seed(args.seed)
        evaluation = evaluate(
            model, dataset, args.out, label_keys=dataset.spec.label_keys,
            donor_key=dataset.spec.donor_key, history=history, heldout_cells=meta.get("validation_cells"),
            n_pcs=args.n_pcs,
            ppc_cells=args.ppc_cells, ppc_samples=args.ppc_samples, umap=not args.no_umap,
            seed=args.seed, context=context)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    probes = evaluation.probes.set_index(["label", "latent"])
    baseline = f"pca{args.n_pcs}"
    for label in dict.fromkeys(evaluation.probes["label"]):
        print(f"probe {label}: accuracy {probes.loc[(label, CELL_STATE), 'accuracy']:.3f} from the "
              f"cell state, {probes.loc[(label, baseline), 'accuracy']:.3f} from {args.n_pcs} PCs "
              f"(chance {probes.loc[(label, CELL_STATE), 'chance']:.3f})")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
