"""Seed 004: the GPG / PGP sequential VAEs and the dual VAE (pyro_livi.models.sequential,
pyro_livi.models.dualvae), the section-3.2 preprocessing steps, the multiome simulator and the
chapter-4 evaluation.

Thesis mode: with ``normal`` likelihoods at the MSE scale and beta as the KL sites' scale, the
negative ELBO per cell equals the thesis's loss (eq. 3.11, 3.21, 3.35) computed independently
with torch's ``mse_loss`` and the closed-form KL, up to an additive constant that is checked to
be the same for two parameter settings and equal to (G/2) log(pi G) + (P/2) log(pi P).
"""

from __future__ import annotations

import json

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pyro
import pyro.poutine as poutine
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from pyro.infer import TraceMeanField_ELBO

from pyro_livi import preprocessing as pp
from pyro_livi.analysis.multiome_eval import (PeakSweep, THESIS_THRESHOLDS, cell_pearson, evaluate_multiome,
                                              latent_classification, peak_prediction_f1)
from pyro_livi.cli import main
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.data.batch import Batch
from pyro_livi.errors import InputError
from pyro_livi.infer import Trainer, TrainingConfig, elbo_terms
from pyro_livi.models import GPG, PGP, DualVAE
from pyro_livi.models.dualvae import diagonal_gaussian_kl, peak_weights
from pyro_livi.models.sequential import THESIS_TRAINING, gaussian_kl
from pyro_livi.paths import shared_data_dir
from pyro_livi.run import build_model, fit
from pyro_livi.simulate_multiome import MultiomeConfig, read_links, simulate_multiome, write_multiome

