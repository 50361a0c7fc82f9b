"""Preprocessing of single-cell count data: thin, recorded wrappers over scanpy and muon.

The steps follow seed 002 section 3 (subsample; keep ``layers["counts"]``; normalise each cell to
a total of 1e4 and take log(1 + x); 2,000 highly variable genes with the site as batch; CLR of
the protein counts with ``muon.prot.pp.clr``; assemble a MuData) and seed 004 section 3.2 (keep
the peaks open in at least 3% of cells; normalise RNA to the median total count then log1p,
recipe ``lognorm_median``; align the modalities on shared barcodes, keeping only the cells
present in all: :func:`assemble` for one file per modality, :func:`pair_cells` for a MuData;
drop cells with too few detected features from every modality, :func:`filter_cells`). ATAC
peaks can also be TF-IDF-transformed or binarised (``muon.atac.pp``), as in the binary/TF-IDF
pipelines seed 004 section 2 reviews.

Rules every public function keeps
---------------------------------
* It returns a **new** object; the input AnnData/MuData is left unchanged.
* The raw counts stay in a layer (``"counts"`` by default) so that a count model can still read
  them (``DatasetSpec(modalities={"rna": "counts"})``); the transformed values go to ``.X``.
* Every step is recorded with its parameters in ``.uns["pyro_livi_preprocessing"]``. For a MuData
  the modality's ``.uns`` holds the steps that changed that modality (including whole-object
  steps such as subsampling and assembly), and the MuData's ``.uns`` holds every step of every
  modality in the order they ran. :func:`preprocessing_steps` returns the record as a list of
  ``{"step", "modality", "params"}``; on disk it is a mapping ``"0000" -> step`` because h5ad
  and h5mu files cannot store a list of mappings. Parameters left at ``None`` are not recorded.
* Bad input (a missing layer, values that are not counts where counts are required, an unknown
  modality or recipe) raises :class:`~pyro_livi.errors.InputError` naming the file, the field and
  the fix. Inside :func:`argument_names` (used by ``pyro-livi preprocess``) the fix names the
  command-line flag instead of the Python argument.

Matrices are cells x features throughout (``n_obs x n_vars``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyro_livi.errors import InputError

try:  # MuData is a declared dependency; imported lazily by anndata-only users.
    import mudata as md
except ImportError:  # pragma: no cover
    md = None

#: ``.uns`` key of the step record.
RECORD_KEY = "pyro_livi_preprocessing"
#: Default layer that keeps the raw counts.
COUNTS_LAYER = "counts"
#: Where the source of in-memory objects is reported in errors.
IN_MEMORY = "<in memory>"

#: Recipe name -> what it does (steps in order). Any recipe can be given to any modality.
RECIPES = {
    "counts": "keep_counts only (.X and layers['counts'] both hold the raw counts)",
    "lognorm": "keep_counts, normalize_total, log1p",
    "lognorm_hvg": "keep_counts, normalize_total, log1p, highly_variable_genes",
    "lognorm_median": "keep_counts, normalize_total to the median total count of the cells, log1p "
                      "(seed 004 section 3.2.1)",
    "clr": "keep_counts, clr (per cell by default)",
    "tfidf": "keep_counts, filter_peaks, tfidf",
    "binary": "keep_counts, filter_peaks, binarize",
    "log1p": "keep_counts, filter_peaks, log1p (seed 004 section 3.2.2)",
}

_ARGUMENT_NAMES: ContextVar[Mapping[str, str]] = ContextVar("pyro_livi_preprocessing_arguments",
                                                             default={})


@contextmanager
def argument_names(names: Mapping[str, str]):
    """Within the block, error fixes call the Python argument ``key`` by ``names[key]``.

    ``pyro-livi preprocess`` passes e.g. ``{"counts_layer": "--counts-layer"}`` so that its
    error messages name the command-line flags.
    """
    token = _ARGUMENT_NAMES.set(dict(names))
    try:
        yield
    finally:
        _ARGUMENT_NAMES.reset(token)


def _arg(name: str) -> str:
    """How the user names the argument ``name``: the CLI flag inside :func:`argument_names`."""
    return _ARGUMENT_NAMES.get().get(name, name)


# --------------------------------------------------------------------------------------
# The step record
# --------------------------------------------------------------------------------------


def _plain(value):
    """``value`` as data an h5ad/h5mu ``.uns`` can store (None entries dropped)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _record(uns, step: str, modality: str, params: Mapping) -> None:
    """Append ``{step, modality, params}`` to ``uns[RECORD_KEY]``."""
    rec = dict(uns.get(RECORD_KEY, {}))
    rec[f"{len(rec):04d}"] = {"step": step, "modality": modality, "params": _plain(params)}
    uns[RECORD_KEY] = rec


