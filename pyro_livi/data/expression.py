"""Reading and validating single-cell count data into a :class:`SingleCellDataset`.

``read_dataset`` takes an ``.h5ad`` / ``.h5mu`` path or an in-memory AnnData / MuData and a
:class:`~pyro_livi.data.spec.DatasetSpec`, checks the data against the data contract
(raw integer counts, or finite values for continuous modalities; no empty cells, unique and
aligned cell ids, unique feature names, donor and categorical covariate columns present) and returns a dataset that hands out dense minibatches
(:class:`~pyro_livi.data.batch.Batch`) while the full matrices stay as stored: sparse
matrices stay sparse, backed files stay on disk. Every problem is an
:class:`~pyro_livi.errors.InputError` that names the file, the field and the fix.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pyro_livi.data.batch import Batch
from pyro_livi.data.donor_index import DonorIndex
from pyro_livi.data.spec import DatasetSpec
from pyro_livi.errors import InputError

try:  # MuData is optional at import time only; it is a declared dependency.
    import mudata as md
except ImportError:  # pragma: no cover
    md = None

#: Stored values read at a time when checking every value and computing size factors.
BACKED_CHUNK_VALUES = 4_000_000

#: Rows of a backed matrix this close (gap in rows) are read in one slice, the rows between dropped.
SPAN_GAP_ROWS = 8


def _row_spans(rows: np.ndarray, max_gap: int) -> np.ndarray:
    """Half-open row ranges ``[start, stop)`` (shape (k, 2), int64) that cover sorted unique
    ``rows``, joining two rows into one range when fewer than ``max_gap`` rows lie between them."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(rows) > max_gap + 1)
    starts = np.concatenate([rows[:1], rows[breaks + 1]])
    stops = np.concatenate([rows[breaks], rows[-1:]]) + 1
    return np.stack([starts, stops], axis=1)


def _preview(items, n: int = 10) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return f"{items[:n]}{more}"


# --------------------------------------------------------------------------------------
# Row access to one count matrix
# --------------------------------------------------------------------------------------


