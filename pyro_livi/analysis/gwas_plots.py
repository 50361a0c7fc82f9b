"""GWAS figures for factor x SNP association results: Manhattan and QQ plots (PNG).

Figures are drawn on matplotlib's Agg canvas directly, so they work headless and do
not change the pyplot backend of a notebook.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pyro_livi.analysis.association import genomic_inflation


def _figure(figsize):
    """A figure drawn with the Agg canvas, independent of the pyplot backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _chrom_key(c) -> tuple:
    """Natural order of chromosome names: 1..22, then X, Y, MT, then anything else."""
    s = re.sub(r"^chr", "", str(c), flags=re.IGNORECASE)
    if s.isdigit():
        return (0, int(s), "")
    order = {"X": 23, "Y": 24, "XY": 25, "M": 26, "MT": 26}
    return (1, order.get(s.upper(), 99), s)


def snp_coordinates(snps: pd.DataFrame) -> tuple[pd.Series, list[tuple[float, str]], str]:
    """x coordinate of each SNP id for a Manhattan plot.

    When every SNP has a chromosome and a position: chromosomes side by side in natural
    order, each spanning its position range. Otherwise: the SNP's index in ``snps``.
    Returns (Series snp -> x, [(tick position, chromosome label)], x-axis label).
    """
    ids = snps["snp"].astype(str).to_numpy()
    chrom = snps["chrom"] if "chrom" in snps.columns else pd.Series([None] * len(snps))
    pos = pd.to_numeric(snps["pos"], errors="coerce") if "pos" in snps.columns else \
        pd.Series(np.nan, index=snps.index)
    known = chrom.notna().to_numpy() & pos.notna().to_numpy()
    if len(snps) and known.all():
        frame = pd.DataFrame({"snp": ids, "chrom": chrom.astype(str).to_numpy(),
                              "pos": pos.to_numpy(float)})
        x = np.empty(len(frame))
        ticks, offset = [], 0.0
        for c in sorted(frame["chrom"].unique(), key=_chrom_key):
            sel = (frame["chrom"] == c).to_numpy()
            p = frame["pos"].to_numpy()[sel]
            lo, hi = p.min(), p.max()
            width = max(hi - lo, 1.0)
            x[sel] = offset + (p - lo)
            ticks.append((offset + width / 2, c))
            offset += width * 1.05 + 1.0
        return pd.Series(x, index=ids), ticks, "chromosome"
    return pd.Series(np.arange(len(ids), dtype=float), index=ids), [], "SNP index"