def preprocessing_steps(data) -> list[dict]:
    """The recorded steps of an AnnData or MuData, in order: a list of ``{step, modality, params}``.

    For a MuData this is the whole record (every modality); for one of its modalities
    (``mdata.mod[name]``) the steps that changed that modality. Empty when nothing was recorded.
    """
    rec = data.uns.get(RECORD_KEY, {})
    return [dict(rec[k]) for k in sorted(rec, key=int)]


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def _is_mudata(obj) -> bool:
    return md is not None and isinstance(obj, md.MuData)


def _field(modality: str, attr: str) -> str:
    return f"mod['{modality}'].{attr}" if modality else attr


def _layer_attr(layer: str | None) -> str:
    return "X" if layer is None else f"layers['{layer}']"


def _counts(adata: ad.AnnData, layer: str | None, modality: str, source: str):
    """The raw counts of ``adata`` (``layers[layer]``, or ``.X`` when ``layer`` is None), checked.

    Raises InputError when the layer is missing or holds values that are not non-negative
    finite integers.
    """
    field = _field(modality, _layer_attr(layer))
    if layer is not None and layer not in adata.layers:
        raise InputError(source, field, f"no such layer; the layers are {list(adata.layers)}",
                         f"run keep_counts first (every recipe does), or set {_arg('counts_layer')} "
                         "to the layer that holds the raw counts")
    matrix = adata.X if layer is None else adata.layers[layer]
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    fix = (f"give raw integer counts (not normalised or log-transformed values): keep them in "
           f".X, or name the layer that holds them with {_arg('counts_layer')}")
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(source, field, f"values of dtype {values.dtype} are not numbers", fix)
    if values.size and np.issubdtype(values.dtype, np.inexact):
        bad = {"non-finite": int((~np.isfinite(values)).sum())}
        if not bad["non-finite"]:
            bad["non-integer"] = int((values != np.round(values)).sum())
            bad["negative"] = int((values < 0).sum())
    else:
        bad = {"negative": int((values < 0).sum()) if values.size else 0}
    for kind, n in bad.items():
        if n:
            raise InputError(source, field, f"{n:,} {kind} value(s) where raw counts are "
                             "required", fix)
    return matrix


def _dense(matrix):
    """A dense ndarray of a dense or sparse matrix."""
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def _as_float(matrix):
    """A float32 copy of a dense or sparse (CSR) matrix."""
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    return np.array(matrix, dtype=np.float32)


def _check_recipes(data, recipes: Mapping[str, str], source: str) -> None:
    """Every modality named exists in ``data`` and every recipe is known."""
    if _is_mudata(data):
        names = list(data.mod)
    elif len(recipes) > 1:
        raise InputError(source, "<modalities>", f"recipes for {list(recipes)} but the file is one "
                         "AnnData (a single modality)",
                         f"give one recipe (e.g. {_arg('rna')}), or a MuData (.h5mu) file")
    else:
        names = list(recipes)
    for name, recipe in recipes.items():
        if name not in names:
            raise InputError(source, f"mod['{name}']", f"no modality '{name}'; the modalities "
                             f"are {names}", f"drop {_arg(name)}, or give a recipe for one of "
                             f"{names} (with {_arg('recipes')} NAME=RECIPE)")
        if recipe not in RECIPES:
            raise InputError(source, f"mod['{name}']", f"unknown recipe '{recipe}'",
                             f"give {_arg(name)} one of {sorted(RECIPES)}")


# --------------------------------------------------------------------------------------
# Steps on one modality (in place; the public functions below run them on a copy)
# --------------------------------------------------------------------------------------


def _muon_pp(kind: str):
    """``muon.prot.pp`` or ``muon.atac.pp`` (muon's import-time version warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from muon import atac, prot
    return {"prot": prot, "atac": atac}[kind].pp


def _keep_counts(adata, *, layer, modality, source):
    if layer in adata.layers:
        _counts(adata, layer, modality, source)
        return {"layer": layer, "from": _layer_attr(layer)}
    counts = _counts(adata, None, modality, source)
    adata.layers[layer] = counts.copy()
    return {"layer": layer, "from": "X"}


def _normalize_total(adata, *, target_sum, layer, modality, source):
    import scanpy as sc

    adata.X = _as_float(_counts(adata, layer, modality, source))
    sc.pp.normalize_total(adata, target_sum=target_sum)
    return {"target_sum": "median" if target_sum is None else float(target_sum),
            "from": _layer_attr(layer)}


def _log1p(adata, **_):
    import scanpy as sc

    adata.X = _as_float(adata.X)
    sc.pp.log1p(adata)
    return {}


def _batch_values(adata, batch_key, modality, source, mdata=None):
    """The batch label of each cell of ``adata``: its own ``.obs`` column, else the MuData's."""
    if batch_key in adata.obs.columns:
        col = adata.obs[batch_key]
    elif mdata is not None and batch_key in mdata.obs.columns:
        col = mdata.obs[batch_key].reindex(adata.obs_names)
    else:
        where = list(adata.obs.columns) + ([] if mdata is None else list(mdata.obs.columns))
        raise InputError(source, _field(modality, f"obs['{batch_key}']"),
                         f"no such .obs column; the columns are {where}",
                         f"set {_arg('batch_key')} to one of these columns, or leave it out")
    if col.isna().any():
        raise InputError(source, _field(modality, f"obs['{batch_key}']"),
                         f"{int(col.isna().sum()):,} cell(s) have no batch label",
                         f"fill in the missing labels, or leave {_arg('batch_key')} out")
    return col.astype(str).to_numpy()


