"""Multigrate-like model: product of experts masked by MuData membership, the prior for a cell
without modalities, KL and MMD in the reference's per-cell units, embeddings of cells lacking a
modality on planted data, MMD integration, imputation, and two real 10x CITE-seq runs with
different protein panels."""

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import pyro.poutine as poutine
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from pyro_livi.analysis.imputation import impute_modality, modality_latent_tables
from pyro_livi.analysis.latents import cell_state
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.infer import elbo_terms
from pyro_livi.models import Multigrate
from pyro_livi.models.multigrate import MMD_GAMMAS, group_mmd, mmd
from pyro_livi.paths import shared_data_dir
from pyro_livi.run import build_model, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True, scope="module")
def _mudata_keeps_modality_obs():
    """MuData objects built here do not pull .obs columns from their modalities; the option is
    restored for the other test modules."""
    with md.set_options(pull_on_update=False):
        yield

CITESEQ = shared_data_dir() / "citeseq"
RUNS = {"10k": CITESEQ / "pbmc10k_protein_200cells.h5ad", "5k": CITESEQ / "pbmc5k_protein_200cells.h5ad"}
SMALL = dict(n_latent=8, n_hidden=32, dropout_rate=0.1)


# ------------------------------------------------------------------------------ planted data
def simulate(n=400, n_genes=60, n_prot=15, shift=1.0, frac_missing=0.3, seed=0):
    """Two modalities from one shared z: 4 cell types (centres N(0, 2^2) in 4 dimensions, cells
    N(centre, 0.5^2)); RNA counts NB(softmax(z W + b + shift_rna[batch]) * l, theta 10) with
    l ~ U(1000, 3000); CLR-like proteins z W_p + shift_prot[batch] + N(0, 0.3^2); per-feature
    batch shifts N(0, shift^2) for two batches; ``frac_missing`` of the cells lack proteins.
    Returns the MuData with every modality (``full``), the one with the proteins of the
    missing cells removed (``part``), and the truth."""
    rng = np.random.default_rng(seed)
    types, batch = rng.integers(0, 4, n), rng.integers(0, 2, n)
    z = rng.normal(0, 2.0, (4, 4))[types] + rng.normal(0, 0.5, (n, 4))
    logits = (z @ rng.normal(0, 0.7, (4, n_genes)) + rng.normal(0, 1, n_genes)
              + rng.normal(0, shift, (2, n_genes))[batch])
    rho = np.exp(logits - logits.max(1, keepdims=True))
    mu = rho / rho.sum(1, keepdims=True) * rng.uniform(1000, 3000, n)[:, None]
    x = rng.negative_binomial(10.0, 10.0 / (10.0 + mu)).astype(np.float32)
    y = (z @ rng.normal(0, 1, (4, n_prot)) + rng.normal(0, shift, (2, n_prot))[batch]
         + rng.normal(0, 0.3, (n, n_prot))).astype(np.float32)
    missing = rng.random(n) < frac_missing
    obs = pd.DataFrame({"batch": [f"b{v}" for v in batch], "cell_type": [f"t{v}" for v in types]},
                       index=[f"cell{i}" for i in range(n)])
    rna = ad.AnnData(sp.csr_matrix(x), obs=obs.copy())
    rna.var_names = [f"g{j}" for j in range(n_genes)]
    prot = ad.AnnData(y, obs=obs.copy())
    prot.var_names = [f"p{j}" for j in range(n_prot)]
    full = md.MuData({"rna": rna, "prot": prot})
    part = md.MuData({"rna": rna, "prot": prot[~missing].copy()})
    full.obs, part.obs = obs.copy(), obs.copy()
    return dict(full=full, part=part, missing=missing, types=types, batch=batch, prot=y)


SPEC = dict(modalities={"rna": None, "prot": None}, continuous_modalities=["prot"], covariate_keys=["batch"])


def fit_planted(data, epochs=150, batch_size=100, **options):
    return fit(data, model="multigrate", optional_modalities=["prot"], epochs=epochs, patience=None,
               batch_size=batch_size, lr=3e-3, progress=False, **SPEC, **{**SMALL, **options})