MULTIOME = shared_data_dir() / "multiome" / "pbmc_multiome_1000cells.h5mu"
G, P, B = 30, 50, 24

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def continuous_batch(seed=0, dtype=torch.float64) -> Batch:
    """A batch of B cells of log1p-like genes (G) and sparse peaks (P), every cell of the data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.log1p(torch.poisson(torch.rand(B, G, generator=g) * 4, generator=g)).to(dtype)
    y = (torch.log1p(torch.poisson(torch.rand(B, P, generator=g), generator=g))
         * (torch.rand(B, P, generator=g) < 0.3)).to(dtype)
    ones = torch.ones(B, dtype=dtype)
    return Batch(index=torch.arange(B), n_cells=B, x={"rna": x, "atac": y}, size_factor={"rna": ones, "atac": ones},
                 present={"rna": torch.ones(B, dtype=torch.bool), "atac": torch.ones(B, dtype=torch.bool)},
                 donor=None, covariates=torch.zeros(B, 0, dtype=torch.long))


@pytest.fixture
def float64():
    """Models built in double precision (their fixed MSE scales too)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def perturb_parameters(model, seed):
    """A second parameter setting: every parameter moved by N(0, 0.3^2) noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def negative_elbo_per_cell(model, batch, seed):
    """(elbo_terms sum, Pyro's TraceMeanField_ELBO) / n_cells, and the guide trace of the same draw."""
    pyro.set_rng_seed(seed)
    terms = elbo_terms(model.model, model.guide, batch)
    pyro.set_rng_seed(seed)
    pyro_loss = TraceMeanField_ELBO().differentiable_loss(model.model, model.guide, batch)
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(model.guide).get_trace(batch)
    return float(sum(terms.values())) / batch.n_cells, float(pyro_loss) / batch.n_cells, guide_trace


def mse_constant(*n_features):
    return sum(n / 2 * np.log(np.pi * n) for n in n_features)


# ------------------------------------------------------------------------------------- thesis mode
@pytest.mark.parametrize("cls", [GPG, PGP])
def test_sequential_negative_elbo_is_the_thesis_loss_up_to_a_constant(cls, float64):
    """eq. 3.11 (GPG) / 3.21 (PGP): MSE_RNA + MSE_ATAC + beta (KL_1 + KL_2), batch means."""
    torch.manual_seed(0)
    model = cls({"rna": G, "atac": P}, continuous=["rna", "atac"], preset="thesis", n_latent=4, hidden=[16, 8])
    assert model.likelihood_names == {"rna": "normal", "atac": "normal"}
    assert model.kl_weight == 0.1 and model.activation == "tanh"
    batch = continuous_batch()
    x, y = batch.x["rna"], batch.x["atac"]
    offsets = []
    for setting in range(2):
        if setting:
            perturb_parameters(model, 7)
        loss, pyro_loss, trace = negative_elbo_per_cell(model, batch, seed=10 + setting)
        z1, z2 = trace.nodes["z1"]["value"], trace.nodes["z2"]["value"]
        with torch.no_grad():
            if cls is GPG:  # x -> z1 -> y^ -> z2 -> x^
                mu1, lv1 = model.encoder1(x)
                y_hat, _ = model.decoder1(z1)
                mu2, lv2 = model.encoder2(y_hat)
                x_hat, _ = model.decoder2(z2)
            else:  # y -> z1 -> x^ -> z2 -> y^
                mu1, lv1 = model.encoder1(y)
                x_hat, _ = model.decoder1(z1)
                mu2, lv2 = model.encoder2(x_hat)
                y_hat, _ = model.decoder2(z2)
            thesis = (F.mse_loss(x_hat, x) + F.mse_loss(y_hat, y)
                      + 0.1 * (gaussian_kl(mu1, lv1).mean() + gaussian_kl(mu2, lv2).mean()))
        offsets.append(loss - float(thesis))
        assert pyro_loss == pytest.approx(loss, abs=1e-9)
    assert offsets[0] == pytest.approx(offsets[1], abs=1e-9)
    assert offsets[0] == pytest.approx(mse_constant(G, P), abs=1e-9)


@pytest.mark.parametrize("alignment", ["l2", "skl", "fusion"])
@pytest.mark.parametrize("peak_loss", ["mse", "weighted_mse"])
def test_dual_negative_elbo_is_eq_3_35_for_each_alignment(alignment, peak_loss, float64):
    """eq. 3.35: MSE_RNA + (W)MSE_ATAC + beta (KL_R + KL_A) + lambda L_align, batch means."""
    torch.manual_seed(1)
    f = 0.3
    lam = 0.7
    model = DualVAE({"rna": G, "atac": P}, continuous=["rna", "atac"], preset="thesis", n_latent=4, hidden=[8],
                    alignment=alignment, align_weight=lam, peak_loss=peak_loss, peak_nonzero_fraction=f)
    batch = continuous_batch(seed=3)
    x, y = batch.x["rna"], batch.x["atac"]
    offsets = []
    for setting in range(2):
        if setting:
            perturb_parameters(model, 8)
        loss, pyro_loss, trace = negative_elbo_per_cell(model, batch, seed=20 + setting)
        with torch.no_grad():
            mu_r, lv_r = model.encoder_rna(x)
            mu_a, lv_a = model.encoder_atac(y)
            x_hat, _ = model.decoder_rna(trace.nodes["z_rna"]["value"])
            y_hat, _ = model.decoder_atac(trace.nodes["z_atac"]["value"])
            if peak_loss == "mse":
                recon_atac = F.mse_loss(y_hat, y)
            else:  # class-balanced weights: 1/(2f) on non-zero entries, 1/(2(1-f)) on zeros
                w = torch.where(y != 0, 1 / (2 * f), 1 / (2 * (1 - f)))
                recon_atac = (w * (y_hat - y) ** 2).mean()
            if alignment == "l2":
                align = ((mu_r - mu_a) ** 2).sum(-1)
            elif alignment == "skl":
                q_r = torch.distributions.Normal(mu_r, torch.exp(0.5 * lv_r))
                q_a = torch.distributions.Normal(mu_a, torch.exp(0.5 * lv_a))
                align = 0.5 * (torch.distributions.kl_divergence(q_r, q_a).sum(-1)
                               + torch.distributions.kl_divergence(q_a, q_r).sum(-1))
            else:
                shared = model.fusion(torch.cat([mu_r, mu_a], -1))
                align = ((shared - mu_r) ** 2).sum(-1) + ((shared - mu_a) ** 2).sum(-1)
            thesis = (F.mse_loss(x_hat, x) + recon_atac + 0.1 * (gaussian_kl(mu_r, lv_r) + gaussian_kl(mu_a, lv_a)).mean()
                      + lam * align.mean())
        offsets.append(loss - float(thesis))
        assert pyro_loss == pytest.approx(loss, abs=1e-9)
    assert offsets[0] == pytest.approx(offsets[1], abs=1e-9)
    if peak_loss == "mse":
        assert offsets[0] == pytest.approx(mse_constant(G, P), abs=1e-9)


def test_weighted_mse_weights_balance_zero_and_nonzero_entries():
    y = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    w = peak_weights(y, nonzero_fraction=0.25)
    assert float(w.mean()) == pytest.approx(1.0)  # mean weight 1 on data with that fraction
    assert float(w[y != 0].sum()) == pytest.approx(float(w[y == 0].sum()))
    assert torch.allclose(peak_weights(y, 0.5), torch.ones_like(y))  # f = 1/2: plain MSE


def test_closed_form_kls_match_torch():
    g = torch.Generator().manual_seed(0)
    mu1, lv1, mu2, lv2 = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4))
    q1 = torch.distributions.Normal(mu1, torch.exp(0.5 * lv1))
    q2 = torch.distributions.Normal(mu2, torch.exp(0.5 * lv2))
    std = torch.distributions.Normal(torch.zeros_like(mu1), torch.ones_like(mu1))
    assert torch.allclose(diagonal_gaussian_kl(mu1, lv1, mu2, lv2), torch.distributions.kl_divergence(q1, q2).sum(-1))
    assert torch.allclose(gaussian_kl(mu1, lv1), torch.distributions.kl_divergence(q1, std).sum(-1))