def _highly_variable_genes(adata, *, n_top_genes, batch_key, flavor, layer, subset, modality,
                           source, mdata=None):
    import scanpy as sc

    if n_top_genes < 1 or n_top_genes > adata.n_vars:
        raise InputError(source, _field(modality, "var"), f"n_top_genes={n_top_genes} but the "
                         f"modality has {adata.n_vars} features",
                         f"set {_arg('n_top_genes')} between 1 and {adata.n_vars}")
    counts_based = flavor == "seurat_v3"
    if counts_based:
        _counts(adata, layer, modality, source)
    tmp = None
    if batch_key is not None:
        tmp = "__pyro_livi_batch__"
        adata.obs[tmp] = _batch_values(adata, batch_key, modality, source, mdata)
    try:
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor=flavor,
                                    batch_key=tmp, layer=layer if counts_based else None,
                                    subset=subset)
    finally:
        if tmp is not None:
            del adata.obs[tmp]
    return {"n_top_genes": n_top_genes, "flavor": flavor, "batch_key": batch_key,
            "from": _layer_attr(layer if counts_based else None), "subset": subset,
            "n_selected": int(adata.var["highly_variable"].sum())}


def _clr(adata, *, axis, layer, modality, source):
    if axis not in (0, 1):
        raise InputError(source, _field(modality, "X"), f"axis={axis} is not 0 or 1",
                         f"set {_arg('clr_axis')} to 1 (per cell) or 0 (per feature)")
    adata.X = _as_float(_dense(_counts(adata, layer, modality, source)))
    _muon_pp("prot").clr(adata, axis=axis)
    return {"axis": axis, "per": "cell" if axis == 1 else "feature", "flavor": "seurat",
            "from": _layer_attr(layer)}


def _filter_peaks(adata, *, min_fraction, layer, modality, source):
    if not 0 <= min_fraction <= 1:
        raise InputError(source, _field(modality, "var"), f"min_fraction={min_fraction} is not "
                         "a fraction", f"set {_arg('min_peak_fraction')} between 0 and 1")
    counts = _counts(adata, layer, modality, source)
    open_cells = np.asarray((counts > 0).sum(axis=0)).ravel()
    min_cells = math.ceil(min_fraction * adata.n_obs)
    keep = open_cells >= min_cells
    if not keep.any():
        raise InputError(source, _field(modality, "var"), f"no peak is open in >= {min_fraction} "
                         f"of the {adata.n_obs} cells", f"lower {_arg('min_peak_fraction')}")
    adata._inplace_subset_var(keep)
    return {"min_fraction": float(min_fraction), "min_cells": min_cells,
            "n_kept": int(keep.sum()), "n_dropped": int((~keep).sum()), "from": _layer_attr(layer)}


def _tfidf(adata, *, scale_factor, log_tf, log_idf, layer, modality, source):
    adata.X = _as_float(_counts(adata, layer, modality, source))
    with np.errstate(divide="ignore", invalid="ignore"):  # empty cells or peaks -> 0
        _muon_pp("atac").tfidf(adata, log_tf=log_tf, log_idf=log_idf, scale_factor=scale_factor)
    if sp.issparse(adata.X):
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return {"scale_factor": float(scale_factor), "log_tf": log_tf, "log_idf": log_idf,
            "from": _layer_attr(layer)}


def _binarize(adata, *, layer, modality, source):
    adata.X = _as_float(_counts(adata, layer, modality, source))
    _muon_pp("atac").binarize(adata)
    return {"from": _layer_attr(layer)}


def _on_copy(step: str, fn, adata: ad.AnnData, modality: str, **kwargs) -> ad.AnnData:
    """Run the in-place step ``fn`` on a copy of ``adata`` and record it there."""
    out = adata.copy()
    params = fn(out, modality=modality, **kwargs)
    _record(out.uns, step, modality, params)
    return out


