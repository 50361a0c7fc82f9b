"""The zoo contract, checked for every registered model: built from a dataset simulated for what it
declares it needs, one observation site per modality, finite ELBO terms, one pass through the
trainer on its default schedule, outputs indexed by the data's own ids, save/load round trip,
posterior predictive draws, likelihood swap by name, options that are CLI flags and keywords."""

import inspect

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from pyro.infer import Predictive

from pyro_livi.cli import main
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.errors import InputError
from pyro_livi.infer import elbo_terms
from pyro_livi.likelihoods import get_likelihood
from pyro_livi.models import MODELS
from pyro_livi.persistence import load_model, save_model
from pyro_livi.run import build_model, fit

#: small sizes of every registered model (a model missing here fails test_every_model_is_covered)
TINY = {
    "livi": dict(n_cell_state=3, n_dxc=2, n_persistent=1, encoder_hidden=(8,)),
    "multislivi": dict(n_cell_state=3, n_dxc=2, n_persistent=1, encoder_hidden=(8,)),
    "dmlivi": dict(n_shared=3, n_dxc=2, n_persistent=1, shared_encoder_hidden=(8,),
                   specific_encoder_hidden=(4,)),
    "scvi": dict(n_latent=3, n_hidden=8),
    "totalvi": dict(n_latent=3, n_hidden=8, n_layers_encoder=1),
    "multigrate": dict(n_latent=3, n_hidden=8, n_layers=1, cond_dim=2),
    "mofa": dict(n_factors=3),
    "cmcvae": dict(n_rna_nodes=3, n_prot_nodes=2, n_hidden=8),
    "gpg": dict(n_latent=3, hidden=[8]),
    "pgp": dict(n_latent=3, hidden=[8]),
    "dualvae": dict(n_latent=3, hidden=[8]),
}
#: schedule options that keep every stage to one epoch
ONE_EPOCH = {"livi": dict(epochs_vae=1), "multislivi": dict(epochs_vae=1), "dmlivi": dict(epochs_vae=1)}
N_CELLS, N_DONORS = 48, 6
FEATURES = {"rna": 15, "prot": 4, "atac": 10}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def tiny_data(name: str, seed: int = 0):
    """(AnnData or MuData, DatasetSpec) with what model ``name`` declares it needs."""
    needs = MODELS[name].data_needs
    rng = np.random.default_rng(seed)
    low, high = needs.modalities
    n_mod = max(low, min(2, high or 2))
    names = list(FEATURES)[:n_mod]
    continuous = needs.inputs == "continuous"
    obs = pd.DataFrame({"donor": [f"d{i % N_DONORS}" for i in range(N_CELLS)],
                        "batch": [f"b{i % 2}" for i in range(N_CELLS)],
                        "cell_type": [f"t{i % 3}" for i in range(N_CELLS)]},
                       index=[f"cell{i}" for i in range(N_CELLS)])
    mods = {}
    for m in names:
        g = FEATURES[m]
        x = rng.poisson(3.0, size=(N_CELLS, g)).astype(np.float32) + (np.arange(g) == 0)
        if continuous:
            x = np.log1p(x) - 1.0
        adata = ad.AnnData(sp.csr_matrix(x), obs=obs.copy())
        adata.var_names = [f"{m}_{j}" for j in range(g)]
        mods[m] = adata
    optional = []
    if needs.missing_modalities and n_mod > 1:
        last = names[-1]
        mods[last] = mods[last][np.arange(N_CELLS) % 4 != 0].copy()
        optional = [last]
    spec = DatasetSpec(modalities={m: None for m in names},
                       donor_key=None if needs.donors == "unused" else "donor",
                       covariate_keys=["batch"], label_keys=["cell_type"], optional_modalities=optional,
                       continuous_modalities=names if continuous else [])
    if n_mod == 1:
        return mods[names[0]], spec
    mdata = md.MuData(mods)
    mdata.obs = obs.loc[mdata.obs_names].copy()
    return mdata, spec


def built(name: str, **options):
    data, spec = tiny_data(name)
    dataset = read_dataset(data, spec)
    torch.manual_seed(0)
    return build_model(name, dataset, **{**TINY[name], **options}), dataset