def test_thesis_preset_matches_table_3_2_and_explicit_options_override():
    gpg = GPG({"rna": 10, "atac": 20}, continuous=["rna", "atac"], preset="thesis")
    assert (gpg.n_latent, gpg.hidden, gpg.activation, gpg.kl_weight) == (256, [1024], "tanh", 0.1)
    dual = DualVAE({"rna": 10, "atac": 20}, continuous=["rna", "atac"], preset="thesis", peak_nonzero_fraction=0.2)
    assert (dual.hidden, dual.alignment, dual.align_weight, dual.peak_loss) == ([2048], "l2", 1.0, "weighted_mse")
    small = PGP({"rna": 10, "atac": 20}, continuous=["rna", "atac"], preset="thesis", n_latent=3, activation="elu")
    assert (small.n_latent, small.activation, small.hidden) == (3, "elu", [1024])
    assert THESIS_TRAINING["gpg"] == dict(epochs=30, lr=1e-4, batch_size=512)
    assert THESIS_TRAINING["pgp"]["lr"] == 2e-4 and THESIS_TRAINING["dualvae"]["epochs"] == 100
    # fixed MSE scale: sigma^2 = F / 2, a buffer, not a parameter
    assert torch.allclose(gpg.lik_atac_log_scale.exp() ** 2, torch.full((20,), 10.0))
    assert not any("log_scale" in n for n, _ in gpg.named_parameters())


def test_kl_warmup_follows_eq_3_36():
    """beta(e) = beta_max (start + (1 - start) e / T) for e < T, then beta_max."""
    stages = GPG.default_stages(epochs=30, kl_warmup_epochs=20, kl_warmup_start=0.25)
    assert [s.name for s in stages] == ["kl_warmup", "train"] and [s.epochs for s in stages] == [20, 10]
    warm = stages[0].kl_warmup
    assert [warm.weight(0, e) for e in (0, 10, 19)] == pytest.approx([0.25, 0.625, 0.25 + 0.75 * 19 / 20])
    assert stages[1].kl_warmup is None  # full weight after T
    assert len(GPG.default_stages(epochs=5)) == 1
    # the trainer applies it: the KL terms of the history are scaled by the recorded beta
    data = tiny_counts()
    dataset = read_dataset(data, DatasetSpec(modalities={"rna": None, "atac": None}))
    model = build_model("gpg", dataset, n_latent=2, hidden=[8])
    history = Trainer(model, dataset, GPG.default_stages(epochs=3, kl_warmup_epochs=4),
                      TrainingConfig(batch_size=64, progress=False)).fit()
    assert history["beta"].tolist() == pytest.approx([0.0, 0.25, 0.5])
    assert history["kl_z1"].iloc[0] == 0.0 and history["kl_z1"].iloc[2] > 0


