"""Graph metrics of a latent (seed 002, section 6), with the scIB definitions.

Every metric starts from a latent (one row per cell) and a label (cell type, donor, ...):

- a kNN graph of the latent: ``scanpy.pp.neighbors`` (UMAP connectivities, ``n_neighbors``
  neighbours, Euclidean distance, fixed ``random_state``);
- **ARI** and **NMI** (``sklearn.metrics``) between the label and Leiden clusters of that graph
  (``scanpy.tl.leiden``, fixed ``random_state``). With several resolutions, the clustering
  with the highest NMI is kept (scIB's convention) and its resolution is reported;
- **silhouette** (``sklearn.metrics.silhouette_score``, Euclidean) of the label in the latent,
  rescaled to [0, 1] as (s + 1) / 2 (scIB's ``silhouette``);
- **graph connectivity**: for each label value, the cells of that value and the kNN edges
  among them form a subgraph; its largest connected component (``scipy.sparse.csgraph``)
  holds a fraction of those cells; the score is the mean of that fraction over label values
  (scIB's ``graph_connectivity``; 1 when every label's cells are connected in the graph);
- **isolated-label silhouette**: the *isolated labels* are the label values present in the
  fewest batches (donors), i.e. in ``min over labels of (number of batches containing the
  label)`` batches; when every label is in the same number of batches, every label counts.
  For each isolated label L the cells are split into "L" and "not L" and the rescaled
  silhouette of that binary split is computed; the score is the mean over isolated labels
  (scIB's ``isolated_labels_asw``).

Leiden uses scanpy's ``flavor="igraph"`` (needs the ``igraph`` package); where only
``leidenalg`` is installed, scanpy's ``leidenalg`` flavor is used instead.
"""

from __future__ import annotations

import importlib.util

import anndata as ad
import numpy as np
import pandas as pd
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from ..errors import InputError

__all__ = [
    "DEFAULT_RESOLUTIONS",
    "knn_graph",
    "leiden",
    "leiden_clusterings",
    "cluster_agreement",
    "silhouette_label",
    "graph_connectivity",
    "isolated_labels",
    "isolated_label_silhouette",
    "graph_metrics",
]

#: Leiden resolutions scanned by default (scIB scans 0.1 to 2.0 in steps of 0.1).
DEFAULT_RESOLUTIONS = tuple(round(0.1 * k, 1) for k in range(1, 21))


def _labels(labels, n: int, name: str) -> np.ndarray:
    labels = pd.Series(np.asarray(labels, dtype=object))
    if len(labels) != n:
        raise InputError("<arguments>", name, f"{len(labels)} values for {n} cells",
                         "give one value per row of the latent")
    if labels.isna().any():
        raise InputError("<arguments>", name, f"{int(labels.isna().sum())} cells have no value",
                         "drop unlabelled cells before computing graph metrics")
    return labels.astype(str).to_numpy()


def _latent(latent) -> np.ndarray:
    latent = np.asarray(latent, dtype=np.float32)
    if latent.ndim != 2 or latent.shape[0] < 3:
        raise InputError("<arguments>", "latent", f"expected a (cells, dimensions) matrix with at "
                         f"least 3 cells, got shape {latent.shape}", "give one row per cell")
    if not np.all(np.isfinite(latent)):
        raise InputError("<arguments>", "latent", "contains NaN or inf",
                         "compute the latent from a model that trained without diverging")
    return latent


def knn_graph(latent, *, n_neighbors: int = 15, seed: int = 0) -> ad.AnnData:
    """AnnData over the cells with the latent in ``obsm["X_latent"]`` and its kNN graph
    (``obsp["connectivities"]``, ``obsp["distances"]``) from ``scanpy.pp.neighbors``."""
    import scanpy as sc
    import torch

    latent = _latent(latent)
    adata = ad.AnnData(np.zeros((latent.shape[0], 0), dtype=np.float32))
    adata.obsm["X_latent"] = latent
    # The neighbour search (numba) resets the OpenMP thread count, which torch shares; a fit
    # after it would then run on another number of threads and round differently. Restore it.
    torch_threads = torch.get_num_threads()
    try:
        sc.pp.neighbors(adata, n_neighbors=min(int(n_neighbors), latent.shape[0] - 1),
                        use_rep="X_latent", random_state=seed)
    finally:
        torch.set_num_threads(torch_threads)
    return adata


def _leiden_flavor() -> str:
    if importlib.util.find_spec("igraph") is not None:
        return "igraph"
    if importlib.util.find_spec("leidenalg") is not None:
        return "leidenalg"
    raise ImportError("Leiden clustering needs the 'igraph' package (scanpy's flavor='igraph'); "
                      "install it with `pip install igraph`")


