"""Denoised values: count likelihoods are rescaled to a library size, Bernoulli probabilities
are not."""

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest

from pyro_livi.analysis.denoise import normalized_expression
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.models import MOFA

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bernoulli_probabilities_are_not_rescaled_by_library_size():
    rng = np.random.default_rng(0)
    n = 30
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    views = {"rna": rng.poisson(3.0, size=(n, 6)).astype(np.float32),
             "atac": (rng.random((n, 8)) < 0.5).astype(np.float32)}
    views["atac"][:, 0] = 1.0  # every cell has an open peak (a zero total is refused)
    mdata = md.MuData({m: ad.AnnData(Y, obs=obs.copy(), var=pd.DataFrame(index=[f"{m}{j}" for j in range(Y.shape[1])]))
                       for m, Y in views.items()})
    data = read_dataset(mdata, DatasetSpec(modalities={"rna": None, "atac": None}))
    model = MOFA.from_dataset(data, n_factors=2, likelihoods={"atac": "bernoulli"})
    atac = normalized_expression(model, data, modality="atac", library_size=1e4)
    same = normalized_expression(model, data, modality="atac", library_size=None)
    assert ((atac.to_numpy() >= 0) & (atac.to_numpy() <= 1)).all()
    np.testing.assert_allclose(atac.to_numpy(), same.to_numpy())
    rna = normalized_expression(model, data, modality="rna", library_size=1e4)  # Poisson: rescaled
    np.testing.assert_allclose(rna.sum(axis=1) / normalized_expression(model, data, modality="rna",
                                                                        library_size=None).sum(axis=1),
                               1e4 / views["rna"].sum(axis=1), rtol=1e-4)
