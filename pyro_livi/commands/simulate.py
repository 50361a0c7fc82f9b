"""``pyro-livi simulate``: draw a simulated population dataset with planted genetic effects."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pyro_livi.errors import InputError

#: Command-line flag -> SimulationConfig field, for the flags that override the config.
_OVERRIDES = {
    "n_donors": "n_donors",
    "cells_per_donor": "cells_per_donor",
    "n_genes": "n_genes",
    "n_snps": "n_snps",
    "n_proteins": "n_proteins",
    "h2_d": "h2_d",
    "h2_v": "h2_v",
}


def register(subparsers) -> None:
    from ._help import DefaultsHelpFormatter

    p = subparsers.add_parser(
        "simulate", formatter_class=DefaultsHelpFormatter,
        help="simulate a population single-cell dataset with planted trans-eQTL effects",
        description="Draw cells, donors and genotypes from LIVI's generative process with known "
        "causal SNPs for the donor factors, and write expression (h5ad, or h5mu with proteins), "
        "PLINK genotypes and the truth (truth/README.md documents every file). With --mode multiome: "
        "paired RNA + ATAC counts with planted cell types and gene -> peak links. A folder that "
        "already holds a simulation's files is refused unless --overwrite is given.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created when missing)")
    p.add_argument("--overwrite", action="store_true",
                   help="when --out already holds a simulation's files (expression.h5ad/.h5mu, multiome.h5mu, "
                   "genotypes.bed/.bim/.fam, the truth/ files), remove them first (only those; other files "
                   "stay) instead of refusing")
    p.add_argument("--seed", type=int, default=0, help="random seed (an integer)")
    p.add_argument("--config", default="demo",
                   help="'demo' (the built-in demo size: 120 donors x ~40 cells, 500 genes, "
                        "2000 SNPs; with --mode multiome 5000 cells, 2000 genes, 20000 peaks) or a JSON "
                        "file of SimulationConfig (MultiomeConfig) fields (a written truth/config.json works)")
    p.add_argument("--n-donors", type=int, help="number of donors (default: from --config)")
    p.add_argument("--cells-per-donor", type=float, help="mean cells per donor (default: from --config)")
    p.add_argument("--n-genes", type=int, help="number of genes (default: from --config)")
    p.add_argument("--n-snps", type=int, help="number of SNPs (default: from --config)")
    p.add_argument("--n-proteins", type=int, help="number of proteins, 0 for RNA only (default: from --config)")
    p.add_argument("--h2-d", type=float, help="fraction of the variance of each D factor explained by its SNP, 0..1 (default: from --config)")
    p.add_argument("--h2-v", type=float, help="fraction of the variance of each V factor explained by its SNP, 0..1 (default: from --config)")
    p.add_argument("--stream", action="store_true",
                   help="draw and write 4,096 cells at a time so that memory does not grow with the cells: for "
                   "millions of cells. Writes the same files as without --stream (OUT/expression.h5ad: RNA counts, "
                   "uncompressed CSR, backed-friendly, no layer 'counts'; genotypes.bed/.bim/.fam; truth/, its "
                   "cell_state.tsv appended block by block), equal to those for the same config and seed; RNA "
                   "only (--n-proteins 0)")
    multi = p.add_argument_group(
        "--mode multiome", "paired RNA + ATAC counts with planted cell types and gene -> peak links: writes "
        "OUT/multiome.h5mu and OUT/truth/ (links.tsv, cell_types.tsv, genes.tsv, peaks.tsv, config.json, "
        "README.md); --n-genes applies too, the donor and SNP flags do not")
    multi.add_argument("--mode", choices=["population", "multiome"], default="population",
                       help="population: donors, genotypes and planted trans-eQTL effects; multiome: paired "
                       "RNA + ATAC")
    multi.add_argument("--n-cells", type=int, help="number of cells (multiome; default 5000, or from --config)")
    multi.add_argument("--n-peaks", type=int, help="number of peaks (multiome; default 20000, or from --config)")
    multi.add_argument("--n-cell-types", type=int, help="number of cell types (multiome; default 8)")
    multi.add_argument("--n-regulators", type=int,
                       help="number of genes with planted peak links (multiome; default 25)")
    p.set_defaults(func=run)


#: Command-line flag -> MultiomeConfig field (``--mode multiome``).
_MULTIOME_OVERRIDES = {"n_cells": "n_cells", "n_genes": "n_genes", "n_peaks": "n_peaks",
                       "n_cell_types": "n_cell_types", "n_regulators": "n_regulators"}


def _config_json(spec: str, what: str) -> tuple[Path, dict]:
    """The path and the JSON object of ``--config``; ``what`` names the config class in fixes."""
    path = Path(spec)
    if not path.is_file():
        raise InputError(spec, "--config", "is neither 'demo' nor an existing file",
                         "pass --config demo or the path of a JSON config")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(path, "--config", f"is not valid JSON ({err})",
                         f"write a JSON object of {what} fields") from err
    if not isinstance(values, dict):
        raise InputError(path, "--config", "is not a JSON object", f"write a JSON object of {what} fields")
    return path, values


def load_config(spec: str):
    """'demo' or a JSON file path -> SimulationConfig."""
    from pyro_livi.simulate import SimulationConfig

    if spec == "demo":
        return SimulationConfig.demo()
    path, values = _config_json(spec, "SimulationConfig")
    return SimulationConfig.from_dict(values, source=str(path))


def load_multiome_config(spec: str):
    """'demo' (the default sizes) or a JSON file of MultiomeConfig fields (a written
    truth/config.json, whose fields are under "config", works) -> MultiomeConfig."""
    from pyro_livi.simulate_multiome import MultiomeConfig

    if spec == "demo":
        return MultiomeConfig()
    path, values = _config_json(spec, "MultiomeConfig")
    if isinstance(values.get("config"), dict):
        values = values["config"]
    return MultiomeConfig.from_dict(values, source=str(path))


def run_multiome(args: argparse.Namespace) -> int:
    """``--mode multiome``: draw and write paired RNA + ATAC data with its truth."""
    from pyro_livi.simulate import prepare_simulation_dir
    from pyro_livi.simulate_multiome import simulate_multiome, write_multiome

    population_only = [f"--{flag.replace('_', '-')}" for flag in _OVERRIDES
                       if flag not in _MULTIOME_OVERRIDES and getattr(args, flag) is not None]
    try:
        if population_only:
            raise InputError("<arguments>", population_only[0], "is a flag of --mode population",
                             "leave it out with --mode multiome (its flags: --n-cells, --n-genes, --n-peaks, "
                             "--n-cell-types, --n-regulators)")
        cfg = load_multiome_config(args.config)
        changes = {field: getattr(args, flag) for flag, field in _MULTIOME_OVERRIDES.items()
                   if getattr(args, flag) is not None}
        cfg = dataclasses.replace(cfg, **changes)
        prepare_simulation_dir(args.out, overwrite=args.overwrite)
        sim = simulate_multiome(cfg, seed=args.seed)
        paths = write_multiome(sim, args.out)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = json.loads(paths["config"].read_text())
    print(f"simulated {summary['n_cells']} cells x {summary['n_genes']} genes + {summary['n_peaks']} peaks, "
          f"{cfg.n_cell_types} cell types, {summary['n_links']} gene -> peak links (seed {args.seed}); non-zero "
          f"values: RNA {summary['rna_nonzero_fraction']:.3f}, ATAC {summary['atac_nonzero_fraction']:.3f}")
    print(f"data:  {paths['data']}")
    print(f"truth: {paths['readme'].parent} (links.tsv, cell_types.tsv; see README.md)")
    return 0


def _print_written(cfg, effects, paths: dict) -> None:
    """The planted effects and the written paths of a population simulation."""
    print(f"planted {int((effects['kind'] == 'D').sum())} D-SNP effects (h2_D {cfg.h2_d}) and "
          f"{int((effects['kind'] == 'V').sum())} V-SNP effects (h2_V {cfg.h2_v})")
    print(f"expression: {paths['expression']}")
    print(f"genotypes:  {paths['bed'].with_suffix('')}.{{bed,bim,fam}}")
    print(f"truth:      {paths['readme'].parent} (see README.md)")


def run_stream(cfg, args: argparse.Namespace) -> int:
    """``--stream``: the whole dataset, its cells drawn and written block by block
    (:func:`pyro_livi.simulate.write_simulation_streaming`)."""
    from pyro_livi.simulate import write_simulation_streaming

    paths, info = write_simulation_streaming(args.out, cfg, seed=args.seed)
    print(f"simulated {info['n_cells']} cells x {info['n_genes']} genes, {info['n_donors']} donors, "
          f"{info['n_snps']} SNPs (seed {args.seed}, streamed), "
          f"{info['nnz'] / max(1, info['n_cells'] * info['n_genes']):.3f} non-zero")
    _print_written(cfg, info["effects"], paths)
    return 0


def run(args: argparse.Namespace) -> int:
    from pyro_livi.simulate import prepare_simulation_dir, simulate, write_simulation

    if not 0 <= args.seed < 2 ** 32:
        print(f"error: --seed must be an integer from 0 to 2**32 - 1, got {args.seed}", file=sys.stderr)
        return 2
    if args.mode == "multiome":
        if args.stream:
            print("error: --stream is a flag of --mode population; leave it out with --mode multiome", file=sys.stderr)
            return 2
        return run_multiome(args)
    multiome_only = [f"--{flag.replace('_', '-')}" for flag in _MULTIOME_OVERRIDES
                     if flag not in _OVERRIDES and getattr(args, flag) is not None]
    if multiome_only:
        print(f"error: {multiome_only[0]} is a flag of --mode multiome; add --mode multiome or leave it out",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        changes = {field: getattr(args, flag) for flag, field in _OVERRIDES.items()
                   if getattr(args, flag) is not None}
        cfg = dataclasses.replace(cfg, **changes)
        cfg.validate(streamed=args.stream)
        prepare_simulation_dir(args.out, overwrite=args.overwrite)
        if args.stream:
            return run_stream(cfg, args)
        sim = simulate(cfg, seed=args.seed)
        paths = write_simulation(sim, args.out)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"simulated {sim.adata.n_obs} cells x {sim.adata.n_vars} genes"
          + (f" + {cfg.n_proteins} proteins" if cfg.n_proteins else "")
          + f", {len(sim.donors)} donors, {sim.genotypes.shape[1]} SNPs (seed {args.seed})")
    _print_written(cfg, sim.truth["effects"], paths)
    return 0