# --------------------------------------------------------------------------------------
# Public steps
# --------------------------------------------------------------------------------------


def keep_counts(adata: ad.AnnData, layer: str = COUNTS_LAYER, *, modality: str = "",
                source: str = IN_MEMORY) -> ad.AnnData:
    """A copy of ``adata`` whose ``layers[layer]`` holds the raw counts (seed 002 section 3, step 3).

    When ``layers[layer]`` already exists it is checked and kept; otherwise ``.X`` is checked and
    copied into it. Run before any transform: every other step reads the counts from this layer.

    Raises InputError when the counts (``n_obs x n_vars``) are not non-negative finite integers.
    ``modality`` labels the record (and the error's field); ``source`` names the file in errors.
    """
    return _on_copy("keep_counts", _keep_counts, adata, modality, layer=layer, source=source)


def normalize_total(adata: ad.AnnData, target_sum: float | None = 1e4, *,
                    layer: str | None = COUNTS_LAYER, modality: str = "",
                    source: str = IN_MEMORY) -> ad.AnnData:
    """Library-size normalisation (``scanpy.pp.normalize_total``; seed 002 section 3, step 4).

    ``X_ij = target_sum * c_ij / sum_j' c_ij'`` from the counts ``c`` in ``layers[layer]`` (``.X``
    when ``layer`` is None): every cell then sums to ``target_sum`` (1e4, "counts per 10k");
    ``target_sum=None`` uses the median of the cells' totals (seed 004 section 3.2.1). ``.X``
    becomes float32, ``n_obs x n_vars``. Raises InputError for a missing layer or non-counts.
    """
    return _on_copy("normalize_total", _normalize_total, adata, modality, target_sum=target_sum,
                    layer=layer, source=source)


def log1p(adata: ad.AnnData, *, modality: str = "", source: str = IN_MEMORY) -> ad.AnnData:
    """``X <- log(1 + X)`` (natural log; ``scanpy.pp.log1p``; seed 002 section 3, step 4)."""
    return _on_copy("log1p", _log1p, adata, modality, source=source)


def highly_variable_genes(adata: ad.AnnData, n_top_genes: int = 2000, *,
                          batch_key: str | None = None, flavor: str = "seurat_v3",
                          layer: str | None = COUNTS_LAYER, subset: bool = True,
                          modality: str = "", source: str = IN_MEMORY) -> ad.AnnData:
    """The ``n_top_genes`` most variable genes (``scanpy.pp.highly_variable_genes``; seed 002
    section 3, step 5: 2,000 HVGs with the site as batch).

    ``flavor="seurat_v3"`` ranks genes by the variance of the standardised raw counts (from
    ``layers[layer]``) after a loess fit of variance on mean; with ``batch_key`` genes are ranked
    per batch and combined by the number of batches selecting them (then the median rank). Other
    flavors ("seurat", "cell_ranger") read log-normalised values from ``.X``. ``subset=True``
    keeps only the selected genes (``n_obs x n_top_genes``, every layer subset alike); otherwise
    ``var["highly_variable"]`` marks them. Raises InputError for a missing batch column or
    counts layer, non-counts, or ``n_top_genes`` outside ``1..n_vars``.
    """
    return _on_copy("highly_variable_genes", _highly_variable_genes, adata, modality,
                    n_top_genes=n_top_genes, batch_key=batch_key, flavor=flavor, layer=layer,
                    subset=subset, source=source)


def clr(adata: ad.AnnData, axis: int = 1, *, layer: str | None = COUNTS_LAYER,
        modality: str = "", source: str = IN_MEMORY) -> ad.AnnData:
    """Centred log-ratio of protein (ADT) counts (``muon.prot.pp.clr``; seed 002 section 3,
    step 6; Stoeckius et al. 2017, doi:10.1038/nmeth.4380).

    With the counts ``c`` from ``layers[layer]`` and ``axis=1`` (per cell, the default: the
    statistic runs over the P proteins of each cell)::

        X_ij = log(1 + c_ij / g_i),   g_i = exp( (1/P) * sum_j log(1 + c_ij) )

    i.e. each count divided by the cell's geometric mean of (1 + counts), then log(1 + .) (muon's
    "seurat" flavor: non-negative and zero-preserving). ``axis=0`` runs the same formula per
    protein over the N cells. ``.X`` becomes a dense float32 array, ``n_obs x n_vars`` (protein
    panels are small). Raises InputError for a missing layer or non-counts.
    """
    return _on_copy("clr", _clr, adata, modality, axis=axis, layer=layer, source=source)