# ------------------------------------------------------------------------- counts mode, shapes, gradients
def tiny_counts(n=64, seed=0):
    rng = np.random.default_rng(seed)
    cells = [f"c{i}" for i in range(n)]
    x = rng.poisson(2.0, (n, 12)).astype(np.float32)
    x[:, 0] += 1
    y = rng.poisson(0.4, (n, 20)).astype(np.float32)
    y[:, 0] += 1
    obs = pd.DataFrame({"cell_type": [f"t{i % 2}" for i in range(n)]}, index=cells)
    mods = {"rna": ad.AnnData(sp.csr_matrix(x), obs=obs.copy()), "atac": ad.AnnData(sp.csr_matrix(y), obs=obs.copy())}
    mods["rna"].var_names = [f"g{j}" for j in range(12)]
    mods["atac"].var_names = [f"p{j}" for j in range(20)]
    out = md.MuData(mods)
    out.obs["cell_type"] = obs["cell_type"].to_numpy()
    return out


def test_counts_mode_defaults_nb_and_binarised_bernoulli_and_chain_gradients():
    dataset = read_dataset(tiny_counts(), DatasetSpec(modalities={"rna": None, "atac": None}))
    model = build_model("gpg", dataset, n_latent=3, hidden=[8])
    assert model.likelihood_names == {"rna": "nb", "atac": "bernoulli"}
    assert model.library_target["rna"] == pytest.approx(float(np.median(dataset.size_factors["rna"])))
    batch = dataset.batch(np.arange(16))
    guide_trace = poutine.trace(model.guide).get_trace(batch)
    trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(batch)
    site = trace.nodes["obs_atac"]
    assert set(site["value"].unique().tolist()) <= {0.0, 1.0} and (site["value"] == (batch.x["atac"] > 0)).all()
    out1, _ = model.decoder1(guide_trace.nodes["z1"]["value"])  # P(open) = sigmoid(decoder 1 output)
    assert torch.allclose(site["fn"].log_prob(torch.ones_like(out1)), F.logsigmoid(out1).sum(-1), atol=1e-4)
    assert guide_trace.nodes["z1"]["value"].shape == (16, 3) and guide_trace.nodes["z2"]["value"].shape == (16, 3)
    assert trace.nodes["obs_rna"]["fn"].batch_shape == (16,) and trace.nodes["obs_rna"]["fn"].event_shape == (12,)
    # the gene reconstruction sees decoder 1 and encoder 2 through the guide's chain (eq. 3.5-3.8)
    terms = elbo_terms(model.model, model.guide, batch)
    terms["nll_obs_rna"].backward()
    for part in (model.encoder1, model.decoder1, model.encoder2, model.decoder2):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    latents = model.encode_latents(batch)
    assert set(latents) == {"z1", "z2"} and latents["z2"][0].shape == (16, 3)


def test_dual_branches_only_meet_in_the_alignment():
    dataset = read_dataset(tiny_counts(), DatasetSpec(modalities={"rna": None, "atac": None}))
    model = build_model("dualvae", dataset, n_latent=3, hidden=[8])
    batch = dataset.batch(np.arange(16))
    terms = elbo_terms(model.model, model.guide, batch)
    assert set(terms) == {"kl_z_rna", "kl_z_atac", "nll_obs_rna", "nll_obs_atac", "penalty_align"}
    terms["nll_obs_rna"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.encoder_atac.parameters())
    model.zero_grad()
    terms["penalty_align"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_atac.mu.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_rna.mu.parameters())
    assert set(model.encode_latents(batch)) == {"z_rna", "z_atac"}


def test_likelihood_that_does_not_fit_the_data_is_named():
    data = tiny_counts()
    with pytest.raises(InputError, match="continuous-modalities") as info:
        fit(data, model="gpg", modalities={"rna": None, "atac": None}, preset="thesis", epochs=1, progress=False)
    assert "pyro-livi preprocess" in str(info.value)
    with pytest.raises(InputError, match="raw counts"):
        fit(data, model="pgp", modalities={"rna": None, "atac": None}, continuous_modalities=["rna", "atac"],
            likelihoods={"rna": "nb"}, epochs=1, progress=False)
    with pytest.raises(ValueError, match="kl_weight"):
        GPG({"rna": 3, "atac": 4}, kl_weight=0.0)


# ------------------------------------------------------------------------------- preprocessing
def unpaired_mdata():
    rng = np.random.default_rng(0)
    cells = [f"bc{i}" for i in range(40)]
    rna = ad.AnnData(sp.csr_matrix(rng.poisson(3, (38, 10)).astype(np.float32)), obs=pd.DataFrame(index=cells[:38]))
    atac_x = rng.poisson(0.3, (37, 30)).astype(np.float32)
    atac_x[:, 0] = 0
    atac_x[0, 0] = 1  # peak 0 open in 1 cell only (< 3%)
    atac = ad.AnnData(sp.csr_matrix(atac_x), obs=pd.DataFrame(index=cells[3:]))
    atac = atac[::-1].copy()  # another order
    return md.MuData({"rna": rna, "atac": atac})


