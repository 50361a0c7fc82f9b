"""Building a model refuses bad input with an InputError naming the keyword, the CLI flag and the
fix, on every path (``ZooModel.from_dataset``, ``pyro_livi.run.fit``, ``pyro_livi.api.Model``,
``pyro-livi fit``): model sizes and weights outside their declared range, likelihoods that do
not fit a modality's values or name modalities the data lack, data that do not give what the
model needs. LIVI reads a modality of any name."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from test_zoo_contract import TINY, tiny_data

from pyro_livi.api import Model
from pyro_livi.cli import main
from pyro_livi.data import DatasetSpec, read_dataset
from pyro_livi.errors import InputError
from pyro_livi.infer import elbo_terms
from pyro_livi.likelihoods import LIKELIHOOD_SUPPORTS, LIKELIHOODS, NBLikelihood, register_likelihood
from pyro_livi.models import LIVI, MODELS, DataNeeds, Option
from pyro_livi.run import fit

N_CELLS, N_GENES, N_DONORS = 40, 12, 5
LIVI_TINY = dict(n_cell_state=3, n_dxc=2, n_persistent=1, encoder_hidden=[8])


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def counts_adata(seed: int = 0, binary: bool = False) -> ad.AnnData:
    """N_CELLS x N_GENES Poisson counts (every cell with a non-zero count), donors, a batch, and a
    log-normalised layer ``lognorm``; ``binary``: the counts replaced by (counts > 2) in 0/1."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(N_CELLS, N_GENES)).astype(np.float32)
    x[:, 0] += 3
    if binary:
        x = (x > 2).astype(np.float32)
    obs = pd.DataFrame({"donor": [f"d{i % N_DONORS}" for i in range(N_CELLS)],
                        "batch": [f"b{i % 2}" for i in range(N_CELLS)]},
                       index=[f"cell{i}" for i in range(N_CELLS)])
    adata = ad.AnnData(sp.csr_matrix(x), obs=obs)
    adata.var_names = [f"gene{j}" for j in range(N_GENES)]
    adata.layers["lognorm"] = np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32)
    return adata


_DATASETS = {}


def dataset_for(name: str):
    """The tiny dataset of model ``name`` (tests/test_zoo_contract.py), read once."""
    if name not in _DATASETS:
        _DATASETS[name] = read_dataset(*tiny_data(name))
    return _DATASETS[name]


# ------------------------------------------------------------------- option declarations
NUMBER_OPTIONS = [(name, key) for name, cls in sorted(MODELS.items())
                  for key, option in cls.options.items() if option.is_number]
ALL_OPTIONS = [(name, key) for name, cls in sorted(MODELS.items()) for key in cls.options]


def test_every_model_has_number_options():
    assert {name for name, _ in NUMBER_OPTIONS} == set(MODELS)


@pytest.mark.parametrize("name, key", NUMBER_OPTIONS)
def test_every_size_and_weight_option_declares_a_lower_bound(name, key):
    option = MODELS[name].options[key]
    assert option.has_bounds, f"{name}: option {key} declares no bound (at_least= or above=)"


@pytest.mark.parametrize("name, key", ALL_OPTIONS)
def test_every_default_passes_its_own_check(name, key):
    option = MODELS[name].options[key]
    option.check(key, option.default)


def _out_of_range(option: Option):
    """Values just outside the declared range (the bound itself when it is excluded)."""
    step = 1 if option.element_type is int else 0.5
    bad = []
    if option.at_least is not None:
        bad.append(option.at_least - step)
    if option.above is not None:
        bad.append(option.above)
    if option.at_most is not None:
        bad.append(option.at_most + step)
    if option.below is not None:
        bad.append(option.below)
    return [[v] if option.nargs else v for v in bad]


def _wrong_types(option: Option):
    """Values of the wrong type: bools and numeric strings always, floats for whole numbers."""
    inside = option.at_least if option.at_least is not None else option.above + 1
    wrong = [True, str(inside)]
    if option.element_type is int:
        wrong.append(inside + 0.5)
    return [[v] if option.nargs else v for v in wrong]


def _build(name: str, key: str, value):
    """Build model ``name`` (or its training schedule) with option ``key`` set to ``value``."""
    cls = MODELS[name]
    if cls.options[key].schedule:
        return cls.default_stages(epochs=4, **{key: value})
    torch.manual_seed(0)
    return cls.from_dataset(dataset_for(name), **{**TINY[name], key: value})


