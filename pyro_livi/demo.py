"""The main job: simulate a population with planted trans-eQTLs, fit LIVI, test its donor factors.

Built-in default (no downloads): :meth:`SimulationConfig.demo` — 120 donors with about 40 cells
each, 500 genes, 2,000 independent SNPs, 4 interaction factors D and 2 persistent factors V, each
driven by one causal SNP explaining 30% of the factor's variance across donors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from .analysis.associate_run import output_paths, run_associate
from .analysis.figures import plot_umap
from .errors import InputError
from .outputs import refuse_earlier_outputs, remove_outputs
from .run import fit
from .rundir import run_outputs
from .simulate import SimulationConfig, simulate, simulation_outputs, write_simulation

#: Files of the demo itself, beside its simulation/, run/ and association outputs.
DEMO_FILES = ("summary.md", "summary.json", "umap_cell_state.png")


@dataclass
class DemoSettings:
    """LIVI settings of the demo fit (sized for 2 CPU cores).

    The persistent factors V train jointly with the VAE in stage 1 (``persistent_in_vae_stage``).
    Trained alone, as in the paper, the VAE writes the persistent donor effects into every
    cell's state (the donor-mean cell state then predicts the planted V with R^2 close to 1),
    where stage 2 can no longer take them back; the cell state also drifts towards one corner
    of the softmax, which blurs the cell-state gating of the interaction and lets the D factors
    mix. With V present from the start both V and D are recovered one to one.
    """

    n_cell_state: int = 8
    n_dxc: int = 8
    n_persistent: int = 4
    encoder_hidden: tuple = (128,)
    epochs_vae: int = 60
    epochs: int = 300
    lr: float = 3e-3
    link: str = "softmax"
    persistent_in_vae_stage: bool = True
    patience: int = 20
    batch_size: int = 256
    fdr: float = 0.05

    @classmethod
    def quick(cls) -> "DemoSettings":
        """Settings for :meth:`SimulationConfig.quick` (``pyro-livi demo --quick``): a smaller
        model (K_C 4, K_DxC 4, K_V 2, encoder [64]) and fewer epochs (VAE 40, donor stage at
        most 150 with patience 10)."""
        return cls(n_cell_state=4, n_dxc=4, n_persistent=2, encoder_hidden=(64,), epochs_vae=40,
                   epochs=150, patience=10)


def matched_correlations(truth: pd.DataFrame, fitted: pd.DataFrame) -> np.ndarray:
    """|Pearson r| across donors between each planted factor and the fitted factor it is
    matched to, one to one (Hungarian assignment maximising the summed |r|).

    truth: (donors, K_true) planted factors; fitted: (donors, K_fit) fitted factors of the same
    kind, K_fit >= K_true, rows aligned by donor id. Returns (K_true,), in the order of truth's
    columns. Factors are identified only up to order and sign, hence the matching and |r|.
    """
    fitted = fitted.loc[truth.index]
    k = truth.shape[1]
    r = np.abs(np.corrcoef(truth.to_numpy().T, fitted.to_numpy().T)[:k, k:])
    rows, cols = linear_sum_assignment(-r)
    matched = np.empty(k)
    matched[rows] = r[rows, cols]
    return matched


def score_recovery(results: pd.DataFrame, effects: pd.DataFrame) -> dict:
    """Compare significant factor x SNP pairs with the planted causal SNPs.

    Fitted factors are unlabelled (any fitted factor may carry a planted one), so a planted SNP
    counts as found when it is significant with at least one fitted factor; a significant pair
    whose SNP is not a planted causal SNP is a false discovery (the simulated SNPs are
    independent, so there is no linkage to excuse it).
    """
    significant = results[results["significant"]]
    significant_snps = set(significant["snp"].astype(str))
    planted = set(effects["snp"].astype(str))
    found = planted & significant_snps
    false = significant[~significant["snp"].astype(str).isin(planted)]
    n_sig = len(significant)
    recovery = {
        "n_planted_snps": len(planted),
        "n_planted_found": len(found),
        "power": len(found) / len(planted) if planted else float("nan"),
        "n_significant_pairs": n_sig,
        "n_false_pairs": len(false),
        "false_discovery_proportion": len(false) / n_sig if n_sig else 0.0,
        "found_snps": sorted(found),
        "missed_snps": sorted(planted - found),
        "n_significant_snps": len(significant_snps),
        # SNPs significant with more than one fitted factor (a planted factor split over
        # several fitted ones): snp -> its significant factors
        "snps_with_several_factors": {
            snp: sorted(rows["factor"].astype(str)) for snp, rows in
            significant.groupby(significant["snp"].astype(str)) if len(rows) > 1},
    }
    if "kind" in effects:  # power per kind of planted factor (D: interaction, V: persistent)
        for kind, rows in effects.groupby("kind"):
            snps = set(rows["snp"].astype(str))
            recovery[f"power_{kind}"] = len(snps & significant_snps) / len(snps)
    return recovery


def demo_outputs(out: str | Path) -> list[Path]:
    """The files in ``out`` that a demo wrote (:data:`DEMO_FILES`, the association outputs, the
    simulation's and the run's files); other files are never listed."""
    out = Path(out)
    if not out.is_dir():
        return []
    own = [out / name for name in DEMO_FILES] + list(output_paths(out / "associations.tsv").values())
    return ([p for p in own if p.is_file()] + simulation_outputs(out / "simulation")
            + run_outputs(out / "run"))


def run_demo(out: str | Path, *, seed: int = 0, config: SimulationConfig | None = None,
             settings: DemoSettings | None = None, progress: bool = True, quick: bool = False,
             overwrite: bool = False) -> dict:
    """Run the whole job into ``out``; returns the recovery figures (also in ``summary.md``).

    ``quick``: the smaller population and model of :meth:`SimulationConfig.quick` and
    :meth:`DemoSettings.quick` (for ``config`` / ``settings`` not given). ``progress``: print
    each step (the closing line with the recovery figures is printed either way).

    Raises InputError (field ``--out``) when ``out`` is a file, or holds an earlier demo's
    outputs (:func:`demo_outputs`) and not ``overwrite`` (``--overwrite``), which replaces them
    (only those)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out", "is a file", "give a folder for the demo's outputs (--out)")
    earlier = demo_outputs(out)
    if not overwrite:
        refuse_earlier_outputs(out, earlier, "holds the outputs of an earlier demo",
                               "add --overwrite (overwrite=True) to replace them, or choose another --out")
    remove_outputs(out, earlier)
    out.mkdir(parents=True, exist_ok=True)
    config = config or (SimulationConfig.quick() if quick else SimulationConfig.demo())
    settings = settings or (DemoSettings.quick() if quick else DemoSettings())
    say = print if progress else (lambda *a, **k: None)
    start = time.perf_counter()

    say(f"[1/4] simulating {config.n_donors} donors, {config.n_genes} genes, {config.n_snps} SNPs (seed {seed})")
    sim = simulate(config, seed=seed)
    files = write_simulation(sim, out / "simulation")

    say(f"[2/4] fitting LIVI on {sim.adata.n_obs} cells")
    result = fit(sim.adata, donor_key="donor", label_keys=["cell_type"], epochs_vae=settings.epochs_vae,
                 epochs=settings.epochs, patience=settings.patience, batch_size=settings.batch_size,
                 lr=settings.lr,
                 seed=seed, progress=progress, out=out / "run", n_cell_state=settings.n_cell_state,
                 n_dxc=settings.n_dxc, n_persistent=settings.n_persistent,
                 encoder_hidden=settings.encoder_hidden, link=settings.link,
                 persistent_in_vae_stage=settings.persistent_in_vae_stage)

    say("[3/4] testing every donor factor against every SNP (linear mixed model)")
    results, report = run_associate(out / "run", files["bed"].with_suffix(""), out=out / "associations.tsv",
                                    fdr=settings.fdr, progress=progress)

    say("[4/4] UMAP of the cell state and summary")
    cell_state = result.tables["cell_state"].to_numpy()
    plot_umap(cell_state, sim.adata.obs[["cell_type", "donor"]], out / "umap_cell_state.png", seed=seed)
    effects = sim.truth["effects"]
    recovery = score_recovery(results, effects)
    for kind in ("D", "V"):
        truth = pd.DataFrame(sim.truth[kind], index=sim.donors)
        if truth.shape[1]:
            recovery[f"matched_r_{kind}"] = matched_correlations(truth, result.tables[kind]).round(3).tolist()
    recovery.update(lambda_gc=report.get("lambda_gc"), n_tests=len(results), seconds=time.perf_counter() - start,
                    seed=seed, fdr=settings.fdr)
    (out / "summary.json").write_text(json.dumps(recovery, indent=2, default=float))
    (out / "summary.md").write_text(_summary_markdown(recovery, config, settings, result.history))
    print(f"found {recovery['n_planted_found']} of {recovery['n_planted_snps']} planted SNPs; "
          f"{recovery['n_false_pairs']} of {recovery['n_significant_pairs']} significant pairs not planted; "
          f"genomic inflation {recovery['lambda_gc']:.3f}; {recovery['seconds']:.0f} s. Summary: {out / 'summary.md'}")
    return recovery


