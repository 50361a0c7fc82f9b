"""The chapter-4 evaluation of seed 004 for paired RNA + ATAC models: latent classification
and agreement, binary peak prediction at a swept threshold, gene reconstruction correlation.

Works for any model of the zoo fitted to two modalities (genes, peaks) through its
conventions only: per-cell latents from ``model.encode_latents(batch)`` (or ``model.encode``),
and predictions read from the ``obs_<modality>`` sites with every latent at its posterior
mean (the guide's locations; :func:`~pyro_livi.analysis.heldout.posterior_mean`). For GPG the
peak prediction is Decoder 1 on z1 (genes -> peaks) and the gene output Decoder 2 on z2; for
PGP the reverse; for the dual VAE each branch's own reconstruction (seed 004, section 4.1).

- **Latent classification** (section 4.2.2): a logistic regression (scikit-learn) fitted on the
  latent of a random stratified part of the cells, predicting the labels of the held-out
  cells; weighted precision, recall and F1 (each class weighted by its number of held-out
  cells). The thesis fits and scores on the same cells; holding cells out measures
  generalisation instead of memorisation. Each latent dimension is standardised on the
  training cells first (``StandardScaler``), so that the score does not depend on the
  latent's scale: a regularised logistic regression on a latent whose posterior means are
  small (e.g. shrunk by the KL term) would otherwise predict the majority class whatever
  their structure.
- **Agreement** (section 4.2.3): ARI and AMI between the classifier's held-out predictions and
  the reference labels.
- **Peak prediction** (section 4.3): the observed peaks binarised (value != 0), the predicted
  values thresholded at every candidate of a sweep, binary precision, recall and F1 over all
  (cell, peak) entries; the threshold with the highest F1 is reported. The thesis sweeps 0 to 3
  in steps of 0.3 (:data:`THESIS_THRESHOLDS`), for outputs on the log1p scale; predictions
  that are probabilities (``bernoulli``) are swept over :data:`PROBABILITY_THRESHOLDS`. The
  shuffled baseline thresholds the predictions of other cells (rows permuted within each
  minibatch) and reports its own best F1.
- **Gene reconstruction** (section 4.4): Pearson correlation between each cell's observed and
  predicted gene vectors in the log1p space of the model inputs (continuous data as they are;
  counts as log1p(x / l_i * L), L the median total count, the predicted expected counts
  alike), then the mean over cells (cells with a constant vector are left out).

Everything is streamed over minibatches of cells: no cells x peaks matrix is held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..data.loader import MinibatchLoader
from ..errors import InputError
from .denoise import _denoised_mean
from .heldout import replayed_model_trace

#: the thesis's threshold sweep for peak outputs on the log1p scale: 0, 0.3, ..., 3.0
THESIS_THRESHOLDS = tuple(round(0.3 * k, 1) for k in range(11))
#: threshold sweep for predicted probabilities: 0.05, 0.10, ..., 0.95
PROBABILITY_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))


# ------------------------------------------------------------------------------- latents
def latent_classification(latent, labels, *, test_size: float = 0.3, seed: int = 0,
                          max_iter: int = 2000) -> dict:
    """Weighted F1 and agreement of a logistic regression from a latent (each dimension
    standardised on the training cells) to labels, on held-out cells (seed 004, sections
    4.2.2-4.2.3).

    latent : (n_cells, K) array; labels : (n_cells,) labels (any hashable values).
    ``test_size``: fraction of cells held out (stratified by label when every label has at
    least two cells), ``seed`` the split's seed.

    Returns {"precision", "recall", "f1" (weighted averages over the held-out cells),
    "accuracy", "ari", "ami" (between held-out predictions and labels), "n_train", "n_test"}.
    Raises InputError on mismatched shapes, non-finite latents or fewer than two labels.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.metrics import (accuracy_score, adjusted_mutual_info_score, adjusted_rand_score,
                                 precision_recall_fscore_support)
    from sklearn.model_selection import train_test_split

    latent = np.asarray(latent, dtype=np.float64)
    labels = np.asarray(labels)
    if latent.ndim != 2 or latent.shape[0] != labels.shape[0]:
        raise InputError("<arguments>", "latent", f"shape {latent.shape} does not match {labels.shape[0]} labels",
                         "give one latent row per labelled cell")
    if not np.isfinite(latent).all():
        raise InputError("<arguments>", "latent", "holds non-finite values", "give a finite latent")
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2:
        raise InputError("<arguments>", "labels", f"only one label ({classes.tolist()})", "give two or more labels")
    stratify = labels if counts.min() >= 2 else None
    train, test = train_test_split(np.arange(labels.size), test_size=test_size, random_state=seed, stratify=stratify)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    clf.fit(latent[train], labels[train])
    pred = clf.predict(latent[test])
    precision, recall, f1, _ = precision_recall_fscore_support(labels[test], pred, average="weighted",
                                                               zero_division=0)
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1),
            "accuracy": float(accuracy_score(labels[test], pred)),
            "ari": float(adjusted_rand_score(labels[test], pred)),
            "ami": float(adjusted_mutual_info_score(labels[test], pred)),
            "n_train": int(train.size), "n_test": int(test.size)}