@pytest.mark.parametrize("name, key", NUMBER_OPTIONS)
def test_out_of_range_and_mistyped_values_are_refused(name, key):
    option = MODELS[name].options[key]
    flag = Option.flag(key)
    for value in _out_of_range(option) + _wrong_types(option):
        with pytest.raises(InputError) as err:
            _build(name, key, value)
        assert err.value.field == key
        message = str(err.value)
        assert f"{key} ({flag}) must be" in message and "got" in message and "Fix: give" in message, message


@pytest.mark.parametrize("name, key", NUMBER_OPTIONS)
def test_the_smallest_allowed_value_works(name, key):
    """The declared bounds are not too loose: at its smallest allowed value (just above an
    excluded bound) an option builds a model with finite ELBO terms (a schedule option: a
    training schedule)."""
    option = MODELS[name].options[key]
    value = option.at_least if option.at_least is not None else option.above + 1e-3
    value = [value] if option.nargs else value
    if key == "background_prior_mean":  # one value per protein
        value = value * dataset_for(name).n_features["prot"]
    if option.schedule:
        assert _build(name, key, value)
        return
    model = _build(name, key, value)
    terms = elbo_terms(model.model, model.guide, dataset_for(name).batch(np.arange(8)))
    assert all(torch.isfinite(v) for v in terms.values()), terms


@pytest.mark.parametrize("value, words", [(0, "a whole number >= 1, got 0"), (-2, "got -2"),
                                          ("5", "got '5' (str)"), (5.7, "got 5.7"), (True, "got True (bool)")])
def test_api_model_refuses_a_bad_size(value, words):
    with pytest.raises(InputError, match=r"n_latent \(--n-latent\) must be") as err:
        Model(counts_adata(), "scvi", n_latent=value)
    assert words in str(err.value) and "n_latent=10 in Python" in str(err.value)


def test_fit_refuses_a_negative_penalty_weight():
    with pytest.raises(InputError, match=r"l1_weight \(--l1-weight\) must be a finite number >= 0, got -1"):
        fit(counts_adata(), model="livi", donor_key="donor", l1_weight=-1, progress=False, **LIVI_TINY)