def _listed(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values) if values else "-"


def _split_factor_text(r: dict) -> str:
    """Why there can be more significant pairs than significant SNPs: one SNP found by
    several fitted factors (a planted factor split over several fitted ones)."""
    several = r.get("snps_with_several_factors") or {}
    n_pairs, n_snps = r["n_significant_pairs"], r.get("n_significant_snps", len(several))
    if not several:
        return ("Each significant SNP is significant with one fitted factor only, so pairs and "
                "SNPs count the same.")
    listed = "; ".join(f"{snp}: {', '.join(factors)}" for snp, factors in sorted(several.items()))
    k = len(several)
    return (f"**Why {n_pairs} significant pairs but {n_snps} SNPs:** {k} "
            f"{'SNP is' if k == 1 else 'SNPs are'} significant with several fitted factors "
            f"({listed}). The fitted factors are not labelled like the planted ones, and the "
            "model may spread one planted factor over several fitted factors (a *split "
            "factor*: each carries part of the same genetic effect); each of them then tests "
            "significant with the same SNP. For a planted SNP these pairs are one discovery "
            "(the planted-SNP count above counts SNPs, not pairs); for a SNP that was not "
            "planted, each pair counts among the pairs whose SNP is not planted.")


def _summary_markdown(r: dict, config: SimulationConfig, s: DemoSettings, history: pd.DataFrame) -> str:
    stages = history.groupby("stage", sort=False).size()
    return f"""# pyro-livi demo

Simulated population (seed {r['seed']}): {config.n_donors} donors, ~{config.cells_per_donor} cells per donor,
{config.n_genes} genes, {config.n_snps} SNPs; {config.k_dxc} interaction factors (D) and {config.k_v} persistent
factors (V), each with a planted causal SNP (h2_D = {config.h2_d}, h2_V = {config.h2_v}).

LIVI: K_C = {s.n_cell_state}, K_DxC = {s.n_dxc}, K_V = {s.n_persistent}, cell-state link {s.link},
V trained {'with the VAE from stage 1' if s.persistent_in_vae_stage else 'after the VAE (stage 2)'};
epochs per stage:
{', '.join(f'{k} {v}' for k, v in stages.items())}.

## Association of the fitted donor factors with the genotypes (FDR {r['fdr']:.0%}, Benjamini-Hochberg)

| figure | value |
|---|---|
| planted causal SNPs found | **{r['n_planted_found']} of {r['n_planted_snps']}** (power {r['power']:.0%}; SNPs of D factors {r.get('power_D', float('nan')):.0%}, of V factors {r.get('power_V', float('nan')):.0%}) |
| significant factor x SNP pairs | {r['n_significant_pairs']} (on {r.get('n_significant_snps', '-')} distinct SNPs) |
| significant pairs whose SNP is not planted | **{r['n_false_pairs']}** (false discovery proportion {r['false_discovery_proportion']:.1%}) |
| genomic inflation (lambda_GC) | **{r['lambda_gc']:.3f}** |
| planted D factors: \|r\| with the matched fitted factor | {_listed(r.get('matched_r_D'))} |
| planted V factors: \|r\| with the matched fitted factor | {_listed(r.get('matched_r_V'))} |
| tests | {r['n_tests']} |
| run time | {r['seconds']:.0f} s |

Missed planted SNPs: {', '.join(r['missed_snps']) or 'none'}.

{_split_factor_text(r)}

Files: `associations.tsv` (factor, snp, beta, se, pvalue, padj, significant, chrom, pos, allele_1, allele_2,
maf), `associations_manhattan.png`,
`associations_qq.png`, `umap_cell_state.png` (cell state coloured by cell type and by donor),
`run/loss_curve.png`, `run/` (the fitted model and its tables), `simulation/` (data, genotypes, truth).
"""
