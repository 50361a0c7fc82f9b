"""Figures of a fit: loss curves."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_loss_curves(history: pd.DataFrame, path: str | Path) -> Path:
    """Total per-cell loss (and the validation cells' loss when recorded) and each ELBO term /
    penalty per epoch, stage starts marked. Writes a PNG."""
    terms = [c for c in history.columns if c.startswith(("nll_", "kl_", "penalty_"))]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)  # draws off-screen: the caller's pyplot backend is left alone
    axes = fig.subplots(1, 2)
    axes[0].plot(history["epoch"], history["loss"], color="black", label="training cells")
    if "validation_loss" in history.columns:
        axes[0].plot(history["epoch"], history["validation_loss"], color="tab:orange", label="validation cells")
        axes[0].legend(fontsize=7, loc="upper right")
    axes[0].set(title="loss (per cell)", xlabel="epoch", ylabel="-ELBO + penalties")
    for term in terms:
        values = history[term]
        axes[1].plot(history["epoch"], values.abs(), label=term)
    axes[1].set(title="terms (per cell)", xlabel="epoch", yscale="log")
    axes[1].legend(fontsize=7)
    for ax in axes:
        for _, rows in history.groupby("stage", sort=False):
            ax.axvline(rows["epoch"].iloc[0], color="grey", lw=0.5, ls="--")
            ax.text(rows["epoch"].iloc[0], 1.0, f" {rows['stage'].iloc[0]}", transform=ax.get_xaxis_transform(),
                    fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