def filter_peaks(adata: ad.AnnData, min_fraction: float = 0.03, *,
                 layer: str | None = COUNTS_LAYER, modality: str = "",
                 source: str = IN_MEMORY) -> ad.AnnData:
    """Keep the peaks with a non-zero count in at least ``ceil(min_fraction * n_obs)`` cells
    (seed 004 section 3.2.2: 3%). Returns ``n_obs x n_kept``; every layer is subset alike.

    Raises InputError when ``min_fraction`` is outside [0, 1] or no peak passes.
    """
    return _on_copy("filter_peaks", _filter_peaks, adata, modality, min_fraction=min_fraction,
                    layer=layer, source=source)


def tfidf(adata: ad.AnnData, scale_factor: float = 1e4, *, log_tf: bool = True,
          log_idf: bool = True, layer: str | None = COUNTS_LAYER, modality: str = "",
          source: str = IN_MEMORY) -> ad.AnnData:
    """TF-IDF of peak counts (``muon.atac.pp.tfidf``; seed 004 section 2, TF-IDF + LSI pipelines).

    With the counts ``c`` (N cells x P peaks) from ``layers[layer]``::

        TF_ij  = scale_factor * c_ij / sum_j' c_ij'      (per cell)
        IDF_j  = N / sum_i c_ij                          (per peak)
        X_ij   = log(1 + TF_ij) * log(1 + IDF_j)

    (``log_tf=False`` / ``log_idf=False`` drop the corresponding log(1 + .)). Cells or peaks with
    no counts get 0. ``.X`` becomes float32, ``n_obs x n_vars``. Raises InputError for a missing
    layer or non-counts.
    """
    return _on_copy("tfidf", _tfidf, adata, modality, scale_factor=scale_factor, log_tf=log_tf,
                    log_idf=log_idf, layer=layer, source=source)


def binarize(adata: ad.AnnData, *, layer: str | None = COUNTS_LAYER, modality: str = "",
             source: str = IN_MEMORY) -> ad.AnnData:
    """``X_ij = 1 if c_ij > 0 else 0`` from the counts in ``layers[layer]`` (``muon.atac.pp.binarize``;
    binary peak accessibility, seed 004 section 2). ``.X`` becomes float32."""
    return _on_copy("binarize", _binarize, adata, modality, layer=layer, source=source)


# --------------------------------------------------------------------------------------
# Whole objects: subsample, assemble, recipes
# --------------------------------------------------------------------------------------


