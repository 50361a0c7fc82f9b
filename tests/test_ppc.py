"""Posterior predictive checks: structure, known p-values, calibration of a true model and
failure of a wrong one."""

import re

import anndata as ad
import arviz as az
import numpy as np
import pandas as pd
import pytest
import torch

from pyro_livi.analysis.ppc import (
    _site_roles,
    feature_statistics,
    posterior_predictive,
    ppc_calibration,
    ppc_table,
)
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.errors import InputError
from pyro_livi.models import LIVI, MODELS

N_CELLS, N_GENES, THETA = 400, 60, 2.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _constant_mean_livi(w, likelihood):
    """LIVI whose expression mean does not depend on the latents: every row of W_C is ``w``, so
    softmax(c) @ W_C = w for every c, and the donor decoders are zero. Then
    mu_ig = softmax(w)_g * size_factor_i exactly, the generative process of the simulated data."""
    model = LIVI(N_GENES, 4, n_cell_state=3, n_dxc=2, n_persistent=2, encoder_hidden=(8,),
                 likelihood=likelihood)
    with torch.no_grad():
        model.W_C.copy_(torch.as_tensor(w, dtype=torch.float32).expand(3, N_GENES))
        model.W_DxC.zero_()
        model.W_V.zero_()
        if likelihood == "nb":
            model.lik_rna_log_theta.fill_(np.log(THETA))
    return model


