"""``pyro-livi preprocess``: per-modality preprocessing of an .h5ad/.h5mu file into a new file."""

from __future__ import annotations

import re
from pathlib import Path

from pyro_livi.errors import InputError

#: Python argument of pyro_livi.preprocessing -> the flag that sets it here (named in errors).
FLAGS = {
    "data": "--data", "files": "--assemble", "join": "--join", "recipes": "--recipe",
    "rna": "--rna", "prot": "--prot", "atac": "--atac", "counts_layer": "--counts-layer",
    "batch_key": "--batch-key", "n_top_genes": "--n-top-genes", "clr_axis": "--clr-axis",
    "min_peak_fraction": "--min-peak-fraction", "n": "--subsample",
    "fraction": "--subsample-fraction", "require_paired": "--require-paired", "pair": "--pair",
    "min_features": "--min-features",
}


def _target_sum(text: str) -> float | None:
    return None if text == "median" else float(text)


def register(subparsers) -> None:
    from pyro_livi.preprocessing import RECIPES

    # the recipes' notes cite internal design documents ("seed 004 section ..."): not for users
    internal = re.compile(r"\s*\(seed \d+[^)]*\)")
    recipes = "; ".join(f"{name}: {internal.sub('', what)}" for name, what in RECIPES.items())
    from ._help import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "preprocess", formatter_class=DefaultsHelpFormatter,
        help="normalise, select HVGs, CLR/TF-IDF per modality; write a new .h5ad/.h5mu",
        description="Preprocess each modality with a recipe and write a NEW file (never the "
        "input): the raw counts stay in a layer (--counts-layer) so that count models can "
        "still read them, the transformed values go to .X, and every step with its parameters "
        f"is recorded in .uns['pyro_livi_preprocessing']. Recipes: {recipes}.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data",
                     help=".h5ad or .h5mu file with raw counts (this or --assemble is required)")
    src.add_argument("--assemble", nargs="+", metavar="NAME=PATH",
                     help="instead of --data: build a MuData from one .h5ad per modality, cells "
                     "aligned by barcode")
    p.add_argument("--join", choices=["inner", "outer"], default="inner",
                   help="with --assemble: keep the cells in every modality (inner) or all "
                   "(outer) (default: inner)")
    p.add_argument("--out", required=True,
                   help="new output file (.h5mu for a MuData, .h5ad for an AnnData; required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists; the input is never replaced (default: off)")
    p.add_argument("--rna", metavar="RECIPE", default=None,
                   help="recipe of modality 'rna' (of the AnnData for an .h5ad), e.g. "
                   "lognorm_hvg (default: none, the modality is left as it is)")
    p.add_argument("--prot", metavar="RECIPE", default=None,
                   help="recipe of modality 'prot', e.g. clr (default: none)")
    p.add_argument("--atac", metavar="RECIPE", default=None,
                   help="recipe of modality 'atac': tfidf, binary or log1p (default: none)")
    p.add_argument("--recipe", nargs="+", default=[], metavar="NAME=RECIPE",
                   help="recipes of modalities with other names, e.g. adt=clr (default: none)")
    p.add_argument("--counts-layer", default="counts",
                   help="layer that keeps (or already holds) the raw counts (default: counts)")
    p.add_argument("--target-sum", type=_target_sum, default=1e4,
                   help="total of each cell after normalize_total, or 'median' for the median "
                   "total of the cells (default: 1e4)")
    p.add_argument("--n-top-genes", type=int, default=2000,
                   help="number of highly variable genes (default: 2000)")
    p.add_argument("--hvg-flavor", choices=["seurat_v3", "seurat", "cell_ranger"],
                   default="seurat_v3",
                   help="scanpy HVG flavor; seurat_v3 reads the raw counts layer (default: seurat_v3)")
    p.add_argument("--batch-key", default=None,
                   help=".obs column with the batch of each cell for HVG selection (default: none)")
    p.add_argument("--no-hvg-subset", action="store_true",
                   help="keep every gene and only mark the HVGs in var['highly_variable'] "
                   "(default: off, keep only the HVGs)")
    p.add_argument("--clr-axis", choices=["cell", "feature"], default="cell",
                   help="CLR per cell (over its proteins) or per feature (over the cells) "
                   "(default: cell)")
    p.add_argument("--min-peak-fraction", type=float, default=0.03,
                   help="ATAC recipes keep the peaks open in at least this fraction of cells "
                   "(default: 0.03)")
    p.add_argument("--tfidf-scale-factor", type=float, default=1e4,
                   help="scale factor of the TF term of tfidf (default: 1e4)")
    p.add_argument("--subsample", type=int, default=None, metavar="N",
                   help="keep N random cells first, seeded by --seed (default: all cells)")
    p.add_argument("--subsample-fraction", type=float, default=None, metavar="F",
                   help="keep this fraction of random cells first, seeded by --seed "
                   "(default: all cells)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsampling (default: 0)")
    p.add_argument("--pair", action="store_true",
                   help="paired-cell alignment of a MuData: keep only the cells measured in every modality, "
                   "rows of every modality in the same order, and report the unmatched barcodes (done first, "
                   "before the recipes) (default: off)")
    p.add_argument("--require-paired", action="store_true",
                   help="like --pair, but refuse (exit code 2) when any barcode is measured in only some "
                   "modalities (default: off)")
    p.add_argument("--min-features", nargs="+", default=[], metavar="NAME=N",
                   help="drop the cells with fewer than N non-zero features in modality NAME, from every "
                   "modality (after --pair and --subsample, before the recipes), e.g. rna=100 atac=1 "
                   "(default: none)")
    p.set_defaults(func=run)