def thin_tick_labels(ax, pad_px: float = 4.0) -> list[str]:
    """Blank the x tick labels of ``ax`` that would overlap an earlier kept one.

    Measured from the rendered text extents (the figure is drawn first), left to right:
    a label is kept when it starts at least ``pad_px`` pixels after the end of the last
    kept label; the last label is preferred over the one before it when they collide.
    Returns the labels kept, in order.
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = list(ax.get_xticklabels())
    texts = [t.get_text() for t in labels]
    boxes = [t.get_window_extent(renderer) for t in labels]
    order = sorted((i for i in range(len(labels)) if texts[i]),
                   key=lambda i: boxes[i].x0 + boxes[i].x1)  # by centre: the tick order
    kept: list[int] = []
    for i in order:
        if not kept or boxes[i].x0 >= boxes[kept[-1]].x1 + pad_px:
            kept.append(i)
        elif i == order[-1] and len(kept) > 1 and \
                boxes[i].x0 >= boxes[kept[-2]].x1 + pad_px:
            kept[-1] = i  # keep the last chromosome rather than its neighbour
    if len(kept) < len(order):
        size = labels[0].get_fontsize()
        ax.set_xticks(ax.get_xticks())
        ax.set_xticklabels([t if k in kept else "" for k, t in enumerate(texts)], fontsize=size)
    return [texts[k] for k in kept]


def manhattan_figure(results: pd.DataFrame, snps: pd.DataFrame, *, fdr: float = 0.05,
                     title: str | None = None):
    """The Manhattan plot of :func:`manhattan_plot` as a matplotlib Figure (Agg canvas)."""
    xs, ticks, xlabel = snp_coordinates(snps)
    snp_ids = results["snp"].astype(str)
    missing = ~snp_ids.isin(xs.index)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} result SNPs not in the SNP table, e.g. "
                         f"{snp_ids[missing].head(3).tolist()}")
    x = xs.reindex(snp_ids).to_numpy()
    p = results["pvalue"].to_numpy(float)
    y = -np.log10(np.clip(p, np.finfo(float).tiny, 1.0))
    sig = results["significant"].to_numpy(bool)
    fig, ax = _figure((11, 4.2))
    if ticks:
        chrom_of = dict(zip(snps["snp"].astype(str), snps["chrom"].astype(str)))
        order = {c: i for i, (_, c) in enumerate(ticks)}
        parity = np.array([order[chrom_of[s]] % 2 for s in snp_ids])
        for k, colour in ((0, "#1f4e79"), (1, "#7fa7d1")):
            sel = (parity == k) & ~sig
            ax.plot(x[sel], y[sel], ".", ms=2.5, color=colour, rasterized=True)
        ax.set_xticks([t for t, _ in ticks])
        ax.set_xticklabels([c for _, c in ticks], fontsize=7)
    else:
        ax.plot(x[~sig], y[~sig], ".", ms=2.5, color="#1f4e79", rasterized=True)
    if sig.any():
        ax.plot(x[sig], y[sig], ".", ms=4, color="#c0392b", rasterized=True,
                label=f"significant ({int(sig.sum())})")
        line = -np.log10(max(p[sig].max(), np.finfo(float).tiny))
        ax.axhline(line, color="#c0392b", lw=0.8, label=f"adjusted p < {fdr:g}")
    elif len(p):
        line = -np.log10(0.05 / len(p))
        ax.axhline(line, color="grey", lw=0.8, ls="--",
                   label=f"5% Bonferroni ({len(p)} tests; none significant at FDR {fdr:g})")
    ax.set_xlabel(xlabel if not ticks else
                  "chromosome (labels thinned where they would overlap)")
    ax.set_ylabel(r"$-\log_{10}\,p$")
    n_factors = results["factor"].nunique() if "factor" in results.columns else 1
    ax.set_title(title or f"{n_factors} factors x {results['snp'].nunique()} SNPs")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    top = max(y.max() if y.size else 0.0, line if len(p) else 0.0)
    ax.set_ylim(0, top * 1.12 + 0.3)
    fig.tight_layout()
    if ticks:
        kept = thin_tick_labels(ax)
        if len(kept) == len(ticks):
            ax.set_xlabel(xlabel)
    return fig


def manhattan_plot(results: pd.DataFrame, snps: pd.DataFrame, path, *, fdr: float = 0.05,
                   title: str | None = None) -> Path:
    """Manhattan plot of all factor x SNP pairs: -log10 p against genome position.

    ``results``: columns ``snp, pvalue, significant``; ``snps``: ``snp, chrom, pos``
    (the genotypes' SNP table). Chromosomes alternate colours; significant pairs are
    red. The horizontal line marks the significance threshold: the largest p-value
    among significant pairs (adjusted p < ``fdr``) when there is one, else the 5%
    Bonferroni threshold over all pairs (dashed, labelled so). Chromosome labels never
    overlap: a label that would touch its left neighbour's is left out
    (:func:`thin_tick_labels`), and the axis says so. Writes ``path`` (PNG).
    """
    path = Path(path)
    fig = manhattan_figure(results, snps, fdr=fdr, title=title)
    fig.savefig(path, dpi=130)
    return path


def qq_plot(pvalues, path, lambda_gc: float | None = None, *, title: str | None = None) -> Path:
    """QQ plot of -log10 p against its uniform expectation, with a 95% band.

    Expected value of the i-th smallest of m p-values: ``(i - 0.5) / m``; the band is
    the 2.5% / 97.5% quantiles of the i-th order statistic of m uniforms,
    ``Beta(i, m - i + 1)``. The genomic inflation ``lambda_gc`` (computed when not
    given) is in the title. Writes ``path`` (PNG).
    """
    path = Path(path)
    p = np.sort(np.asarray(pvalues, dtype=float).ravel())
    m = p.size
    if lambda_gc is None:
        lambda_gc = genomic_inflation(p) if m else float("nan")
    fig, ax = _figure((4.8, 4.8))
    if m:
        i = np.arange(1, m + 1)
        expected = -np.log10((i - 0.5) / m)
        observed = -np.log10(np.clip(p, np.finfo(float).tiny, 1.0))
        lo = -np.log10(stats.beta.ppf(0.975, i, m - i + 1))
        hi = -np.log10(stats.beta.ppf(0.025, i, m - i + 1))
        ax.fill_between(expected, lo, hi, color="0.85", lw=0, label="95% band (null)")
        top = max(expected.max(), 1e-9)
        ax.plot([0, top], [0, top], color="0.4", lw=0.8)
        ax.plot(expected, observed, ".", ms=2.5, color="#1f4e79", rasterized=True)
    ax.set_xlabel(r"expected $-\log_{10}\,p$")
    ax.set_ylabel(r"observed $-\log_{10}\,p$")
    head = title or f"QQ plot ({m} tests)"
    ax.set_title(f"{head}\n$\\lambda_{{GC}}$ = {lambda_gc:.3f}")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    return path
