"""Posterior summaries of a fitted model as tables with the data's own ids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..data.loader import MinibatchLoader


def _per_cell(model, dataset, batch_size: int, compute) -> dict[str, np.ndarray]:
    """Run ``compute(batch)`` -> {name: array (..., B, K)} over the cells in dataset order, in eval
    mode without gradients; {name: array (..., n_cells, K)}. Each output array is allocated once
    and filled batch by batch: keeping one small array per batch between the batches' large
    temporaries fragments the heap, and the process then grows with the cells."""
    out: dict[str, np.ndarray] = {}
    start = 0
    model.eval()
    with torch.no_grad():
        for batch in MinibatchLoader(dataset, batch_size=batch_size, shuffle=False):
            for name, values in compute(batch).items():
                if name not in out:
                    out[name] = np.empty((*values.shape[:-2], dataset.n_cells, values.shape[-1]), values.dtype)
                out[name][..., start:start + batch.size, :] = values
            start += batch.size
    model.train()
    return out


def cell_state(model, dataset, *, batch_size: int = 4096, n_samples: int = 0, seed: int = 0) -> np.ndarray:
    """Cell-state latent of every cell, in dataset order.

    Returns the posterior mean, shape (n_cells, K_C), or with ``n_samples > 0`` posterior
    samples of shape (n_samples, n_cells, K_C).
    """
    generator = torch.Generator().manual_seed(seed)

    def compute(batch):
        loc, scale = model.encode(batch)
        if n_samples:
            loc = loc + scale * torch.randn((n_samples, *loc.shape), generator=generator)
        return {"latent": loc.numpy()}

    return _per_cell(model, dataset, batch_size, compute)["latent"]


def cell_state_table(model, dataset, **kwargs) -> pd.DataFrame:
    """Posterior mean of the per-cell latent (``model.encode``), rows = cell ids, columns
    named after the latent's sample site (``c_0..`` for the LIVI family's cell state)."""
    values = cell_state(model, dataset, **kwargs)
    return pd.DataFrame(values, index=dataset.obs_names,
                        columns=[f"{model.latent_site}_{k}" for k in range(values.shape[1])])


def specific_state_tables(model, dataset, *, batch_size: int = 4096) -> dict[str, pd.DataFrame]:
    """Posterior means of modality-specific latents, for models that have them (DMLIVI's
    ``s_<modality>`` through ``model.encode_latents``): {"specific_state_<modality>": table},
    rows = cell ids, columns ``s_<modality>_0..``. Empty for other models."""
    if not hasattr(model, "encode_latents"):
        return {}
    values = _per_cell(model, dataset, batch_size, lambda batch: {
        name: loc.cpu().numpy() for name, (loc, _) in model.encode_latents(batch).items() if name.startswith("s_")})
    return {f"specific_state_{name[2:]}": pd.DataFrame(v, index=dataset.obs_names,
                                                       columns=[f"{name}_{k}" for k in range(v.shape[1])])
            for name, v in values.items()}


def donor_factor_tables(model, donor_index) -> dict[str, pd.DataFrame]:
    """Donor x factor tables (rows = donor ids as in the data), e.g. {"D": ..., "V": ...}."""
    return {
        name: pd.DataFrame(values.cpu().numpy(), index=pd.Index(donor_index.ids, name="donor"),
                           columns=[f"{name}_{k}" for k in range(values.shape[1])])
        for name, values in model.donor_factors().items()
    }


def assignment_table(model) -> pd.DataFrame:
    """A = sigmoid(A_logits), rows = cell-state factors (``model.A_row_names`` when the model
    has them), columns = interaction factors."""
    A = model.A.detach().cpu().numpy()
    rows = getattr(model, "A_row_names", None) or [f"c_{k}" for k in range(A.shape[0])]
    return pd.DataFrame(A, index=rows,
                        columns=[f"D_{k}" for k in range(A.shape[1])])


def loading_tables(model, feature_names: dict) -> dict[str, pd.DataFrame]:
    """Gene loadings of each decoder: features x factors, one table per decoder."""
    tables = {}
    for name, W in model.loadings().items():
        modality = name.split("__")[1] if "__" in name else model.modalities[0]
        prefix = {"W_C": "c", "W_DxC": "D", "W_V": "V", "W_S": f"s_{modality}",
                  "W": model.latent_site}.get(name.split("__")[0], name)
        W = W.cpu().numpy()
        tables[name] = pd.DataFrame(W.T, index=pd.Index(feature_names[modality], name="feature"),
                                    columns=[f"{prefix}_{k}" for k in range(W.shape[0])])
    return tables


def dispersion_tables(model, feature_names: dict) -> dict[str, pd.DataFrame]:
    """Per-feature likelihood parameters (e.g. theta), one table per modality."""
    return {
        modality: pd.DataFrame({k: v.cpu().numpy() for k, v in params.items()},
                               index=pd.Index(feature_names[modality], name="feature"))
        for modality, params in model.dispersions().items()
    }


def output_tables(model, dataset) -> dict[str, pd.DataFrame]:
    """Every table a model declares in ``model.outputs``, by file stem, each indexed by the
    data's own ids: the per-cell latent (``model.latent_name``, rows = cell ids),
    ``specific_state_<modality>``, ``latent_<modality>`` (each modality's own expert),
    ``variance_explained`` (factor x view R2, rows = factor names) and
    ``variance_explained_total`` (rows = views), donor factors ``D`` and ``V`` (rows = donor ids), the
    assignment ``A``, ``loadings_<decoder>`` and ``dispersions_<modality>`` (rows = feature
    names), ``denoised_protein`` and ``protein_foreground_probability`` (totalVI-like models;
    rows = cell ids, columns = proteins)."""
    tables: dict[str, pd.DataFrame] = {}
    for kind in model.outputs:
        if kind == "latent":
            tables[model.latent_name] = cell_state_table(model, dataset)
        elif kind == "specific_state":
            tables.update(specific_state_tables(model, dataset))
        elif kind == "variance_explained":
            from .factors import variance_explained

            r2 = variance_explained(model, dataset)
            tables["variance_explained"] = r2.per_factor.assign(
                inactive=[f in r2.inactive for f in r2.per_factor.index])
            tables["variance_explained_total"] = r2.total.rename("r2").to_frame()
        elif kind == "modality_latent":
            from .imputation import modality_latent_tables

            tables.update(modality_latent_tables(model, dataset))
        elif kind == "donor_factors":
            tables.update(donor_factor_tables(model, dataset.donor_index))
        elif kind == "assignment":
            tables["A"] = assignment_table(model)
        elif kind == "loadings":
            tables.update({f"loadings_{k}": v for k, v in loading_tables(model, dataset.feature_names).items()})
        elif kind == "protein_foreground":
            from .totalvi_outputs import totalvi_tables

            tables.update(totalvi_tables(model, dataset, rna=False))
        elif kind == "dispersions":
            tables.update({f"dispersions_{k}": v for k, v in dispersion_tables(model, dataset.feature_names).items()})
        else:
            raise ValueError(f"{type(model).__name__} declares an unknown output {kind!r}")
    return tables