def _pairs(items: list[str], flag: str, what: str) -> dict[str, str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise InputError("<arguments>", flag, f"'{item}' is not NAME={what}",
                             f"write each item of {flag} as NAME={what}")
        out[name] = value
    return out


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError("<arguments>", flag, f"'{text}' is not an integer",
                         f"write each item of {flag} as NAME=N") from None


def _check_paths(out: Path, inputs: list[Path], overwrite: bool) -> None:
    for path in inputs:
        if path.exists() and out.resolve() == path.resolve():
            raise InputError(out, "--out", "is an input file; preprocess never modifies its input",
                             "give a new path with --out")
    if out.exists() and not overwrite:
        raise InputError(out, "--out", "already exists", "give a new path, or pass --overwrite")


def run(args) -> int:
    from anndata import AnnData

    from pyro_livi import preprocessing as pp

    recipes = {m: getattr(args, m) for m in ("rna", "prot", "atac") if getattr(args, m)}
    recipes.update(_pairs(args.recipe, "--recipe", "RECIPE"))
    files = _pairs(args.assemble, "--assemble", "PATH") if args.assemble else None
    pair = args.pair or args.require_paired
    min_features = {k: _int(v, "--min-features") for k, v in _pairs(args.min_features, "--min-features", "N").items()}
    if (not recipes and args.subsample is None and args.subsample_fraction is None and not pair
            and not min_features and files is None):
        raise InputError("<arguments>", "--rna/--prot/--atac/--recipe", "nothing to do",
                         "give a recipe for at least one modality, --subsample, --pair or --assemble")
    out = Path(args.out)
    source = args.data if files is None else ", ".join(files.values())
    flags = {**FLAGS, **{n: f"--recipe {n}=RECIPE" for n in recipes if n not in FLAGS}}
    with pp.argument_names(flags):
        _check_paths(out, [Path(p) for p in ([args.data] if files is None else files.values())],
                     args.overwrite)
        data = pp.read_data(args.data) if files is None else pp.assemble(files, join=args.join)
        suffix = ".h5ad" if isinstance(data, AnnData) else ".h5mu"
        if out.suffix != suffix:
            kind = "a MuData" if suffix == ".h5mu" else "an AnnData"
            raise InputError(out, "--out", f"the result is {kind}",
                             f"give --out a path ending in {suffix}")
        before = {n: a.shape for n, a in (data.mod.items() if suffix == ".h5mu" else [("", data)])}
        result = pp.preprocess(
            data, recipes, counts_layer=args.counts_layer, target_sum=args.target_sum,
            n_top_genes=args.n_top_genes, batch_key=args.batch_key, hvg_flavor=args.hvg_flavor,
            subset_hvg=not args.no_hvg_subset, clr_axis=1 if args.clr_axis == "cell" else 0,
            min_peak_fraction=args.min_peak_fraction, tfidf_scale_factor=args.tfidf_scale_factor,
            subsample_n=args.subsample, subsample_fraction=args.subsample_fraction,
            seed=args.seed, pair=pair, require_paired=args.require_paired, min_features=min_features,
            source=source)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".h5mu":
        result.write(out)
        after = {n: a.shape for n, a in result.mod.items()}
    else:
        result.write_h5ad(out)
        after = {"": result.shape}
    for step in pp.preprocessing_steps(result):
        if step["step"] == "assemble":
            print(f"assembled {step['params']['n_cells']} cells ({args.join} join); dropped per "
                  f"modality: {step['params']['dropped_cells']}")
        if step["step"] == "filter_cells":
            params = step["params"]
            print(f"kept {params['n_cells']} of {params['n_before']} cells with enough detected features "
                  f"{params['min_features']}; below the minimum per modality: {params['dropped_cells']}")
        if step["step"] == "pair_cells":
            params = step["params"]
            unmatched = ", ".join(f"{m}: {k}" + (f" (e.g. {', '.join(params['unmatched_examples'][m][:3])})"
                                                  if k else "")
                                  for m, k in params["unmatched"].items())
            print(f"paired {params['n_cells']} cells measured in every modality; unmatched barcodes dropped "
                  f"per modality: {unmatched}")
    for name, shape in after.items():
        label = name or next(iter(recipes), "data")
        print(f"{label}: {before[name][0]} x {before[name][1]} -> {shape[0]} x {shape[1]} "
              f"({recipes.get(label, 'no recipe')})")
    print(f"wrote {out}; counts in layers['{args.counts_layer}'], steps in "
          f".uns['{pp.RECORD_KEY}']")
    return 0
