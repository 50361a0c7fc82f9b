"""Cross-modal imputation and per-modality embeddings of multimodal models whose cells may lack
a modality (the Multigrate-like model, :class:`pyro_livi.models.Multigrate`).

A cell's joint latent is the posterior mean of z given the modalities the cell has (product of
the prior expert and those modalities' experts); decoding it with another modality's decoder
gives that modality's expected values, E[x^m | z, s], for a cell that was never measured in m.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import torch


def _cell_rows(dataset, cells, modality: str) -> np.ndarray:
    """Rows of ``cells`` in ``dataset``: None (cells lacking ``modality``), a boolean mask
    (n_cells,), integer rows or cell ids."""
    if cells is None:
        return np.flatnonzero(~np.asarray(dataset.present[modality]))
    values = np.asarray(cells)
    if values.dtype == bool:
        if values.shape != (dataset.n_cells,):
            raise ValueError(f"a boolean mask of cells must have shape ({dataset.n_cells},), got {values.shape}")
        return np.flatnonzero(values)
    if np.issubdtype(values.dtype, np.integer):
        if values.size and (values.min() < 0 or values.max() >= dataset.n_cells):
            raise ValueError(f"cell rows must lie in [0, {dataset.n_cells}); got {values.min()}..{values.max()}")
        return values.astype(np.int64)
    rows = pd.Index(dataset.obs_names).get_indexer(values.astype(str))
    if (rows < 0).any():
        missing = values[rows < 0][:5].tolist()
        raise ValueError(f"cells {missing} are not in the dataset")
    return rows


def _covariate_override(dataset, covariates: Mapping[str, str] | None) -> dict[int, int]:
    """{covariate position: category code} from {covariate key: category}."""
    if not covariates:
        return {}
    keys = list(dataset.covariate_categories)
    out = {}
    for key, category in covariates.items():
        if key not in keys:
            raise ValueError(f"covariate {key!r} is not one of the dataset's covariate keys {keys}")
        categories = [str(c) for c in dataset.covariate_categories[key]]
        if str(category) not in categories:
            raise ValueError(f"covariate {key!r} has no category {category!r}; its categories are {categories}")
        out[keys.index(key)] = categories.index(str(category))
    return out


@torch.no_grad()
def impute_modality(model, dataset, modality: str, *, cells=None, library_size: float = 1e4,
                    covariates: Mapping[str, str] | None = None, batch_size: int = 4096) -> pd.DataFrame:
    """Expected values of modality ``modality`` decoded from each cell's joint latent.

    Parameters
    ----------
    model : a fitted model with ``encode(batch)`` (joint posterior) and
        ``expected_value(z, covariates, modality, size_factor)``, e.g. Multigrate.
    dataset : the :class:`~pyro_livi.data.SingleCellDataset` the model was fitted on (or one
        read with the same spec and covariate categories).
    modality : the modality to impute, one of ``model.modalities``.
    cells : which cells: None (default: the cells lacking ``modality``), a boolean mask
        (n_cells,), integer rows or cell ids. Cells that have the modality may be given too
        (their values are then reconstructions, their joint latent including the modality).
    library_size : total count, in counts, of the imputed cells in ``modality`` for count
        likelihoods (``nb``, ``zinb``, ``poisson``, ``nb_mixture``): the values are expected
        counts per ``library_size`` counts (default 1e4, the scale of log-normalisation).
        Ignored by ``normal`` (values in the modality's units, e.g. CLR) and ``bernoulli``
        (values are P(x = 1)).
    covariates : {covariate key: category} to decode every cell as if it belonged to that
        category (e.g. the batch whose panel measured the modality; by default each cell's own
        categories, with which a conditioned decoder may never have seen the modality).

    Returns
    -------
    DataFrame, rows = cell ids (index name "cell"), columns = the modality's feature names,
    float values (expected counts, modality units, or probabilities as above).

    Raises
    ------
    ValueError : unknown modality, cells or covariate category; TypeError : a model that
    cannot decode (no ``expected_value``).
    """
    if not hasattr(model, "expected_value"):
        raise TypeError(f"{type(model).__name__} has no expected_value(z, covariates, modality, size_factor); "
                        "imputation needs a model that decodes a joint latent into every modality, e.g. multigrate")
    if modality not in model.modalities:
        raise ValueError(f"modality {modality!r} is not one of the model's {list(model.modalities)}")
    if library_size <= 0:
        raise ValueError(f"library_size must be > 0 counts, got {library_size}")
    rows = _cell_rows(dataset, cells, modality)
    override = _covariate_override(dataset, covariates)
    was_training = model.training
    model.eval()
    parts = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = dataset.batch(rows[start:start + batch_size])
            loc, _ = model.encode(batch)
            codes = batch.covariates.clone()
            for k, code in override.items():
                codes[:, k] = code
            size = torch.full((batch.size,), float(library_size))
            parts.append(model.expected_value(loc, codes, modality, size).cpu().numpy())
    finally:
        model.train(was_training)
    values = np.concatenate(parts) if parts else np.zeros((0, len(dataset.feature_names[modality])), np.float32)
    return pd.DataFrame(values, index=pd.Index(np.asarray(dataset.obs_names)[rows], name="cell"),
                        columns=pd.Index(dataset.feature_names[modality], name="feature"))


@torch.no_grad()
def modality_latent_tables(model, dataset, *, batch_size: int = 4096) -> dict[str, pd.DataFrame]:
    """Posterior mean of each modality's own expert, {"latent_<modality>": table}: rows = cell
    ids, columns ``z_<modality>_0..``, NaN for the cells lacking the modality. Read from
    ``model.encode_latents`` (keys ``"z_<modality>"``); empty for models without it."""
    if not hasattr(model, "encode_latents"):
        return {}
    parts: dict[str, list[np.ndarray]] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, dataset.n_cells, batch_size):
            batch = dataset.batch(np.arange(start, min(start + batch_size, dataset.n_cells)))
            for name, (loc, _) in model.encode_latents(batch).items():
                if name.startswith("z_") and name[2:] in model.modalities:
                    parts.setdefault(name, []).append(loc.cpu().numpy())
    finally:
        model.train(was_training)
    tables = {}
    for name, values in parts.items():
        values = np.concatenate(values)
        tables[f"latent_{name[2:]}"] = pd.DataFrame(
            values, index=pd.Index(dataset.obs_names, name="cell"),
            columns=[f"{name}_{k}" for k in range(values.shape[1])])
    return tables
