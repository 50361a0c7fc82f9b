"""Figures of a fit: loss curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Donor sites whose guide can be a point mass (``donor_guide="delta"``): their ``kl_`` term
#: is then ``-log p(value)``, a log-prior term, not a KL divergence.
POINT_MASS_SITES = ("D", "V")


def term_labels(terms, model=None, *, weights: dict | None = None,
                point_mass=None) -> dict[str, str]:
    """Honest legend labels of history terms.

    ``weights``: modality -> weight lambda_m (default: ``model.modality_weights``); a term
    ``nll_obs_<m>`` with lambda_m != 1 is labelled ``lambda_m x nll_obs_<m> (weighted)``,
    since the history records it multiplied. ``point_mass``: latent sites with a point-mass
    (Delta) guide (default: D and V when ``model.donor_guide == "delta"``); their ``kl_``
    terms are labelled ``-log prior(<site>) (point estimate, not a KL)``.
    """
    if weights is None:
        weights = dict(getattr(model, "modality_weights", None) or {})
    if point_mass is None:
        point_mass = POINT_MASS_SITES if getattr(model, "donor_guide", None) == "delta" else ()
    labels = {}
    for term in terms:
        label = term
        if term.startswith("nll_obs_"):
            w = weights.get(term[len("nll_obs_"):], 1.0)
            if float(w) != 1.0:
                label = f"{float(w):g} x {term} (weighted)"
        elif term.startswith("kl_") and term[len("kl_"):] in set(point_mass):
            label = f"-log prior({term[len('kl_'):]}) (point estimate, not a KL)"
        labels[term] = label
    return labels


def plot_loss_curves(history: pd.DataFrame, path: str | Path, *, model=None,
                     weights: dict | None = None, point_mass=None) -> Path:
    """Total per-cell loss (and the validation cells' loss when recorded) and each ELBO term /
    penalty per epoch, stage starts marked. Writes a PNG.

    Terms are labelled as they enter the loss (:func:`term_labels`: weighted likelihood terms
    with their weight, point-estimate donor terms as log-prior terms); give ``model`` (or
    ``weights`` / ``point_mass``) for these labels. Legends sit outside the axes, so that
    they never cover a curve.
    """
    terms = [c for c in history.columns if c.startswith(("nll_", "kl_", "penalty_"))]
    labels = term_labels(terms, model, weights=weights, point_mass=point_mass)
    fig = Figure(figsize=(12, 4.2))
    FigureCanvasAgg(fig)  # draws off-screen: the caller's pyplot backend is left alone
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1]})
    axes[0].plot(history["epoch"], history["loss"], color="black", label="training cells")
    if "validation_loss" in history.columns:
        axes[0].plot(history["epoch"], history["validation_loss"], color="tab:orange", label="validation cells")
        axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=2, frameon=False)
    axes[0].set(title="loss (per cell)", xlabel="epoch", ylabel="-ELBO + penalties")
    for term in terms:
        values = history[term]
        axes[1].plot(history["epoch"], values.abs(), label=labels[term])
    axes[1].set(title="terms (per cell, as they enter the loss; |value|)", xlabel="epoch", yscale="log")
    if terms:
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                       frameon=False)
    for ax in axes:
        for _, rows in history.groupby("stage", sort=False):
            ax.axvline(rows["epoch"].iloc[0], color="grey", lw=0.5, ls="--")
            ax.text(rows["epoch"].iloc[0], 1.0, f" {rows['stage'].iloc[0]}", transform=ax.get_xaxis_transform(),
                    fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return Path(path)
