"""TOTALVI: the per-cell-background NB mixture against scipy and its per-element sampling; the
masked-protein design (no gradient from unmeasured proteins, imputed values returned); the
KL warm-up schedule; the CLI; recovery of planted structure from the model's own generative
process; the isotype-control negative control on real ECCITE-seq data; two 10x runs with
different protein panels."""

import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

from pyro_livi.analysis.totalvi_outputs import protein_measured, totalvi_tables, write_totalvi_tables
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.errors import InputError
from pyro_livi.infer import KLWarmup, elbo_terms
from pyro_livi.likelihoods import NegativeBinomialMixture, get_likelihood
from pyro_livi.models import MODELS, TOTALVI
from pyro_livi.models.totalvi import protein_background_init, read_protein_panel
from pyro_livi.paths import shared_data_dir
from pyro_livi.run import build_model, fit

CITESEQ = shared_data_dir() / "citeseq"


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """One torch thread in every test: a command run by an earlier test may change the count,
    and small models train faster without thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _needs(path):
    return pytest.mark.skipif(not path.exists(), reason=f"real data not found: {path} "
                              "(set PYRO_LIVI_DATA to the shared data folder)")


# --------------------------------------------------------------------------- likelihood
def test_nb_mixture_cell_log_prob_matches_scipy():
    """log p(y) = logsumexp(log w + log NB(y; beta, phi), log(1 - w) + log NB(y; beta + mean, phi))
    with scipy's nbinom(n=phi, p=phi / (phi + mu))."""
    rng = np.random.default_rng(0)
    B, T = 6, 5
    log_bg = rng.normal(1.5, 1.0, (B, T))
    mean = rng.uniform(0.5, 200.0, (B, T))
    log_theta = rng.normal(1.0, 1.0, T)
    mix = rng.normal(0.0, 2.0, (B, T))
    y = rng.integers(0, 300, (B, T)).astype(float)
    lik = get_likelihood("nb_mixture_cell")
    d = lik(torch.tensor(mean), log_theta=torch.tensor(log_theta), log_background=torch.tensor(log_bg),
            mix_logits=torch.tensor(mix))
    got = d.log_prob(torch.tensor(y)).numpy()
    theta, back = np.exp(log_theta)[None], np.exp(log_bg)
    fore = back + mean
    w = 1 / (1 + np.exp(-mix))
    lb = np.log(w) + stats.nbinom.logpmf(y, theta, theta / (theta + back))
    lf = np.log1p(-w) + stats.nbinom.logpmf(y, theta, theta / (theta + fore))
    np.testing.assert_allclose(got, np.logaddexp(lb, lf), rtol=1e-9, atol=1e-9)
    assert lik.cell_heads == ("log_background", "mix_logits") and lik.feature_params == ("log_theta",)
    assert MODELS["totalvi"](3, 2, n_hidden=8).likelihoods["prot"].name == "nb_mixture_cell"
    assert get_likelihood("nb_mixture").feature_params == ("log_background", "log_theta")  # unchanged


def test_mixture_sample_draws_the_component_per_element():
    """One sample call holds both components within a single (cell, protein) across draws and
    across the elements of a batch, in the proportion w (scvi-tools' class draws one component
    for the whole sample)."""
    torch.manual_seed(0)
    w = torch.tensor([[0.3, 0.5, 0.8]]).expand(4, 3)
    d = NegativeBinomialMixture(torch.full((4, 3), 1.0), torch.full((4, 3), 1000.0), torch.full((4, 3), 1e4),
                                torch.logit(w))
    draws = d.sample((4000,))
    assert draws.shape == (4000, 4, 3)
    foreground = draws > 100
    frac = foreground.double().mean(0)
    np.testing.assert_allclose(frac.numpy(), 1 - w.numpy(), atol=0.04)
    one_draw = d.sample()  # a single draw already mixes components over elements
    big = NegativeBinomialMixture(torch.ones(2000), torch.full((2000,), 1000.0), torch.full((2000,), 1e4),
                                  torch.zeros(2000)).sample()
    assert one_draw.shape == (4, 3) and 0.4 < (big > 100).double().mean() < 0.6