@pytest.mark.parametrize("args, words", [
    (["--n-cell-state", "0"], "n_cell_state (--n-cell-state) must be a whole number >= 1, got 0"),
    (["--n-dxc", "0"], "n_dxc (--n-dxc) must be a whole number >= 1, got 0"),
    (["--n-persistent", "0"], "n_persistent (--n-persistent) must be a whole number >= 1, got 0"),
    (["--encoder-hidden", "0"], "encoder_hidden (--encoder-hidden) must be one or more values, each a whole "
                                "number >= 1"),
    (["--l1-weight", "-1"], "l1_weight (--l1-weight) must be a finite number >= 0, got -1.0"),
    (["--donor-lr", "0"], "donor_lr (--donor-lr) must be a finite number > 0, got 0.0"),
])
def test_cli_refuses_bad_livi_sizes_and_weights(tmp_path, capsys, args, words):
    path = tmp_path / "x.h5ad"
    counts_adata().write_h5ad(path)
    code = main(["fit", "--data", str(path), "--donor-key", "donor", "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--epochs-vae", "1", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "Fix:" in err and "Traceback" not in err


def test_option_check_normalises_values():
    hidden = LIVI.options["encoder_hidden"]
    assert hidden.check("encoder_hidden", np.int64(16)) == [16]
    assert hidden.check("encoder_hidden", (np.int64(16), 8)) == [16, 8]
    assert type(hidden.check("encoder_hidden", [np.int64(16)])[0]) is int
    assert LIVI.options["l1_weight"].check("l1_weight", 0) == 0.0
    assert LIVI.options["n_dxc"].check("n_dxc", np.int32(3)) == 3
    with pytest.raises(InputError, match="one or more values"):
        hidden.check("encoder_hidden", [])
    background = MODELS["totalvi"].options["background_prior_mean"]
    assert background.check("background_prior_mean", None) is None
    assert background.check("background_prior_mean", {"p1": 2.0}) == {"p1": 2.0}
    with pytest.raises(InputError, match="got"):
        background.check("background_prior_mean", {"p1": -2.0})
    with pytest.raises(InputError, match="true or false"):
        LIVI.options["batch_norm"].check("batch_norm", 1)
    with pytest.raises(InputError, match=r"one of \['softmax', 'identity'\]"):
        LIVI.options["link"].check("link", "relu")
    with pytest.raises(InputError, match="finite"):
        LIVI.options["a_weight"].check("a_weight", float("nan"))
    # MultiSLIVI and DMLIVI take one L1 weight per modality in Python
    l1 = MODELS["multislivi"].options["l1_weight"]
    assert l1.check("l1_weight", {"rna": 1, "prot": np.float32(0.5)}) == {"rna": 1.0, "prot": 0.5}
    with pytest.raises(InputError, match=r"l1_weight \(--l1-weight\) must be .* got -1"):
        l1.check("l1_weight", {"rna": -1})
    with pytest.raises(InputError, match="got"):
        LIVI.options["l1_weight"].check("l1_weight", {"rna": 0.1})
    # a preset model takes None for its sizes (the preset's value)
    assert MODELS["gpg"].options["n_latent"].check("n_latent", None) is None
    with pytest.raises(InputError, match="got None"):
        LIVI.options["n_dxc"].check("n_dxc", None)


def test_schedule_options_are_refused_by_from_dataset():
    with pytest.raises(InputError, match="setting of the training schedule"):
        LIVI.from_dataset(dataset_for("livi"), epochs_vae=2, **TINY["livi"])


# ---------------------------------------------------------------- likelihood supports
def test_every_registered_likelihood_declares_a_support():
    supports = {name: lik.support for name, lik in LIKELIHOODS.items()}
    assert set(supports.values()) <= set(LIKELIHOOD_SUPPORTS)
    assert supports["bernoulli"] == "binary" and supports["normal"] == "real" and supports["nb"] == "counts"


def test_register_likelihood_refuses_an_unknown_support(monkeypatch):
    import pyro_livi.likelihoods as lk

    monkeypatch.setattr(lk, "LIKELIHOODS", dict(LIKELIHOODS))

    class Odd(NBLikelihood):
        name, support = "odd_support", "integers"

    with pytest.raises(ValueError, match="support 'integers'"):
        register_likelihood(Odd())


def test_cli_refuses_bernoulli_on_counts(tmp_path, capsys):
    path = tmp_path / "x.h5ad"
    counts_adata().write_h5ad(path)
    code = main(["fit", "--model", "scvi", "--data", str(path), "--likelihood", "bernoulli",
                 "--out", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "likelihood 'bernoulli' of modality 'rna' models 0/1 values" in err
    assert "--likelihood poisson" in err and "binarise" in err


@pytest.mark.parametrize("model, likelihood", [("mofa", "nb"), ("multigrate", "poisson"), ("mofa", "bernoulli")])
def test_likelihood_of_counts_or_binary_values_refused_on_continuous_data(model, likelihood):
    with pytest.raises(InputError) as err:
        Model(counts_adata(), model, layer="lognorm", continuous_modalities=["rna"],
              likelihoods={"rna": likelihood}, **TINY[model])
    message = str(err.value)
    assert err.value.field == "likelihoods['rna']"
    assert f"likelihood '{likelihood}' of modality 'rna'" in message
    assert "--likelihood normal" in message and "likelihoods={'rna': 'normal'}" in message


def test_second_modality_names_the_protein_likelihood_flag():
    data, spec = tiny_data("multigrate")  # rna counts, prot counts some cells lack
    dataset = read_dataset(data, DatasetSpec(modalities=spec.modalities, optional_modalities=["prot"],
                                             continuous_modalities=["prot"]))
    with pytest.raises(InputError, match=r"--protein-likelihood normal on the CLI, likelihoods=\{'prot'"):
        MODELS["multigrate"].from_dataset(dataset, likelihoods={"prot": "nb"}, **TINY["multigrate"])


def test_binary_likelihoods_are_accepted_where_they_fit():
    # 0/1 values
    model = Model(counts_adata(binary=True), "scvi", likelihoods={"rna": "bernoulli"}, **TINY["scvi"])
    assert model.module.likelihoods["rna"].name == "bernoulli"
    # the paired VAEs observe x > 0 under bernoulli: counts fit
    model = MODELS["gpg"].from_dataset(dataset_for("gpg"), likelihoods={"prot": "bernoulli"}, **TINY["gpg"])
    assert model.likelihoods["prot"].name == "bernoulli"


def test_default_likelihoods_are_checked_too():
    # LIVI's likelihood= keyword (not likelihoods=) reaches the same support check
    with pytest.raises(InputError, match="likelihood 'bernoulli' of modality 'rna' models 0/1 values"):
        Model(counts_adata(), "livi", donor_key="donor", likelihood="bernoulli", **LIVI_TINY)


# -------------------------------------------------------- likelihoods keyed by modality
@pytest.mark.parametrize("key", ["protein", "prot"])
def test_likelihoods_for_absent_modalities_are_refused(key):
    with pytest.raises(InputError, match=r"likelihoods are given for \['" + key + r"'\].*modalities are \['rna'\]"):
        Model(counts_adata(), "scvi", likelihoods={key: "nb"}, **TINY["scvi"])
    with pytest.raises(InputError, match=r"modalities are \['rna'\]"):
        fit(counts_adata(), model="scvi", likelihoods={key: "nb"}, epochs=1, progress=False, **TINY["scvi"])


def test_unknown_likelihood_names_are_refused():
    with pytest.raises(InputError, match=r"unknown likelihood 'nbx' for modality 'rna'.*choose one of"):
        Model(counts_adata(), "scvi", likelihoods={"rna": "nbx"}, **TINY["scvi"])


# ---------------------------------------------------------------------- LIVI's modality
def test_livi_reads_a_modality_of_any_name():
    runs = {}
    for modality in ("rna", "prot"):
        result = fit(counts_adata(), model="livi", donor_key="donor", modalities={modality: None}, epochs=2,
                     epochs_vae=1, batch_size=16, seed=3, progress=False, **LIVI_TINY)
        assert result.model.modalities == (modality,)
        assert f"lik_{modality}_log_theta_unconstrained" in dict(result.model.named_parameters())
        runs[modality] = result.history["loss"].to_numpy()
    assert len(runs["rna"]) == 3 and np.isfinite(runs["rna"]).all()
    np.testing.assert_allclose(runs["prot"], runs["rna"], rtol=1e-6)


def test_livi_with_the_api_on_an_adt_modality():
    model = Model(counts_adata(), "livi", donor_key="donor", modalities={"adt": None}, **LIVI_TINY)
    assert model.module.modalities == ("adt",) and model.module.config["modality"] == "adt"


# ------------------------------------------------------------------ data needs, once
def _violating_dataset(name: str):
    """A dataset that lacks what model ``name`` needs, or None when every dataset suits it."""
    low, high = MODELS[name].data_needs.modalities
    if high == 1:
        return dataset_for("cmcvae"), "modalities"  # two modalities
    if low >= 2:
        return dataset_for("scvi"), "modalities"  # one modality
    if MODELS[name].data_needs.donors == "required":
        return dataset_for("scvi"), "donor_key"  # no donor key
    return None


REFUSING = [name for name in sorted(MODELS) if _violating_dataset(name) is not None]


def test_most_models_can_be_refused_data():
    assert len(REFUSING) >= 9 and {"scvi", "livi", "totalvi", "dmlivi"} <= set(REFUSING)


@pytest.mark.parametrize("name", REFUSING)
def test_from_dataset_checks_the_data_needs(name):
    dataset, field = _violating_dataset(name)
    with pytest.raises(InputError) as err:
        MODELS[name].from_dataset(dataset, **TINY[name])
    assert err.value.field == field and f"model '{name}'" in str(err.value)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_from_dataset_checks_the_data_needs_once(name, monkeypatch):
    calls = []
    check = DataNeeds.check

    def counted(self, dataset, model):
        calls.append(model)
        return check(self, dataset, model)

    monkeypatch.setattr(DataNeeds, "check", counted)
    MODELS[name].from_dataset(dataset_for(name), **TINY[name])
    assert calls == [name]


# ------------------------------------------------------------------------ docstrings
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_and_guide_say_what_observed_does(name):
    cls = MODELS[name]
    assert "observed=False" in (cls.model.__doc__ or "") and "(B," in cls.model.__doc__
    assert "observed" in (cls.guide.__doc__ or "")


@pytest.mark.parametrize("name", [n for n in sorted(MODELS) if MODELS[n].data_needs.donors == "required"])
def test_a_donor_model_warns_about_data_of_one_donor(name):
    data, spec = tiny_data(name)
    one = data.copy()
    for obs in [one.obs] + [mod.obs for mod in getattr(one, "mod", {}).values()]:
        obs["donor"] = "d0"
    dataset = read_dataset(one, spec)
    with pytest.warns(UserWarning, match=r"separates donors.*one donor.*nothing to learn.*donor-free model"):
        MODELS[name].from_dataset(dataset, **TINY[name])
