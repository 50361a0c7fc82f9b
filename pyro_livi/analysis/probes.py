"""Linear probes: how well a label (cell type, donor, ...) can be read off a latent.

A probe is a multinomial logistic regression (scikit-learn, on standardised latent
coordinates) trained on a stratified random part of the cells and scored on the rest, repeated
over several seeds. High accuracy for cell type means the latent holds cell identity; high
accuracy for donor means donor identity leaks into it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import InputError

__all__ = ["ProbeResult", "probe", "probe_table"]


@dataclass
class ProbeResult:
    """Scores of one probe, averaged over seeds.

    Attributes
    ----------
    label : str | None
        Name of the label probed.
    accuracy, accuracy_std : float
        Mean and standard deviation over seeds of the held-out accuracy (fraction correct).
    balanced_accuracy, balanced_accuracy_std : float
        Same for the balanced accuracy (mean over classes of the per-class accuracy).
    chance : float
        Accuracy of always predicting the most frequent class (the fraction of that class).
    per_class : pandas.Series
        Class -> held-out accuracy (recall) of that class, mean over the seeds in which the
        class had test cells.
    n_cells, n_classes : int
        Cells and classes used.
    dropped : dict
        ``{"missing_label": k, "rare_classes": [...]}``: cells without a label and classes with
        fewer than two cells (a stratified split needs two), left out of the probe.
    per_seed : pandas.DataFrame
        One row per seed: seed, accuracy, balanced_accuracy.
    """

    label: str | None
    accuracy: float
    accuracy_std: float
    balanced_accuracy: float
    balanced_accuracy_std: float
    chance: float
    per_class: pd.Series
    n_cells: int
    n_classes: int
    dropped: dict = field(default_factory=dict)
    per_seed: pd.DataFrame = field(default_factory=pd.DataFrame)

    def as_dict(self) -> dict:
        """The scalar scores as a flat dict."""
        return {"label": self.label, "accuracy": self.accuracy, "accuracy_std": self.accuracy_std,
                "balanced_accuracy": self.balanced_accuracy,
                "balanced_accuracy_std": self.balanced_accuracy_std, "chance": self.chance,
                "n_cells": self.n_cells, "n_classes": self.n_classes}


def _clean(latent, labels, label_name):
    source = "<arguments>"
    latent = np.asarray(latent, dtype=np.float64)
    if latent.ndim != 2:
        raise InputError(source, "latent", f"expected a (cells, dimensions) matrix, got shape "
                         f"{latent.shape}", "give one row per cell")
    labels = pd.Series(np.asarray(labels, dtype=object))
    if len(labels) != latent.shape[0]:
        raise InputError(source, "labels", f"{len(labels)} labels for {latent.shape[0]} cells",
                         "give one label per row of the latent")
    if not np.all(np.isfinite(latent)):
        raise InputError(source, "latent", "contains NaN or inf",
                         "compute the latent from a model that trained without diverging")
    missing = labels.isna().to_numpy()
    counts = labels[~missing].value_counts()
    rare = sorted(map(str, counts.index[counts < 2]))
    keep = ~missing & labels.isin(counts.index[counts >= 2]).to_numpy()
    labels = labels[keep].astype(str).to_numpy()
    if np.unique(labels).size < 2:
        raise InputError(source, f"labels ({label_name})",
                         "fewer than two classes with at least two cells each",
                         "probe a label that takes at least two values")
    return latent[keep], labels, {"missing_label": int(missing.sum()), "rare_classes": rare}


def probe(latent, labels, *, seeds=(0, 1, 2, 3, 4), test_fraction: float = 0.2, C: float = 1.0,
          max_iter: int = 1000, label: str | None = None) -> ProbeResult:
    """Logistic-regression probe from ``latent`` to ``labels``, over several seeded splits.

    Parameters
    ----------
    latent : array, shape (n_cells, K)
        One row per cell (e.g. the posterior-mean cell state).
    labels : array-like, shape (n_cells,)
        Class of each cell (any hashable values, compared as strings; NaN = unlabelled).
    seeds : iterable of int
        One stratified train/test split (``train_test_split(stratify=labels,
        random_state=seed)``) and one fit per seed.
    test_fraction : float
        Fraction of cells scored in each split.
    C, max_iter : LogisticRegression's inverse regularisation strength and iteration cap.
    label : str, optional
        Name stored in the result.
    """
    X, y, dropped = _clean(latent, labels, label)
    classes = np.unique(y)
    n_test = int(np.ceil(test_fraction * len(y)))
    if n_test < classes.size or len(y) - n_test < classes.size:
        raise InputError("<arguments>", "test_fraction",
                         f"{len(y)} cells cannot be split into train and test sets that each hold "
                         f"all {classes.size} classes with test_fraction={test_fraction}",
                         "probe more cells or a label with fewer classes")
    rows, per_class = [], []
    for seed in seeds:
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=test_fraction, stratify=y, random_state=int(seed))
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        clf.fit(X_train, y_train)
        pred = clf.predict(X_test)
        rows.append({"seed": int(seed), "accuracy": accuracy_score(y_test, pred),
                     "balanced_accuracy": balanced_accuracy_score(y_test, pred)})
        cm = confusion_matrix(y_test, pred, labels=classes)
        support = cm.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class.append(np.where(support > 0, np.diag(cm) / support, np.nan))
    per_seed = pd.DataFrame(rows)
    with warnings.catch_warnings():  # a class that never reached a test set stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        class_accuracy = np.nanmean(np.vstack(per_class), axis=0)
    _, class_counts = np.unique(y, return_counts=True)
    return ProbeResult(
        label=label,
        accuracy=float(per_seed["accuracy"].mean()),
        accuracy_std=float(per_seed["accuracy"].std(ddof=0)),
        balanced_accuracy=float(per_seed["balanced_accuracy"].mean()),
        balanced_accuracy_std=float(per_seed["balanced_accuracy"].std(ddof=0)),
        chance=float(class_counts.max() / class_counts.sum()),
        per_class=pd.Series(class_accuracy, index=pd.Index(classes, name="class"), name="accuracy"),
        n_cells=int(len(y)),
        n_classes=int(classes.size),
        dropped=dropped,
        per_seed=per_seed,
    )


def probe_table(results: dict) -> pd.DataFrame:
    """Scalar scores of several probes, e.g. ``{(latent, label): ProbeResult}``, one row each."""
    rows = []
    for key, result in results.items():
        key = key if isinstance(key, tuple) else (key,)
        rows.append({"key": key, **result.as_dict()})
    table = pd.DataFrame(rows)
    if len(table) and all(len(k) == 2 for k in table["key"]):
        table.insert(0, "latent", [k[0] for k in table["key"]])
    return table.drop(columns="key")