def knn_batch_entropy(emb, labels, k=15):
    """Mean over cells of the entropy (base 2, two batches: 0 = one batch, 1 = even) of the
    batch labels among each cell's k nearest neighbours."""
    idx = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb, return_distance=False)[:, 1:]
    p = np.stack([(labels[idx] == b).mean(1) for b in np.unique(labels)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nan_to_num(-(p * np.log2(p))).sum(1).mean())


def cluster_ari(emb, types):
    return adjusted_rand_score(types, KMeans(4, n_init=10, random_state=0).fit_predict(emb))


@pytest.fixture(scope="module")
def planted():
    sim = simulate()
    result = fit_planted(sim["part"])
    full = read_dataset(sim["full"], DatasetSpec(**SPEC), covariate_categories=result.dataset.covariate_categories)
    return sim, result, full


# ------------------------------------------------------------------------- structure, no fit
def tiny_model(**options):
    sim = simulate(n=40, n_genes=12, n_prot=5)
    dataset = read_dataset(sim["part"], DatasetSpec(**SPEC, optional_modalities=["prot"]))
    torch.manual_seed(0)
    return build_model("multigrate", dataset, n_latent=3, n_hidden=8, n_layers=1, **options), dataset


def test_defaults_follow_the_dataset_and_the_reference():
    model, dataset = tiny_model()
    assert model.likelihood_names == {"rna": "nb", "prot": "normal"}
    assert model.kl_weight == 1e-5 and model.mmd_key_index is None and model.mmd_weight == 0.0
    assert model.expert_dropout == 0.5
    assert Multigrate.options["n_latent"].default == 16 and Multigrate.options["n_layers"].default == 2
    stages = Multigrate.default_stages(epochs=200)
    assert [s.name for s in stages] == ["kl_warmup", "train"] and stages[0].epochs == 66
    assert stages[0].kl_warmup.weight(0, 0) == 0.0 and stages[1].early_stopping is not None
    for epochs, warm in ((1, None), (2, None), (3, None), (5, 10), (5, 2)):  # --epochs is the total
        stages = Multigrate.default_stages(epochs=epochs, kl_warmup_epochs=warm)
        assert sum(s.epochs for s in stages) == epochs and all(s.epochs >= 1 for s in stages)
    with_mmd, _ = tiny_model(mmd_key="batch")
    assert with_mmd.mmd_key_index == 0 and with_mmd.mmd_weight == 1.0
    with pytest.raises(ValueError, match="covariate keys"):
        tiny_model(mmd_key="donor")
    with pytest.raises(ValueError, match="mmd_key"):
        tiny_model(mmd_weight=2.0)


def test_every_modality_masked_gives_the_prior():
    model, dataset = tiny_model()
    model.eval()
    batch = dataset.batch(np.arange(20))
    batch.present = {m: torch.zeros(20, dtype=torch.bool) for m in batch.present}
    loc, scale = model.encode(batch)
    assert torch.equal(loc, torch.zeros_like(loc)) and torch.equal(scale, torch.ones_like(scale))
    terms = elbo_terms(model.model, model.guide, batch)
    assert terms["kl_z"] == 0.0 and terms["nll_obs_rna"] == 0.0 and terms["nll_obs_prot"] == 0.0


def test_presence_comes_from_membership_not_row_sums():
    """A measured CLR row summing to zero is an expert; an unmeasured row with values is not."""
    model, dataset = tiny_model()
    model.eval()
    has_prot = np.flatnonzero(dataset.present["prot"])[:6]
    batch = dataset.batch(has_prot)
    batch.x["prot"] = batch.x["prot"] - batch.x["prot"].mean(1, keepdim=True)  # rows sum to 0
    rna_only = dataset.batch(has_prot)
    rna_only.present["prot"] = torch.zeros(6, dtype=torch.bool)
    with_prot = model.encode(batch)[0]
    assert not torch.allclose(with_prot, model.encode(rna_only)[0])
    rna_only.x["prot"] = rna_only.x["prot"] + 5.0
    experts = model.experts(rna_only)
    expected = (experts["rna"][0] / experts["rna"][1] ** 2) / (1 + experts["rna"][1] ** -2)
    torch.testing.assert_close(model.encode(rna_only)[0], expected)


def test_expert_dropout_keeps_a_measured_expert_and_acts_in_training_only():
    model, dataset = tiny_model(expert_dropout=0.9, dropout_rate=0.0)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    for _ in range(50):
        kept = model._kept_experts(mask) & mask
        assert torch.equal(kept.any(0), mask.any(0))
    both = np.flatnonzero(dataset.present["prot"])[:10]
    batch = dataset.batch(both)
    model.eval()
    loc = poutine.trace(model.guide).get_trace(batch).nodes["z"]["fn"].base_dist.loc
    torch.testing.assert_close(loc, model.encode(batch)[0])
    model.train()  # no dropout layers (rate 0): only the experts differ
    torch.manual_seed(0)
    loc = poutine.trace(model.guide).get_trace(batch).nodes["z"]["fn"].base_dist.loc
    assert not torch.allclose(loc, model.encode(batch)[0])


def test_kl_weight_and_mmd_are_in_per_cell_units():
    model, dataset = tiny_model(mmd_key="batch", mmd_weight=3.0, kl_weight=1.0)
    model.eval()
    batch = dataset.batch(np.arange(16))
    torch.manual_seed(1)
    terms = elbo_terms(model.model, model.guide, batch)
    model.kl_weight = 1e-5
    torch.manual_seed(1)
    scaled = elbo_terms(model.model, model.guide, batch)
    torch.testing.assert_close(scaled["kl_z"], 1e-5 * terms["kl_z"])
    guide_trace = poutine.trace(model.guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(batch)
    z = guide_trace.nodes["z"]["value"]
    expected = dataset.n_cells * 3.0 * group_mmd(z, batch.covariates[:, 0])
    factor = model_trace.nodes["penalty_mmd"]["fn"].log_prob(model_trace.nodes["penalty_mmd"]["value"])
    torch.testing.assert_close(-factor, expected)
    assert expected > 0


def test_mmd_matches_the_reference_statistic():
    torch.manual_seed(0)
    x, y = torch.randn(30, 4), torch.randn(20, 4) + 1.0
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    k = lambda a, b: sum(torch.exp(-g * d(a, b)) for g in MMD_GAMMAS) / len(MMD_GAMMAS)  # noqa: E731
    torch.testing.assert_close(mmd(x, y), k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    assert mmd(x, x[torch.randperm(30)]).abs() < 1e-6 and mmd(x, y[:1]) == 0.0
    z, groups = torch.cat([x, y, y + 1]), torch.tensor([0] * 30 + [1] * 20 + [2] * 20)
    pairs = mmd(x, y) + mmd(x, y + 1) + mmd(y, y + 1)
    torch.testing.assert_close(group_mmd(z, groups), pairs)
    assert group_mmd(x, torch.zeros(30, dtype=torch.long)) == 0.0


# ---------------------------------------------------------------------------- planted fits
def test_cells_lacking_a_modality_embed_next_to_their_full_embedding(planted):
    sim, result, full = planted
    emb_part = cell_state(result.model, result.dataset)  # the missing cells embedded from RNA only
    emb_full = cell_state(result.model, full)  # every cell with both modalities
    missing = np.flatnonzero(sim["missing"])
    neighbours = NearestNeighbors(n_neighbors=15).fit(emb_full).kneighbors(emb_part[missing], return_distance=False)
    hits = np.mean([cell in row for cell, row in zip(missing, neighbours)])
    assert hits >= 0.8, hits
    assert cluster_ari(emb_part, sim["types"]) > 0.9


def test_imputation_and_modality_latents(planted):
    sim, result, full = planted
    model, dataset = result.model, result.dataset
    imputed = impute_modality(model, dataset, "prot")
    missing = np.flatnonzero(sim["missing"])
    assert list(imputed.index) == list(dataset.obs_names[missing]) and list(imputed.columns) == list(
        dataset.feature_names["prot"])
    truth = sim["prot"][missing]
    r = [np.corrcoef(imputed.to_numpy()[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])]
    assert np.median(r) > 0.8, r
    counts = impute_modality(model, dataset, "rna", cells=dataset.obs_names[:5], library_size=2000)
    np.testing.assert_allclose(counts.sum(1), 2000, rtol=1e-4)
    other = impute_modality(model, dataset, "prot", cells=missing[:5], covariates={"batch": "b1"})
    assert other.shape == (5, truth.shape[1]) and not np.allclose(other.to_numpy(), imputed.to_numpy()[:5])
    with pytest.raises(ValueError, match="no category"):
        impute_modality(model, dataset, "prot", covariates={"batch": "b9"})
    tables = modality_latent_tables(model, dataset)
    assert set(tables) == {"latent_rna", "latent_prot"}
    assert tables["latent_prot"].iloc[missing].isna().all().all()
    assert np.isfinite(tables["latent_prot"].to_numpy()[~sim["missing"]]).all()


@pytest.mark.slow
def test_mmd_raises_batch_mixing_without_losing_clusters():
    """Batch shifts that the decoders cannot absorb (not conditioned on the batch) separate the
    batches in z; the MMD between batches mixes them and keeps the cell types. The MMD is at
    most ~2 against ~10^2 nats of reconstruction per cell, so the reference's weight 1 barely
    moves the latent; with weight 100 the kNN batch entropy rose from 0.20 to 0.61, with 1000
    (used here) to 0.91, the ARI unchanged (0.98)."""
    sim = simulate(shift=2.0)
    options = dict(condition_decoders=False, batch_size=400, epochs=120)
    off = fit_planted(sim["part"], **options)
    on = fit_planted(sim["part"], mmd_key="batch", mmd_weight=1000.0, **options)
    emb_off, emb_on = cell_state(off.model, off.dataset), cell_state(on.model, on.dataset)
    mixing_off, mixing_on = knn_batch_entropy(emb_off, sim["batch"]), knn_batch_entropy(emb_on, sim["batch"])
    assert mixing_on > mixing_off + 0.3, (mixing_off, mixing_on)
    assert cluster_ari(emb_on, sim["types"]) >= cluster_ari(emb_off, sim["types"]) - 0.05
    assert "penalty_mmd" in on.history and "penalty_mmd" not in off.history


# ------------------------------------------------------------------------------ real data
def clr(counts):
    """Per-cell centred log-ratio as muon's ``pt.clr``: log1p(x / geometric-mean-like(x)),
    the denominator exp(mean over the panel of log1p(x))."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.log1p(counts / np.exp(np.log1p(counts).mean(1, keepdims=True))).astype(np.float32)


def two_runs(n_genes=1000):
    """The two 10x runs as one MuData with a run covariate: ``rna`` (raw counts of the
    ``n_genes`` genes with the highest total count among the genes both runs measured),
    ``prot`` (the 14 proteins both panels share, CLR over those 14, every cell) and
    ``prot_5k`` (the 15 proteins only the 5k panel has, CLR over those 15, the 5k cells only:
    MuData membership masks whole cells, so each panel's own proteins are their own modality)."""
    runs = {name: ad.read_h5ad(path) for name, path in RUNS.items()}
    for name, adata in runs.items():
        adata.obs_names = [f"{name}_{c}" for c in adata.obs_names]
    genes = runs["10k"].var_names.intersection(runs["5k"].var_names)
    rna = ad.concat([adata[:, genes] for adata in runs.values()], label="run", keys=list(runs))
    totals = np.asarray(rna.X.sum(0)).ravel()
    rna = rna[:, np.sort(np.argsort(-totals)[:n_genes])].copy()
    panels = {name: list(adata.uns["protein_names"]) for name, adata in runs.items()}
    shared = [p for p in panels["5k"] if p in panels["10k"]]
    only_5k = [p for p in panels["5k"] if p not in panels["10k"]]
    assert set(panels["10k"]) <= set(panels["5k"])  # the 10k panel adds no protein of its own

    def protein_block(name, proteins):
        adata = runs[name]
        values = np.asarray(adata.obsm["protein_expression"])[:, [panels[name].index(p) for p in proteins]]
        block = ad.AnnData(clr(values), obs=pd.DataFrame(index=adata.obs_names))
        block.var_names = proteins
        return block

    prot = ad.concat([protein_block(name, shared) for name in runs])
    prot_5k = protein_block("5k", only_5k)
    mdata = md.MuData({"rna": rna, "prot": prot, "prot_5k": prot_5k})
    mdata.obs = pd.DataFrame({"run": rna.obs["run"].astype(str).to_numpy()}, index=rna.obs_names)
    return mdata, shared, only_5k


@pytest.mark.filterwarnings("ignore:Element .* was written without encoding metadata")
@pytest.mark.skipif(not all(p.exists() for p in RUNS.values()),
                    reason=f"real data absent: {list(RUNS.values())} (set PYRO_LIVI_DATA)")
def test_two_10x_runs_with_different_protein_panels(tmp_path):
    mdata, shared, only_5k = two_runs()
    assert len(shared) == 14 and len(only_5k) == 15
    result = fit(mdata, model="multigrate", modalities={"rna": None, "prot": None, "prot_5k": None},
                 optional_modalities=["prot_5k"], continuous_modalities=["prot", "prot_5k"], covariate_keys=["run"],
                 epochs=40, patience=None, batch_size=400, lr=3e-3, progress=False, out=tmp_path,
                 mmd_key="run", **SMALL)
    dataset, model = result.dataset, result.model
    assert model.likelihood_names == {"rna": "nb", "prot": "normal", "prot_5k": "normal"}
    is_10k = dataset.obs_names.str.startswith("10k_")
    assert list(~is_10k) == list(dataset.present["prot_5k"]) and is_10k.sum() == 200
    latent = result.tables["latent"]
    assert latent.shape == (400, 8) and list(latent.index) == list(dataset.obs_names)
    assert np.isfinite(latent.to_numpy()).all()
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[0]
    # the 10k cells never enter the 5k-only panel's likelihood
    terms = elbo_terms(model.model, model.guide, dataset.batch(np.flatnonzero(is_10k)))
    assert terms["nll_obs_prot_5k"] == 0.0 and terms["nll_obs_prot"] != 0.0
    imputed = impute_modality(model, dataset, "prot_5k", covariates={"run": "5k"})
    assert imputed.shape == (200, 15) and list(imputed.columns) == only_5k
    assert imputed.index.str.startswith("10k_").all() and np.isfinite(imputed.to_numpy()).all()