def test_every_model_is_covered():
    assert set(TINY) == set(MODELS), "every registered model needs its tiny sizes here"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_declarations(name):
    cls = MODELS[name]
    assert cls.registry_name == name and cls.summary and cls.reference
    from pyro_livi.models._base import OUTPUT_KINDS

    assert set(cls.outputs) <= set(OUTPUT_KINDS) and "latent" in cls.outputs
    keywords = {**inspect.signature(cls.__init__).parameters, **inspect.signature(cls.from_dataset).parameters}
    stage_keywords = inspect.signature(cls.default_stages).parameters
    for option_name, option in cls.options.items():
        target = stage_keywords if option.schedule else keywords
        assert option_name in target, f"{name}: option {option_name} is no keyword"
        declared = target[option_name].default
        if declared is not None:  # None: resolved from the data (e.g. protein_weight)
            assert tuple(np.atleast_1d(declared)) == tuple(np.atleast_1d(option.default)), option_name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sites_and_finite_elbo_terms(name):
    model, dataset = built(name)
    batch = dataset.batch(np.arange(16))
    terms = elbo_terms(model.model, model.guide, batch)
    obs_terms = {k for k in terms if k.startswith("nll_obs_")}
    assert obs_terms == {f"nll_obs_{m}" for m in dataset.modalities}
    assert all(torch.isfinite(v) for v in terms.values()), terms
    loss = sum(terms.values())
    loss.backward()
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_predictive_draws_every_observation_site(name):
    model, dataset = built(name)
    batch = dataset.batch(np.arange(10))
    model.eval()
    draws = Predictive(model.model, guide=model.guide, num_samples=2)(batch, observed=False)
    for m in dataset.modalities:
        assert draws[f"obs_{m}"].shape == (2, 10, dataset.n_features[m])
        assert torch.isfinite(draws[f"obs_{m}"]).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_likelihood_swap_by_name(name):
    swap = "normal" if MODELS[name].data_needs.inputs == "continuous" else "poisson"
    data, spec = tiny_data(name)
    dataset = read_dataset(data, spec)
    model = build_model(name, dataset, likelihoods={m: swap for m in dataset.modalities}, **TINY[name])
    batch = dataset.batch(np.arange(8))
    terms = elbo_terms(model.model, model.guide, batch)
    assert all(torch.isfinite(v) for v in terms.values())
    for m in dataset.modalities:
        assert model.likelihoods[m] is get_likelihood(swap)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fit_one_epoch_outputs_and_save_load(name, tmp_path):
    data, spec = tiny_data(name)
    result = fit(data, model=name, donor_key=spec.donor_key, modalities=spec.modalities,
                 optional_modalities=spec.optional_modalities,
                 continuous_modalities=spec.continuous_modalities, covariate_keys=spec.covariate_keys,
                 label_keys=spec.label_keys, epochs=1, batch_size=16, progress=False, out=tmp_path,
                 **TINY[name], **ONE_EPOCH.get(name, {}))
    dataset, model = result.dataset, result.model
    assert len(result.history) == len(MODELS[name].default_stages(epochs=1, **ONE_EPOCH.get(name, {})))
    assert np.isfinite(result.history["loss"]).all()
    tables = result.tables
    latent = tables[model.latent_name]
    assert list(latent.index) == list(dataset.obs_names) and np.isfinite(latent.to_numpy()).all()
    for table_name, table in tables.items():
        assert (tmp_path / f"{table_name}.tsv").exists()
        if table_name in ("D", "V"):
            assert list(table.index) == list(dataset.donor_index.ids)
        elif table_name.startswith(("loadings_", "dispersions_")):
            modality = table_name.split("__")[-1] if "__" in table_name else table_name.split("_", 1)[1]
            modality = modality if modality in dataset.modalities else dataset.modalities[0]
            assert list(table.index) == list(dataset.feature_names[modality]), table_name
        elif table_name == "variance_explained":
            assert set(table.index) == set(latent.columns) and set(dataset.modalities) <= set(table.columns)
        elif table_name == "variance_explained_total":
            assert set(table.index) == set(dataset.modalities)
        elif table_name in ("denoised_protein", "protein_foreground_probability"):
            assert list(table.index) == list(dataset.obs_names)
            assert list(table.columns) == list(map(str, dataset.feature_names[dataset.modalities[1]]))
            assert (table.to_numpy() >= 0).all()
        elif table_name != "A":
            assert list(table.index) == list(dataset.obs_names), table_name
    assert ("D" in tables) == (MODELS[name].data_needs.donors != "unused")
    held_out = MODELS[name].default_train_size < 1
    assert ("validation_loss" in result.history.columns) == held_out == (tmp_path / "split.tsv").exists()
    if held_out:
        split = pd.read_csv(tmp_path / "split.tsv", sep="\t", index_col=0)["set"]
        assert list(split.index) == list(dataset.obs_names)
        assert (split == "validation").sum() == len(result.validation) == round(0.1 * N_CELLS)
    loaded, meta = load_model(tmp_path)
    assert type(loaded) is type(model) and meta["model"] == name
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    reread = read_dataset(data, DatasetSpec.from_dict(meta["spec"]), donor_index=meta["donor_index"],
                          covariate_categories=meta["covariate_categories"])
    model.eval(), loaded.eval()
    batch = reread.batch(np.arange(N_CELLS))
    assert torch.equal(model.encode(batch)[0], loaded.encode(batch)[0])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cli_lists_the_model_and_its_options(name, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model", name, "--help"])
    text = capsys.readouterr().out
    for option_name in MODELS[name].options:
        assert f"--{option_name.replace('_', '-')}" in text
    assert main(["models"]) == 0
    assert any(line.startswith(name + " ") for line in capsys.readouterr().out.splitlines())


def test_unknown_option_and_missing_donors_are_named():
    data, spec = tiny_data("livi")
    with pytest.raises(InputError, match="n_latent"):
        fit(data, model="livi", donor_key="donor", n_latent=3, epochs=1, progress=False)
    with pytest.raises(InputError, match="--donor-key"):
        fit(data, model="livi", epochs=1, progress=False)


def test_count_model_refuses_continuous_input():
    data, _ = tiny_data("scvi")
    with pytest.raises(InputError, match="continuous") as info:
        fit(data, model="scvi", continuous_modalities=["rna"], epochs=1, progress=False)
    assert "--modalities rna:counts" in str(info.value)


@pytest.mark.parametrize("name", ["livi", "multislivi", "dmlivi"])
def test_models_saved_by_version_0_1_still_load(name):
    """Files written by pyro_livi 0.1 (tests/fixtures/make_v0_1.py) load and give the same latent."""
    from pathlib import Path

    from fixtures.v0_1_cells import v0_1_cells

    here = Path(__file__).parent / "fixtures"
    model, meta = load_model(here / f"{name}_v0_1.pt")
    rna, mdata = v0_1_cells()
    data = rna if name == "livi" else mdata
    dataset = read_dataset(data, DatasetSpec.from_dict(meta["spec"]), donor_index=meta["donor_index"])
    from pyro_livi.analysis.latents import cell_state

    expected = np.loadtxt(here / f"{name}_v0_1_latent.txt")
    np.testing.assert_allclose(cell_state(model, dataset), expected, rtol=1e-5, atol=1e-6)


def test_save_refuses_an_unregistered_model(tmp_path):
    from pyro_livi.models import SCVI

    class Custom(SCVI):
        pass

    with pytest.raises(ValueError, match="register"):
        save_model(Custom(5), tmp_path, feature_names={"rna": [str(i) for i in range(5)]})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_user_api_and_write_back(name, tmp_path):
    """The scvi-tools-style layer works for every model: train, latent, denoised values,
    predictive samples, write-back into the user's data without touching its counts, save/load."""
    from pyro_livi.api import Model

    data, spec = tiny_data(name)
    counts_before = (data.mod[next(iter(spec.modalities))] if hasattr(data, "mod")
                     else data).X.copy()
    m = Model(data, name, modalities=spec.modalities, donor_key=spec.donor_key,
              covariate_keys=spec.covariate_keys, optional_modalities=spec.optional_modalities,
              continuous_modalities=spec.continuous_modalities, **TINY[name], **ONE_EPOCH.get(name, {}))
    history = m.train(max_epochs=1, batch_size=16, progress=False)
    assert len(history) >= 1 and m.history is history
    z = m.get_latent_representation()
    assert z.shape[0] == N_CELLS and np.isfinite(z).all()
    assert m.get_latent_representation(give_mean=False).shape == z.shape
    for modality in spec.modalities:
        norm = m.get_normalized_expression(modality=modality)
        assert norm.shape == (N_CELLS, FEATURES[modality]) and list(norm.index) == list(m.dataset.obs_names)
        assert np.isfinite(norm.to_numpy()).all()
    draws = m.posterior_predictive_sample(n_samples=2)
    assert draws.shape == (2, N_CELLS, FEATURES[next(iter(spec.modalities))])
    written = m.write_to()
    ref = written.mod[next(iter(spec.modalities))] if hasattr(written, "mod") else written
    assert ref.obsm[f"X_{name}"].shape == z.shape and f"{name}_normalized" in ref.layers
    assert (ref.X != counts_before).nnz == 0  # the counts are untouched
    assert (f"{name}_donor_factors" in written.uns) == (MODELS[name].data_needs.donors != "unused")
    m.save(tmp_path)
    again = Model.load(tmp_path, adata=data)
    np.testing.assert_allclose(again.get_latent_representation(), z, rtol=1e-5, atol=1e-6)
    assert again.history is not None and len(again.history) == len(history)