def leiden(graph: ad.AnnData, *, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Leiden clusters (strings) of the kNN graph in ``graph`` (from :func:`knn_graph`)."""
    import scanpy as sc

    flavor = _leiden_flavor()
    kwargs = dict(flavor="igraph", n_iterations=2, directed=False) if flavor == "igraph" else {}
    key = f"_leiden_{resolution}"
    sc.tl.leiden(graph, resolution=float(resolution), random_state=seed, key_added=key, **kwargs)
    clusters = graph.obs.pop(key).astype(str).to_numpy()
    graph.uns.pop(key, None)
    return clusters


def cluster_agreement(clusters, labels) -> dict[str, float]:
    """``{"ari": ..., "nmi": ...}`` between two partitions of the same cells (sklearn)."""
    clusters, labels = np.asarray(clusters), np.asarray(labels)
    return {"ari": float(adjusted_rand_score(labels, clusters)),
            "nmi": float(normalized_mutual_info_score(labels, clusters))}


def silhouette_label(latent, labels, *, sample_size: int | None = None, seed: int = 0) -> float:
    """Silhouette width of ``labels`` in the latent (Euclidean), rescaled to [0, 1] as
    (s + 1) / 2: 1 for compact well separated groups, 0.5 for overlapping ones.

    ``sample_size`` cells (drawn with ``seed``) are used when given (sklearn's option; the
    computation is quadratic in the number of cells)."""
    latent = _latent(latent)
    labels = _labels(labels, latent.shape[0], "labels")
    if np.unique(labels).size < 2:
        return float("nan")
    s = silhouette_score(latent, labels, sample_size=sample_size, random_state=seed)
    return float((s + 1.0) / 2.0)


def graph_connectivity(connectivities, labels) -> tuple[float, pd.Series]:
    """Mean over label values of the fraction of that value's cells in the largest connected
    component of the kNN subgraph restricted to them.

    Parameters
    ----------
    connectivities : sparse matrix, shape (n_cells, n_cells)
        kNN graph (e.g. ``graph.obsp["connectivities"]``).
    labels : array-like, shape (n_cells,)

    Returns
    -------
    (score, per_label) : the mean, and the fraction for each label value.
    """
    labels = _labels(labels, connectivities.shape[0], "labels")
    fractions = {}
    for value in np.unique(labels):
        cells = np.flatnonzero(labels == value)
        sub = connectivities[cells][:, cells]
        _, component = connected_components(sub, directed=True, connection="strong")
        fractions[value] = np.bincount(component).max() / cells.size
    per_label = pd.Series(fractions, name="largest_component_fraction")
    return float(per_label.mean()), per_label


def isolated_labels(labels, batches) -> list[str]:
    """Label values found in the fewest batches (see the module docstring)."""
    labels = _labels(labels, len(labels), "labels")
    batches = _labels(batches, len(labels), "batches")
    n_batches = pd.DataFrame({"label": labels, "batch": batches}).groupby("label")["batch"].nunique()
    return sorted(n_batches.index[n_batches == n_batches.min()])


def isolated_label_silhouette(latent, labels, batches, *, sample_size: int | None = None,
                              seed: int = 0) -> tuple[float, pd.Series]:
    """Mean over isolated labels L of the rescaled silhouette of the split "L" vs "not L".

    Returns ``(score, per_label)``; NaN when the label has a single value.
    """
    latent = _latent(latent)
    labels = _labels(labels, latent.shape[0], "labels")
    if np.unique(labels).size < 2:
        return float("nan"), pd.Series(dtype=float, name="isolated_label_silhouette")
    scores = {value: silhouette_label(latent, labels == value, sample_size=sample_size, seed=seed)
              for value in isolated_labels(labels, batches)}
    per_label = pd.Series(scores, name="isolated_label_silhouette")
    return float(per_label.mean()), per_label


def leiden_clusterings(graph: ad.AnnData, resolutions=DEFAULT_RESOLUTIONS, *, seed: int = 0) -> dict:
    """``{resolution: clusters}``: Leiden clusters of the graph at each resolution."""
    if np.isscalar(resolutions):
        resolutions = (float(resolutions),)
    return {float(r): leiden(graph, resolution=r, seed=seed) for r in resolutions}


def graph_metrics(latent, labels, batches=None, *, n_neighbors: int = 15,
                  resolutions=DEFAULT_RESOLUTIONS, seed: int = 0, graph: ad.AnnData | None = None,
                  clusterings: dict | None = None, silhouette_sample: int | None = None) -> dict:
    """All graph metrics of one latent against one label.

    Parameters
    ----------
    latent : array, shape (n_cells, K)
    labels : array-like, shape (n_cells,)
    batches : array-like, shape (n_cells,), optional
        Batch (donor) of each cell, for the isolated-label silhouette (NaN without it).
    n_neighbors, seed : kNN graph and Leiden settings.
    resolutions : float or sequence of float
        Leiden resolution(s); with several, the clustering with the highest NMI is kept.
    graph : AnnData, optional
        A kNN graph of this latent already built with :func:`knn_graph` (reused, e.g. across
        labels; it receives no new columns).
    clusterings : dict, optional
        ``{resolution: clusters}`` of that graph from :func:`leiden_clusterings` (reused across
        labels); computed here at ``resolutions`` when None.
    silhouette_sample : int, optional
        Cells drawn for the silhouettes (all when None).

    Returns
    -------
    dict with ``ari``, ``nmi``, ``resolution``, ``n_clusters``, ``silhouette``,
    ``graph_connectivity``, ``isolated_label_silhouette``, ``isolated_labels`` (list).
    """
    latent = _latent(latent)
    labels = _labels(labels, latent.shape[0], "labels")
    if graph is None:
        graph = knn_graph(latent, n_neighbors=n_neighbors, seed=seed)
    if clusterings is None:
        clusterings = leiden_clusterings(graph, resolutions, seed=seed)
    best = None
    for resolution, clusters in clusterings.items():
        scores = cluster_agreement(clusters, labels)
        if best is None or scores["nmi"] > best["nmi"]:
            best = {**scores, "resolution": float(resolution),
                    "n_clusters": int(np.unique(clusters).size)}
    out = dict(best)
    out["silhouette"] = silhouette_label(latent, labels, sample_size=silhouette_sample, seed=seed)
    out["graph_connectivity"], _ = graph_connectivity(graph.obsp["connectivities"], labels)
    if batches is not None:
        score, per_label = isolated_label_silhouette(latent, labels, batches,
                                                     sample_size=silhouette_sample, seed=seed)
        out["isolated_label_silhouette"], out["isolated_labels"] = score, list(per_label.index)
    else:
        out["isolated_label_silhouette"], out["isolated_labels"] = float("nan"), []
    return out