# ------------------------------------------------------------------------------- peaks
class PeakSweep:
    """Streaming binary precision / recall / F1 of thresholded predictions over a sweep.

    ``add(predicted, observed)`` takes a block of cells (B, P) (arrays or tensors);
    ``table()`` returns one row per threshold: threshold, tp, fp, fn, precision, recall, f1
    (precision 0 when nothing is predicted open, recall 0 when nothing is open)."""

    def __init__(self, thresholds):
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.tp = np.zeros(self.thresholds.size, dtype=np.int64)
        self.fp = np.zeros_like(self.tp)
        self.fn = np.zeros_like(self.tp)

    def add(self, predicted, observed) -> None:
        predicted = torch.as_tensor(predicted)
        truth = torch.as_tensor(observed) != 0
        n_true = int(truth.sum())
        for k, t in enumerate(self.thresholds):
            called = predicted > t
            tp = int((called & truth).sum())
            self.tp[k] += tp
            self.fp[k] += int(called.sum()) - tp
            self.fn[k] += n_true - tp

    def table(self) -> pd.DataFrame:
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(self.tp + self.fp > 0, self.tp / (self.tp + self.fp), 0.0)
            recall = np.where(self.tp + self.fn > 0, self.tp / (self.tp + self.fn), 0.0)
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        return pd.DataFrame({"threshold": self.thresholds, "tp": self.tp, "fp": self.fp, "fn": self.fn,
                             "precision": precision, "recall": recall, "f1": f1})


def best_threshold(table: pd.DataFrame) -> pd.Series:
    """The row of a :class:`PeakSweep` table with the highest F1 (the lowest threshold on ties),
    the thesis's "best decision threshold"."""
    return table.loc[int(np.argmax(table["f1"].to_numpy()))]


def peak_prediction_f1(predicted, observed, thresholds=THESIS_THRESHOLDS) -> tuple[pd.Series, pd.DataFrame]:
    """(best row, full sweep table) of binary peak prediction for in-memory arrays (n, P);
    see :class:`PeakSweep`."""
    sweep = PeakSweep(thresholds)
    sweep.add(predicted, observed)
    table = sweep.table()
    return best_threshold(table), table


# ------------------------------------------------------------------------------- genes
def cell_pearson(observed, predicted) -> np.ndarray:
    """Pearson correlation of each row of ``observed`` with the same row of ``predicted``
    (both (n, G)); NaN for rows where either is constant."""
    x = np.asarray(observed, dtype=np.float64)
    y = np.asarray(predicted, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denom = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, (x * y).sum(1) / denom, np.nan)


# ------------------------------------------------------------------------------- whole model
@dataclass
class MultiomeEvaluation:
    """Result of :func:`evaluate_multiome`.

    classification : one row per latent (index: latent name, e.g. z1, z2, z_rna, z_atac) with
        precision, recall, f1, accuracy, ari, ami, n_train, n_test.
    peaks : the sweep table of the model's peak predictions; ``peaks_best`` its best row.
    peaks_shuffled : the same for the shuffled baseline; ``peaks_shuffled_best`` its best row.
    gene_correlation : Pearson correlation per cell (n_cells,), NaN for constant rows;
        ``gene_correlation_mean`` the mean over the other cells.
    """

    classification: pd.DataFrame
    peaks: pd.DataFrame
    peaks_best: pd.Series
    peaks_shuffled: pd.DataFrame
    peaks_shuffled_best: pd.Series
    gene_correlation: np.ndarray
    gene_correlation_mean: float
    notes: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """One flat dict: f1/ari/ami of each latent, peak precision/recall/F1/threshold and the
        shuffled F1, mean gene correlation."""
        out = {}
        for name, row in self.classification.iterrows():
            for k in ("precision", "recall", "f1", "ari", "ami"):
                out[f"{name}_{k}"] = float(row[k])
        for k in ("precision", "recall", "f1", "threshold"):
            out[f"peak_{k}"] = float(self.peaks_best[k])
        out["peak_f1_shuffled"] = float(self.peaks_shuffled_best["f1"])
        out["gene_pearson"] = float(self.gene_correlation_mean)
        return out