def test_pair_cells_aligns_barcodes_and_reports_the_unmatched():
    out = pp.pair_cells(unpaired_mdata())
    assert list(out.mod["rna"].obs_names) == list(out.mod["atac"].obs_names) == [f"bc{i}" for i in range(3, 38)]
    step = pp.preprocessing_steps(out)[-1]
    assert step["step"] == "pair_cells" and step["params"]["n_cells"] == 35
    assert step["params"]["unmatched"] == {"rna": 3, "atac": 2}
    assert list(step["params"]["unmatched_examples"]["atac"]) == ["bc39", "bc38"]
    with pytest.raises(InputError, match="only some modalities") as info:
        pp.pair_cells(unpaired_mdata(), require_all=True)
    assert "bc0" in str(info.value) and "'rna': 3" in str(info.value)
    disjoint = md.MuData({"rna": ad.AnnData(np.ones((2, 2), np.float32), obs=pd.DataFrame(index=["a", "b"])),
                          "atac": ad.AnnData(np.ones((2, 2), np.float32), obs=pd.DataFrame(index=["c", "d"]))})
    with pytest.raises(InputError, match="no cell barcode is shared"):
        pp.pair_cells(disjoint)


def test_section_3_2_recipes_median_normalisation_and_3_percent_peaks(tmp_path, capsys):
    data = pp.pair_cells(unpaired_mdata())
    out = pp.preprocess(data, rna="lognorm_median", atac="log1p")
    counts = data.mod["rna"].X.toarray()
    median = np.median(counts.sum(1))
    np.testing.assert_allclose(out.mod["rna"].X.toarray(), np.log1p(counts / counts.sum(1, keepdims=True) * median),
                               rtol=1e-5)
    kept = (data.mod["atac"].X.toarray() > 0).mean(0) >= 0.03
    assert out.mod["atac"].n_vars == kept.sum() and "f0" not in out.mod["atac"].var_names
    binary = pp.preprocess(data, atac="binary")
    assert set(np.unique(binary.mod["atac"].X.toarray())) <= {0.0, 1.0}
    # the command: pairing report, unmatched barcodes refused with --require-paired
    src = tmp_path / "in.h5mu"
    unpaired_mdata().write(src)
    assert main(["preprocess", "--data", str(src), "--rna", "lognorm_median", "--atac", "log1p", "--pair",
                 "--out", str(tmp_path / "out.h5mu")]) == 0
    text = capsys.readouterr().out
    assert "paired 35 cells" in text and "rna: 3" in text and "atac: 2" in text
    assert main(["preprocess", "--data", str(src), "--require-paired", "--out", str(tmp_path / "o2.h5mu")]) == 2
    assert "--pair instead of --require-paired" in capsys.readouterr().err


def test_filter_cells_drops_cells_from_every_modality():
    data = pp.pair_cells(unpaired_mdata())
    atac = data.mod["atac"].X.toarray()
    out = pp.filter_cells(data, {"atac": 9})
    keep = (atac != 0).sum(1) >= 9
    assert out.n_obs == keep.sum() and list(out.mod["rna"].obs_names) == list(out.mod["atac"].obs_names)
    assert pp.preprocessing_steps(out)[-1]["params"]["dropped_cells"] == {"atac": int((~keep).sum())}


# ------------------------------------------------------------------------------- simulator
SMALL = MultiomeConfig(n_cells=300, n_genes=200, n_peaks=1500, n_cell_types=4, n_regulators=6)


@pytest.fixture(scope="module")
def small_sim():
    return simulate_multiome(SMALL, seed=2)