# -------------------------------------------------------------------------- tiny data
def tiny_cite(n_cells=60, n_genes=12, n_proteins=5, seed=0, absent_cells=True):
    """MuData with two batches; batch b1 lacks protein p3 (stored as 0) and, optionally, every
    fifth cell lacks the protein modality."""
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame({"batch": [f"b{i % 2}" for i in range(n_cells)]},
                       index=[f"cell{i}" for i in range(n_cells)])
    x = rng.poisson(4.0, (n_cells, n_genes)).astype(np.float32) + 1
    y = rng.poisson(20.0, (n_cells, n_proteins)).astype(np.float32)
    y[obs["batch"].to_numpy() == "b1", 3] = 0
    rna = ad.AnnData(sp.csr_matrix(x), obs=obs.copy())
    rna.var_names = [f"g{j}" for j in range(n_genes)]
    prot = ad.AnnData(sp.csr_matrix(y), obs=obs.copy())
    prot.var_names = [f"p{j}" for j in range(n_proteins)]
    if absent_cells:
        prot = prot[np.arange(n_cells) % 5 != 0].copy()
    mdata = md.MuData({"rna": rna, "prot": prot})
    mdata.obs = obs.loc[mdata.obs_names].copy()
    panel = pd.DataFrame(True, index=["b0", "b1"], columns=list(prot.var_names))
    panel.loc["b1", "p3"] = False
    spec = DatasetSpec(modalities={"rna": None, "prot": None}, covariate_keys=["batch"],
                       optional_modalities=["prot"] if absent_cells else [])
    return mdata, spec, panel


def tiny_model(panel, **options):
    mdata, spec, _ = tiny_cite()
    dataset = read_dataset(mdata, spec)
    torch.manual_seed(0)
    model = build_model("totalvi", dataset, n_latent=3, n_hidden=8, n_layers_encoder=1,
                        protein_panel=panel, **options)
    return model, dataset


def test_panel_forms_and_errors(tmp_path):
    _, _, panel = tiny_cite()
    proteins = list(panel.columns)
    mask = read_protein_panel(panel, ["b0", "b1"], proteins)
    assert mask.shape == (2, 5) and mask.sum() == 9 and not mask[1, 3]
    as_dict = {"b0": proteins, "b1": [p for p in proteins if p != "p3"]}
    np.testing.assert_array_equal(read_protein_panel(as_dict, ["b0", "b1"], proteins), mask)
    path = tmp_path / "panel.tsv"
    panel.astype(int).to_csv(path, sep="\t")
    np.testing.assert_array_equal(read_protein_panel(str(path), ["b0", "b1"], proteins), mask)
    with pytest.raises(InputError, match="b2"):
        read_protein_panel(panel, ["b0", "b1", "b2"], proteins)
    with pytest.raises(InputError, match="p9"):
        read_protein_panel({"b0": ["p9"], "b1": []}, ["b0", "b1"], proteins)


def test_masked_protein_gets_no_gradient_and_is_imputed():
    """p3 is not in batch b1's panel: for b1 cells its likelihood term is masked, so neither its
    dispersion nor anything else gets a gradient from it, its stored placeholder values do not
    change the loss, and the outputs still give an imputed foreground for it."""
    _, _, panel = tiny_cite()
    model, dataset = tiny_model(panel)
    b1 = np.flatnonzero(dataset.covariate_codes[:, 0] == 1)[:16]
    batch = dataset.batch(b1)
    assert not model.observed_mask(batch)[:, 3].any()
    model.train()
    pyro_seed = 3
    import pyro

    pyro.set_rng_seed(pyro_seed)
    terms = elbo_terms(model.model, model.guide, batch)
    terms["nll_obs_prot"].backward()
    grad = model.lik_prot_log_theta.grad
    assert grad[3] == 0 and (grad[[0, 1, 2, 4]] != 0).all()
    # the placeholder values of a masked protein are never read
    altered = dataset.batch(b1)
    altered.x["prot"][:, 3] = 1000.0
    pyro.set_rng_seed(pyro_seed)
    again = elbo_terms(model.model, model.guide, altered)
    for k in terms:
        assert torch.allclose(terms[k], again[k]), k
    # a cell lacking the protein modality contributes nothing to obs_prot
    absent = np.flatnonzero(~dataset.present["prot"])[:4]
    empty = elbo_terms(model.model, model.guide, dataset.batch(absent))
    assert empty["nll_obs_prot"].item() == 0.0
    tables = totalvi_tables(model, dataset)
    measured = protein_measured(model, dataset)
    assert not measured.loc[dataset.obs_names[b1], "p3"].any()
    assert not measured.loc[dataset.obs_names[absent]].any().any()
    for name in ("denoised_protein", "protein_foreground_probability"):
        table = tables[name]
        assert list(table.index) == list(dataset.obs_names) and list(table.columns) == [f"p{j}" for j in range(5)]
        assert np.isfinite(table.to_numpy()).all() and (table.loc[dataset.obs_names[b1], "p3"] > 0).all()
    assert tables["denoised_rna"].shape == (dataset.n_cells, 12)


