"""Variance explained by the factors of a linear factor model (MOFA-like), per factor and view.

Definition (mofapy2's, ``BayesNet.calculate_variance_explained``; Argelaguet et al. 2018,
Methods "Variance decomposition"): for view m with data Y_m (cells x features, centred per
feature, here by the model's intercept b_m), posterior means Z (cells x K) and W_m (K x G_m),

    R2_mk     = 1 - sum_ig (Y_mig - z_ik w_mkg)^2 / sum_ig Y_mig^2        factor k alone
    R2_m      = 1 - sum_ig (Y_mig - sum_k z_ik w_mkg)^2 / sum_ig Y_mig^2  all factors (total)

on uncentred sums of squares (no further centring of Y or of the prediction), over the cells
measured in view m. Per-factor values need not add up to the total (factors are not
orthogonal), and a factor that fits nothing can have a slightly negative R2_mk.

For views whose likelihood is not ``normal`` (no Gaussian residual), the same formula is
applied on the response scale with the model's link: Y_m replaced by x_m - g(b_m) and the
prediction by g(b_m + z_k w_mk) - g(b_m) (g = softplus). mofapy2 instead uses its
Gaussian pseudo-data for such views; both are 1 - residual / total sums of squares, but
they are not the same numbers.

Factors are ordered by their total R2 over views, sum_m R2_mk, largest first; a factor whose
R2_mk is below ``threshold`` in every view is reported inactive (mofapy2's criterion for
dropping factors, with its ``drop_factor_threshold`` in place of ``threshold``). A factor the
MOFA-like model switched off in a view (:meth:`pyro_livi.models.MOFA.active_factors`) has zero
loadings there, so its R2 there is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

__all__ = ["VarianceExplained", "r2_from_arrays", "variance_explained"]


@dataclass
class VarianceExplained:
    """R2 of a factor model.

    per_factor : DataFrame (factor x view), R2_mk as fractions (0-1), rows ordered by total R2
        (largest first), index = factor names (``z_0``, ... as in the latent table).
    total : Series over views, R2_m of all factors together.
    inactive : factor names with R2_mk < threshold in every view.
    threshold : the threshold used.
    n_cells : Series over views, cells measured in each view (those summed over).
    """

    per_factor: pd.DataFrame
    total: pd.Series
    inactive: list = field(default_factory=list)
    threshold: float = 1e-3
    n_cells: pd.Series | None = None

    @property
    def order(self) -> list:
        """Factor names ordered by total R2, largest first."""
        return list(self.per_factor.index)

    @property
    def active(self) -> list:
        return [f for f in self.order if f not in set(self.inactive)]

    def tables(self) -> dict[str, pd.DataFrame]:
        """{"r2_per_factor": factor x view (plus ``active``), "r2_total": one row ``total`` x view}."""
        per = self.per_factor.copy()
        per["active"] = [f not in set(self.inactive) for f in per.index]
        total = pd.DataFrame([self.total.to_numpy()], index=pd.Index(["total"], name="factor"),
                             columns=self.total.index)
        return {"r2_per_factor": per, "r2_total": total}


def _summarise(ss: dict, res_k: dict, res_tot: dict, n_cells: dict, factor_names, threshold: float):
    views = list(ss)
    per = pd.DataFrame({m: 1.0 - res_k[m] / ss[m] if ss[m] > 0 else np.nan for m in views},
                       index=pd.Index(list(factor_names), name="factor"))
    total = pd.Series({m: 1.0 - res_tot[m] / ss[m] if ss[m] > 0 else np.nan for m in views}, name="total")
    score = per.fillna(0.0).sum(axis=1)
    per = per.loc[score.sort_values(ascending=False, kind="stable").index]
    inactive = [f for f in per.index if (per.loc[f].fillna(0.0) < threshold).all()]
    return VarianceExplained(per, total, inactive, threshold, pd.Series(n_cells, name="n_cells"))


def r2_from_arrays(Y: dict, Z: np.ndarray, W: dict, *, present: dict | None = None,
                   factor_names=None, threshold: float = 1e-3) -> VarianceExplained:
    """R2 per factor and view of a linear model Y_m ~ Z W_m, from arrays (mofapy2's definition,
    see the module docstring).

    Parameters
    ----------
    Y : {view: (N, G_m) array}, already centred (the residual to explain, e.g. x - b_m).
        NaN entries are left out of both sums (mofapy2's missing values).
    Z : (N, K) factor values (posterior means).
    W : {view: (K, G_m) array} loadings (posterior means).
    present : optional {view: (N,) bool}, cells measured in each view (others left out).
    factor_names : K names (default ``z_0..``).

    Raises ValueError when shapes disagree.
    """
    Z = np.asarray(Z, dtype=np.float64)
    K = Z.shape[1]
    factor_names = list(factor_names) if factor_names is not None else [f"z_{k}" for k in range(K)]
    ss, res_k, res_tot, n_cells = {}, {}, {}, {}
    for m, y in Y.items():
        y = np.asarray(y, dtype=np.float64)
        w = np.asarray(W[m], dtype=np.float64)
        if y.shape[0] != Z.shape[0] or w.shape != (K, y.shape[1]):
            raise ValueError(f"view {m!r}: Y {y.shape}, Z {Z.shape}, W {w.shape} do not fit Y ~ Z W")
        keep = np.ones(y.shape[0], bool) if present is None else np.asarray(present[m], bool)
        y, z = y[keep], Z[keep]
        ok = ~np.isnan(y)
        y0 = np.where(ok, y, 0.0)
        ss[m] = float((y0 ** 2).sum())
        res_k[m] = np.array([float((np.where(ok, y - np.outer(z[:, k], w[k]), 0.0) ** 2).sum())
                             for k in range(K)])
        res_tot[m] = float((np.where(ok, y - z @ w, 0.0) ** 2).sum())
        n_cells[m] = int(keep.sum())
    return _summarise(ss, res_k, res_tot, n_cells, factor_names, threshold)


@torch.no_grad()
def variance_explained(model, dataset, *, threshold: float = 1e-3, batch_size: int = 4096) -> VarianceExplained:
    """R2 per factor and view of a fitted MOFA-like model on ``dataset``, streamed over cells
    (memory O(batch_size x G_m x K)), with mofapy2's definition (module docstring).

    ``model`` needs ``encode(batch) -> (mean, sd)`` of z, ``loadings()`` ({``W__<view>``: (K, G_m)}),
    ``intercepts()`` ({view: (G_m,)}), ``link_mean(view, eta)`` and ``modalities``.
    Cells absent from a view (``Batch.present``) are left out of that view's sums.
    """
    from ..data.loader import MinibatchLoader

    W = {m: model.loadings()[f"W__{m}"].double() for m in model.modalities}
    b = {m: v.double() for m, v in model.intercepts().items()}
    K = next(iter(W.values())).shape[0]
    ss = {m: 0.0 for m in model.modalities}
    res_k = {m: np.zeros(K) for m in model.modalities}
    res_tot = {m: 0.0 for m in model.modalities}
    n_cells = {m: 0 for m in model.modalities}
    was_training = model.training
    model.eval()
    try:
        for batch in MinibatchLoader(dataset, batch_size=batch_size, shuffle=False):
            z = model.encode(batch)[0].double()
            for m in model.modalities:
                keep = batch.present[m].bool()
                if not keep.any():
                    continue
                x, zk = batch.x[m][keep].double(), z[keep]
                base = model.link_mean(m, b[m])
                y = x - base
                ss[m] += float((y ** 2).sum())
                for k in range(K):
                    pred = model.link_mean(m, b[m] + zk[:, k:k + 1] * W[m][k]) - base
                    res_k[m][k] += float(((y - pred) ** 2).sum())
                res_tot[m] += float(((y - (model.link_mean(m, b[m] + zk @ W[m]) - base)) ** 2).sum())
                n_cells[m] += int(keep.sum())
    finally:
        model.train(was_training)
    names = [f"{getattr(model, 'latent_site', 'z')}_{k}" for k in range(K)]
    return _summarise(ss, res_k, res_tot, n_cells, names, threshold)
