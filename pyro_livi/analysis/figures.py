"""Evaluation figures, written as PNG files.

UMAP of a latent coloured by labels (scanpy), probe accuracies as a bar chart, and posterior
predictive checks (ArviZ's ``plot_ppc`` on the most expressed features, and observed vs
replicated per-feature statistics). Loss curves are :func:`pyro_livi.analysis.plots.plot_loss_curves`.
Every figure is drawn off-screen on its own Agg canvas (scanpy and ArviZ draw into axes given to
them), so the caller's pyplot backend and open figures are left alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_umap", "plot_umap_grid", "plot_probe_bars", "plot_ppc_features", "plot_ppc_statistics"]


def _figure(nrows: int, ncols: int, figsize) -> tuple[Figure, np.ndarray]:
    """An off-screen figure and its axes as a (nrows, ncols) array."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, np.asarray(fig.subplots(nrows, ncols, squeeze=False))


def _save(fig: Figure, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_umap(latent, obs: pd.DataFrame, path, *, graph=None, n_neighbors: int = 15, seed: int = 0,
              title: str | None = None, max_legend: int = 40) -> np.ndarray:
    """UMAP of ``latent`` (n_cells, K), one panel per column of ``obs`` (colours).

    ``graph`` is a kNN AnnData of this latent (:func:`pyro_livi.analysis.graph_metrics.knn_graph`),
    built here when None. Categorical columns with more than ``max_legend`` values get no
    legend. Writes the PNG and returns the UMAP coordinates, shape (n_cells, 2).
    """
    import scanpy as sc

    from .graph_metrics import knn_graph

    if graph is None:
        graph = knn_graph(latent, n_neighbors=n_neighbors, seed=seed)
    adata = graph.copy()
    sc.tl.umap(adata, random_state=seed)
    columns = list(obs.columns)
    for column in columns:  # labels are categories, whatever their dtype
        adata.obs[column] = pd.Categorical(obs[column].astype(str).to_numpy())
    fig, axes = _figure(1, len(columns), (5.5 * len(columns), 4.5))
    for ax, column in zip(axes[0], columns):
        n_values = obs[column].nunique()
        legend = "right margin" if n_values <= max_legend else "none"
        # scanpy greys out columns with more than 102 categories: give them a palette of their own
        palette = None
        if n_values > 102:
            from matplotlib import colormaps
            from matplotlib.colors import to_hex

            palette = [to_hex(c) for c in colormaps["hsv"](np.linspace(0, 1, n_values, endpoint=False))]
        sc.pl.umap(adata, color=column, ax=ax, show=False, legend_loc=legend, legend_fontsize=6,
                   title=f"{title}: {column}" if title else column, frameon=False, palette=palette)
    _save(fig, path)
    return np.asarray(adata.obsm["X_umap"])


def plot_umap_grid(latents: dict, labels, path, *, label_name: str = "label", n_neighbors: int = 15,
                   seed: int = 0) -> Path:
    """One UMAP panel per latent ({name: (n_cells, K) array}), every panel coloured by the same
    ``labels`` (n_cells,); writes the PNG."""
    import scanpy as sc

    from .graph_metrics import knn_graph

    ncols = min(3, len(latents))
    nrows = -(-len(latents) // ncols)
    fig, axes = _figure(nrows, ncols, (5.0 * ncols, 4.3 * nrows))
    colours = pd.Categorical(np.asarray(labels).astype(str))
    for ax, (name, latent) in zip(axes.ravel(), latents.items()):
        adata = knn_graph(latent, n_neighbors=n_neighbors, seed=seed)
        sc.tl.umap(adata, random_state=seed)
        adata.obs[label_name] = colours
        sc.pl.umap(adata, color=label_name, ax=ax, show=False, legend_loc="on data", legend_fontsize=6,
                   title=name, frameon=False)
    for ax in axes.ravel()[len(latents):]:
        ax.set_axis_off()
    _save(fig, path)
    return Path(path)


def plot_probe_bars(table: pd.DataFrame, path, *, metric: str = "accuracy") -> Path:
    """Grouped bars of probe scores: one group per label, one bar per latent.

    ``table`` has columns ``latent``, ``label``, ``<metric>``, ``<metric>_std`` and ``chance``
    (as from :func:`pyro_livi.analysis.probes.probe_table`). The chance level (majority class)
    of each label is a dashed line over its group.
    """
    labels = list(dict.fromkeys(table["label"]))
    latents = list(dict.fromkeys(table["latent"]))
    width = 0.8 / max(len(latents), 1)
    fig, axes = _figure(1, 1, (1.8 + 1.6 * len(labels) * max(len(latents), 1) / 2, 4))
    ax = axes[0, 0]
    for j, latent in enumerate(latents):
        rows = table[table["latent"] == latent].set_index("label").reindex(labels)
        x = np.arange(len(labels)) + (j - (len(latents) - 1) / 2) * width
        ax.bar(x, rows[metric], width, yerr=rows.get(f"{metric}_std"), capsize=3, label=latent)
        for xi, value in zip(x, rows[metric]):
            if np.isfinite(value):
                ax.text(xi, value + 0.02, f"{value:.2f}", ha="center", fontsize=7)
    chance = table.groupby("label")["chance"].first().reindex(labels)
    for i, value in enumerate(chance):
        ax.hlines(value, i - 0.45, i + 0.45, colors="grey", linestyles="--", lw=1,
                  label="chance (majority class)" if i == 0 else None)
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set(ylim=(0, 1.1), ylabel=f"probe {metric.replace('_', ' ')}",
           title="logistic-regression probes (mean over seeds)")
    ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)
    return Path(path)


def plot_ppc_features(idata, site: str, path, *, n_features: int = 6, num_pp_samples: int | None = None,
                      log1p: bool = True) -> Path:
    """ArviZ ``plot_ppc`` of the ``n_features`` features with the highest observed mean of
    ``site``: per feature, the distribution over cells of the observed values and of each
    replicate. With ``log1p`` (default) the values are shown as log(1 + count), where count
    distributions spanning decades (and bimodal ones, such as antibody background and
    foreground) are readable."""
    import arviz as az

    obs = idata.observed_data[site]
    feature_dim = obs.dims[1]
    means = np.nanmean(obs.values.astype(np.float64), axis=0)
    top = list(obs.coords[feature_dim].values[np.argsort(-means)[:n_features]])
    obs = obs.sel({feature_dim: top})
    rep = idata.posterior_predictive[site].sel({feature_dim: top})
    if log1p:
        obs, rep = np.log1p(obs.astype(np.float64)), np.log1p(rep.astype(np.float64))
    subset = az.from_dict(posterior_predictive={site: rep.values}, observed_data={site: obs.values},
                          coords={"cell": obs.coords["cell"].values, feature_dim: top},
                          dims={site: ["cell", feature_dim]})
    ncols = min(3, len(top))
    nrows = -(-len(top) // ncols)
    fig, axes = _figure(nrows, ncols, (5.5 * ncols, 3.6 * nrows))
    for ax in axes.ravel()[len(top):]:
        ax.set_axis_off()
    az.plot_ppc(subset, var_names=[site], flatten=["cell"], num_pp_samples=num_pp_samples,
                random_seed=0, textsize=8, ax=axes.ravel()[:len(top)])
    for ax in axes.ravel()[:len(top)]:
        if log1p:
            ax.set_xlabel(ax.get_xlabel().replace(site, f"log1p({site})"))
    fig.suptitle(f"{site}: posterior predictive check of the {len(top)} most expressed features"
                 + (" (log1p scale)" if log1p else ""), fontsize=9)
    _save(fig, path)
    return Path(path)


def plot_ppc_statistics(table: pd.DataFrame, path, *, title: str = "") -> Path:
    """Observed vs replicated per-feature statistics (one panel per statistic of
    :func:`pyro_livi.analysis.ppc.feature_statistics`): replicated mean with its 95% interval
    against the observed value, identity line; features whose observed statistic lies above
    the predictions (ppp < 0.025) in red, below them (ppp > 0.975) in purple. Legends sit
    below the axes, off the points."""
    stats = [c[: -len("_ppp")] for c in table.columns if c.endswith("_ppp")]
    fig, axes = _figure(1, len(stats), (4.2 * len(stats), 4))
    for ax, name in zip(axes[0], stats):
        obs, rep = table[f"{name}_obs"], table[f"{name}_rep_mean"]
        lo, hi = table[f"{name}_rep_q025"], table[f"{name}_rep_q975"]
        above, below = table[f"{name}_ppp"] < 0.025, table[f"{name}_ppp"] > 0.975
        for mask, colour, lab in ((~(above | below), "tab:blue", "ppp in [0.025, 0.975]"),
                                  (above, "tab:red", "observed above predictions (ppp < 0.025)"),
                                  (below, "tab:purple", "observed below predictions (ppp > 0.975)")):
            ax.errorbar(obs[mask], rep[mask], yerr=[(rep - lo)[mask].clip(lower=0), (hi - rep)[mask].clip(lower=0)],
                        fmt="o", ms=2, lw=0.5, color=colour, alpha=0.6, label=f"{lab} ({int(mask.sum())})")
        values = np.concatenate([obs[np.isfinite(obs)], rep[np.isfinite(rep)]])
        if name != "zero_fraction":  # means and variances span decades; zeros are not drawn
            ax.set_xscale("log", nonpositive="mask")
            ax.set_yscale("log", nonpositive="mask")
            values = values[values > 0]
        if values.size:
            ax.plot([values.min(), values.max()], [values.min(), values.max()], color="black", lw=0.7)
        ax.set(xlabel=f"observed {name}", ylabel=f"replicated {name}", title=name)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return Path(path)