def test_background_prior_mean_is_fixed_and_background_init_modes():
    _, _, panel = tiny_cite()
    model, dataset = tiny_model(panel, background_prior_mean=[5.0, 6.0, 7.0, 8.0, 9.0])
    np.testing.assert_allclose(model.back_prior_loc.exp().numpy(), [[5, 6, 7, 8, 9]] * 2, rtol=1e-5)
    assert not any("back_prior_loc" in n for n, _ in model.named_parameters())
    with pytest.raises(InputError, match="background_prior_mean"):
        tiny_model(panel, background_prior_mean=[5.0, 6.0])
    # per protein: each protein's lower mode; pooled: one value tiled over proteins (scvi-tools)
    rng = np.random.default_rng(0)
    back = np.array([3.0, 10.0, 40.0])
    fg = rng.random((400, 3)) < 0.3
    counts = rng.poisson(back * np.where(fg, 20.0, 1.0))
    loc, _ = protein_background_init(counts, np.zeros(400, int), 1, how="per_protein")
    np.testing.assert_allclose(loc[0], np.log1p(back), atol=0.25)
    pooled, _ = protein_background_init(counts, np.zeros(400, int), 1, how="pooled")
    assert np.ptp(pooled[0]) == 0
    none, _ = protein_background_init(counts, np.zeros(400, int), 1, how="none")
    assert (none == 1.0).all()


def test_latent_library_option():
    """log l ~ N(m_s, v_s) with the per-batch empirical mean and variance of log total counts."""
    _, _, panel = tiny_cite()
    model, dataset = tiny_model(panel, latent_library=True)
    log_sf = np.log(dataset.size_factors["rna"])
    b0 = dataset.covariate_codes[:, 0] == 0
    np.testing.assert_allclose(model.library_prior_loc[0].item(), log_sf[b0].mean(), rtol=1e-5)
    np.testing.assert_allclose(model.library_prior_scale[0].item() ** 2, log_sf[b0].var(), rtol=1e-4)
    terms = elbo_terms(model.model, model.guide, dataset.batch(np.arange(12)))
    assert {"kl_z", "kl_log_beta", "kl_log_library", "nll_obs_rna", "nll_obs_prot"} == set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    rna = totalvi_tables(model, dataset, library_size=1e4)["denoised_rna"]
    np.testing.assert_allclose(rna.sum(1).to_numpy(), 1e4, rtol=1e-4)


def test_kl_warmup_schedule():
    """totalVI's warm-up: 0.75 x n_cells optimiser steps when n_cells is known, else 0.75 of the epochs."""
    (stage,) = TOTALVI.default_stages(epochs=100, n_cells=6855)
    assert stage.kl_warmup == KLWarmup(steps=5141) and stage.train == ("all",)
    (stage,) = TOTALVI.default_stages(epochs=100)
    assert stage.kl_warmup == KLWarmup(epochs=75)
    (stage,) = TOTALVI.default_stages(epochs=1, patience=None)
    assert stage.kl_warmup.epochs == 1 and stage.early_stopping is None
    with pytest.raises(TypeError):
        TOTALVI.default_stages(epochs=1, bogus=1)