def _subsample_positions(n_obs: int, n, fraction, seed: int, source: str) -> np.ndarray:
    if (n is None) == (fraction is None):
        raise InputError(source, "obs", "give exactly one of n and fraction",
                         f"pass {_arg('n')} (a number of cells) or {_arg('fraction')}")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise InputError(source, "obs", f"fraction={fraction} is not in (0, 1]",
                             f"set {_arg('fraction')} between 0 (excluded) and 1")
        n = max(1, round(fraction * n_obs))
    if not 1 <= n <= n_obs:
        raise InputError(source, "obs", f"cannot draw {n} of {n_obs} cells",
                         f"set {_arg('n')} between 1 and {n_obs}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_obs, size=n, replace=False))


def _record_everywhere(data, step: str, params: Mapping, modalities=None) -> None:
    """Record a whole-object step in ``data.uns`` and in each modality's ``.uns`` (MuData)."""
    if _is_mudata(data):
        for name in modalities or data.mod:
            _record(data.mod[name].uns, step, "*", params)
    _record(data.uns, step, "*", params)


def subsample(data, n: int | None = None, *, fraction: float | None = None, seed: int = 0,
              source: str = IN_MEMORY):
    """A random subset of the cells without replacement, seeded (seed 002 section 3, step 1).

    Give ``n`` cells or a ``fraction`` of them (rounded, at least 1); the kept cells stay in their
    original order. Works on an AnnData or a MuData (cells of ``mdata.obs``; each modality keeps
    those of its cells that were drawn). Raises InputError for a bad ``n`` / ``fraction``.
    """
    pos = _subsample_positions(data.n_obs, n, fraction, seed, source)
    out = data[data.obs_names[pos]].copy()
    if _is_mudata(out):
        out.update()
    _record_everywhere(out, "subsample", {"n": int(len(pos)), "fraction": fraction,
                                          "seed": seed, "n_before": int(data.n_obs)})
    return out


def read_data(path, *, flag: str = "data"):
    """An ``.h5ad`` (AnnData) or ``.h5mu`` (MuData) file, read into memory."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "<file>", "file not found", f"give an existing file with {_arg(flag)}")
    if path.suffix == ".h5ad":
        return ad.read_h5ad(path)
    if path.suffix == ".h5mu":
        return md.read_h5mu(path)
    raise InputError(path, "<file>", f"unknown file type '{path.suffix}'",
                     f"give an .h5ad or .h5mu file with {_arg(flag)}")


def assemble(files: Mapping[str, str | Path], join: str = "inner"):
    """A MuData from one AnnData file (``.h5ad``) per modality, cells aligned by barcode
    (seed 002 section 3, step 7; seed 004 section 3.2.3).

    ``files`` maps modality name -> path. ``join="inner"`` keeps the cells present in every
    modality, in the order of the first; ``join="outer"`` keeps every cell (modalities may then
    lack some cells). The number of cells dropped from each modality is recorded in the
    ``assemble`` step (``params["dropped_cells"]``). Raises InputError for a missing or
    non-h5ad file, duplicate barcodes within a modality, or no shared cell.
    """
    if join not in ("inner", "outer"):
        raise InputError("<arguments>", "join", f"unknown join '{join}'",
                         f"set {_arg('join')} to inner or outer")
    if not files:
        raise InputError("<arguments>", "files", "no modality given",
                         f"give one NAME=PATH per modality with {_arg('files')}")
    mods = {}
    for name, path in files.items():
        adata = read_data(path, flag="files")
        if not isinstance(adata, ad.AnnData):
            raise InputError(path, "<file>", "is a MuData; assembly reads one AnnData per "
                             "modality", f"give .h5ad files with {_arg('files')}")
        if not adata.obs_names.is_unique:
            dup = adata.obs_names[adata.obs_names.duplicated()].unique().tolist()[:5]
            raise InputError(path, "obs_names", f"duplicate cell barcodes, e.g. {dup}",
                             "make the barcodes unique (adata.obs_names_make_unique())")
        mods[name] = adata
    first = next(iter(mods.values())).obs_names
    if join == "inner":
        keep = first
        for adata in mods.values():
            keep = keep[keep.isin(adata.obs_names)]
        if not len(keep):
            raise InputError(files[next(iter(files))], "obs_names", "no cell barcode is shared "
                             f"by all of {list(files)}", "check that the files hold the same cells "
                             "with barcodes written alike (e.g. the same '-1' suffix)")
        dropped = {name: int(adata.n_obs - len(keep)) for name, adata in mods.items()}
        mods = {name: adata[keep].copy() for name, adata in mods.items()}
    else:
        dropped = {name: 0 for name in mods}
    mdata = md.MuData(mods)
    _record_everywhere(mdata, "assemble", {"files": {k: str(v) for k, v in files.items()},
                                           "join": join, "n_cells": int(mdata.n_obs),
                                           "dropped_cells": dropped})
    return mdata


def pair_cells(mdata, modalities=None, *, require_all: bool = False, source: str = IN_MEMORY):
    """Paired-cell alignment by barcode (seed 004 section 3.2.3): a new MuData holding only the
    cells measured in every modality of ``modalities`` (default: all), each modality's rows in
    the order of the first modality, so that row i of every modality is the same cell.

    The ``pair_cells`` step records ``n_cells`` (kept), ``unmatched`` ({modality: number of its
    cells missing from another modality}) and ``unmatched_examples`` ({modality: up to 5 such
    barcodes}). Modalities not in ``modalities`` are dropped. Raises InputError when
    ``mdata`` is not a MuData, a modality is unknown or has duplicate barcodes, no barcode is
    shared, or (``require_all=True``) any barcode is unmatched, naming the modality, the
    number and examples of the unmatched barcodes, and the fix.
    """
    if not _is_mudata(mdata):
        raise InputError(source, "<file>", "paired-cell alignment needs a MuData with two or more modalities",
                         f"give an .h5mu file, or assemble one from one .h5ad per modality with {_arg('files')}")
    names = list(mdata.mod) if modalities is None else list(modalities)
    for name in names:
        if name not in mdata.mod:
            raise InputError(source, f"mod['{name}']", f"no modality '{name}'; the modalities are {list(mdata.mod)}",
                             "name existing modalities")
        if not mdata.mod[name].obs_names.is_unique:
            dup = mdata.mod[name].obs_names[mdata.mod[name].obs_names.duplicated()].unique().tolist()[:5]
            raise InputError(source, f"mod['{name}'].obs_names", f"duplicate cell barcodes, e.g. {dup}",
                             "make the barcodes unique (adata.obs_names_make_unique())")
    keep = mdata.mod[names[0]].obs_names
    for name in names[1:]:
        keep = keep[keep.isin(mdata.mod[name].obs_names)]
    unmatched = {name: int((~mdata.mod[name].obs_names.isin(keep)).sum()) for name in names}
    examples = {name: mdata.mod[name].obs_names[~mdata.mod[name].obs_names.isin(keep)][:5].tolist()
                for name in names}
    if not len(keep):
        first = {name: mdata.mod[name].obs_names[:3].tolist() for name in names}
        raise InputError(source, "obs_names", f"no cell barcode is shared by all of {names} (first barcodes: "
                         f"{first})", "check that the modalities hold the same cells with barcodes written "
                         "alike (e.g. the same '-1' suffix)")
    if require_all and any(unmatched.values()):
        detail = "; ".join(f"'{n}': {k} (e.g. {examples[n]})" for n, k in unmatched.items() if k)
        raise InputError(source, "obs_names", f"cells measured in only some modalities: {detail}",
                         f"keep only the paired cells ({_arg('pair')} instead of {_arg('require_paired')}), "
                         "or fix the barcodes")
    mods = {name: mdata.mod[name][keep].copy() for name in names}
    with md.set_options(pull_on_update=False):
        out = md.MuData(mods)
    obs = mdata.obs.reindex(keep)
    for col in obs.columns:
        if col not in out.obs.columns:
            out.obs[col] = obs[col].to_numpy()
    out.uns.update(dict(mdata.uns))
    _record_everywhere(out, "pair_cells", {"modalities": names, "n_cells": int(len(keep)),
                                           "n_before": {n: int(mdata.mod[n].n_obs) for n in names},
                                           "unmatched": unmatched, "unmatched_examples": examples})
    return out


def filter_cells(data, min_features: Mapping[str, int], *, source: str = IN_MEMORY):
    """Drop the cells with fewer than ``min_features[m]`` non-zero features in modality ``m``
    (seed 004 section 3.2.1: at least 100 detected genes), from every modality alike so that
    paired cells stay paired. For an AnnData give one entry (any key). Reads ``.X`` (raw
    counts: run it before the recipes). Records ``filter_cells`` with the thresholds and the
    number of cells dropped for each modality. Raises InputError for an unknown modality, a
    negative threshold, or when no cell is left."""
    mu = _is_mudata(data)
    if not mu and len(min_features) > 1:
        raise InputError(source, "<modalities>", f"thresholds for {list(min_features)} but the file is one AnnData",
                         f"give one {_arg('min_features')} entry")
    keep = pd.Series(True, index=data.obs_names)
    dropped = {}
    for name, k in min_features.items():
        if mu and name not in data.mod:
            raise InputError(source, f"mod['{name}']", f"no modality '{name}'; the modalities are {list(data.mod)}",
                             f"give {_arg('min_features')} NAME=N for existing modalities")
        if int(k) < 0:
            raise InputError(source, f"mod['{name}']", f"minimum of {k} features is negative",
                             f"give {_arg('min_features')} NAME=N with N >= 0")
        adata = data.mod[name] if mu else data
        detected = np.asarray((adata.X != 0).sum(axis=1)).ravel()
        low = adata.obs_names[detected < int(k)]
        dropped[name] = int(len(low))
        keep[keep.index.isin(low)] = False
    cells = keep.index[keep.to_numpy()]
    if not len(cells):
        raise InputError(source, "obs", f"no cell has at least {dict(min_features)} detected features",
                         f"lower {_arg('min_features')}")
    if mu:
        mods = {name: adata[adata.obs_names.isin(cells)].copy() for name, adata in data.mod.items()}
        with md.set_options(pull_on_update=False):
            out = md.MuData(mods)
        obs = data.obs.reindex(out.obs_names)
        for col in obs.columns:
            if col not in out.obs.columns:
                out.obs[col] = obs[col].to_numpy()
        out.uns.update(dict(data.uns))
    else:
        out = data[data.obs_names.isin(cells)].copy()
    _record_everywhere(out, "filter_cells", {"min_features": {k: int(v) for k, v in min_features.items()},
                                             "dropped_cells": dropped, "n_before": int(data.n_obs),
                                             "n_cells": int(out.n_obs)})
    return out


def _recipe_steps(recipe: str, *, counts_layer, target_sum, n_top_genes, batch_key, hvg_flavor,
                  subset_hvg, clr_axis, min_peak_fraction, tfidf_scale_factor):
    """(step name, in-place function, keyword arguments) of each step of a recipe."""
    keep = ("keep_counts", _keep_counts, {"layer": counts_layer})
    norm = ("normalize_total", _normalize_total, {"target_sum": target_sum, "layer": counts_layer})
    log = ("log1p", _log1p, {})
    peaks = ("filter_peaks", _filter_peaks, {"min_fraction": min_peak_fraction,
                                             "layer": counts_layer})
    hvg = ("highly_variable_genes", _highly_variable_genes,
           {"n_top_genes": n_top_genes, "batch_key": batch_key, "flavor": hvg_flavor,
            "layer": counts_layer, "subset": subset_hvg})
    return {
        "counts": [keep],
        "lognorm": [keep, norm, log],
        "lognorm_hvg": [keep, norm, log, hvg],
        "lognorm_median": [keep, ("normalize_total", _normalize_total, {"target_sum": None, "layer": counts_layer}),
                           log],
        "clr": [keep, ("clr", _clr, {"axis": clr_axis, "layer": counts_layer})],
        "tfidf": [keep, peaks, ("tfidf", _tfidf, {"scale_factor": tfidf_scale_factor,
                                                  "log_tf": True, "log_idf": True,
                                                  "layer": counts_layer})],
        "binary": [keep, peaks, ("binarize", _binarize, {"layer": counts_layer})],
        "log1p": [keep, peaks, log],
    }[recipe]


def preprocess(data, recipes: Mapping[str, str] | None = None, *,
               counts_layer: str = COUNTS_LAYER, target_sum: float | None = 1e4,
               n_top_genes: int = 2000, batch_key: str | None = None,
               hvg_flavor: str = "seurat_v3", subset_hvg: bool = True, clr_axis: int = 1,
               min_peak_fraction: float = 0.03, tfidf_scale_factor: float = 1e4,
               subsample_n: int | None = None, subsample_fraction: float | None = None,
               seed: int = 0, pair: bool = False, require_paired: bool = False,
               min_features: Mapping[str, int] | None = None, source: str = IN_MEMORY,
               **named_recipes: str):
    """Per-modality recipes on a new copy of an AnnData or MuData.

    Example: ``preprocess(mdata, rna="lognorm_hvg", prot="clr", atac="tfidf")``; modality names
    that are not Python identifiers go in ``recipes={"name": "recipe"}``. The recipes
    (:data:`RECIPES`) are

    * ``lognorm_median``: :func:`keep_counts`, :func:`normalize_total` to the median total
      count, :func:`log1p` (seed 004 section 3.2.1);
    * ``lognorm_hvg``: :func:`keep_counts`, :func:`normalize_total` (``target_sum``),
      :func:`log1p`, :func:`highly_variable_genes` (``n_top_genes``, ``batch_key``,
      ``hvg_flavor``, ``subset_hvg``) - seed 002 section 3; ``lognorm`` without the HVGs;
    * ``clr``: :func:`keep_counts`, :func:`clr` (``clr_axis``, 1 = per cell);
    * ``tfidf`` / ``binary`` / ``log1p``: :func:`keep_counts`, :func:`filter_peaks`
      (``min_peak_fraction``, seed 004: 0.03), then :func:`tfidf` / :func:`binarize` /
      :func:`log1p`;
    * ``counts``: :func:`keep_counts` only.

    With ``pair=True`` (or ``require_paired=True``, which also refuses unmatched barcodes) a
    MuData's modalities are first aligned on their shared barcodes (:func:`pair_cells`), so
    that peak fractions and median totals refer to the paired cells. Cells are then
    subsampled when ``subsample_n`` or ``subsample_fraction`` is given
    (:func:`subsample`, with ``seed``), and cells with too few detected features are dropped
    from every modality when ``min_features`` ({modality: minimum}) is given
    (:func:`filter_cells`). Modalities without a recipe are left as they are. For an
    AnnData give one recipe; its key labels the modality in the record. ``batch_key`` is looked
    up in the modality's ``.obs``, then in the MuData's. Returns the new object; ``data`` is not
    changed. Raises InputError for an unknown modality or recipe, or any step's bad input.
    """
    recipes = {**(recipes or {}), **named_recipes}
    _check_recipes(data, recipes, source)
    if pair or require_paired:
        data = pair_cells(data, require_all=require_paired, source=source)
    if subsample_n is not None or subsample_fraction is not None:
        out = subsample(data, subsample_n, fraction=subsample_fraction, seed=seed, source=source)
    else:
        out = data.copy()
    if min_features:
        out = filter_cells(out, min_features, source=source)
    mu = _is_mudata(out)
    options = dict(counts_layer=counts_layer, target_sum=target_sum, n_top_genes=n_top_genes,
                   batch_key=batch_key, hvg_flavor=hvg_flavor, subset_hvg=subset_hvg,
                   clr_axis=clr_axis, min_peak_fraction=min_peak_fraction,
                   tfidf_scale_factor=tfidf_scale_factor)
    for name, recipe in recipes.items():
        adata = out.mod[name] if mu else out
        for step, fn, kwargs in _recipe_steps(recipe, **options):
            if fn is _highly_variable_genes and mu:
                kwargs = {**kwargs, "mdata": out}
            params = {"recipe": recipe, **fn(adata, modality=name if mu else "",
                                            source=source, **kwargs)}
            _record(adata.uns, step, name, params)
            if mu:
                _record(out.uns, step, name, params)
    if mu:
        out.update()
    return out