@pytest.fixture(scope="module")
def simulated():
    """Overdispersed counts x_ig ~ NB(softmax(w)_g * L_i, theta = 2)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0.0, 1.0, size=N_GENES)
    p = np.exp(w) / np.exp(w).sum()
    library = rng.uniform(2000, 4000, size=N_CELLS)
    mu = p[None, :] * library[:, None]
    counts = rng.negative_binomial(THETA, THETA / (THETA + mu)).astype(np.float32)
    obs = pd.DataFrame({"donor": [f"d{k % 4}" for k in range(N_CELLS)]},
                       index=[f"cell{k}" for k in range(N_CELLS)])
    adata = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]))
    return w, read_dataset(adata, DatasetSpec(modalities={"rna": None}, donor_key="donor"))


def test_inference_data_structure(simulated):
    w, data = simulated
    model = _constant_mean_livi(w, "nb")
    idata = posterior_predictive(model, data, np.arange(50), num_samples=4, batch_size=16, seed=0)
    assert isinstance(idata, az.InferenceData)
    assert {"posterior_predictive", "observed_data"} <= set(idata.groups())
    rep, obs = idata.posterior_predictive["obs_rna"], idata.observed_data["obs_rna"]
    assert rep.dims == ("chain", "draw", "cell", "feature_rna") and rep.shape == (1, 4, 50, N_GENES)
    assert obs.dims == ("cell", "feature_rna")
    assert list(obs.coords["cell"].values[:2]) == ["cell0", "cell1"]
    assert obs.coords["feature_rna"].values[0] == "g0"
    np.testing.assert_array_equal(obs.values, data.batch(np.arange(50)).x["rna"].numpy())
    assert obs.dtype == np.int32 and rep.dtype == np.int32
    again = posterior_predictive(model, data, np.arange(50), num_samples=4, batch_size=16, seed=0)
    np.testing.assert_array_equal(again.posterior_predictive["obs_rna"].values, rep.values)


def test_site_roles_separate_donor_and_cell_latents(simulated):
    w, data = simulated
    model = _constant_mean_livi(w, "nb")
    global_sites, cell_sites, obs_sites = _site_roles(model, data.batch(np.arange(5)), "cells")
    assert sorted(global_sites) == ["D", "V"]
    assert cell_sites == ["c"] and obs_sites == ["obs_rna"]


def test_mid_p_values_on_a_hand_made_example():
    # one feature over two cells, observed (1, 1): mean 1, variance 0, zero fraction 0.
    # replicates: (0, 0), (1, 1), (2, 2), (3, 1): means 0, 1, 2, 2.
    obs = np.array([[1], [1]])
    rep = np.array([[[0], [0]], [[1], [1]], [[2], [2]], [[3], [1]]])
    idata = az.from_dict(posterior_predictive={"obs_x": rep[None]}, observed_data={"obs_x": obs},
                         dims={"obs_x": ["cell", "feature_x"]})
    table = feature_statistics(idata, "obs_x")
    # mean: P(>1) = 2/4, P(=1) = 1/4 -> 0.625
    assert table["mean_ppp"].iloc[0] == pytest.approx(0.625)
    # variance: replicated variances 0, 0, 0, 2 vs observed 0 -> 1/4 + 0.5 * 3/4
    assert table["variance_ppp"].iloc[0] == pytest.approx(0.625)
    # zero fraction: replicated 1, 0, 0, 0 vs observed 0 -> 1/4 + 0.5 * 3/4
    assert table["zero_fraction_ppp"].iloc[0] == pytest.approx(0.625)
    assert table["mean_rep_mean"].iloc[0] == pytest.approx(1.25)
    assert table["mean_obs"].iloc[0] == 1.0


def test_true_model_is_calibrated_and_poisson_fails_the_variance_check(simulated):
    w, data = simulated
    true = ppc_calibration(ppc_table(posterior_predictive(_constant_mean_livi(w, "nb"), data,
                                                          num_samples=50, seed=1)))
    wrong = ppc_calibration(ppc_table(posterior_predictive(_constant_mean_livi(w, "poisson"), data,
                                                           num_samples=50, seed=1)))
    for statistic in ("mean", "variance", "zero_fraction"):
        assert true.loc[("rna", statistic), "frac_ppp_in_interval"] >= 0.85, true
        assert true.loc[("rna", statistic), "calibration_error"] < 1.2, true
    # Poisson has variance = mean: the observed (NB) variance is above every replicate
    assert wrong.loc[("rna", "variance"), "frac_ppp_in_interval"] < 0.1, wrong
    assert wrong.loc[("rna", "variance"), "frac_obs_above"] > 0.9, wrong
    assert wrong.loc[("rna", "variance"), "calibration_error"] > 5, wrong
    # ... and it predicts fewer zeros than the data have wherever zeros are common
    assert wrong.loc[("rna", "zero_fraction"), "frac_obs_above"] > true.loc[("rna", "zero_fraction"),
                                                                            "frac_obs_above"]
    # the older names are the same fractions (frac_ppp_low: ppp < 0.025, observed above)
    pd.testing.assert_series_equal(wrong["frac_ppp_low"], wrong["frac_obs_above"], check_names=False)
    pd.testing.assert_series_equal(wrong["frac_ppp_high"], wrong["frac_obs_below"], check_names=False)


def test_calibration_columns_read_in_the_direction_of_their_names():
    """Constructed case: of four features, three have observed means above every replicate
    (the model predicts too little), one below every replicate; frac_obs_above / _below say so,
    and the report text defines them the same way."""
    obs = np.array([[5, 5, 5, 0]] * 3)                       # 3 cells x 4 features
    rep = np.array([[[1, 1, 1, 3]] * 3] * 20)                 # 20 replicates, all identical
    idata = az.from_dict(posterior_predictive={"obs_x": rep[None]}, observed_data={"obs_x": obs},
                         dims={"obs_x": ["cell", "feature_x"]})
    table = feature_statistics(idata, "obs_x")
    assert (table["mean_obs"] > table["mean_rep_q975"]).tolist() == [True, True, True, False]
    calibration = ppc_calibration({"x": table}).loc[("x", "mean")]
    assert calibration["frac_obs_above"] == pytest.approx(0.75)
    assert calibration["frac_obs_below"] == pytest.approx(0.25)
    assert calibration["frac_ppp_in_interval"] == 0.0
    import inspect

    from pyro_livi.analysis import report

    text = inspect.getsource(report.write_report)
    assert "`frac_obs_above`: fraction of" in text and "above the predictions (ppp < 0.025)" in text
    assert "`frac_obs_below`: " in text and "below them (ppp > 0.975)" in text


def test_loss_curve_labels_weighted_and_log_prior_terms_and_keeps_legends_off_the_curves(tmp_path):
    from types import SimpleNamespace

    from matplotlib.figure import Figure

    from pyro_livi.analysis import plots

    terms = ["nll_obs_rna", "nll_obs_prot", "kl_c", "kl_D", "kl_V", "penalty_l1"]
    model = SimpleNamespace(modality_weights={"rna": 1.0, "prot": 50.0}, donor_guide="delta")
    labels = plots.term_labels(terms, model)
    assert labels["nll_obs_rna"] == "nll_obs_rna" and labels["kl_c"] == "kl_c"
    assert labels["nll_obs_prot"] == "50 x nll_obs_prot (weighted)"
    assert labels["kl_D"].startswith("-log prior(D)") and "not a KL" in labels["kl_V"]
    normal = plots.term_labels(terms, SimpleNamespace(modality_weights={}, donor_guide="normal"))
    assert normal["kl_D"] == "kl_D" and normal["nll_obs_prot"] == "nll_obs_prot"

    epochs = np.arange(30)
    history = pd.DataFrame({"epoch": epochs, "stage": ["vae"] * 10 + ["donor"] * 20,
                            "loss": 100 - epochs, "validation_loss": 101 - epochs,
                            **{t: 10.0 + k + epochs for k, t in enumerate(terms)}})
    seen = {}
    original = Figure.savefig

    def keep(fig, *args, **kwargs):
        seen["fig"] = fig
        return original(fig, *args, **kwargs)

    Figure.savefig = keep
    try:
        plots.plot_loss_curves(history, tmp_path / "loss.png", model=model)
    finally:
        Figure.savefig = original
    fig = seen["fig"]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
    legend_texts = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "50 x nll_obs_prot (weighted)" in legend_texts
    assert any(t.startswith("-log prior(D)") for t in legend_texts)
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_bad_num_samples(simulated):
    w, data = simulated
    with pytest.raises(InputError, match="num_samples"):
        posterior_predictive(_constant_mean_livi(w, "nb"), data, num_samples=0)


@pytest.fixture(scope="module")
def cite_like():
    from pyro_livi.simulate import SimulationConfig, simulate

    config = SimulationConfig(n_donors=6, cells_per_donor=20, vary_cells_per_donor=False, n_snps=10,
                              n_genes=40, k_c=4, k_dxc=2, k_v=1, n_cell_types=2, n_proteins=8)
    return simulate(config, seed=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_through_its_sites(cite_like, name):
    """Held-out NLL and predictive checks need nothing model-specific: every registered model
    works through its guide and its obs_<modality> sites (multimodal ones with a protein
    modality that some cells lack, where the model allows it)."""
    import mudata as md

    from pyro_livi.analysis.heldout import heldout_nll
    from pyro_livi.run import build_model

    needs = MODELS[name].data_needs
    donor_key = None if needs.donors == "unused" else "donor"
    if needs.modalities[1] == 1:
        data = read_dataset(cite_like.adata, DatasetSpec(modalities={"rna": None}, donor_key=donor_key))
    else:
        mdata = cite_like.mdata
        optional = needs.missing_modalities
        if optional:  # every fourth cell has no protein measurement
            prot = mdata.mod["prot"]
            mdata = md.MuData({"rna": mdata.mod["rna"], "prot": prot[np.arange(prot.n_obs) % 4 != 0].copy()})
            mdata.obs["donor"] = mdata.mod["rna"].obs["donor"].to_numpy()
        data = read_dataset(mdata, DatasetSpec(modalities={"rna": None, "prot": None}, donor_key=donor_key,
                                               optional_modalities=["prot"] if optional else []))
    model = build_model(name, data, **({"n_dxc": 2, "n_persistent": 1} if donor_key else {}))
    nll = heldout_nll(model, data, np.arange(40), batch_size=16)
    assert set(nll) == set(data.modalities)
    for modality, series in nll.items():
        assert len(series) == data.n_features[modality] and np.isfinite(series).all()
        assert series.attrs["n_cells"] == int(data.present[modality][:40].sum())
    idata = posterior_predictive(model, data, np.arange(40), num_samples=3, batch_size=16)
    assert set(idata.observed_data.data_vars) == {f"obs_{m}" for m in data.modalities}
    calibration = ppc_calibration(ppc_table(idata))
    assert set(calibration.index.get_level_values("modality")) == set(data.modalities)
    assert calibration["n_features"].gt(0).all()
    for modality in data.modalities:
        rep = idata.posterior_predictive[f"obs_{modality}"].values
        absent = ~data.present[modality][:40]
        assert np.isnan(rep[..., absent, :]).all() and not np.isnan(rep[..., ~absent, :]).any()


def test_evaluate_prints_a_line_per_step_with_its_time(cite_like, tmp_path, capsys, monkeypatch):
    """`evaluate` is not silent for minutes: each step says when it starts and how long it took.
    (The graph metrics, tested elsewhere, are stubbed: their first call compiles for ~15 s.)"""
    from pyro_livi.analysis import report
    from pyro_livi.analysis.report import evaluate
    from pyro_livi.run import build_model

    metrics = {"ari": 0.0, "nmi": 0.0, "resolution": 1.0, "n_clusters": 1, "silhouette": 0.0,
               "graph_connectivity": 0.0, "isolated_label_silhouette": 0.0, "isolated_labels": []}
    monkeypatch.setattr(report, "knn_graph", lambda *a, **k: None)
    monkeypatch.setattr(report, "leiden_clusterings", lambda *a, **k: {1.0: np.zeros(1)})
    monkeypatch.setattr(report, "graph_metrics", lambda *a, **k: dict(metrics))

    data = read_dataset(cite_like.adata, DatasetSpec(modalities={"rna": None}, donor_key="donor",
                                                     label_keys=["cell_type"]))
    model = build_model("scvi", data)
    evaluate(model, data, tmp_path, label_keys=["cell_type"], n_pcs=5, probe_seeds=(0,),
             resolutions=(1.0,), ppc_cells=40, ppc_samples=2, umap=False)
    err = capsys.readouterr().err
    starts = [line for line in err.splitlines() if line.startswith("evaluate [")]
    assert [line.split("]")[0] for line in starts] == [f"evaluate [{k}/6" for k in range(1, 7)], err
    assert len(re.findall(r"^  done in \d+\.\d s$", err, flags=re.M)) == 6, err
