"""Earlier results are never replaced silently: ``associate`` and ``demo`` refuse an --out that
holds their outputs unless --overwrite, and refuse an unusable --out before any work."""

import time

import pytest

from pyro_livi.cli import main
from test_association_scale import simulate, write_plink


@pytest.fixture
def inputs(tmp_path):
    geno, F, _, _ = simulate(n=40, m=60, seed=1)
    prefix = write_plink(tmp_path, geno)
    run = tmp_path / "run"
    run.mkdir()
    F.rename(columns=lambda c: c.replace("F_", "D_")).to_csv(run / "D.tsv", sep="\t")
    return ["associate", "--run", str(run), "--genotypes", prefix, "--kinship", "identity", "--quiet",
            "--no-plots"]


def test_associate_refuses_earlier_results_unless_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "res" / "assoc.tsv"
    assert main(inputs + ["--out", str(out)]) == 0
    first = out.read_text()
    out.write_text("my edited results\n")
    capsys.readouterr()
    assert main(inputs + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "assoc.tsv" in err and "--overwrite" in err
    assert out.read_text() == "my edited results\n"
    assert main(inputs + ["--out", str(out), "--overwrite"]) == 0
    assert out.read_text() == first


def test_associate_refuses_an_unusable_out_before_the_scan(inputs, tmp_path, capsys, monkeypatch):
    import pyro_livi.analysis.associate_run as associate_run

    def no_scan(*args, **kwargs):
        raise AssertionError("the scan ran before --out was checked")

    monkeypatch.setattr(associate_run, "associate_factors", no_scan)
    (tmp_path / "afile").write_text("x")
    for out, words in ((tmp_path, "is a folder"), (tmp_path / "afile" / "x.tsv", "is a file")):
        assert main(inputs + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and words in err and "Fix:" in err


def test_demo_refuses_an_earlier_demo_and_a_file_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "summary.md").write_text("an earlier demo\n")
    (out / "notes.txt").write_text("mine\n")
    start = time.perf_counter()
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "earlier demo" in err and "summary.md" in err and "--overwrite" in err
    assert time.perf_counter() - start < 5  # refused before simulating or fitting
    assert (out / "summary.md").read_text() == "an earlier demo\n"
    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_demo_overwrite_replaces_only_its_own_outputs(tmp_path, one_torch_thread):
    from pyro_livi.demo import DemoSettings, run_demo
    from pyro_livi.simulate import SimulationConfig

    config = SimulationConfig(n_donors=20, cells_per_donor=10, vary_cells_per_donor=False, n_genes=40,
                              n_snps=60, k_c=3, k_dxc=1, k_v=1, n_cell_types=3)
    settings = DemoSettings(n_cell_state=3, n_dxc=1, n_persistent=1, encoder_hidden=(8,), epochs_vae=1, epochs=1,
                            batch_size=100)
    out = tmp_path / "demo"
    run_demo(out, seed=0, config=config, settings=settings, progress=False)
    (out / "notes.txt").write_text("mine\n")
    (out / "simulation" / "expression.h5mu").write_text("stale output of another simulation")
    first = (out / "associations.tsv").read_text()
    run_demo(out, seed=0, config=config, settings=settings, progress=False, overwrite=True)
    assert (out / "associations.tsv").read_text() == first  # same seed, same results
    assert (out / "notes.txt").read_text() == "mine\n"
    assert not (out / "simulation" / "expression.h5mu").exists()


def test_model_save_refuses_a_saved_model_unless_overwrite(tmp_path, one_torch_thread):
    import numpy as np

    from pyro_livi.api import Model
    from pyro_livi.errors import InputError
    from test_zoo_contract import tiny_data

    data, _ = tiny_data("scvi")
    m = Model(data, "scvi", n_latent=2, n_hidden=8)
    m.train(max_epochs=1, batch_size=16, progress=False)
    m.save(tmp_path / "run")
    before = (tmp_path / "run" / "model.pt").read_bytes()
    m.train(max_epochs=1, batch_size=16, progress=False)
    with pytest.raises(InputError, match="already holds a saved model.*overwrite=True"):
        m.save(tmp_path / "run")
    assert (tmp_path / "run" / "model.pt").read_bytes() == before
    m.save(tmp_path / "run", overwrite=True)
    again = Model.load(tmp_path / "run", adata=data)
    np.testing.assert_allclose(again.get_latent_representation(), m.get_latent_representation(), rtol=1e-5)