@pytest.mark.slow
def test_cli_fit_and_evaluate(tmp_path, capsys):
    from pyro_livi.cli import main

    mdata, _, panel = tiny_cite()
    data = tmp_path / "cite.h5mu"
    mdata.write(data)
    panel_path = tmp_path / "panel.tsv"
    panel.astype(int).to_csv(panel_path, sep="\t")
    with pytest.raises(SystemExit):
        main(["fit", "--model", "totalvi", "--help"])
    assert "--protein-panel" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["fit", "--model", "totalvi", "--data", str(data), "--modalities", "rna,prot",
                 "--optional-modalities", "prot", "--covariate-keys", "batch", "--protein-panel",
                 str(panel_path), "--n-latent", "3", "--n-hidden", "8", "--epochs", "2", "--batch-size", "32",
                 "--out", str(run)]) == 0
    for name in ("model.pt", "latent.tsv", "dispersions_rna.tsv", "dispersions_prot.tsv", "history.tsv"):
        assert (run / name).exists(), name
    disp = pd.read_csv(run / "dispersions_prot.tsv", sep="\t", index_col=0)
    assert {"theta", "background_mean_b0", "background_mean_b1"} <= set(disp.columns)
    assert main(["evaluate", "--run", str(run), "--data", str(data), "--no-umap", "--ppc-samples", "2",
                 "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "report.md").exists()


# ------------------------------------------------------------------- planted structure
def simulate_planted(n_cells=1500, n_genes=100, n_proteins=10, seed=0):
    """Counts from TOTALVI's generative process with 5 clusters: RNA x ~ NB(l rho_k, 5); protein
    t has a background log beta ~ N(c_t, 0.2) in every cell and is foreground (mean beta alpha_t,
    alpha_t in [8, 30]) with probability 0.95 in its given clusters and 0.03 elsewhere;
    y ~ NB(., 20) with the component drawn per element."""
    rng = np.random.default_rng(seed)
    k = 5
    cluster = rng.integers(0, k, n_cells)
    logits = rng.normal(0, 1, (k, n_genes)) + rng.normal(0, 1, n_genes)
    rho = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    library = np.exp(rng.normal(np.log(1500), 0.3, n_cells))
    mu = rho[cluster] * library[:, None]
    x = rng.negative_binomial(5.0, 5.0 / (5.0 + mu))
    fg_clusters = np.zeros((k, n_proteins), bool)
    for t in range(n_proteins):
        fg_clusters[[t % k] if t < 5 else [t % k, (t + 2) % k], t] = True
    c = rng.uniform(np.log(5), np.log(40), n_proteins)
    log_beta = rng.normal(c, 0.2, (n_cells, n_proteins))
    alpha = rng.uniform(8, 30, n_proteins)
    background = rng.random((n_cells, n_proteins)) < np.where(fg_clusters[cluster], 0.05, 0.97)
    m = np.exp(log_beta) * np.where(background, 1.0, alpha)
    y = rng.negative_binomial(20.0, 20.0 / (20.0 + m))
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    rna = ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs.copy())
    rna.var_names = [f"g{j}" for j in range(n_genes)]
    prot = ad.AnnData(sp.csr_matrix(y.astype(np.float32)), obs=obs.copy())
    prot.var_names = [f"p{j}" for j in range(n_proteins)]
    return md.MuData({"rna": rna, "prot": prot}), dict(cluster=cluster, background=background, c=c)


@pytest.mark.slow
def test_planted_structure_is_recovered():
    """Foreground probability AUROC against the true component > 0.9, k-means ARI of the latent
    against the clusters > 0.8, learned background prior means within log(1.5) of the truth."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, roc_auc_score

    from pyro_livi.analysis.totalvi_outputs import latent

    mdata, truth = simulate_planted()
    result = fit(mdata, model="totalvi", modalities={"rna": None, "prot": None}, epochs=200, patience=None,
                 batch_size=256, lr=4e-3, progress=False, n_latent=10, n_hidden=64, seed=0)
    model, dataset = result.model, result.dataset
    foreground = totalvi_tables(model, dataset)["protein_foreground_probability"].to_numpy()
    assert roc_auc_score((~truth["background"]).ravel(), foreground.ravel()) > 0.9
    z = latent(model, dataset).to_numpy()
    labels = KMeans(5, n_init=10, random_state=0).fit_predict(z)
    assert adjusted_rand_score(truth["cluster"], labels) > 0.8
    learned = model.back_prior_loc.detach().numpy()[0]
    assert np.abs(learned - truth["c"]).max() < np.log(1.5), learned - truth["c"]


# ------------------------------------------------------------------------- real data
ECCITE = CITESEQ / "eccite_pbmc500.h5mu"


@pytest.mark.slow
@_needs(ECCITE)
def test_isotype_controls_are_background_on_eccite():
    """ECCITE-seq PBMC (49 ADTs): the isotype controls IgG1 and IgG2a have median foreground
    probability < 0.2, while the lineage markers CD3, CD19 and CD14 are bimodal: at least 3% of
    cells clearly foreground (> 0.8) and at least 3% clearly background (< 0.2); B cells and
    classical monocytes are a few percent of these PBMCs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = md.read_h5mu(ECCITE)
    rna = full.mod["rna"]
    keep = np.sort(np.argsort(-np.asarray(rna.X.sum(0)).ravel())[:1000])
    mdata = md.MuData({"rna": rna[:, keep].copy(), "adt": full.mod["adt"].copy()})
    result = fit(mdata, model="totalvi", modalities={"rna": None, "adt": None}, epochs=200, patience=None,
                 batch_size=256, lr=4e-3, progress=False, seed=0)
    fg = totalvi_tables(result.model, result.dataset)["protein_foreground_probability"]
    for isotype in ("IgG1", "IgG2a"):
        assert fg[isotype].median() < 0.2, (isotype, fg[isotype].median())
    for marker in ("CD3", "CD19", "CD14"):
        v = fg[marker].to_numpy()
        assert (v > 0.8).mean() >= 0.03 and (v < 0.2).mean() >= 0.03, (marker, np.median(v))


PBMC10K, PBMC5K = CITESEQ / "pbmc10k_protein_200cells.h5ad", CITESEQ / "pbmc5k_protein_200cells.h5ad"


@pytest.mark.slow
@_needs(PBMC10K)
@_needs(PBMC5K)
def test_two_runs_with_different_panels(tmp_path):
    """pbmc10k (14 proteins) + pbmc5k (29): the union of proteins, a declared panel per run; the
    proteins pbmc10k lacks are masked for its cells and imputed in the outputs."""
    runs = {"pbmc10k": ad.read_h5ad(PBMC10K), "pbmc5k": ad.read_h5ad(PBMC5K)}
    genes = runs["pbmc10k"].var_names.intersection(runs["pbmc5k"].var_names)
    total = sum(np.asarray(a[:, genes].X.sum(0)).ravel() for a in runs.values())
    genes = genes[np.sort(np.argsort(-total)[:500])]
    proteins = sorted(set().union(*(map(str, a.uns["protein_names"]) for a in runs.values())))
    rna_parts, prot_parts, panel = [], [], {}
    for name, a in runs.items():
        names = list(map(str, a.uns["protein_names"]))
        y = pd.DataFrame(np.asarray(a.obsm["protein_expression"]), columns=names).reindex(columns=proteins,
                                                                                           fill_value=0)
        obs = pd.DataFrame({"run": name}, index=[f"{name}_{c}" for c in a.obs_names])
        rna_parts.append(ad.AnnData(sp.csr_matrix(a[:, genes].X), obs=obs, var=pd.DataFrame(index=genes)))
        prot_parts.append(ad.AnnData(sp.csr_matrix(y.to_numpy(np.float32)), obs=obs,
                                     var=pd.DataFrame(index=proteins)))
        panel[name] = names
    mdata = md.MuData({"rna": ad.concat(rna_parts), "prot": ad.concat(prot_parts)})
    mdata.obs["run"] = mdata.mod["rna"].obs["run"].to_numpy()
    result = fit(mdata, model="totalvi", modalities={"rna": None, "prot": None}, covariate_keys=["run"],
                 protein_panel=panel, epochs=20, patience=None, batch_size=128, lr=4e-3, progress=False,
                 n_latent=10, n_hidden=64, seed=0)
    model, dataset = result.model, result.dataset
    mask = model.protein_mask.numpy()
    assert mask.sum(1).tolist() == [14, 29] if dataset.covariate_categories["run"][0] == "pbmc10k" \
        else mask.sum(1).tolist() == [29, 14]
    tables = write_totalvi_tables(model, dataset, tmp_path)
    measured = tables["protein_measured"]
    only_5k = [p for p in proteins if p not in panel["pbmc10k"]]
    cells_10k = dataset.obs_names[dataset.obs["run"].to_numpy() == "pbmc10k"]
    assert not measured.loc[cells_10k, only_5k].any().any()
    imputed = tables["denoised_protein"].loc[cells_10k, only_5k].to_numpy()
    assert np.isfinite(imputed).all() and (imputed > 0).all()
    assert (tmp_path / "protein_foreground_probability.tsv").exists()
