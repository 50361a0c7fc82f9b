"""`pyro-livi simulate`, `fit` and `associate` from the command line, and `fit` on real data."""

import json

import numpy as np

import pandas as pd
import pytest

from pyro_livi.cli import main
from pyro_livi.paths import shared_data_dir

ONEK1K = shared_data_dir() / "donors" / "onek1k_40donors_7811cells.h5ad"
RUN_FILES = ["model.pt", "D.tsv", "V.tsv", "A.tsv", "cell_state.tsv", "history.tsv", "loss_curve.png",
             "loadings_W_C.tsv", "loadings_W_DxC.tsv", "loadings_W_V.tsv", "dispersions_rna.tsv", "run.json"]


def test_simulate_fit_associate(tmp_path):
    sim = tmp_path / "sim"
    assert main(["simulate", "--out", str(sim), "--seed", "2", "--n-donors", "20", "--cells-per-donor", "8",
                 "--n-genes", "40", "--n-snps", "60"]) == 0
    run = tmp_path / "run"
    assert main(["fit", "--data", str(sim / "expression.h5ad"), "--donor-key", "donor", "--epochs-vae", "2",
                 "--epochs", "2", "--n-cell-state", "4", "--n-dxc", "3", "--n-persistent", "2",
                 "--batch-size", "64", "--persistent-in-vae-stage", "--out", str(run)]) == 0
    for name in RUN_FILES:
        assert (run / name).exists(), name
    assert json.loads((run / "run.json").read_text())["persistent_in_vae_stage"] is True
    history = pd.read_csv(run / "history.tsv", sep="\t")
    assert history.loc[history["stage"] == "vae", "kl_V"].notna().all()  # V trained with the VAE
    D = pd.read_csv(run / "D.tsv", sep="\t", index_col=0)
    assert D.shape == (20, 3) and list(D.columns) == ["D_0", "D_1", "D_2"]
    assert D.index[0].startswith("donor_")
    results = tmp_path / "assoc.tsv"
    assert main(["associate", "--run", str(run), "--genotypes", str(sim / "genotypes"), "--maf", "0.01",
                 "--out", str(results)]) == 0
    table = pd.read_csv(results, sep="\t")
    assert list(table.columns) == ["factor", "snp", "beta", "se", "pvalue", "padj", "significant",
                                   "chrom", "pos", "allele_1", "allele_2", "maf"]
    assert table["chrom"].notna().all() and table["pos"].notna().all()  # from the .bim
    assert table["allele_1"].notna().all() and table["maf"].between(0.01, 0.5).all()
    assert set(table["factor"]) == {"D_0", "D_1", "D_2", "V_0", "V_1"}


@pytest.mark.skipif(not ONEK1K.exists(), reason=f"real data absent: {ONEK1K} (set PYRO_LIVI_DATA)")
def test_fit_on_onek1k_writes_the_run_dir(tmp_path):
    run = tmp_path / "run"
    assert main(["fit", "--data", str(ONEK1K), "--donor-key", "indiv", "--epochs-vae", "2", "--epochs", "2",
                 "--n-dxc", "10", "--out", str(run)]) == 0
    for name in RUN_FILES:
        assert (run / name).exists(), name
    D = pd.read_csv(run / "D.tsv", sep="\t", index_col=0)
    assert D.shape == (40, 10)
    cells = pd.read_csv(run / "cell_state.tsv", sep="\t", index_col=0)
    assert cells.shape == (7811, 15)


def test_default_modalities_follow_the_file_and_the_model(tmp_path, capsys):
    """Without --modalities: rna from an .h5ad (a multi-view model included); from a .h5mu the
    file's modalities, rna first, as many as the model takes."""
    import anndata as ad
    import mudata as md
    import scipy.sparse as sp

    from pyro_livi.commands.fit import default_modalities
    from pyro_livi.models import MODELS

    rng = np.random.default_rng(0)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(60)])
    mods = {name: ad.AnnData(sp.csr_matrix(rng.poisson(3.0, size=(60, n)).astype(np.float32)), obs=obs.copy())
            for name, n in (("adt", 4), ("rna", 12), ("hto", 3))}
    for name, a in mods.items():
        a.var_names = [f"{name}{j}" for j in range(a.n_vars)]
    md.MuData(mods).write(tmp_path / "x.h5mu")
    path = str(tmp_path / "x.h5mu")
    assert default_modalities(path, MODELS["scvi"].data_needs) == "rna"
    assert default_modalities(path, MODELS["totalvi"].data_needs) == "rna,adt"
    assert default_modalities(path, MODELS["mofa"].data_needs) == "rna,adt,hto"
    assert default_modalities(str(tmp_path / "x.h5ad"), MODELS["mofa"].data_needs) == "rna"
    mods["rna"].write_h5ad(tmp_path / "rna.h5ad")
    assert main(["fit", "--model", "mofa", "--data", str(tmp_path / "rna.h5ad"), "--epochs", "2",
                 "--n-factors", "2", "--out", str(tmp_path / "run")]) == 0
    assert main(["fit", "--model", "mofa", "--data", path, "--epochs", "2", "--n-factors", "2",
                 "--out", str(tmp_path / "run3")]) == 0
    assert "modalities: rna,adt,hto (the file's" in capsys.readouterr().out


def test_python_fit_returns_the_tables_with_or_without_a_run_dir(tmp_path):
    import anndata as ad

    from pyro_livi.run import fit

    rng = np.random.default_rng(1)
    adata = ad.AnnData(rng.poisson(3.0, size=(60, 12)).astype(np.float32))
    kw = dict(model="scvi", epochs=2, batch_size=32, n_latent=2, n_hidden=8, progress=False)
    bare = fit(adata, **kw)
    written = fit(adata, out=tmp_path / "run", **kw)
    assert set(bare.tables) == set(written.tables) == {"latent", "dispersions_rna"}
    pd.testing.assert_frame_equal(bare.tables["latent"], written.tables["latent"])
    on_disk = pd.read_csv(tmp_path / "run" / "latent.tsv", sep="\t", index_col=0)
    np.testing.assert_allclose(on_disk.to_numpy(), bare.tables["latent"].to_numpy(), rtol=1e-6)