class _CountMatrix:
    """Row access to one stored count matrix (cells x features) without densifying it.

    ``kind`` is one of ``"dense"`` (in-memory ndarray), ``"csr"`` (in-memory scipy CSR),
    ``"backed_sparse"`` (anndata CSR dataset on disk) or ``"backed_dense"`` (h5py dataset).
    """

    def __init__(self, matrix, source: str, field: str, notes: list[str]):
        self.field = field
        if isinstance(matrix, ad.abc.CSCDataset):
            raise InputError(
                source, field,
                "the counts are a backed CSC matrix: reading one minibatch of cells would "
                "read the whole matrix from disk",
                "read the file in memory (backed=False), or rewrite it with CSR counts "
                "(adata.X = adata.X.tocsr(); adata.write_h5ad(path))")
        if isinstance(matrix, ad.abc.CSRDataset):
            self.kind = "backed_sparse"
        elif isinstance(matrix, h5py.Dataset):
            self.kind = "backed_dense"
        elif sp.issparse(matrix):
            if matrix.format != "csr":
                note = (f"{source}: {field} is stored as {matrix.format.upper()}; converted once "
                        f"to CSR for row access (an in-memory copy of {matrix.nnz:,} stored "
                        "values; store CSR to avoid it)")
                warnings.warn(note, stacklevel=3)
                notes.append(note)
                matrix = matrix.tocsr()
            self.kind = "csr"
        elif isinstance(matrix, np.ndarray):
            matrix = np.asarray(matrix)  # np.matrix -> ndarray (no copy)
            self.kind = "dense"
        else:
            raise InputError(
                source, field,
                f"unsupported matrix type {type(matrix).__module__}.{type(matrix).__name__}",
                "store the counts as a numpy array or a scipy sparse CSR matrix (e.g. "
                "adata.X = adata.X.compute() for a dask array), or save as .h5ad and read "
                "it with backed=True")
        if len(matrix.shape) != 2:
            raise InputError(source, field, f"expected a 2-D matrix, got shape {matrix.shape}",
                             "store a cells x features count matrix")
        self.matrix = matrix
        self._indptr: np.ndarray | None = None  # row pointers of a backed CSR matrix, read once
        self.shape = tuple(int(s) for s in matrix.shape)
        self.dtype = np.dtype(matrix.dtype)

    @property
    def backed(self) -> bool:
        return self.kind.startswith("backed")

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Dense float32 rows, shape (len(rows), n_features), in the order of ``rows``.

        Backed matrices are read through :meth:`read_block`: one slice per run of neighbouring
        rows (e.g. ``shuffle=False`` passes), one per row for scattered rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.shape[1]), dtype=np.float32)
        uniq, inverse = np.unique(rows, return_inverse=True)  # sorted, as h5py needs
        if self.backed:
            block = self.read_block(uniq)
        else:
            block = self.matrix[uniq]
        if sp.issparse(block):
            block = block.toarray()
        block = np.asarray(block, dtype=np.float32)
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return block
        return block[inverse.ravel()]

    def read_block(self, rows: np.ndarray):
        """Rows ``rows`` (sorted, unique) as stored: a scipy CSR matrix for sparse counts, an
        ndarray for dense ones, shape (len(rows), n_features), nothing made dense.

        A backed matrix is read in one slice per span of :func:`_row_spans` (rows closer than
        :data:`SPAN_GAP_ROWS` share a slice; the rows between them are read and dropped), so
        runs of neighbouring rows cost one HDF5 read (per array) each instead of one per row."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.backed:
            return self.matrix[rows]
        if rows.size == 0:
            empty = np.zeros((0, self.shape[1]), dtype=self.dtype)
            return sp.csr_matrix(empty) if self.kind == "backed_sparse" else empty
        spans = _row_spans(rows, SPAN_GAP_ROWS)
        if self.kind == "backed_sparse":
            block = self._read_csr_spans(spans)
        else:
            block = np.concatenate([np.asarray(self.matrix[int(a):int(b)]) for a, b in spans])
        # position of each wanted row in the concatenated spans
        lengths = spans[:, 1] - spans[:, 0]
        which = np.searchsorted(spans[:, 1], rows, side="right")
        local = rows - spans[which, 0] + (np.cumsum(lengths) - lengths)[which]
        if local.size == block.shape[0]:
            return block
        return block[local]

    def _read_csr_spans(self, spans: np.ndarray) -> sp.csr_matrix:
        """Rows ``[start, stop)`` of every span of a backed CSR matrix, stacked: two HDF5 reads per
        span (``data`` and ``indices``) through h5py, with ``indptr`` read once and kept (8 bytes
        per row). anndata's own indexing costs milliseconds of bookkeeping per call."""
        if self._indptr is None:
            self._indptr = np.asarray(self.matrix.group["indptr"][...], dtype=np.int64)
        group = self.matrix.group
        data_ds, indices_ds, indptr = group["data"], group["indices"], self._indptr
        lo, hi = indptr[spans[:, 0]], indptr[spans[:, 1]]
        sizes = hi - lo
        starts = np.cumsum(sizes) - sizes  # where each span's values go
        data = np.empty(int(sizes.sum()), dtype=data_ds.dtype)
        indices = np.empty(int(sizes.sum()), dtype=indices_ds.dtype)
        for a, s, t in zip(lo.tolist(), starts.tolist(), sizes.tolist()):
            if t:  # into the block, one span at a time (h5py's read_direct costs more per call)
                data[s:s + t] = data_ds[a:a + t]
                indices[s:s + t] = indices_ds[a:a + t]
        row_ptr = np.concatenate([[0]] + [indptr[a + 1:b + 1] - indptr[a] + s
                                          for (a, b), s in zip(spans.tolist(), starts.tolist())])
        n_rows = int((spans[:, 1] - spans[:, 0]).sum())
        return sp.csr_matrix((data, indices, row_ptr.astype(np.int64)), shape=(n_rows, self.shape[1]))

    def chunks(self):
        """Yield ``(start, stop, block)`` over all rows, about ``BACKED_CHUNK_VALUES`` stored
        values a block (so that checks over every value never allocate more than that);
        blocks are sparse or dense as stored."""
        n, g = self.shape
        nnz_per_row = max(1.0, self.n_stored() / max(n, 1))
        step = max(1, int(BACKED_CHUNK_VALUES // nnz_per_row))
        for start in range(0, n, step):
            stop = min(n, start + step)
            yield start, stop, self.matrix[start:stop]

    def _backed_nnz(self) -> int:
        group = getattr(self.matrix, "group", None)
        if group is not None and "data" in group:
            return int(group["data"].shape[0])
        return self.shape[0] * self.shape[1]

    def n_stored(self) -> int:
        if self.kind == "csr":
            return int(self.matrix.nnz)
        if self.kind == "backed_sparse":
            return self._backed_nnz()
        return self.shape[0] * self.shape[1]


class _ValueTally:
    """Counts of bad stored values (non-finite; for counts also negative, non-integer), with the
    (row, column, value) of the first of each kind."""

    def __init__(self, continuous: bool):
        self.continuous = continuous
        self.counts = {"non-finite": 0, "negative": 0, "non-integer": 0}
        self.examples: dict[str, tuple[int, int, float]] = {}

    def add(self, block, row_offset: int) -> None:
        """Check every stored value of ``block`` (rows ``row_offset..``), sparse or dense."""
        if sp.issparse(block):
            block = block.tocoo()
            values, rows, cols = block.data, block.row, block.col
        else:
            block = np.asarray(block)
            values, rows, cols = block.reshape(-1), None, None
        if values.size == 0 or values.dtype.kind in "ub":
            return
        bad = {}
        if values.dtype.kind == "f":
            finite = np.isfinite(values)
            bad["non-finite"] = ~finite
            if not self.continuous:
                fin = np.where(finite, values, 0)
                bad["negative"] = fin < 0
                bad["non-integer"] = fin != np.floor(fin)
        elif not self.continuous:
            bad["negative"] = values < 0
        for name, mask in bad.items():
            k = int(np.count_nonzero(mask))
            if k:
                self.counts[name] += k
                if name not in self.examples:
                    first = int(np.argmax(mask))
                    if rows is None:
                        r, c = divmod(first, block.shape[1])
                    else:
                        r, c = int(rows[first]), int(cols[first])
                    self.examples[name] = (row_offset + r, c, values[first].item())


def _check_dtype(m: _CountMatrix, source: str, continuous: bool, name: str) -> None:
    if m.dtype.kind not in "uif":
        what = "values" if continuous else "counts"
        raise InputError(source, m.field,
                         f"{what} have dtype {m.dtype}, not a numeric type",
                         "store numbers (an integer or float array)" + ("" if continuous else
                         " of raw integer counts; if the raw counts are in a layer, name it ("
                         + _layer_fix(name) + ")"))


def _layer_fix(name: str, layer: str = "counts") -> str:
    """How to name a layer, in the spec's Python form and as the CLI flag."""
    return f"modalities={{'{name}': '{layer}'}} in Python, --layer {layer} or --modalities {name}:{layer} on the CLI"


#: Stored values looked at per layer when suggesting which layer holds raw counts.
LAYER_PROBE_VALUES = 100_000


def _holds_counts(matrix) -> bool:
    """Whether the first ``LAYER_PROBE_VALUES`` stored values of a layer look like raw counts
    (non-negative integers, not all zero). Cheap, used only to suggest a layer in a message."""
    try:
        if sp.issparse(matrix) or isinstance(matrix, (ad.abc.CSRDataset, ad.abc.CSCDataset)):
            data = matrix.data if sp.issparse(matrix) else matrix.group["data"]
            values = np.asarray(data[:LAYER_PROBE_VALUES])
        else:
            n_rows = max(1, LAYER_PROBE_VALUES // max(1, int(matrix.shape[1])))
            values = np.asarray(matrix[:n_rows]).reshape(-1)
    except Exception:  # noqa: BLE001 - a suggestion must never fail the read
        return False
    if values.size == 0 or values.dtype.kind not in "uif" or not values.any():
        return False
    if values.dtype.kind in "ui":
        return bool((values >= 0).all())
    return bool(np.isfinite(values).all() and (values >= 0).all() and (values == np.floor(values)).all())


def _layers_note(adata, name: str, current: str | None) -> tuple[str, str | None]:
    """``(note, counts_layer)``: the layers modality ``name`` has (for a message) and the first
    other layer that holds integer counts (None if none)."""
    layers = list(adata.layers.keys()) if adata is not None else []
    if not layers:
        return f"modality '{name}' has no layers besides .X", None
    counts = next((k for k in layers if k != current and _holds_counts(adata.layers[k])), None)
    note = f"layers of modality '{name}': {layers}"
    if counts is not None:
        note += f"; layer '{counts}' holds integer counts"
    return note, counts


def _value_totals(m: _CountMatrix, source: str, name: str, continuous: bool, cell_names,
                  feature_names, adata=None, layer: str | None = None) -> np.ndarray:
    """Row totals (float64, shape (n_rows,)) after checking every stored value.

    The matrix is read in blocks of about ``BACKED_CHUNK_VALUES`` stored values, in memory or
    on disk alike, and every stored value is checked: finite always; for counts
    (``continuous=False``) also non-negative and integer. Raises an InputError naming the
    file, the field, the first offending cell and feature, and the fix.
    """
    _check_dtype(m, source, continuous, name)
    tally = _ValueTally(continuous)
    totals = np.zeros(m.shape[0], dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        for start, stop, block in m.chunks():
            totals[start:stop] = np.asarray(block.sum(axis=1, dtype=np.float64)).reshape(-1)
            tally.add(block, start)
    if not any(tally.counts.values()):
        return totals
    kind = next(k for k, v in tally.counts.items() if v)
    row, col, value = tally.examples[kind]
    where = (f"{tally.counts[kind]:,} among all {m.n_stored():,} stored values; the first in cell "
             f"'{cell_names[row]}' (row {row}), feature '{feature_names[col]}' (column {col}): {value}")
    if continuous:
        raise InputError(source, m.field, f"values contain NaN or inf ({where})",
                         "replace the NaN/inf entries, or drop those cells or features")
    note, counts_layer = _layers_note(adata, name, layer)
    fix_raw = ("give raw integer counts (not normalised, scaled or log-transformed values): "
               + (f"layer '{counts_layer}' holds them, name it (" + _layer_fix(name, counts_layer) + ")"
                  if counts_layer else "if the raw counts are in a layer, name it (" + _layer_fix(name) + ")")
               + "; if this "
               f"modality really holds continuous values, declare it continuous "
               f"(continuous_modalities=['{name}'] in Python, --continuous-modalities {name} on "
               "the CLI) for a model that reads continuous input")
    problem = {"non-finite": "counts contain NaN or inf", "negative": "counts contain negative values",
               "non-integer": "counts are not integers"}[kind]
    if kind == "non-finite":
        fix_raw = "replace the NaN/inf entries with the measured counts, or drop those cells; " + fix_raw
    raise InputError(source, m.field, f"{problem} ({where}); {note}", fix_raw)


# --------------------------------------------------------------------------------------
# Opening the input and finding its parts
# --------------------------------------------------------------------------------------


def read_h5mu(path, **kwargs):
    """``mudata.read_h5mu`` without mudata's FutureWarning about ``update()`` pulling columns
    (printed once per modality on every read; reading is unchanged)."""
    import warnings

    import mudata as md

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="mudata")
        return md.read_h5mu(path, **kwargs)


def _open(data, backed: bool):
    """``(object, source)``: the AnnData/MuData to read and the name used in messages."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        source = str(path)
        if not path.exists():
            raise InputError(source, "<file>", "file not found",
                             "give the path of an existing .h5ad or .h5mu file")
        suffix = path.suffix.lower()
        try:
            if suffix == ".h5ad":
                return ad.read_h5ad(path, backed="r" if backed else None), source
            if suffix == ".h5mu":
                return read_h5mu(path, backed=bool(backed)), source
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise InputError(source, "<file>", f"could not be read ({type(err).__name__}: {err})",
                             "check that the file is a complete AnnData (.h5ad) or MuData "
                             "(.h5mu) file written by anndata/mudata") from err
        raise InputError(source, "<file>", f"unknown file type '{path.suffix}'",
                         "give an AnnData '.h5ad' or MuData '.h5mu' file")
    if backed:
        raise InputError(f"<in-memory {type(data).__name__}>", "backed",
                         "backed=True needs a file path; this is an in-memory object",
                         "pass the path of the .h5ad/.h5mu file, or leave backed=False")
    if md is not None and isinstance(data, md.MuData):
        return data, "<in-memory MuData>"
    if isinstance(data, ad.AnnData):
        return data, "<in-memory AnnData>"
    raise InputError("<in-memory object>", "data",
                     f"expected an AnnData, a MuData or a path, got {type(data).__name__}",
                     "pass an anndata.AnnData, a mudata.MuData, or a .h5ad/.h5mu path")


def _is_mudata(obj) -> bool:
    return md is not None and isinstance(obj, md.MuData)


def _modalities(obj, spec: DatasetSpec, source: str) -> dict[str, ad.AnnData]:
    """Spec modality name -> the AnnData holding it."""
    names = list(spec.modalities)
    if not _is_mudata(obj):
        if len(names) != 1:
            in_obsm = [k for k in getattr(obj, "obsm", {}).keys() if "protein" in k.lower() or "adt" in k.lower()]
            hint = "" if not in_obsm else (
                f"; this AnnData keeps .obsm['{in_obsm[0]}'] (scvi-tools' layout for proteins): make a MuData "
                f"of it in Python, mudata.MuData({{'rna': adata, 'prot': anndata.AnnData(adata.obsm['{in_obsm[0]}'])}})"
                ", and write it as .h5mu")
            raise InputError(source, "modalities",
                             f"an AnnData holds one modality but the spec names {names}",
                             "give a MuData for several modalities (.h5mu), or a spec with a single "
                             "modality, e.g. {'rna': None} (modalities= in Python; --modalities rna "
                             "on the CLI, or a model that takes one modality)" + hint)
        return {names[0]: obj}
    if getattr(obj, "axis", 0) != 0:
        raise InputError(source, "axis",
                         f"MuData with axis={obj.axis} (shared features); the models need "
                         "modalities measured on shared cells (axis=0)",
                         "build the MuData with axis=0 (the default)")
    missing = [n for n in names if n not in obj.mod]
    if missing:
        raise InputError(source, "modalities",
                         f"modality(ies) {missing} not in the MuData; available: {list(obj.mod)}",
                         "name modalities of the MuData in the spec's 'modalities' (--modalities "
                         f"{','.join(list(obj.mod)[:2])} on the CLI, modalities="
                         f"{ {m: None for m in list(obj.mod)[:2]} } in Python)")
    return {n: obj.mod[n] for n in names}


def _matrix_field(is_mu: bool, name: str, layer: str | None) -> str:
    part = ".X" if layer is None else f".layers['{layer}']"
    return f"mdata.mod['{name}']{part}" if is_mu else f"adata{part}"


def _count_source(adata: ad.AnnData, name: str, layer: str | None, source: str, field: str):
    if layer is None:
        if adata.X is None:
            note, counts = _layers_note(adata, name, None)
            raise InputError(source, field, f"modality '{name}' has no .X; {note}",
                             "store the raw counts in .X, or name the layer that holds them, "
                             f"e.g. {_layer_fix(name, counts or 'counts')}")
        return adata.X
    if layer not in adata.layers:
        _, counts = _layers_note(adata, name, None)
        example = counts or next(iter(adata.layers.keys()), "LAYER")
        raise InputError(source, field, f"no layer '{layer}' in modality '{name}'; available "
                         f"layers: {list(adata.layers.keys())}" + (f" (layer '{counts}' holds integer "
                                                                   "counts)" if counts else ""),
                         f"set modalities['{name}'] to one of these layers, or to null for .X "
                         f"(e.g. {_layer_fix(name, example)}; leave out --layer for .X)")
    return adata.layers[layer]


def _check_unique_cells(names: pd.Index, source: str, where: str) -> None:
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise InputError(source, f"{where}obs_names",
                         f"{len(dup)} duplicate cell id(s): {_preview(dup.tolist())}",
                         "make cell ids unique and save again: adata.obs_names_make_unique() "
                         "(for a MuData: mdata.obs_names_make_unique())")


def _check_unique_features(names: pd.Index, source: str, name: str, is_mu: bool) -> None:
    """InputError naming the file, the modality, some duplicated feature names and the fix when
    ``names`` repeats one (tables and loadings are indexed by feature name)."""
    dup = names[names.duplicated()].unique()
    if len(dup):
        where = f"mdata.mod['{name}']" if is_mu else "adata"
        raise InputError(source, f"{where}.var_names",
                         f"{len(dup)} duplicate feature name(s) in modality '{name}' "
                         f"({int(names.duplicated(keep=False).sum()):,} of its {len(names):,} features): "
                         f"{_preview(dup.tolist(), 5)}",
                         f"make the names unique and save again: {where}.var_names_make_unique() "
                         "(appends -1, -2, ... to repeats"
                         + ("; then mdata.update())" if is_mu else ")")
                         + ", or use unique ids (e.g. Ensembl gene ids) as var_names")


def _align(ref_name: str, ref_names: pd.Index, name: str, names: pd.Index, optional: bool,
           source: str) -> np.ndarray | None:
    """Row of each reference cell in modality ``name`` (-1 where absent); None = identity."""
    if names.equals(ref_names):
        return None
    field = f"mdata.mod['{name}'].obs_names"
    extra = names[~names.isin(ref_names)]
    if optional:
        if len(extra):
            raise InputError(
                source, field,
                f"{len(extra)} cell(s) of optional modality '{name}' are not cells of the first "
                f"modality '{ref_name}': {_preview(extra.tolist())}",
                f"drop them from '{name}', e.g. mdata.mod['{name}'] = mdata.mod['{name}']"
                f"[mdata.mod['{name}'].obs_names.isin(mdata.mod['{ref_name}'].obs_names)].copy()")
        return names.get_indexer(ref_names).astype(np.int64)
    missing = ref_names[~ref_names.isin(names)]
    if len(extra) == 0 and len(missing) == 0:
        first = int(np.flatnonzero(names.to_numpy() != ref_names.to_numpy())[0])
        raise InputError(
            source, field,
            f"modality '{name}' has the same cells as the first modality '{ref_name}' but in a "
            f"different order (first difference at position {first}: "
            f"'{names[first]}' vs '{ref_names[first]}')",
            f"reorder it: mdata.mod['{name}'] = mdata.mod['{name}']"
            f"[mdata.mod['{ref_name}'].obs_names].copy(); mdata.update()")
    raise InputError(
        source, field,
        f"modality '{name}' and the first modality '{ref_name}' hold different cells: "
        f"{len(missing)} cell(s) of '{ref_name}' are missing from '{name}' "
        f"({_preview(missing.tolist(), 5)}), {len(extra)} cell(s) of '{name}' are not in "
        f"'{ref_name}' ({_preview(extra.tolist(), 5)})",
        f"keep only the cells measured in both (e.g. muon.pp.intersect_obs(mdata)), or, if "
        f"some cells truly lack '{name}', declare it optional (--optional-modalities {name} on the "
        f"CLI, optional_modalities=['{name}'] in Python) with a model that takes cells lacking a "
        "modality (`pyro-livi models` lists them)")


def _obs_column(obj, ref: ad.AnnData, key: str, spec_field: str, source: str) -> pd.Series:
    """The ``.obs`` column ``key`` for the reference cells, in their order (not a copy)."""
    if _is_mudata(obj):
        if key in obj.obs.columns:
            pos = obj.obs.index.get_indexer(ref.obs_names)
            if (pos < 0).any():
                raise InputError(source, "obs", "the MuData's global .obs does not list all "
                                 "cells of its modalities",
                                 "call mdata.update() before reading or saving")
            return obj.obs[key].iloc[pos]
        if key in ref.obs.columns:
            return ref.obs[key]
        available = list(obj.obs.columns) + [c for c in ref.obs.columns
                                             if c not in obj.obs.columns]
    else:
        if key in obj.obs.columns:
            return obj.obs[key]
        available = list(obj.obs.columns)
    flag = {"donor_key": "--donor-key", "covariate_keys": "--covariate-keys",
            "label_keys": "--label-keys"}.get(spec_field, f"--{spec_field.replace('_', '-')}")
    close = difflib.get_close_matches(str(key), [str(c) for c in available], n=1, cutoff=0.6)
    close += [str(c) for c in available if str(c).lower() == str(key).lower() and str(c) not in close]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise InputError(source, f"obs['{key}'] ({spec_field})",
                     f"no .obs column '{key}'; available .obs columns: {available}{hint}",
                     f"set '{spec_field}' in the spec to one of the available columns ({flag} "
                     f"on the CLI, {spec_field}= in Python), or add a '{key}' column to .obs")


def _nan_check(col: pd.Series, names: pd.Index, key: str, spec_field: str, source: str,
               what: str) -> None:
    missing = col.isna().to_numpy()
    if missing.any():
        raise InputError(source, f"obs['{key}'] ({spec_field})",
                         f"{int(missing.sum()):,} cell(s) have no {what} (NaN), e.g. "
                         f"{_preview(names[missing].tolist(), 5)}",
                         f"fill in the {what} of these cells, or drop them before reading "
                         f"(adata = adata[adata.obs['{key}'].notna()].copy())")


#: Most distinct values a numeric (int or float) covariate column may hold and still be read as
#: categories; more, or any non-whole value, is a measurement, refused (bin it first).
MAX_NUMERIC_COVARIATE_LEVELS = 50

#: A numeric covariate column with more distinct values than this (and at most
#: :data:`MAX_NUMERIC_COVARIATE_LEVELS`) is read as categories with a warning.
WARN_NUMERIC_COVARIATE_LEVELS = 10


def _is_numeric_column(col: pd.Series) -> bool:
    """Integers or floats (NumPy or pandas nullable), not bools, categoricals or strings."""
    dtype = col.dtype
    return (pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
            and not isinstance(dtype, pd.CategoricalDtype))


def _check_covariate_levels(col: pd.Series, key: str, source: str) -> None:
    """Refuse a covariate column that is not a set of categories (InputError naming the file,
    the column, its number of distinct values and the fix).

    Covariates are categorical (scvi-tools' ``categorical_covariate_keys``): every distinct value
    is a category with its own offset per feature. Refused: a numeric column (int or float, not
    bool or categorical) holding a non-whole value or more than
    :data:`MAX_NUMERIC_COVARIATE_LEVELS` distinct values (a measurement such as age or a
    pseudotime), and any column giving every cell its own value (an identifier such as a
    barcode). Integer codes with few values (batches 1, 2, 3) are categories; a numeric column
    with more than :data:`WARN_NUMERIC_COVARIATE_LEVELS` values gives a warning."""
    n_cells = int(col.shape[0])
    n_levels = int(col.nunique(dropna=True))
    field = f"obs['{key}'] (covariate_keys)"
    leave_out = f"or leave '{key}' out of the covariates (--covariate-keys on the CLI, covariate_keys= in Python)"
    numeric = _is_numeric_column(col)
    if numeric:
        values = col.to_numpy(dtype=np.float64)
        fractional = values != np.round(values)
        if fractional.any() or n_levels > MAX_NUMERIC_COVARIATE_LEVELS:
            why = (f"non-whole values such as {values[np.argmax(fractional)]:g}" if fractional.any()
                   else f"more than {MAX_NUMERIC_COVARIATE_LEVELS} distinct values")
            raise InputError(
                source, field,
                f"a numeric column ({col.dtype}) with {n_levels:,} distinct values over {n_cells:,} cells "
                f"({why}): a measurement, not categories. Covariates are categorical, every distinct "
                f"value a category with its own offset per feature, so this column would give "
                f"{n_levels:,} free offsets per feature",
                f"bin it into a few categories and give that column instead, e.g. "
                f"adata.obs['{key}_bin'] = pd.cut(adata.obs['{key}'], bins=5).astype(str) with "
                f"--covariate-keys {key}_bin (covariate_keys=['{key}_bin']); if its values really are "
                f"category labels, store them as such (adata.obs['{key}'] = adata.obs['{key}'].astype(str)); "
                + leave_out)
    if n_cells > 1 and n_levels == n_cells:
        raise InputError(
            source, field,
            f"every one of the {n_cells:,} cells has its own value ({n_levels:,} distinct values, e.g. "
            f"{_preview(col.astype(str).iloc[:3].tolist(), 3)}): an identifier such as a barcode, not a "
            "covariate; as categories it would give every cell a free offset per feature",
            "give a column that groups cells (batch, sample, plate, ...), " + leave_out)
    if numeric and n_levels > WARN_NUMERIC_COVARIATE_LEVELS:
        warnings.warn(
            f"{source}: field '{field}': a numeric column with {n_levels} distinct values, read as "
            f"{n_levels} categories (one offset per feature each); if it is a measurement (age, a "
            f"score), bin it (pd.cut) or leave it out of the covariates", stacklevel=3)


def _covariate_codes(col: pd.Series, key: str, categories: list[str] | None, source: str):
    """``(categories, codes)`` for one categorical covariate; values compared as strings.
    Without ``categories`` (reading data to fit on) the column must be categories
    (:func:`_check_covariate_levels`); with them (a fitted model's) every value must be one."""
    values = col.astype(str).to_numpy(dtype=object)
    if categories is None:
        _check_covariate_levels(col, key, source)
        categories = sorted(set(values.tolist()))
    lookup = {c: k for k, c in enumerate(categories)}
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    unseen = [u for u in uniq.tolist() if u not in lookup]
    if unseen:
        raise InputError(source, f"obs['{key}'] (covariate_keys)",
                         f"{len(unseen)} value(s) not among the categories the model was "
                         f"trained with: {_preview(unseen)}; trained categories: "
                         f"{_preview(categories)}",
                         f"keep only cells whose '{key}' is one of the trained categories, or "
                         "fit a model on data that includes these categories")
    codes = np.array([lookup[u] for u in uniq.tolist()], dtype=np.int64)[inverse.ravel()]
    return list(categories), codes


# --------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------


class RowBlock:
    """Stored rows of a set of cells, read at once by :meth:`SingleCellDataset.prefetch`.

    Attributes
    ----------
    positions : np.ndarray[int64], shape (n,)
        The cells held (dataset positions), sorted.
    matrices : dict[str, scipy CSR matrix | np.ndarray]
        Modality -> the rows of the cells present in it, as stored (CSR stays sparse).
    rows_in_block : dict[str, np.ndarray[int64]], each shape (n,)
        Modality -> row in ``matrices[modality]`` of each cell of ``positions`` (-1: absent).
    """

    def __init__(self, *, positions, matrices, rows_in_block, n_features, source):
        self.positions = positions
        self.matrices = matrices
        self.rows_in_block = rows_in_block
        self.n_features = n_features
        self.source = source

    def __len__(self) -> int:
        return int(self.positions.size)

    def dense_rows(self, modality: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(x, present)`` of cells ``idx`` (dataset positions, all held here): dense float32
        counts, shape (len(idx), n_features[modality]), and presence, shape (len(idx),)."""
        idx = np.asarray(idx, dtype=np.int64)
        local = np.searchsorted(self.positions, idx)
        inside = local < self.positions.size
        if not (inside.all() and np.array_equal(self.positions[local], idx)):
            raise InputError(self.source, "block", "the minibatch holds cells that the prefetched "
                             "block does not", "prefetch a superset of the minibatch's cells")
        matrix = self.matrices[modality]

        def read(rows):
            part = matrix[rows]
            return part.toarray() if sp.issparse(part) else np.asarray(part)

        return _dense_with_absent(self.rows_in_block[modality][local], self.n_features[modality], read)


def _dense_with_absent(rows: np.ndarray, n_features: int, read) -> tuple[np.ndarray, np.ndarray]:
    """``(x, present)``: dense float32 (len(rows), n_features) with ``read(rows[present])`` in the
    rows of present cells and zeros for cells without the modality (``rows`` -1)."""
    present = rows >= 0
    x = np.zeros((rows.size, n_features), dtype=np.float32)
    if present.any():
        x[present] = read(rows[present])
    return x, present


class SingleCellDataset:
    """Validated single-cell counts that hand out dense minibatches.

    The count matrices are held as stored (scipy CSR in memory, or on disk when read with
    ``backed=True``); only the rows of a minibatch are made dense. The dataset refers to the
    user's matrices without copying them and never modifies them.

    Attributes
    ----------
    source : str
        The file path, or ``"<in-memory AnnData>"`` / ``"<in-memory MuData>"``.
    spec : DatasetSpec
    n_cells : int
    modalities : list[str]
        Modality names; the first is the reference every other modality is aligned to.
    n_features : dict[str, int]
    feature_names : dict[str, pd.Index]
    obs_names : pd.Index, shape (n_cells,)
    obs : pd.DataFrame, shape (n_cells, .)
        Copies of the donor, covariate and label columns only, indexed by ``obs_names``.
    donor_index : DonorIndex | None
        None when the spec has no donor key.
    donor_codes : np.ndarray[int64], shape (n_cells,), or None without donors
    covariate_categories : dict[str, list[str]]
        Covariate key -> its categories (as strings); code k is ``categories[k]``.
    covariate_codes : np.ndarray[int64], shape (n_cells, n_covariates)
        Columns in the order of ``spec.covariate_keys``.
    present : dict[str, np.ndarray[bool]], each shape (n_cells,)
        Whether each cell was measured in the modality (all True unless optional).
    size_factors : dict[str, np.ndarray[float64]], each shape (n_cells,)
        Total count of each cell in the modality (counts; 1.0 for continuous modalities).
        Cells absent from an optional
        modality get 1.0, a neutral placeholder that keeps ``log(size_factor)`` finite; their
        counts are zero and ``present`` is False, so models mask them out.
    notes : list[str]
        What reading did beyond checking (e.g. a one-off CSC -> CSR conversion).
    """

    def __init__(self, *, source, spec, matrices, rows_of_cell, cells, obs, donor_index,
                 donor_codes, covariate_categories, covariate_codes, present, size_factors,
                 feature_names, notes):
        self.source = source
        self.spec = spec
        self._matrices: dict[str, _CountMatrix] = matrices
        # Modality -> row in its matrix of each cell of the full (unsubset) read; None = same.
        self._rows_of_cell: dict[str, np.ndarray | None] = rows_of_cell
        # Position in the full read of each cell of this dataset.
        self._cells = cells
        self.obs = obs
        self.obs_names = obs.index
        self.donor_index = donor_index
        self.donor_codes = donor_codes
        self.covariate_categories = covariate_categories
        self.covariate_codes = covariate_codes
        self.present = present
        self.size_factors = size_factors
        self.feature_names = feature_names
        self.modalities = list(matrices)
        self.n_features = {m: int(matrices[m].shape[1]) for m in matrices}
        self.notes = notes

    @property
    def n_cells(self) -> int:
        return int(self._cells.shape[0])

    @property
    def backed(self) -> bool:
        """Whether any modality is read from disk per batch."""
        return any(m.backed for m in self._matrices.values())

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        feats = ", ".join(f"{m}: {g}" for m, g in self.n_features.items())
        donors = "no donors" if self.donor_index is None else f"{len(self.donor_index)} donors"
        return (f"SingleCellDataset({self.source}, {self.n_cells} cells, "
                f"{donors}, features {{{feats}}}"
                f"{', backed' if self.backed else ''})")

    def _check_idx(self, idx, what: str = "idx") -> np.ndarray:
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (self.n_cells,):
                raise InputError(self.source, what,
                                 f"boolean mask of shape {idx.shape}, expected ({self.n_cells},)",
                                 "give one boolean per cell, or integer cell positions")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise InputError(self.source, what,
                             f"expected a 1-D array of integer cell positions, got dtype "
                             f"{idx.dtype} shape {idx.shape}",
                             "give integer positions 0..n_cells-1 (or a boolean mask)")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_cells):
            raise InputError(self.source, what,
                             f"cell positions outside 0..{self.n_cells - 1} "
                             f"(min {idx.min()}, max {idx.max()})",
                             "give positions within the dataset")
        return idx

    def _dense_rows(self, modality: str, idx: np.ndarray,
                    block: "RowBlock | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """``(x, present)``: dense float32 counts (len(idx), G) and presence of cells ``idx``,
        taken from ``block`` when given (it must hold every cell of ``idx``)."""
        if block is not None:
            return block.dense_rows(modality, idx)
        matrix = self._matrices[modality]
        full = self._cells[idx]
        mapping = self._rows_of_cell[modality]
        if mapping is None:
            return matrix.read(full), np.ones(idx.shape[0], dtype=bool)
        return _dense_with_absent(mapping[full], matrix.shape[1], matrix.read)

    def prefetch(self, idx) -> "RowBlock":
        """Read the stored rows of cells ``idx`` (positions 0..n_cells-1) of every modality at
        once, as stored: sparse matrices stay sparse (CSR), nothing is made dense.

        Backed matrices are read in one contiguous slice per run of neighbouring rows
        (:meth:`_CountMatrix.read_block`). Pass the result to :meth:`batch` (``block=``) for any
        subset of ``idx``; the chunked shuffle of :class:`~pyro_livi.data.MinibatchLoader`
        prefetches a buffer of minibatches this way. Memory: the stored values of these cells.
        """
        idx = np.unique(self._check_idx(idx))
        full = self._cells[idx]
        matrices, rows_in_block = {}, {}
        for m, matrix in self._matrices.items():
            mapping = self._rows_of_cell[m]
            rows = full if mapping is None else mapping[full]
            present = rows >= 0
            wanted = rows[present]
            order = np.argsort(wanted, kind="stable")
            sorted_rows = wanted[order]
            matrices[m] = matrix.read_block(sorted_rows)
            where = np.full(idx.size, -1, dtype=np.int64)
            where[np.flatnonzero(present)[order]] = np.arange(sorted_rows.size)
            rows_in_block[m] = where
        return RowBlock(positions=idx, matrices=matrices, rows_in_block=rows_in_block,
                        n_features=dict(self.n_features), source=self.source)

    def batch(self, idx, block: "RowBlock | None" = None) -> Batch:
        """The minibatch of cells ``idx`` (positions 0..n_cells-1), dense only for these rows.

        ``Batch.n_cells`` is the size of this dataset, ``Batch.index`` is ``idx``. ``block``: rows
        read beforehand by :meth:`prefetch` for a superset of ``idx`` (nothing is read then).
        """
        idx = self._check_idx(idx)
        x, present = {}, {}
        for m in self.modalities:
            xm, pm = self._dense_rows(m, idx, block)
            x[m] = torch.from_numpy(xm)
            present[m] = torch.from_numpy(pm)
        return Batch(
            index=torch.from_numpy(idx.copy()),
            n_cells=self.n_cells,
            x=x,
            size_factor={m: torch.from_numpy(self.size_factors[m][idx].astype(np.float32))
                         for m in self.modalities},
            present=present,
            donor=None if self.donor_codes is None else torch.from_numpy(self.donor_codes[idx].copy()),
            covariates=torch.from_numpy(self.covariate_codes[idx].copy()),
        )

    def first_non_binary(self, modality: str) -> tuple[str, float] | None:
        """``(feature name, value)`` of the first stored value of ``modality`` that is neither 0
        nor 1, or None when every value is 0 or 1 (what a Bernoulli likelihood needs). Reads the
        stored matrix in chunks (in memory or on disk alike); sparse blocks stay sparse, so the
        cost is one pass over the stored values."""
        for _, _, block in self._matrices[modality].chunks():
            if sp.issparse(block):
                block = block.tocoo()
                values, cols = block.data, block.col
            else:
                block = np.asarray(block)
                values, cols = block.reshape(-1), None
            bad = (values != 0) & (values != 1)
            if bad.any():
                k = int(np.argmax(bad))
                col = int(cols[k]) if cols is not None else k % block.shape[1]
                return str(self.feature_names[modality][col]), float(values[k])
        return None

    def counts_sample(self, modality: str, n: int = 2000, seed: int = 0) -> np.ndarray:
        """Dense float32 counts of up to ``n`` random cells measured in ``modality``.

        Shape (min(n, n_present), n_features[modality]); rows in dataset order. Cells absent
        from an optional modality are never drawn. Meant for data-based initialisations.
        """
        if modality not in self._matrices:
            raise InputError(self.source, "modality", f"unknown modality '{modality}'",
                             f"use one of {self.modalities}")
        candidates = np.flatnonzero(self.present[modality])
        rng = np.random.default_rng(seed)
        k = min(int(n), candidates.size)
        chosen = np.sort(rng.choice(candidates, size=k, replace=False))
        return self._dense_rows(modality, chosen)[0]

    def subset(self, idx) -> "SingleCellDataset":
        """The cells ``idx`` (integer positions or boolean mask) as a new dataset.

        It keeps this dataset's donor index and covariate categories, so codes mean the
        same in both (train / held-out splits). Matrices are shared, not copied.
        """
        idx = self._check_idx(idx)
        if np.unique(idx).size != idx.size:
            raise InputError(self.source, "idx", "repeated cell positions in a subset",
                             "give each cell at most once")
        return SingleCellDataset(
            source=self.source,
            spec=self.spec,
            matrices=self._matrices,
            rows_of_cell=self._rows_of_cell,
            cells=self._cells[idx],
            obs=self.obs.iloc[idx].copy(),
            donor_index=self.donor_index,
            donor_codes=None if self.donor_codes is None else self.donor_codes[idx],
            covariate_categories={k: list(v) for k, v in self.covariate_categories.items()},
            covariate_codes=self.covariate_codes[idx],
            present={m: v[idx] for m, v in self.present.items()},
            size_factors={m: v[idx] for m, v in self.size_factors.items()},
            feature_names=self.feature_names,
            notes=list(self.notes),
        )

    def donor_cell_counts(self) -> pd.Series:
        """Number of cells of every donor of the index (0 for donors absent here)."""
        if self.donor_index is None:
            raise InputError(self.source, "donor_key", "the data were read without donors",
                             "read them with a donor key (donor_key= in Python, --donor-key on the CLI)")
        counts = np.bincount(self.donor_codes, minlength=len(self.donor_index))
        return pd.Series(counts, index=pd.Index(self.donor_index.ids, name="donor"),
                         name="n_cells")


# --------------------------------------------------------------------------------------
# read_dataset
# --------------------------------------------------------------------------------------


def read_dataset(data, spec: DatasetSpec | dict, *, backed: bool = False,
                 donor_index: DonorIndex | None = None,
                 covariate_categories: dict | None = None) -> SingleCellDataset:
    """Read and validate single-cell counts.

    Parameters
    ----------
    data : str | Path | AnnData | MuData
        A ``.h5ad`` or ``.h5mu`` path, or an in-memory object (never modified).
    spec : DatasetSpec | dict
        What to read; a dict is validated against ``data_schemas/dataset_spec.schema.json``.
    backed : bool
        Open a path in backed mode: counts stay on disk and each batch reads its rows
        (sorted, for h5py); size factors are computed in chunks. Needs a path and the counts
        in ``.X``: anndata loads the layers of a backed file into memory, so a layer with
        ``backed=True`` raises an InputError.
    donor_index, covariate_categories
        A fitted model's donor index and covariate categories, re-applied to this data
        (unseen donors or categories raise an InputError); built from the data when None.
    Checks (each an InputError naming the file, the field and the fix): every stored value of a
    count modality is a non-negative integer, every value of a continuous modality
    (``spec.continuous_modalities``) is finite (one vectorised pass over all values, in
    chunks); no cell has a zero total count in a count modality where it is present; cell ids are unique; MuData modalities hold the first modality's cells in
    its order (optional modalities: a subset of them); feature names are unique within each
    modality; the donor, covariate and label columns, layers and modalities exist; no cell lacks
    a donor or a covariate value; without ``covariate_categories``, every covariate column holds
    categories: not a numeric measurement (a non-whole value, or more than
    :data:`MAX_NUMERIC_COVARIATE_LEVELS` distinct numbers), nor a value per cell (an identifier).
    Donors with a single cell only give a warning.
    """
    if isinstance(spec, dict):
        spec = DatasetSpec.from_dict(spec)
    elif not isinstance(spec, DatasetSpec):
        raise InputError("<spec>", "<spec>", f"expected a DatasetSpec or a dict, got "
                         f"{type(spec).__name__}", "pass DatasetSpec(...) or its dict form")
    obj, source = _open(data, backed)
    is_mu = _is_mudata(obj)
    mods = _modalities(obj, spec, source)
    ref_name = next(iter(spec.modalities))
    ref = mods[ref_name]
    ref_names = pd.Index(ref.obs_names)
    if ref.n_obs == 0:
        raise InputError(source, f"mdata.mod['{ref_name}']" if is_mu else "adata.obs",
                         "no cells", "give data with at least one cell")
    notes: list[str] = []

    rows_of_cell: dict[str, np.ndarray | None] = {}
    for name, adata in mods.items():
        where = f"mdata.mod['{name}']." if is_mu else "adata."
        _check_unique_cells(pd.Index(adata.obs_names), source, where)
        rows_of_cell[name] = _align(ref_name, ref_names, name, pd.Index(adata.obs_names),
                                    name in spec.optional_modalities, source)

    # .obs columns: donor, covariates, labels (copies, in the reference cells' order).
    columns: dict[str, pd.Series] = {}
    if spec.donor_key is not None:
        columns[spec.donor_key] = _obs_column(obj, ref, spec.donor_key, "donor_key", source)
    for key in spec.covariate_keys:
        columns.setdefault(key, _obs_column(obj, ref, key, "covariate_keys", source))
    for key in spec.label_keys:
        columns.setdefault(key, _obs_column(obj, ref, key, "label_keys", source))
    obs = pd.DataFrame({k: c.reset_index(drop=True).copy() for k, c in columns.items()})
    obs.index = ref_names.copy()

    donor_codes = None
    if spec.donor_key is not None:
        donor_col = columns[spec.donor_key]
        _nan_check(donor_col, ref_names, spec.donor_key, "donor_key", source, "donor id")
        if donor_index is None:
            donor_index = DonorIndex.from_values(donor_col.to_numpy(), source,
                                                 f"obs['{spec.donor_key}']")
        donor_codes = donor_index.encode(donor_col.to_numpy(), source, f"obs['{spec.donor_key}']")
    elif donor_index is not None:
        raise InputError(source, "donor_key", "a donor index is given but the spec has no donor key",
                         "name the .obs column with the donor ids (donor_key= in Python, "
                         "--donor-key on the CLI)")

    if covariate_categories is not None:
        given = set(covariate_categories)
        if given != set(spec.covariate_keys):
            raise InputError(source, "covariate_categories",
                             f"categories are given for {sorted(given)} but the spec's "
                             f"covariate_keys are {spec.covariate_keys}",
                             "use the spec the model was fitted with, or its categories")
    categories_out: dict[str, list[str]] = {}
    code_cols = []
    for key in spec.covariate_keys:
        col = columns[key]
        _nan_check(col, ref_names, key, "covariate_keys", source, f"'{key}' value")
        given = None if covariate_categories is None else [str(c) for c in
                                                           covariate_categories[key]]
        categories_out[key], codes = _covariate_codes(col, key, given, source)
        code_cols.append(codes)
    covariate_codes = (np.stack(code_cols, axis=1) if code_cols
                       else np.zeros((ref.n_obs, 0), dtype=np.int64))

    matrices: dict[str, _CountMatrix] = {}
    present: dict[str, np.ndarray] = {}
    size_factors: dict[str, np.ndarray] = {}
    feature_names: dict[str, pd.Index] = {}
    for name, layer in spec.modalities.items():
        adata = mods[name]
        field = _matrix_field(is_mu, name, layer)
        if backed and layer is not None:
            raise InputError(source, field, f"backed reading keeps only .X on disk, and anndata loads "
                             f"the layers of a backed file into memory: the layer '{layer}' of "
                             f"modality '{name}' would not stay on disk",
                             f"store the counts in .X and save the file (adata.X = "
                             f"adata.layers['{layer}']; adata.write_h5ad(...)), then read it backed "
                             "without a layer (no --layer / modalities layer None); or leave out "
                             "--backed (backed=False) to read the layer in memory")
        _check_unique_features(pd.Index(adata.var_names), source, name, is_mu)
        matrix = _CountMatrix(_count_source(adata, name, layer, source, field), source, field,
                              notes)
        if matrix.shape != (adata.n_obs, adata.n_vars):
            raise InputError(source, field, f"shape {matrix.shape} does not match the "
                             f"modality's {adata.n_obs} cells x {adata.n_vars} features",
                             "store a cells x features matrix")
        if matrix.shape[1] == 0:
            raise InputError(source, field, f"modality '{name}' has no features",
                             "give at least one feature, or drop the modality from the spec")
        continuous = name in spec.continuous_modalities
        totals = _value_totals(matrix, source, name, continuous, adata.obs_names, adata.var_names,
                               adata=adata, layer=layer)
        if continuous:
            totals = np.ones_like(totals)
        zero = totals == 0
        if zero.any():
            ids = pd.Index(adata.obs_names)[zero]
            fix = ("filter them before reading, e.g. sc.pp.filter_cells(adata, min_counts=1)"
                   if not is_mu else
                   "drop them from every modality so the cells stay aligned, e.g. "
                   "mdata = mdata[~mdata.obs_names.isin(bad_ids)].copy() with bad_ids the "
                   "cells with zero total")
            raise InputError(source, field,
                             f"{int(zero.sum()):,} of {zero.size:,} cells have zero total count "
                             f"in modality '{name}', e.g. {_preview(ids.tolist(), 10)}",
                             fix)
        mapping = rows_of_cell[name]
        if mapping is None:
            present[name] = np.ones(ref.n_obs, dtype=bool)
            size_factors[name] = totals
        else:
            present[name] = mapping >= 0
            sf = np.ones(ref.n_obs, dtype=np.float64)
            sf[present[name]] = totals[mapping[present[name]]]
            size_factors[name] = sf
        matrices[name] = matrix
        feature_names[name] = pd.Index(adata.var_names).copy()

    counts = np.bincount(donor_codes, minlength=len(donor_index)) if donor_codes is not None else []
    single = [donor_index.ids[k] for k in np.flatnonzero(np.asarray(counts) == 1)]
    if single:
        warnings.warn(
            f"{source}: field 'obs['{spec.donor_key}']': {len(single)} donor(s) have a single "
            f"cell: {_preview(single)}; their donor factors rest on one cell",
            stacklevel=2)

    return SingleCellDataset(
        source=source, spec=spec, matrices=matrices, rows_of_cell=rows_of_cell,
        cells=np.arange(ref.n_obs, dtype=np.int64), obs=obs, donor_index=donor_index,
        donor_codes=donor_codes, covariate_categories=categories_out,
        covariate_codes=covariate_codes, present=present, size_factors=size_factors,
        feature_names=feature_names, notes=notes)