def _site_kind(fn) -> str:
    from torch.distributions import Bernoulli

    from .denoise import _elementwise

    inner = _elementwise(fn)
    return "probability" if isinstance(inner, Bernoulli) else "value"


@torch.no_grad()
def evaluate_multiome(model, dataset, labels, *, genes: str | None = None, peaks: str | None = None,
                      thresholds=None, test_size: float = 0.3, seed: int = 0,
                      batch_size: int = 512) -> MultiomeEvaluation:
    """The chapter-4 evaluation of a fitted two-modality model on ``dataset`` (see the module
    docstring).

    labels : (n_cells,) reference labels in dataset order (e.g. planted or RNA-derived cell
        types), or the name of a label column of the dataset (``dataset.obs``).
    genes, peaks : the gene and peak modalities (default: the first and second).
    thresholds : the peak sweep (default: :data:`PROBABILITY_THRESHOLDS` when the peak site
        is a Bernoulli, else :data:`THESIS_THRESHOLDS`).

    Raises InputError for unknown modalities or labels of the wrong length.
    """
    genes = genes or dataset.modalities[0]
    peaks = peaks or (dataset.modalities[1] if len(dataset.modalities) > 1 else None)
    for name, m in (("genes", genes), ("peaks", peaks)):
        if m not in dataset.modalities:
            raise InputError(dataset.source, name, f"unknown modality {m!r}", f"use one of {dataset.modalities}")
    if isinstance(labels, str):
        if labels not in dataset.obs.columns:
            raise InputError(dataset.source, labels, "no such label column",
                             f"read it as a label (label_keys=['{labels}']); columns: {list(dataset.obs.columns)}")
        labels = dataset.obs[labels].to_numpy()
    labels = np.asarray(labels)
    if labels.shape[0] != dataset.n_cells:
        raise InputError("<arguments>", "labels", f"{labels.shape[0]} labels for {dataset.n_cells} cells",
                         "give one label per cell, in dataset order")
    continuous = set(dataset.spec.continuous_modalities)
    target = float(np.median(dataset.size_factors[genes])) if genes not in continuous else 1.0
    rng = np.random.default_rng(seed)

    latents: dict[str, list[np.ndarray]] = {}
    correlations = []
    sweep = shuffled = None
    kind = None
    was_training = model.training
    model.eval()
    try:
        for batch in MinibatchLoader(dataset, batch_size=batch_size, shuffle=False):
            if hasattr(model, "encode_latents"):
                found = model.encode_latents(batch)
            else:
                found = {getattr(model, "latent_site", "z"): model.encode(batch)}
            for name, (loc, _) in found.items():
                latents.setdefault(name, []).append(loc.cpu().numpy())
            trace = replayed_model_trace(model, batch)
            # peaks
            site = trace.nodes[f"obs_{peaks}"]
            if kind is None:
                kind = _site_kind(site["fn"])
                grid = thresholds if thresholds is not None else (
                    PROBABILITY_THRESHOLDS if kind == "probability" else THESIS_THRESHOLDS)
                sweep, shuffled = PeakSweep(grid), PeakSweep(grid)
            pred = _denoised_mean(site["fn"]).expand(batch.x[peaks].shape)
            if kind == "value" and peaks not in continuous:
                pred = torch.log1p(pred)  # expected counts -> the log1p scale of the thesis's sweep
            sweep.add(pred, batch.x[peaks])
            shuffled.add(pred[torch.as_tensor(rng.permutation(batch.size))], batch.x[peaks])
            # genes
            mean = _denoised_mean(trace.nodes[f"obs_{genes}"]["fn"]).expand(batch.x[genes].shape)
            x = batch.x[genes]
            if genes not in continuous:
                scale = target / batch.size_factor[genes][:, None]
                x, mean = torch.log1p(x * scale), torch.log1p(mean * scale)
            correlations.append(cell_pearson(x.cpu().numpy(), mean.cpu().numpy()))
    finally:
        model.train(was_training)
    rows = {name: latent_classification(np.concatenate(parts), labels, test_size=test_size, seed=seed)
            for name, parts in latents.items()}
    classification = pd.DataFrame(rows).T
    table, table_shuffled = sweep.table(), shuffled.table()
    corr = np.concatenate(correlations)
    return MultiomeEvaluation(
        classification=classification, peaks=table, peaks_best=best_threshold(table),
        peaks_shuffled=table_shuffled, peaks_shuffled_best=best_threshold(table_shuffled),
        gene_correlation=corr, gene_correlation_mean=float(np.nanmean(corr)) if np.isfinite(corr).any() else float("nan"),
        notes={"peak_prediction": kind, "n_constant_cells": int(np.isnan(corr).sum())})
