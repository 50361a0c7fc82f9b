"""Executes notebooks/03_user_api.ipynb (the user API on the OneK1K subset) and checks its results."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_notebook_outputs_cleared, execute_notebook

from pyro_livi.paths import shared_data_dir

pytest.importorskip("nbclient", reason="needs the dev extra (nbclient)")
pytest.importorskip("ipykernel", reason="needs the dev extra (ipykernel)")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_user_api.ipynb"
ONEK1K = shared_data_dir() / "donors" / "onek1k_40donors_7811cells.h5ad"

CHECKS = r"""
import json, math, sys
assert history["validation_loss"].notna().all() and list(history["stage"].unique()) == ["vae", "donor"]
assert history["validation_loss"].iloc[-1] < history["validation_loss"].iloc[0]
assert adata_fit.obsm["X_livi"].shape == (adata_fit.n_obs, 10)
assert "livi_normalized" in adata_fit.layers and "livi_donor_factors" in adata_fit.uns
assert (adata_fit.X != adata[~new].X).nnz == 0
assert min(agreement) > 0.5, agreement
assert z_new.shape == (adata_new.n_obs, 10) and new_accuracy > 0.8, new_accuracy
assert replicates.shape == (5, adata_new.n_obs, adata_fit.n_vars) and ppc_corr > 0.95, ppc_corr
print(json.dumps({"prefix": sys.prefix, "new_accuracy": new_accuracy, "ppc_corr": ppc_corr}))
"""


def test_committed_notebook_has_no_outputs():
    assert_notebook_outputs_cleared(NOTEBOOK)


@pytest.mark.slow
@pytest.mark.skipif(not ONEK1K.exists(), reason=f"real data absent: {ONEK1K} (set PYRO_LIVI_DATA)")
def test_notebook_runs_on_real_data(tmp_path):
    _, images = execute_notebook(NOTEBOOK, tmp_path, CHECKS, timeout=600)
    assert len(images) == 2  # UMAP, loss curves
