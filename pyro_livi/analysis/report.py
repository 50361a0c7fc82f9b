"""The evaluation suite of a fitted model, written as ``report.md``, ``metrics.tsv`` and PNGs.

:func:`evaluate` runs every check that works for any model of the zoo (through
``model.encode`` and the ``obs_<modality>`` sites): linear probes and graph metrics of the cell
state, next to the same on a baseline latent (the first principal components of log-normalised
counts); reconstruction NLL; posterior predictive checks; UMAP pictures.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from .figures import plot_ppc_features, plot_ppc_statistics, plot_probe_bars, plot_umap
from .graph_metrics import DEFAULT_RESOLUTIONS, graph_metrics, knn_graph, leiden_clusterings
from .heldout import heldout_nll, nll_summary
from .latents import cell_state
from .plots import plot_loss_curves
from .ppc import posterior_predictive, ppc_calibration, ppc_table
from .probes import probe, probe_table

__all__ = ["Evaluation", "pca_latent", "evaluate", "metrics_long", "write_report"]

CELL_STATE = "cell_state"


def pca_latent(dataset, *, n_pcs: int = 15, modality: str | None = None, seed: int = 0,
               batch_size: int = 4096) -> np.ndarray:
    """First ``n_pcs`` principal components of log-normalised counts (the baseline latent).

    scanpy: ``normalize_total`` (each cell to the median total count), ``log1p``, ``pca``
    (``random_state=seed``) on all features of ``modality`` (default: the first one).
    Returns an array of shape (n_cells, n_pcs).
    """
    import anndata as ad
    import scanpy as sc

    from ..data.loader import MinibatchLoader

    modality = modality or dataset.modalities[0]
    blocks = [sp.csr_matrix(batch.x[modality].numpy())
              for batch in MinibatchLoader(dataset, batch_size=batch_size, shuffle=False)]
    adata = ad.AnnData(sp.vstack(blocks).tocsr())
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    n_pcs = min(int(n_pcs), adata.n_obs - 1, adata.n_vars - 1)
    sc.pp.pca(adata, n_comps=n_pcs, random_state=seed)
    return np.asarray(adata.obsm["X_pca"])


@dataclass
class Evaluation:
    """Everything :func:`evaluate` computed (tables as pandas DataFrames)."""

    probes: pd.DataFrame
    per_class: dict = field(default_factory=dict)
    graph: pd.DataFrame = field(default_factory=pd.DataFrame)
    nll: pd.DataFrame = field(default_factory=pd.DataFrame)
    nll_per_feature: dict = field(default_factory=dict)
    ppc: pd.DataFrame = field(default_factory=pd.DataFrame)
    ppc_features: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    context: dict = field(default_factory=dict)


def evaluate(model, dataset, out, *, label_keys=(), donor_key: str | None = None, history=None,
             heldout_cells=None,
             n_pcs: int = 15, probe_seeds=(0, 1, 2, 3, 4), n_neighbors: int = 15,
             resolutions=DEFAULT_RESOLUTIONS, ppc_cells: int = 1000, ppc_samples: int = 20,
             umap: bool = True, seed: int = 0, context: dict | None = None,
             progress: bool = True) -> Evaluation:
    """Evaluate ``model`` on ``dataset`` and write the results into ``out``.

    Parameters
    ----------
    model : fitted zoo model (``encode``, ``model``/``guide`` with ``obs_<modality>`` sites).
    dataset : SingleCellDataset whose ``obs`` holds the label columns.
    out : directory receiving ``report.md``, ``metrics.tsv``, ``ppc_<modality>.tsv``,
        ``nll_<modality>.tsv`` and the PNGs.
    label_keys : ``.obs`` columns probed and scored (cell type, ...); the donor column is added
        when there is one.
    donor_key : donor column (default: the dataset spec's, None for data without donors); the
        batches of the isolated-label silhouette, and itself a label (the donor probe measures
        donor leakage). Without donors the isolated-label silhouette has no batches and the
        report has no donor-leakage line.
    history : training history (loss curve), optional.
    heldout_cells : ids of cells the model did not train on (a run's validation split); the
        reconstruction NLL is computed on those of them in ``dataset``. None: on every cell,
        training cells included, as the report then says.
    n_pcs : principal components of the baseline latent.
    probe_seeds, n_neighbors, resolutions : probe and graph-metric settings.
    ppc_cells, ppc_samples : cells (a seeded random subset) and replicates of the posterior
        predictive checks.
    umap : draw UMAPs (the slowest step).
    context : extra facts shown at the top of the report (e.g. the run directory); a
        ``"reconstruction cells"`` entry replaces the report's own description of those cells.
    progress : print a line when each step starts and its time when it ends (stderr), so that
        long steps (graph metrics, predictive checks, UMAPs) are not silent.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    donor_key = donor_key or dataset.spec.donor_key
    labels = list(dict.fromkeys([*label_keys, *([donor_key] if donor_key else [])]))
    missing = [k for k in labels if k not in dataset.obs.columns]
    if missing:
        raise InputError(dataset.source, f"obs['{missing[0]}']",
                         f"label column(s) {missing} not among the columns read "
                         f"({list(dataset.obs.columns)})",
                         "read the data with these columns in the spec's label_keys")
    timings, figures = {}, {}
    rng = np.random.default_rng(seed)

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    tic = time.perf_counter()
    say("evaluate [1/6] cell state of the model and the PCA baseline ...")
    baseline = f"pca{n_pcs}"
    latents = {CELL_STATE: cell_state(model, dataset), baseline: pca_latent(dataset, n_pcs=n_pcs, seed=seed)}
    obs = dataset.obs
    if not labels:  # no labels and no donors: Leiden clusters of the baseline stand in for cell types
        key = f"leiden_{baseline}"
        graph = knn_graph(latents[baseline], n_neighbors=n_neighbors, seed=seed)
        clusters = leiden_clusterings(graph, 1.0, seed=seed)[1.0]
        obs = obs.assign(**{key: pd.Categorical(np.asarray(clusters).astype(str))})
        labels = [key]
    timings["latents"] = time.perf_counter() - tic
    say(f"  done in {timings['latents']:.1f} s")

    tic = time.perf_counter()
    say("evaluate [2/6] logistic-regression probes of each label ...")
    results, per_class = {}, {}
    for name, latent in latents.items():
        for key in labels:
            result = probe(latent, obs[key].to_numpy(), seeds=probe_seeds, label=key)
            results[(name, key)] = result
            per_class[(name, key)] = result.per_class
    probes = probe_table(results)
    timings["probes"] = time.perf_counter() - tic
    say(f"  done in {timings['probes']:.1f} s")

    tic = time.perf_counter()
    say("evaluate [3/6] kNN graphs, Leiden clusterings and graph metrics ...")
    donors = dataset.obs[donor_key].to_numpy() if donor_key else None
    graph_rows, graphs = [], {}
    for name, latent in latents.items():
        graphs[name] = knn_graph(latent, n_neighbors=n_neighbors, seed=seed)
        clusterings = leiden_clusterings(graphs[name], resolutions, seed=seed)
        for key in labels:
            values = obs[key].to_numpy()
            batches = None if key == donor_key else donors
            labelled = obs[key].notna().to_numpy()
            if labelled.all():
                metrics = graph_metrics(latent, values, batches, graph=graphs[name],
                                        clusterings=clusterings, seed=seed)
            else:  # unlabelled cells are left out: a graph of the labelled ones
                metrics = graph_metrics(latent[labelled], values[labelled],
                                        None if batches is None else batches[labelled],
                                        n_neighbors=n_neighbors, resolutions=resolutions, seed=seed)
            metrics["isolated_labels"] = ", ".join(metrics["isolated_labels"])
            graph_rows.append({"latent": name, "label": key, **metrics})
    graph = pd.DataFrame(graph_rows)
    timings["graph_metrics"] = time.perf_counter() - tic
    say(f"  done in {timings['graph_metrics']:.1f} s")

    tic = time.perf_counter()
    say("evaluate [4/6] reconstruction NLL ...")
    heldout = None
    if heldout_cells is not None:
        heldout = np.flatnonzero(np.asarray(dataset.obs_names.isin(pd.Index(heldout_cells))))
        if heldout.size == 0:
            raise InputError(dataset.source, "heldout_cells", "none of the held-out cells is among the evaluated "
                             "cells", "evaluate on the data the run was fitted on (without --n-cells, or more cells)")
    nll_features = heldout_nll(model, dataset, heldout)
    nll = nll_summary(nll_features)
    for modality, series in nll_features.items():
        series.to_frame().to_csv(out / f"nll_{modality}.tsv", sep="\t")
    timings["nll"] = time.perf_counter() - tic
    say(f"  done in {timings['nll']:.1f} s")

    tic = time.perf_counter()
    say("evaluate [5/6] posterior predictive checks (replicated data sets) ...")
    ppc_idx = (np.sort(rng.choice(dataset.n_cells, size=ppc_cells, replace=False))
               if ppc_cells and ppc_cells < dataset.n_cells else None)
    idata = posterior_predictive(model, dataset, ppc_idx, num_samples=ppc_samples, seed=seed)
    ppc_features = ppc_table(idata)
    ppc = ppc_calibration(ppc_features)
    for modality, table in ppc_features.items():
        table.to_csv(out / f"ppc_{modality}.tsv", sep="\t")
        figures[f"ppc_{modality}"] = plot_ppc_features(idata, f"obs_{modality}", out / f"ppc_{modality}.png")
        figures[f"ppc_statistics_{modality}"] = plot_ppc_statistics(
            table, out / f"ppc_statistics_{modality}.png", title=f"obs_{modality}: per-feature statistics")
    del idata
    timings["ppc"] = time.perf_counter() - tic
    say(f"  done in {timings['ppc']:.1f} s")

    tic = time.perf_counter()
    say("evaluate [6/6] figures" + (" and UMAPs (the slowest step)" if umap else "") + " ...")
    figures["probes"] = plot_probe_bars(probes, out / "probes.png")
    if history is not None and len(history):
        figures["loss_curve"] = plot_loss_curves(history, out / "loss_curve.png", model=model)
    if umap:
        for name, latent in latents.items():
            path = out / f"umap_{name}.png"
            plot_umap(latent, obs[labels], path, graph=graphs[name], seed=seed, title=name)
            figures[f"umap_{name}"] = path
    timings["figures"] = time.perf_counter() - tic
    say(f"  done in {timings['figures']:.1f} s")

    if labels[0] not in dataset.obs.columns:
        context = {**(context or {}), "labels": f"none given; `{labels[0]}` is the Leiden clustering "
                   f"(resolution 1) of the {baseline} baseline's kNN graph, which favours that baseline"}
    context = {"reconstruction cells": (
        f"{len(heldout)} validation cells the model did not train on" if heldout is not None else
        "every evaluated cell, training cells included (the run has no validation split)"), **(context or {})}
    context = {"cells evaluated": dataset.n_cells,
               "donors": "none" if donors is None else int(np.unique(donors).size),
               "features": ", ".join(f"{m}: {g}" for m, g in dataset.n_features.items()),
               "data": dataset.source, **(context or {})}
    evaluation = Evaluation(probes=probes, per_class=per_class, graph=graph, nll=nll,
                            nll_per_feature=nll_features, ppc=ppc, ppc_features=ppc_features,
                            figures=figures, timings=timings, context=context)
    metrics_long(evaluation).to_csv(out / "metrics.tsv", sep="\t", index=False)
    write_report(evaluation, out / "report.md", donor_key=donor_key, n_pcs=n_pcs,
                 ppc_cells=ppc_cells if ppc_idx is not None else dataset.n_cells, ppc_samples=ppc_samples,
                 n_seeds=len(tuple(probe_seeds)), n_neighbors=n_neighbors)
    return evaluation


def metrics_long(evaluation: Evaluation) -> pd.DataFrame:
    """Every scalar metric in long form: section, latent, label, modality, metric, value."""
    rows = []
    for _, r in evaluation.probes.iterrows():
        for metric in ("accuracy", "accuracy_std", "balanced_accuracy", "balanced_accuracy_std", "chance"):
            rows.append(("probe", r["latent"], r["label"], "", metric, r[metric]))
    for _, r in evaluation.graph.iterrows():
        for metric in ("ari", "nmi", "resolution", "n_clusters", "silhouette", "graph_connectivity",
                       "isolated_label_silhouette"):
            rows.append(("graph", r["latent"], r["label"], "", metric, r[metric]))
    for modality, r in evaluation.nll.iterrows():
        for metric in ("nll_per_cell", "nll_per_feature", "n_cells"):
            rows.append(("reconstruction", "", "", modality, metric, r[metric]))
    for (modality, statistic), r in evaluation.ppc.iterrows():
        for metric in ("frac_ppp_in_interval", "frac_obs_above", "frac_obs_below", "calibration_error"):
            rows.append(("ppc", "", statistic, modality, metric, r[metric]))
    return pd.DataFrame(rows, columns=["section", "latent", "label", "modality", "metric", "value"])


def _markdown_table(frame: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A pipe table (no optional dependency): floats formatted with ``floatfmt``."""
    def cell(value):
        if isinstance(value, (float, np.floating)):
            return "nan" if not np.isfinite(value) else format(value, floatfmt)
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_report(evaluation: Evaluation, path, *, donor_key: str | None, n_pcs: int, ppc_cells: int,
                 ppc_samples: int, n_seeds: int = 5, n_neighbors: int = 15) -> Path:
    """Write ``report.md`` from an :class:`Evaluation`."""
    path = Path(path)
    ev = evaluation
    baseline = f"pca{n_pcs}"
    lines = ["# Evaluation report", ""]
    for key, value in ev.context.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "## Linear probes", "",
              f"Multinomial logistic regression on standardised latent coordinates, "
              f"{int(ev.probes.get('n_cells', pd.Series([0])).max())} cells, {n_seeds} seeded "
              "stratified 80/20 splits; mean (standard deviation) held-out accuracy. "
              f"`{CELL_STATE}` is the model's posterior-mean cell state; `{baseline}` the first "
              f"{n_pcs} principal components of log-normalised counts (normalize_total, log1p, PCA). "
              "Chance is the fraction of the most frequent class.", ""]
    rows = []
    for key in dict.fromkeys(ev.probes["label"]):
        row = {"label": key}
        for latent in (CELL_STATE, baseline):
            r = ev.probes[(ev.probes["label"] == key) & (ev.probes["latent"] == latent)].iloc[0]
            row[f"{latent} accuracy"] = f"{r['accuracy']:.3f} ({r['accuracy_std']:.3f})"
            row[f"{latent} balanced"] = f"{r['balanced_accuracy']:.3f}"
        row["chance"] = f"{r['chance']:.3f}"
        row["classes"] = int(r["n_classes"])
        rows.append(row)
    lines.append(_markdown_table(pd.DataFrame(rows)))
    donor = ev.probes[ev.probes["label"] == donor_key].set_index("latent")
    if len(donor):
        lines += ["", f"Donor leakage: the donor (`{donor_key}`) probe reaches "
                  f"{donor.loc[CELL_STATE, 'accuracy']:.3f} from the cell state and "
                  f"{donor.loc[baseline, 'accuracy']:.3f} from {n_pcs} PCs of the counts "
                  f"(chance {donor.loc[CELL_STATE, 'chance']:.3f}). The cell state should carry "
                  "cell identity, not donor identity, so a low donor accuracy is the goal."]
    for (latent, key), series in ev.per_class.items():
        if latent == CELL_STATE and len(series) <= 30:
            lines += ["", f"Per-class accuracy of the `{key}` probe from the cell state:", "",
                      _markdown_table(series.rename("accuracy").reset_index())]
    lines += ["", "## Graph metrics", "",
              f"kNN graph (scanpy, {n_neighbors} neighbours) of each latent; ARI/NMI between the "
              "label and "
              "the Leiden clustering with the highest NMI over the scanned resolutions; "
              "silhouettes rescaled to [0, 1]; graph connectivity as in scIB; "
              + (f"isolated labels are the label values present in the fewest donors (`{donor_key}`), "
                 "not computed for the donor label itself." if donor_key else
                 "isolated labels are the least frequent label values (the data have no donors)."), "",
              _markdown_table(ev.graph.drop(columns=["isolated_labels"]))]
    lines += ["", "## Reconstruction", "",
              "Negative log-likelihood (nats) of the evaluated cells under the model's own "
              "observation sites, every latent at its posterior mean; per cell (sum over "
              "features) and per feature and cell, on the cells named under 'reconstruction cells' "
              "above (held-out values only when they are validation cells).", "",
              _markdown_table(ev.nll.reset_index())]
    lines += ["", "## Posterior predictive checks", "",
              f"{ppc_samples} replicated data sets of {ppc_cells} cells drawn from the model "
              "(pyro.infer.Predictive with the guide). For each feature and statistic, ppp = "
              "P(T_rep > T_obs) + 0.5 P(T_rep = T_obs); `frac_ppp_in_interval` is the fraction of "
              "features with ppp in [0.025, 0.975]; `frac_obs_above`: fraction of features whose "
              "observed statistic lies above the predictions (ppp < 0.025); `frac_obs_below`: "
              "below them (ppp > 0.975); `calibration_error`: median over features of "
              "|T_obs - E T_rep| / sd(T_rep) (about 0.67 or less for a calibrated model).", "",
              _markdown_table(ev.ppc.drop(columns=["frac_ppp_low", "frac_ppp_high"],
                                          errors="ignore").reset_index())]
    lines += ["", "## Figures", ""]
    for name, fig in ev.figures.items():
        lines.append(f"![{name}]({Path(fig).name})")
    lines += ["", "Run time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ev.timings.items()), ""]
    path.write_text("\n".join(lines))
    return path
