"""The causal read-out of a fitted CMC-VAE (:mod:`pyro_livi.models.cmcvae`; seed 003's
"central dogma" and "regulatory" asymmetry panels): the learned latent graph as an edge table,
in-silico interventions from feature to feature through (I - A^T)^{-1}, the RNA -> protein
versus protein -> RNA asymmetry of matched gene/protein pairs, and the TF -> target versus
target -> TF asymmetry of prior edges, each with a paired test across pairs, and figures.

Effects. For features i (source) and j (target), E_ij is the change of j's linear predictor
when the exogenous noise of the latent nodes is shifted by the least-norm vector that would
move i's linear predictor by one unit, propagated through at least one edge of the latent
SCM (:meth:`pyro_livi.models.cmcvae.CMCVAE.feature_effects`). For a matched pair (gene g,
protein p): forward = E_gp (RNA -> protein), reverse = E_pg (protein -> RNA).

Paired test. Across pairs, the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided,
exact for fewer than 50 pairs without ties) of the differences |forward| - |reverse|. The
direction is called when p < alpha: ``rna_to_prot`` (or ``forward``) when the median
difference is positive, ``prot_to_rna`` (``reverse``) when negative; otherwise
``undetermined``.

Tables read here (TSV, or CSV when the file ends in ``.csv``):

- prior edges: columns ``source``, ``target`` and optionally ``sign`` (+1 / -1 / 0, or
  ``+``, ``-``, ``activation``, ``repression``, ``stimulation``, ``inhibition``,
  ``unknown``; CollecTRI's ``weight`` or ``mor`` column is read as the sign), names of genes or
  proteins; a name held by both modalities is written ``rna:NAME`` / ``prot:NAME`` (the
  modality names of the data);
- matched pairs: columns ``gene`` and ``protein``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import InputError

__all__ = ["PBMC10K_PAIRS", "CausalResult", "causal_analysis", "default_pairs", "edge_effects", "graph_table",
           "node_table", "pair_effects", "paired_asymmetry", "plot_asymmetry", "plot_graph", "read_edge_table",
           "read_pairs", "resolve_pairs"]

#: matched gene / protein pairs of ``citeseq/pbmc10k_cite.h5mu`` (10x TotalSeq-B panel, 14
#: antibodies; every name is a feature of that file). CD3 is paired with CD3D (the antibody's
#: target CD3E is not among the file's 4,000 genes; CD3D encodes a chain of the same complex);
#: CD15 (Lewis X, a glycan) with FUT4, the fucosyltransferase that makes it; CD45RA and CD45RO
#: (isoforms of PTPRC, absent from the genes) have no pair.
PBMC10K_PAIRS = (
    ("CD3D", "CD3_TotalSeqB"),
    ("CD4", "CD4_TotalSeqB"),
    ("CD8A", "CD8a_TotalSeqB"),
    ("CD14", "CD14_TotalSeqB"),
    ("FCGR3A", "CD16_TotalSeqB"),
    ("CD19", "CD19_TotalSeqB"),
    ("NCAM1", "CD56_TotalSeqB"),
    ("IL7R", "CD127_TotalSeqB"),
    ("IL2RA", "CD25_TotalSeqB"),
    ("FUT4", "CD15_TotalSeqB"),
    ("PDCD1", "PD-1_TotalSeqB"),
    ("TIGIT", "TIGIT_TotalSeqB"),
)

_SIGN_WORDS = {"+": 1, "activation": 1, "stimulation": 1, "positive": 1, "-": -1, "repression": -1,
               "inhibition": -1, "negative": -1, "0": 0, "unknown": 0, "": 0, "nan": 0}


def default_pairs() -> pd.DataFrame:
    """The pairs of :data:`PBMC10K_PAIRS` as a table (columns gene, protein)."""
    return pd.DataFrame(PBMC10K_PAIRS, columns=["gene", "protein"])


def _read_table(path, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "<file>", f"{what} file not found", f"give the path of a TSV/CSV {what} table")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, comment="#")
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(path, "<file>", f"not a readable {'CSV' if sep == ',' else 'TSV'} table ({err})",
                         "write one row per entry, columns separated by "
                         f"{'commas' if sep == ',' else 'tabs'}, with a header line") from err
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _index(feature_names: dict, modalities) -> tuple[dict, dict, list]:
    """({modality: {name: global index}}, {name: [modality, ...]}, modalities) over the
    features of ``modalities`` in order (genes first, then proteins)."""
    modalities = list(modalities or feature_names)
    offset, by_mod, where = 0, {}, {}
    for m in modalities:
        names = [str(n) for n in feature_names[m]]
        by_mod[m] = {n: offset + k for k, n in enumerate(names)}
        for n in names:
            where.setdefault(n, []).append(m)
        offset += len(names)
    return by_mod, where, modalities


def _resolve(name: str, by_mod: dict, where: dict, allowed=None):
    """(modality, global index) of a feature name (``modality:NAME`` accepted); (None, reason)
    when it cannot be resolved."""
    name = str(name).strip()
    if ":" in name and name.split(":", 1)[0] in by_mod:
        m, bare = name.split(":", 1)
        if bare in by_mod[m] and (allowed is None or m in allowed):
            return m, by_mod[m][bare]
        return None, "unknown"
    mods = [m for m in where.get(name, []) if allowed is None or m in allowed]
    if not mods:
        return None, "unknown"
    if len(mods) > 1:
        return None, "ambiguous"
    return mods[0], by_mod[mods[0]][name]


def _sign(value, source, row: int) -> int:
    text = str(value).strip().lower()
    if text in _SIGN_WORDS:
        return _SIGN_WORDS[text]
    try:
        number = float(text)
    except ValueError:
        raise InputError(source, "sign", f"row {row + 2}: sign {value!r} is not understood",
                         "use 1 / -1 / 0, +/-, activation/repression or unknown") from None
    if not math.isfinite(number):
        raise InputError(source, "sign", f"row {row + 2}: sign {value!r} is not finite", "use 1, -1 or 0")
    return int(np.sign(number))


def read_edge_table(table, feature_names: dict, *, modalities=None, unknown: str = "error",
                    source: str | None = None) -> pd.DataFrame:
    """Prior edges between features, resolved against the data's feature names.

    table : a path (TSV, or CSV for ``.csv``) or a DataFrame with columns ``source``, ``target``
        and optionally ``sign`` (or CollecTRI's ``weight`` / ``mor``; see the module docstring).
    feature_names : {modality: names}; modalities : their order (default: the dict's), which
        fixes the global feature index (genes 0..G-1, then proteins).
    unknown : ``"error"`` (default) refuses rows naming a feature absent from the data;
        ``"drop"`` leaves them out.

    Returns a DataFrame with columns source, target (names as in the data), sign (int),
    source_modality, target_modality, source_index, target_index; exact duplicates are kept
    once. Raises InputError naming the file, the column and the fix: missing columns, unknown
    or ambiguous names, self-edges, the same edge listed with two signs, no edge left.
    """
    if unknown not in ("error", "drop"):
        raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
    if isinstance(table, pd.DataFrame):
        source = source or "<prior edge table>"
        table = table.astype(str)
    else:
        source = source or str(table)
        table = _read_table(table, "prior edge")
    columns = {c.lower(): c for c in table.columns}
    missing = [c for c in ("source", "target") if c not in columns]
    if missing:
        raise InputError(source, "columns", f"no column {missing} (columns: {list(table.columns)})",
                         "name the columns source, target and (optionally) sign in the header line")
    sign_col = next((columns[c] for c in ("sign", "weight", "mor") if c in columns), None)
    by_mod, where, modalities = _index(feature_names, modalities)
    rows, dropped = [], 0
    for r, rec in enumerate(table.itertuples(index=False)):
        rec = dict(zip(table.columns, rec))
        resolved = {}
        for col in ("source", "target"):
            name = str(rec[columns[col]]).strip()
            m, idx = _resolve(name, by_mod, where)
            if m is None and idx == "ambiguous":
                raise InputError(source, col, f"row {r + 2}: {name!r} is a feature of several modalities "
                                 f"({where[name]})", f"write it as '{where[name][0]}:{name}' or "
                                 f"'{where[name][1]}:{name}'")
            resolved[col] = (m, idx, name.split(":", 1)[1] if m is not None and ":" in name
                             and name.split(":", 1)[0] == m else name)
        bad = [col for col in ("source", "target") if resolved[col][0] is None]
        if bad:
            if unknown == "drop":
                dropped += 1
                continue
            col = bad[0]
            raise InputError(source, col, f"row {r + 2}: {resolved[col][2]!r} is not a feature of the data "
                             f"(modalities {modalities}, e.g. "
                             f"{', '.join(list(by_mod[modalities[0]])[:3] + list(by_mod[modalities[-1]])[:2])})",
                             "use the data's gene / protein names (var_names), or leave such rows out "
                             "(prior_unknown='drop' in Python, --prior-unknown drop on the CLI)")
        if resolved["source"][1] == resolved["target"][1]:
            raise InputError(source, "target", f"row {r + 2}: an edge from {resolved['source'][2]!r} to itself",
                             "remove self-edges")
        sign = _sign(rec[sign_col], source, r) if sign_col else 0
        rows.append({"source": resolved["source"][2], "target": resolved["target"][2], "sign": sign,
                     "source_modality": resolved["source"][0], "target_modality": resolved["target"][0],
                     "source_index": int(resolved["source"][1]), "target_index": int(resolved["target"][1])})
    out = pd.DataFrame(rows, columns=["source", "target", "sign", "source_modality", "target_modality",
                                      "source_index", "target_index"]).drop_duplicates()
    clash = out.duplicated(["source_index", "target_index"], keep=False)
    if clash.any():
        first = out[clash].iloc[0]
        raise InputError(source, "sign", f"edge {first['source']} -> {first['target']} is listed with "
                         "different signs", "keep one row per edge")
    if out.empty:
        raise InputError(source, "source", f"no edge joins two features of the data ({dropped} rows dropped "
                         "as unknown)", "use the data's gene / protein names")
    out.attrs["dropped"] = dropped
    return out.reset_index(drop=True)


def read_pairs(table) -> pd.DataFrame:
    """Matched gene / protein pairs from a path (TSV, or CSV for ``.csv``) or a DataFrame with
    columns ``gene`` and ``protein``. Raises InputError on a missing file or column."""
    source = "<pairs table>" if isinstance(table, pd.DataFrame) else str(table)
    if not isinstance(table, pd.DataFrame):
        table = _read_table(table, "matched pairs")
    columns = {str(c).strip().lower(): c for c in table.columns}
    missing = [c for c in ("gene", "protein") if c not in columns]
    if missing:
        raise InputError(source, "columns", f"no column {missing} (columns: {list(table.columns)})",
                         "name the columns gene and protein in the header line")
    out = pd.DataFrame({"gene": table[columns["gene"]].astype(str).str.strip(),
                        "protein": table[columns["protein"]].astype(str).str.strip()})
    out.attrs["source"] = source
    return out


def resolve_pairs(pairs: pd.DataFrame, feature_names: dict, modalities) -> pd.DataFrame:
    """Pairs with the global feature index of each gene (in the RNA modality, the first of
    ``modalities``) and protein (the second). Raises InputError listing every name that is not
    a feature of its modality."""
    rna, prot = modalities
    by_mod, _, _ = _index(feature_names, modalities)
    source = pairs.attrs.get("source", "<pairs table>")
    for col, m in (("gene", rna), ("protein", prot)):
        absent = [n for n in pairs[col] if n not in by_mod[m]]
        if absent:
            raise InputError(source, col, f"{len(absent)} of {len(pairs)} names are not features of modality "
                             f"'{m}': {absent[:8]}", f"use the data's {m} var_names (e.g. "
                             f"{list(by_mod[m])[:4]}), or give --pairs FILE with columns gene, protein")
    if pairs.empty:
        raise InputError(source, "gene", "no pairs", "give at least one gene / protein pair")
    out = pairs.copy()
    out["gene_index"] = [by_mod[rna][n] for n in pairs["gene"]]
    out["protein_index"] = [by_mod[prot][n] for n in pairs["protein"]]
    return out


# -------------------------------------------------------------------------------- effects
@torch.no_grad()
def _effects(model, sources, targets) -> np.ndarray:
    """E_ij for the (n,) feature indices ``sources`` and ``targets`` as float64 numpy."""
    return model.feature_effects(torch.as_tensor(np.asarray(sources, dtype=np.int64)),
                                 torch.as_tensor(np.asarray(targets, dtype=np.int64))).double().numpy()


def pair_effects(model, pairs: pd.DataFrame) -> pd.DataFrame:
    """Effects of each matched pair (resolved by :func:`resolve_pairs`): columns gene, protein,
    rna_to_prot (E_gp), prot_to_rna (E_pg), their absolute values, difference = |E_gp| - |E_pg|
    and log2_ratio = log2(|E_gp| / |E_pg|) (+-inf when one is exactly 0)."""
    forward = _effects(model, pairs["gene_index"], pairs["protein_index"])
    reverse = _effects(model, pairs["protein_index"], pairs["gene_index"])
    out = pairs[["gene", "protein"]].copy()
    out["rna_to_prot"], out["prot_to_rna"] = forward, reverse
    out["abs_rna_to_prot"], out["abs_prot_to_rna"] = np.abs(forward), np.abs(reverse)
    out["difference"] = np.abs(forward) - np.abs(reverse)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["log2_ratio"] = np.log2(np.abs(forward)) - np.log2(np.abs(reverse))
    return out


def edge_effects(model, edges: pd.DataFrame) -> pd.DataFrame:
    """Effects of prior edges (:func:`read_edge_table`): columns source, target, sign, forward
    (E_st), reverse (E_ts), their absolute values, difference and log2_ratio as in
    :func:`pair_effects`, and sign_agrees (sign of E_st equals the listed sign; NaN when
    unsigned)."""
    forward = _effects(model, edges["source_index"], edges["target_index"])
    reverse = _effects(model, edges["target_index"], edges["source_index"])
    out = edges[["source", "target", "sign"]].copy()
    out["forward"], out["reverse"] = forward, reverse
    out["abs_forward"], out["abs_reverse"] = np.abs(forward), np.abs(reverse)
    out["difference"] = np.abs(forward) - np.abs(reverse)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["log2_ratio"] = np.log2(np.abs(forward)) - np.log2(np.abs(reverse))
    out["sign_agrees"] = np.where(edges["sign"].to_numpy() == 0, np.nan,
                                  (np.sign(forward) == edges["sign"].to_numpy()).astype(float))
    return out


def paired_asymmetry(forward, reverse, *, alpha: float = 0.05, names=("forward", "reverse")) -> dict:
    """Wilcoxon signed-rank test (two-sided) of |forward| - |reverse| across pairs.

    forward, reverse : (n,) effects of the same pairs in the two directions.
    Returns {n, statistic, p_value, median_abs_<names[0]>, median_abs_<names[1]>,
    median_difference, fraction_<names[0]>_larger, direction}: direction is names[0] or
    names[1] when p < alpha (by the sign of the median difference), else ``undetermined``;
    p = 1 when every difference is 0.
    """
    f = np.abs(np.asarray(forward, dtype=float))
    r = np.abs(np.asarray(reverse, dtype=float))
    if f.shape != r.shape or f.ndim != 1 or f.size == 0:
        raise ValueError("forward and reverse must be non-empty (n,) arrays of one length")
    diff = f - r
    if np.all(diff == 0):
        statistic, p = 0.0, 1.0
    else:
        from scipy.stats import wilcoxon

        test = wilcoxon(f, r, alternative="two-sided", zero_method="wilcox")
        statistic, p = float(test.statistic), float(test.pvalue)
    median = float(np.median(diff))
    direction = "undetermined"
    if p < alpha and median != 0:
        direction = names[0] if median > 0 else names[1]
    return {"n": int(f.size), "statistic": statistic, "p_value": p,
            f"median_abs_{names[0]}": float(np.median(f)), f"median_abs_{names[1]}": float(np.median(r)),
            "median_difference": median, f"fraction_{names[0]}_larger": float(np.mean(diff > 0)),
            "direction": direction}


# ----------------------------------------------------------------------------------- graph
def node_table(model, feature_names: dict, top: int = 5) -> pd.DataFrame:
    """One row per latent node: modality, the ``top`` features with the largest |loading|
    (``name:loading``), the node's in- and out-degree in the thresholded graph."""
    rna, prot = model.modalities
    A = model.A.detach().numpy()
    kept = np.abs(A) >= model.edge_threshold
    rows = []
    for k, node in enumerate(model.node_names()):
        is_rna = k < model.K_R
        W = model.decoders()[0 if is_rna else 1].detach().numpy()[k if is_rna else k - model.K_R]
        names = feature_names[rna if is_rna else prot]
        order = np.argsort(-np.abs(W))[:top]
        rows.append({"node": node, "modality": rna if is_rna else prot,
                     "top_features": ", ".join(f"{names[j]}:{W[j]:+.2f}" for j in order),
                     "in_degree": int(kept[:, k].sum()), "out_degree": int(kept[k].sum())})
    return pd.DataFrame(rows).set_index("node")


def graph_table(model) -> pd.DataFrame:
    """Every allowed edge of the latent graph: source, target (node names), block
    (``rna->rna``, ``rna->prot``, ``prot->rna``, ``prot->prot``), weight A[i, j], abs_weight and
    in_graph (|weight| >= the model's edge threshold), sorted by abs_weight."""
    A = model.A.detach().numpy()
    mask = model.A_mask.numpy() > 0
    names = model.node_names()
    kind = ["rna"] * model.K_R + ["prot"] * model.K_P
    i, j = np.nonzero(mask)
    table = pd.DataFrame({"source": [names[a] for a in i], "target": [names[b] for b in j],
                          "block": [f"{kind[a]}->{kind[b]}" for a, b in zip(i, j)], "weight": A[i, j]})
    table["abs_weight"] = table["weight"].abs()
    table["in_graph"] = table["abs_weight"] >= model.edge_threshold
    return table.sort_values("abs_weight", ascending=False).reset_index(drop=True)


# ---------------------------------------------------------------------------------- figures
def plot_asymmetry(panels: list[tuple[str, pd.DataFrame, str, str, dict]], path) -> None:
    """The asymmetry figure: one panel per test, |effect| of each pair in both directions joined
    by a line (paired; red where the first direction is larger), with box plots and the test's
    p-value. ``panels``: (title, table, forward column, reverse column, test result) each; tables
    with a ``label`` column name their pairs (at the larger end) when there are at most 20."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8 * len(panels), 4.6))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, (title, table, fcol, rcol, test) in zip(axes, panels):
        f, r = table[fcol].abs().to_numpy(), table[rcol].abs().to_numpy()
        ax.boxplot([f, r], positions=[0, 1], widths=0.35, showfliers=False)
        for k in range(len(f)):
            colour = "tab:red" if f[k] > r[k] else "tab:blue"
            ax.plot([0, 1], [f[k], r[k]], "-o", color=colour, alpha=0.6, ms=3, lw=0.8)
            if len(f) <= 20 and "label" in table:  # named at the end with the larger effect
                left = f[k] >= r[k]
                ax.annotate(str(table["label"].iloc[k]), (0 if left else 1, f[k] if left else r[k]),
                            xytext=(-4 if left else 4, 0), textcoords="offset points",
                            ha="right" if left else "left", va="center", fontsize=6)
        ax.set_xticks([0, 1], [fcol.replace("_", " "), rcol.replace("_", " ")])
        ax.set_xlim(-1.0, 2.0)
        ax.set_ylabel("|effect| (linear-predictor units per unit of the source)")
        ax.set_title(f"{title}\nWilcoxon signed-rank p = {test['p_value']:.2g}, n = {test['n']}"
                     f"\n{test['direction']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_graph(model, path) -> None:
    """Heatmap of A (rows: source nodes, columns: target nodes), the RNA/protein blocks
    separated by lines, thresholded-away entries hatched out by a dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    A = model.A.detach().numpy()
    names = model.node_names()
    fig = Figure(figsize=(1.2 + 0.32 * len(names), 1 + 0.3 * len(names)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bound = max(float(np.abs(A).max()), 1e-6)
    image = ax.imshow(A, cmap="RdBu_r", vmin=-bound, vmax=bound)
    small = (np.abs(A) < model.edge_threshold) & (model.A_mask.numpy() > 0)
    yy, xx = np.nonzero(small)
    ax.scatter(xx, yy, s=2, c="grey")
    for at in (model.K_R - 0.5,):
        ax.axhline(at, color="k", lw=0.8)
        ax.axvline(at, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("target node")
    ax.set_ylabel("source node")
    ax.set_title(f"latent graph A (dots: |A| < {model.edge_threshold:g})", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.7, label="edge weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ---------------------------------------------------------------------------------- runner
@dataclass
class CausalResult:
    """Tables of :func:`causal_analysis`: ``graph``, ``nodes``, ``pairs`` (matched-pair effects),
    ``prior`` (prior-edge effects or None), ``tests`` (one row per paired test) and the files
    written."""

    graph: pd.DataFrame
    nodes: pd.DataFrame
    pairs: pd.DataFrame
    prior: pd.DataFrame | None
    tests: pd.DataFrame
    files: list = field(default_factory=list)


def causal_analysis(run_dir, *, pairs=None, prior=None, prior_unknown: str = "error", out=None,
                    alpha: float = 0.05) -> CausalResult:
    """The causal read-out of a CMC-VAE run directory (``pyro-livi fit --model cmcvae``).

    pairs : a pairs table (path or DataFrame, columns gene, protein); default
        :data:`PBMC10K_PAIRS`, which must then all be features of the run.
    prior : a prior edge table (path or DataFrame); default: the prior edges the model was
        trained with (none: no prior test). prior_unknown : see :func:`read_edge_table`.
    out : folder receiving graph.tsv, nodes.tsv, asymmetry_pairs.tsv, asymmetry_prior.tsv (with
        prior edges), asymmetry_tests.tsv, asymmetry.png and graph.png (None: nothing written).
    alpha : level at which a direction is called.

    Raises InputError for a run that is not a CMC-VAE or tables that do not fit its features.
    """
    from ..persistence import load_model

    model, meta = load_model(run_dir)
    if type(model).registry_name != "cmcvae":
        raise InputError(run_dir, "model", f"the run holds a '{meta['model']}' model, not a CMC-VAE",
                         "fit one with `pyro-livi fit --model cmcvae`")
    model.eval()
    feature_names = meta["feature_names"]
    modalities = model.modalities
    if pairs is None:
        table = default_pairs()
        table.attrs["source"] = "default pairs (pbmc10k_cite)"
    else:
        table = read_pairs(pairs)
    pairs_resolved = resolve_pairs(table, feature_names, modalities)
    pair_table = pair_effects(model, pairs_resolved)
    pair_table["label"] = pair_table["gene"] + "/" + pair_table["protein"]
    pair_test = paired_asymmetry(pair_table["rna_to_prot"], pair_table["prot_to_rna"], alpha=alpha,
                                 names=("rna_to_prot", "prot_to_rna"))
    tests = [{"test": "matched pairs: RNA -> protein vs protein -> RNA", **_generic(pair_test)}]
    panels = [("matched gene / protein pairs", pair_table, "rna_to_prot", "prot_to_rna", pair_test)]
    prior_table = None
    if prior is not None:
        edges = read_edge_table(prior, feature_names, modalities=modalities, unknown=prior_unknown)
    elif model.config["prior_edges"]:
        names = [str(n) for m in modalities for n in feature_names[m]]
        mods = [m for m in modalities for _ in feature_names[m]]
        edges = pd.DataFrame([{"source": names[i], "target": names[j], "sign": s, "source_modality": mods[i],
                               "target_modality": mods[j], "source_index": i, "target_index": j}
                              for i, j, s in model.config["prior_edges"]])
    else:
        edges = None
    if edges is not None:
        prior_table = edge_effects(model, edges)
        prior_table["label"] = prior_table["source"] + ">" + prior_table["target"]
        prior_test = paired_asymmetry(prior_table["forward"], prior_table["reverse"], alpha=alpha,
                                      names=("forward", "reverse"))
        tests.append({"test": "prior edges: source -> target vs target -> source", **_generic(prior_test)})
        panels.append(("prior edges (e.g. TF -> target)", prior_table, "forward", "reverse", prior_test))
    result = CausalResult(graph=graph_table(model), nodes=node_table(model, feature_names), pairs=pair_table,
                          prior=prior_table, tests=pd.DataFrame(tests))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result.graph.to_csv(out / "graph.tsv", sep="\t", index=False)
        result.nodes.to_csv(out / "nodes.tsv", sep="\t")
        pair_table.drop(columns="label").to_csv(out / "asymmetry_pairs.tsv", sep="\t", index=False)
        files = ["graph.tsv", "nodes.tsv", "asymmetry_pairs.tsv"]
        if prior_table is not None:
            prior_table.drop(columns="label").to_csv(out / "asymmetry_prior.tsv", sep="\t", index=False)
            files.append("asymmetry_prior.tsv")
        result.tests.to_csv(out / "asymmetry_tests.tsv", sep="\t", index=False)
        plot_asymmetry(panels, out / "asymmetry.png")
        plot_graph(model, out / "graph.png")
        result.files = [str(out / f) for f in files + ["asymmetry_tests.tsv", "asymmetry.png", "graph.png"]]
    return result


def _generic(test: dict) -> dict:
    """A test result with direction-neutral column names (forward = first direction)."""
    keys = list(test)
    return {"n": test["n"], "statistic": test["statistic"], "p_value": test["p_value"],
            "median_abs_forward": test[keys[3]], "median_abs_reverse": test[keys[4]],
            "median_difference": test["median_difference"], "fraction_forward_larger": test[keys[6]],
            "direction": test["direction"]}