def test_simulator_shapes_sparsity_truth_and_seed(small_sim, tmp_path):
    sim = small_sim
    rna, atac = sim.mdata.mod["rna"].X, sim.mdata.mod["atac"].X
    assert sp.isspmatrix_csr(rna) and sp.isspmatrix_csr(atac)
    assert rna.shape == (300, 200) and atac.shape == (300, 1500)
    assert 0.04 < atac.nnz / (300 * 1500) < 0.15  # section 2.2: the peak matrix is > 85% zeros
    assert set(sim.cell_types.cat.categories) == {f"type_{t}" for t in range(4)}
    links = sim.links
    assert list(links.columns) == ["gene", "peak", "effect", "gene_index", "peak_index", "distance_to_tss"]
    assert links["gene"].nunique() == 6 and links["peak"].is_unique
    assert (links["distance_to_tss"].abs() <= SMALL.link_window).all()
    assert (sim.mdata.mod["rna"].var_names[links["gene_index"]] == links["gene"]).all()
    assert (sim.mdata.mod["atac"].var_names[links["peak_index"]] == links["peak"]).all()
    again = simulate_multiome(SMALL, seed=2)
    assert (again.mdata.mod["atac"].X != atac).nnz == 0 and again.links.equals(links)
    paths = write_multiome(sim, tmp_path)
    pd.testing.assert_frame_equal(read_links(paths["links"]), links, check_dtype=False)
    types = pd.read_csv(paths["cell_types"], sep="\t")
    assert list(types.columns) == ["cell", "cell_type"] and len(types) == 300
    assert json.loads(paths["config"].read_text())["n_links"] == len(links)


def test_planted_links_show_in_the_data(small_sim):
    """A linked peak opens with its gene's expression (sign of the planted effect); unlinked
    peaks of the same regulator's neighbourhood do not."""
    sim = small_sim
    rna = sim.mdata.mod["rna"].X.toarray()
    atac = (sim.mdata.mod["atac"].X.toarray() > 0).astype(float)
    expr = np.log1p(rna / rna.sum(1, keepdims=True) * 1e3)
    strong = sim.links[sim.links["effect"].abs() > 1.5]
    corr = [np.corrcoef(expr[:, g], atac[:, p])[0, 1] for g, p in zip(strong["gene_index"], strong["peak_index"])]
    assert np.mean(np.sign(corr) == np.sign(strong["effect"])) > 0.8
    background = np.flatnonzero((sim.peaks["kind"] == "background").to_numpy())[:100]
    g0 = int(strong["gene_index"].iloc[0])
    null = [abs(np.corrcoef(expr[:, g0], atac[:, p])[0, 1]) for p in background]
    assert np.median(np.abs(corr)) > 2 * np.nanmedian(null)


def test_simulate_command_multiome_mode(tmp_path, capsys):
    assert main(["simulate", "--mode", "multiome", "--out", str(tmp_path), "--n-cells", "120", "--n-genes", "100",
                 "--n-peaks", "600", "--n-cell-types", "3", "--n-regulators", "4", "--seed", "1"]) == 0
    assert "120 cells x 100 genes + 600 peaks" in capsys.readouterr().out
    data = md.read_h5mu(tmp_path / "multiome.h5mu")
    assert data.mod["atac"].shape == (120, 600) and "cell_type" in data.obs
    assert (tmp_path / "truth" / "links.tsv").exists() and (tmp_path / "truth" / "cell_types.tsv").exists()
    assert main(["simulate", "--mode", "multiome", "--n-donors", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--n-donors" in capsys.readouterr().err


# ------------------------------------------------------------------------------- evaluation
def test_peak_sweep_and_pearson_match_scikit_learn_and_numpy():
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(0)
    obs = rng.poisson(0.3, (40, 25)) * (rng.random((40, 25)) < 0.5)
    pred = rng.uniform(0, 3, (40, 25))
    best, table = peak_prediction_f1(pred, obs)
    assert table["threshold"].tolist() == list(THESIS_THRESHOLDS)
    for _, row in table.iterrows():
        p, r, f, _ = precision_recall_fscore_support((obs != 0).ravel(), (pred > row["threshold"]).ravel(),
                                                     average="binary", zero_division=0)
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f))
    assert best["f1"] == table["f1"].max()
    sweep = PeakSweep(THESIS_THRESHOLDS)
    sweep.add(pred[:15], obs[:15]), sweep.add(pred[15:], obs[15:])  # streaming = at once
    pd.testing.assert_frame_equal(sweep.table(), table)
    x, y = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    assert cell_pearson(x, y) == pytest.approx([np.corrcoef(a, b)[0, 1] for a, b in zip(x, y)])
    assert np.isnan(cell_pearson(np.ones((1, 4)), y[:1, :4]))[0]


