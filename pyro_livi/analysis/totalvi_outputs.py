"""What a user reads from a fitted :class:`~pyro_livi.models.TOTALVI`, as tables indexed by the
data's cell ids and feature names (Gayoso et al. 2021, "denoised" expression and foreground
probabilities; scvi-tools ``TOTALVI.get_normalized_expression`` /
``get_protein_foreground_probability``).

For cell n with posterior q(z_n | x_n, y_n, s_n) and q(log beta_n | z_n, s_n):

- latent: the posterior mean E_q[z_n], (n_cells, K);
- denoised RNA: rho_ng * L, the decoded expression proportions times a chosen library size L
  (the cell's observed total count by default, or any fixed number of counts, e.g. 1e4);
- denoised protein foreground: (1 - pi_nt) beta_nt alpha_nt, in counts; with
  ``include_background=True`` the full mean pi_nt beta_nt + (1 - pi_nt) beta_nt alpha_nt;
- protein foreground probability: 1 - pi_nt = P(y_nt is foreground | z_n, s_n).

Proteins a cell's batch did not measure (and cells without the protein modality) are decoded
like every other (imputed from z_n); :func:`protein_measured` says which values were measured.
Every quantity is either the plug-in value at the posterior means (``n_samples=0``) or the
average over ``n_samples`` joint draws of (z, log beta) from the guide.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..data.loader import MinibatchLoader
from .latents import cell_state_table

__all__ = ["latent", "totalvi_tables", "protein_measured", "denoised_rna", "denoised_protein",
           "protein_foreground_probability", "write_totalvi_tables"]


def latent(model, dataset, *, batch_size: int = 1024) -> pd.DataFrame:
    """Posterior mean of z, rows = cell ids, columns ``z_0..z_{K-1}``."""
    return cell_state_table(model, dataset, batch_size=batch_size)


def _check_model(model) -> None:
    if not all(hasattr(model, a) for a in ("decode", "background_posterior", "observed_mask")):
        raise TypeError(f"{type(model).__name__} is not a TOTALVI model (no decode / background_posterior)")


@torch.no_grad()
def totalvi_tables(model, dataset, *, library_size: float | str = "observed", n_samples: int = 0,
                   include_background: bool = False, batch_size: int = 1024, seed: int = 0,
                   rna: bool = True) -> dict[str, pd.DataFrame]:
    """Denoised RNA, denoised protein and protein foreground probability of every cell.

    Parameters
    ----------
    model : TOTALVI
    dataset : SingleCellDataset the model was built for (same modalities and covariates).
    library_size : ``"observed"`` (the cell's total RNA count; with ``latent_library`` the
        posterior mean of l_n) or a positive number of counts applied to every cell.
    n_samples : 0 for plug-in values at the posterior means, else the number of guide draws
        averaged.
    include_background : add the background term pi beta to the denoised protein.
    rna : False leaves out the denoised RNA (a dense cells x genes table).

    Returns
    -------
    ``{"denoised_rna": (n_cells, G) counts, "denoised_protein": (n_cells, T) counts,
    "protein_foreground_probability": (n_cells, T) in [0, 1]}``, rows = cell ids, columns =
    feature names.
    """
    _check_model(model)
    if not (library_size == "observed" or (np.isscalar(library_size) and float(library_size) > 0)):
        raise ValueError(f"library_size must be 'observed' or a positive number, got {library_size!r}")
    rna, prot = model.modalities
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[np.ndarray]] = {"denoised_rna": [], "denoised_protein": [],
                                          "protein_foreground_probability": []}
    if not rna:
        del parts["denoised_rna"]
    was_training = model.training
    model.eval()
    try:
        for batch in MinibatchLoader(dataset, batch_size=batch_size, shuffle=False):
            loc, scale = model.encode(batch)
            if library_size != "observed":
                library = torch.full_like(batch.size_factor[rna], float(library_size))
            elif model.latent_library:
                l_loc, l_scale = model.encode_library(batch)
                library = torch.exp(l_loc + 0.5 * l_scale ** 2)
            else:
                library = batch.size_factor[rna]
            draws = max(n_samples, 1)
            acc = {k: 0.0 for k in parts}
            for _ in range(draws):
                z = loc if n_samples == 0 else loc + scale * torch.randn(loc.shape, generator=generator)
                b_loc, b_scale = model.background_posterior(z, batch)
                log_beta = b_loc if n_samples == 0 else b_loc + b_scale * torch.randn(b_loc.shape, generator=generator)
                out = model.decode(z, batch)
                beta = log_beta.exp()
                fore = torch.sigmoid(-out["mix_logits"])
                protein = fore * beta * out["alpha"]
                if include_background:
                    protein = protein + (1 - fore) * beta
                if rna:
                    acc["denoised_rna"] = acc["denoised_rna"] + out["rho"] * library[:, None]
                acc["denoised_protein"] = acc["denoised_protein"] + protein
                acc["protein_foreground_probability"] = acc["protein_foreground_probability"] + fore
            for k in parts:
                parts[k].append((acc[k] / draws).cpu().numpy())
    finally:
        model.train(was_training)
    names = {"denoised_rna": dataset.feature_names[rna], "denoised_protein": dataset.feature_names[prot],
             "protein_foreground_probability": dataset.feature_names[prot]}
    return {k: pd.DataFrame(np.concatenate(v), index=dataset.obs_names,
                            columns=pd.Index(list(map(str, names[k])), name="feature"))
            for k, v in parts.items()}


def denoised_rna(model, dataset, **kwargs) -> pd.DataFrame:
    """rho x library size, (n_cells, G) counts; keywords as :func:`totalvi_tables`."""
    return totalvi_tables(model, dataset, **kwargs)["denoised_rna"]


def denoised_protein(model, dataset, **kwargs) -> pd.DataFrame:
    """(1 - pi) beta alpha (optionally + pi beta), (n_cells, T) counts; keywords as :func:`totalvi_tables`."""
    return totalvi_tables(model, dataset, **kwargs)["denoised_protein"]


def protein_foreground_probability(model, dataset, **kwargs) -> pd.DataFrame:
    """1 - pi, (n_cells, T); keywords as :func:`totalvi_tables`."""
    return totalvi_tables(model, dataset, **kwargs)["protein_foreground_probability"]


@torch.no_grad()
def protein_measured(model, dataset, *, batch_size: int = 4096) -> pd.DataFrame:
    """(n_cells, T) booleans: True where the protein was measured for the cell (the cell has
    the protein modality and its batch's panel has the protein); False values are imputed."""
    _check_model(model)
    parts = [model.observed_mask(batch).cpu().numpy()
             for batch in MinibatchLoader(dataset, batch_size=batch_size, shuffle=False)]
    prot = model.modalities[1]
    return pd.DataFrame(np.concatenate(parts), index=dataset.obs_names,
                        columns=pd.Index(list(map(str, dataset.feature_names[prot])), name="feature"))


def write_totalvi_tables(model, dataset, out, **kwargs) -> dict[str, "pd.DataFrame"]:
    """Write ``latent.tsv``, ``denoised_rna.tsv``, ``denoised_protein.tsv``,
    ``protein_foreground_probability.tsv`` and ``protein_measured.tsv`` (rows = cell ids) to
    the folder ``out``; returns the tables. Keywords as :func:`totalvi_tables`."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"latent": latent(model, dataset), **totalvi_tables(model, dataset, **kwargs),
              "protein_measured": protein_measured(model, dataset)}
    for name, table in tables.items():
        table.to_csv(out / f"{name}.tsv", sep="\t")
    return tables
