"""Graph metrics on inputs with known answers."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.datasets import make_blobs

from pyro_livi.analysis.graph_metrics import (
    cluster_agreement,
    graph_connectivity,
    graph_metrics,
    isolated_label_silhouette,
    isolated_labels,
    knn_graph,
    leiden,
    silhouette_label,
)
from pyro_livi.errors import InputError


@pytest.fixture(scope="module")
def blobs():
    """Three far-apart, tight Gaussian blobs of 100 cells in 5 dimensions."""
    X, y = make_blobs(n_samples=300, centers=[[0] * 5, [20] * 5, [-20, 20, -20, 20, -20]],
                      cluster_std=0.5, random_state=0)
    return X.astype(np.float32), np.array([f"type_{k}" for k in y])


def test_perfect_clustering_has_ari_and_nmi_one(blobs):
    X, y = blobs
    metrics = graph_metrics(X, y, resolutions=(0.1, 0.5, 1.0), seed=0)
    assert metrics["ari"] == pytest.approx(1.0)
    assert metrics["nmi"] == pytest.approx(1.0)
    assert metrics["n_clusters"] == 3
    assert metrics["graph_connectivity"] == pytest.approx(1.0)
    assert metrics["silhouette"] > 0.95


def test_random_labels_have_ari_near_zero(blobs):
    X, _ = blobs
    random_labels = np.random.default_rng(1).choice(["a", "b", "c"], size=X.shape[0])
    metrics = graph_metrics(X, random_labels, resolutions=(0.1, 1.0), seed=0)
    assert abs(metrics["ari"]) < 0.05
    assert metrics["nmi"] < 0.05
    assert metrics["silhouette"] == pytest.approx(0.5, abs=0.05)
    truth = np.repeat([0, 1, 2], 1000)
    shuffled = np.random.default_rng(2).permutation(truth)
    assert abs(cluster_agreement(shuffled, truth)["ari"]) < 0.01
    assert cluster_agreement(truth, truth) == {"ari": 1.0, "nmi": 1.0}


def test_leiden_is_deterministic_given_the_seed(blobs):
    X, _ = blobs
    graph = knn_graph(X, n_neighbors=10, seed=0)
    assert graph.obsp["connectivities"].shape == (300, 300)
    a = leiden(graph, resolution=1.0, seed=3)
    b = leiden(graph, resolution=1.0, seed=3)
    np.testing.assert_array_equal(a, b)
    assert "_leiden_1.0" not in graph.obs


def test_silhouette_closed_form():
    # Groups {0, 1} and {10, 11} on a line: s = 1 - a/b with a = 1 and b = 10.5 (outer points)
    # or 9.5 (inner points).
    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    s = np.mean([1 - 1 / 10.5, 1 - 1 / 9.5, 1 - 1 / 9.5, 1 - 1 / 10.5])
    assert silhouette_label(X, ["A", "A", "B", "B"]) == pytest.approx((s + 1) / 2)


def test_graph_connectivity_known_graph():
    # Label A: cells 0-3 on a chain (one component). Label B: cells 4-5 and 6-7 linked in pairs,
    # plus edges 5-6 only through cell 0 of label A (not inside B): two components of 2.
    edges = [(0, 1), (1, 2), (2, 3), (4, 5), (6, 7), (5, 0), (0, 6)]
    rows, cols = zip(*(edges + [(j, i) for i, j in edges]))
    graph = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(8, 8))
    labels = ["A"] * 4 + ["B"] * 4
    score, per_label = graph_connectivity(graph, labels)
    assert per_label["A"] == 1.0
    assert per_label["B"] == 0.5
    assert score == pytest.approx(0.75)


def test_isolated_labels_are_those_in_fewest_batches():
    labels = ["X", "X", "Y", "Y", "Y", "Z", "Z"]
    batches = ["d1", "d1", "d1", "d2", "d3", "d2", "d2"]
    assert isolated_labels(labels, batches) == ["X", "Z"]
    # every label in the same number of batches: all are isolated (scIB)
    assert isolated_labels(["a", "b", "a", "b"], ["1", "1", "2", "2"]) == ["a", "b"]


def test_isolated_label_silhouette_closed_form():
    # A is the isolated label (one donor); the split "A vs not A" is the closed-form case above.
    X = np.array([[0.0], [1.0], [10.0], [11.0], [10.5]])
    labels = ["A", "A", "B", "B", "B"]
    batches = ["d1", "d1", "d1", "d2", "d3"]
    score, per_label = isolated_label_silhouette(X, labels, batches)
    assert list(per_label.index) == ["A"]
    assert score == pytest.approx(silhouette_label(X, ["A", "A", "n", "n", "n"]))
    metrics = graph_metrics(np.vstack([X, X + 0.01]), labels * 2, batches * 2, n_neighbors=3,
                            resolutions=1.0)
    assert metrics["isolated_labels"] == ["A"]


def test_bad_inputs_name_the_field():
    with pytest.raises(InputError, match="labels"):
        silhouette_label(np.zeros((5, 2)), ["a", "b"])
    with pytest.raises(InputError, match="NaN"):
        knn_graph(np.full((5, 2), np.nan))


def test_knn_graph_leaves_torch_thread_count_alone(blobs):
    """The neighbour search must not change the thread count of a later fit (reproducibility)."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        knn_graph(blobs[0], n_neighbors=10)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
