"""Logistic-regression probes on latents with known answers."""

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from pyro_livi.analysis.probes import probe, probe_table
from pyro_livi.errors import InputError


@pytest.fixture(scope="module")
def separable():
    X, y = make_blobs(n_samples=600, centers=3, n_features=4, cluster_std=0.5, center_box=(-20, 20),
                      random_state=0)
    return X, np.array(["a", "b", "c"])[y]


def test_separable_labels_are_read_perfectly(separable):
    X, y = separable
    result = probe(X, y, label="cell_type")
    assert result.accuracy > 0.99
    assert result.balanced_accuracy > 0.99
    assert (result.per_class > 0.99).all()
    assert list(result.per_class.index) == ["a", "b", "c"]
    assert len(result.per_seed) == 5 and result.n_cells == 600 and result.n_classes == 3
    assert result.chance == pytest.approx(1 / 3, abs=0.01)


def test_random_labels_give_chance_accuracy(separable):
    X, _ = separable
    y = np.random.default_rng(0).choice(["a", "b", "c"], size=len(X))
    result = probe(X, y)
    assert abs(result.accuracy - 1 / 3) < 0.1
    assert abs(result.balanced_accuracy - 1 / 3) < 0.1


def test_chance_is_the_majority_fraction_and_results_are_seeded():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3))
    y = np.array(["major"] * 140 + ["minor"] * 60)
    a, b = probe(X, y, seeds=(0, 1)), probe(X, y, seeds=(0, 1))
    assert a.chance == pytest.approx(0.7)
    assert a.accuracy == b.accuracy
    assert list(a.per_seed["seed"]) == [0, 1]


def test_unlabelled_cells_and_singleton_classes_are_left_out(separable):
    X, y = separable
    y = y.astype(object)
    y[0] = None
    y[1] = "lonely"
    result = probe(X, y)
    assert result.n_cells == 598
    assert result.dropped == {"missing_label": 1, "rare_classes": ["lonely"]}


def test_probe_table_rows(separable):
    X, y = separable
    table = probe_table({("latent_a", "cell_type"): probe(X, y, seeds=(0,), label="cell_type")})
    assert list(table[["latent", "label"]].iloc[0]) == ["latent_a", "cell_type"]


def test_bad_inputs_name_the_field(separable):
    X, y = separable
    with pytest.raises(InputError, match="labels"):
        probe(X, y[:10])
    with pytest.raises(InputError, match="two classes"):
        probe(X, np.array(["a"] * len(X)))
    with pytest.raises(InputError, match="NaN"):
        probe(np.full_like(X, np.nan), y)
