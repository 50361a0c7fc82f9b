"""A stable mapping between donor ids (strings) and integer codes 0..n_donors-1."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from pyro_livi.errors import InputError


def _as_string_ids(values, source: str, field: str) -> np.ndarray:
    """Donor ids as a 1-D object array of ``str``; missing values are an InputError."""
    series = pd.Series(np.asarray(values, dtype=object).ravel(), dtype=object)
    missing = series.isna().to_numpy()
    if missing.any():
        raise InputError(source, field,
                         f"{int(missing.sum())} missing donor id(s) (NaN/None) at position(s) "
                         f"{np.flatnonzero(missing)[:10].tolist()}",
                         "give every cell a donor id, or drop the cells without one")
    return series.astype(str).to_numpy(dtype=object)


def _preview(items, n: int = 10) -> str:
    items = list(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return f"{items[:n]}{more}"


class DonorIndex:
    """Donor id <-> integer code, in a fixed order.

    The codes index the rows of every donor-level latent (D, V, ...) of a model, so a fitted
    model keeps its index and re-applies it to new data with :meth:`encode`.

    Attributes
    ----------
    ids : list[str]
        Donor ids; ``ids[k]`` has code ``k``.
    """

    def __init__(self, ids: Iterable[str]):
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique().tolist()
            raise InputError("<donor index>", "ids", f"duplicate donor ids {_preview(dup)}",
                             "give each donor exactly once")
        self.ids = ids
        self._codes = {d: k for k, d in enumerate(ids)}

    @classmethod
    def from_values(cls, values, source: str = "<in-memory>", field: str = "donor") -> "DonorIndex":
        """Index of the sorted unique donor ids among ``values`` (converted to ``str``)."""
        ids = _as_string_ids(values, source, field)
        return cls(sorted(set(ids.tolist())))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, donor) -> bool:
        return str(donor) in self._codes

    def __eq__(self, other) -> bool:
        return isinstance(other, DonorIndex) and self.ids == other.ids

    def __repr__(self) -> str:
        return f"DonorIndex(n_donors={len(self)}, ids={_preview(self.ids, 5)})"

    def code(self, donor) -> int:
        """Integer code of one donor id; unknown id -> InputError."""
        key = str(donor)
        if key not in self._codes:
            raise InputError("<donor index>", "donor", f"unknown donor '{key}'",
                             f"use one of the {len(self)} donors the index holds")
        return self._codes[key]

    def encode(self, values, source: str = "<in-memory>", field: str = "donor") -> np.ndarray:
        """Integer codes of donor ids, shape (n,), int64.

        Ids are compared as strings. Ids not in the index raise an InputError naming them: a
        model trained on other donors has no donor factors for them.
        """
        ids = _as_string_ids(values, source, field)
        uniq, inverse = np.unique(ids.astype(str), return_inverse=True)
        unseen = [u for u in uniq.tolist() if u not in self._codes]
        if unseen:
            raise InputError(
                source, field,
                f"{len(unseen)} donor(s) not in the donor index: {_preview(unseen)}; the model "
                f"was trained on other donors ({len(self)} donors, e.g. {_preview(self.ids, 5)})",
                "keep only cells of donors the model was trained on, or fit a model that "
                "includes these donors")
        lookup = np.array([self._codes[u] for u in uniq.tolist()], dtype=np.int64)
        return lookup[inverse.ravel()] if len(ids) else np.zeros(0, dtype=np.int64)

    def to_dict(self) -> dict:
        """``{"ids": [...]}``, JSON-serialisable."""
        return {"ids": list(self.ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "DonorIndex":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict) or not isinstance(d.get("ids"), list):
            raise InputError("<donor index>", "ids", "expected a dict with a list 'ids'",
                             "pass the dict produced by DonorIndex.to_dict()")
        return cls(d["ids"])