def test_latent_classification_on_separable_and_random_latents():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 60)
    separable = np.eye(3)[np.repeat([0, 1, 2], 60)] * 5 + rng.normal(size=(180, 3))
    good = latent_classification(separable, labels)
    assert good["f1"] > 0.95 and good["ari"] > 0.85 and good["n_test"] == 54
    bad = latent_classification(rng.normal(size=(180, 3)), labels)
    assert bad["f1"] < 0.6 and abs(bad["ari"]) < 0.2


# ------------------------------------------------------------------------------- real multiome data
@pytest.fixture(scope="module")
def real_paired():
    if not MULTIOME.exists():
        pytest.skip(f"real data absent: {MULTIOME} (set PYRO_LIVI_DATA)")
    data = md.read_h5mu(MULTIOME)
    return pp.filter_cells(pp.pair_cells(data), {"atac": 1})  # 19 cells have no ATAC fragment


@pytest.mark.parametrize("name", ["gpg", "pgp", "dualvae"])
def test_real_multiome_fits_counts_mode(real_paired, name):
    result = fit(real_paired, model=name, modalities={"rna": None, "atac": None}, epochs=3, batch_size=256,
                 lr=2e-3, progress=False, n_latent=5, hidden=[32])
    assert len(result.history) == 3 and np.isfinite(result.history["loss"]).all()
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[0]
    assert result.dataset.n_cells == 981


def test_real_multiome_thesis_mode_and_evaluation(real_paired, tmp_path):
    data = pp.preprocess(real_paired, rna="lognorm_median", atac="log1p")
    path = tmp_path / "pp.h5mu"
    data.write(path)
    run = tmp_path / "run"
    assert main(["fit", "--model", "gpg", "--data", str(path), "--modalities", "rna,atac", "--continuous-modalities",
                 "rna,atac", "--preset", "thesis", "--n-latent", "8", "--hidden", "32", "--epochs", "2",
                 "--batch-size", "512", "--lr", "1e-4", "--out", str(run)]) == 0
    assert (run / "latent.tsv").exists() and (run / "model.pt").exists()
    result = fit(path, model="dualvae", modalities={"rna": None, "atac": None}, continuous_modalities=["rna", "atac"],
                 preset="thesis", n_latent=8, hidden=[32], epochs=2, batch_size=1024, lr=1e-4, progress=False)
    assert result.model.peak_loss == "weighted_mse"
    nz = (data.mod["atac"].X != 0).sum() / np.prod(data.mod["atac"].shape)
    assert result.model.peak_nonzero_fraction == pytest.approx(float(nz))
    labels = (data.mod["rna"].layers["counts"].sum(1).A1 > np.median(data.mod["rna"].layers["counts"].sum(1).A1))
    ev = evaluate_multiome(result.model, result.dataset, labels.astype(int))
    assert set(ev.classification.index) == {"z_rna", "z_atac"}
    assert ev.peaks_best["threshold"] in THESIS_THRESHOLDS and 0 <= ev.peaks_best["f1"] <= 1
    assert np.isfinite(ev.gene_correlation_mean)


# ------------------------------------------------------------------------------- planted recovery
@pytest.mark.slow
def test_gpg_latent_recovers_planted_cell_types_and_beats_shuffled_peaks(tmp_path):
    """Simulated multiome (2,000 cells, 500 genes, 4,000 peaks, 8 types): GPG's z1 classifies
    the planted types with weighted F1 >= 0.9; the peak prediction F1 is above the shuffled
    baseline's."""
    cfg = MultiomeConfig(n_cells=2000, n_genes=500, n_peaks=4000, n_regulators=10)
    sim = simulate_multiome(cfg, seed=1)
    result = fit(sim.mdata, model="gpg", modalities={"rna": None, "atac": None}, label_keys=["cell_type"],
                 epochs=20, batch_size=256, lr=2e-3, progress=False, train_size=1.0, n_latent=16, hidden=[128],
                 kl_warmup_epochs=5)
    ev = evaluate_multiome(result.model, result.dataset, "cell_type")
    print(ev.classification.to_string())
    print(f"peak F1 {ev.peaks_best['f1']:.3f} (threshold {ev.peaks_best['threshold']}), shuffled "
          f"{ev.peaks_shuffled_best['f1']:.3f}; gene Pearson {ev.gene_correlation_mean:.3f}")
    assert ev.classification.loc["z1", "f1"] >= 0.9
    assert ev.peaks_best["f1"] > ev.peaks_shuffled_best["f1"] + 0.02
