"""What every model of the zoo shares: the contract it declares (data needs, options,
training schedule, output tables), its own parameter namespace, parameter groups, active
components, and observation sites built from the likelihood registry."""

from __future__ import annotations

import contextvars
import functools
import itertools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.nn import PyroModule, PyroParam

from ..data.batch import Batch
from ..errors import InputError
from ..infer.stages import EarlyStopping, Stage, is_real, is_whole
from ..likelihoods import LIKELIHOODS, Likelihood, get_likelihood

_instance_counter = itertools.count()

#: the kinds of output table a model can declare (computed by :mod:`pyro_livi.analysis.latents`)
OUTPUT_KINDS = ("latent", "specific_state", "modality_latent", "donor_factors", "assignment", "loadings",
                "dispersions", "variance_explained", "protein_foreground")


@dataclass(frozen=True)
class DataNeeds:
    """What a model reads from a dataset.

    modalities : number of modalities the model takes, ``(min, max)`` (max None: any number).
    inputs : ``"counts"`` (raw integer counts in every modality), ``"continuous"``
        (normalised values) or ``"any"``.
    donors : ``"required"`` (donor factors need a donor key), ``"optional"`` or ``"unused"``.
    missing_modalities : whether cells may lack a modality other than the first.
    preferred_inputs : for ``inputs="any"``, what each modality is best given, by position
        (``"counts"`` or ``"continuous"``; the last entry serves the remaining modalities),
        e.g. ``("counts", "continuous")`` for raw RNA counts and CLR proteins. Used by
        ``pyro-livi compare``; empty: raw counts.
    """

    modalities: tuple[int, int | None] = (1, 1)
    inputs: str = "counts"
    donors: str = "unused"
    missing_modalities: bool = False
    preferred_inputs: tuple[str, ...] = ()

    def input_kinds(self, modalities) -> dict[str, str]:
        """{modality: "counts" or "continuous"}: what each of ``modalities`` should be given."""
        if self.inputs != "any":
            return {m: self.inputs for m in modalities}
        prefs = self.preferred_inputs or ("counts",)
        return {m: prefs[min(k, len(prefs) - 1)] for k, m in enumerate(modalities)}

    def describe(self) -> str:
        """One line, e.g. ``"1 modality, raw counts, no donors"``."""
        low, high = self.modalities
        count = f"{low}" if low == high else f"{low}+" if high is None else f"{low}-{high}"
        inputs = {"counts": "raw counts", "continuous": "continuous values", "any": "counts or continuous values"}
        donors = {"required": "donors required", "optional": "donors optional", "unused": "no donors"}
        parts = [f"{count} modalit{'y' if count == '1' else 'ies'}", inputs[self.inputs], donors[self.donors]]
        if self.missing_modalities:
            parts.append("cells may lack a modality")
        return ", ".join(parts)

    def check(self, dataset, model: str) -> None:
        """Raise an InputError naming the model, the field and the fix when ``dataset`` does not
        give what the model needs."""
        low, high = self.modalities
        n = len(dataset.modalities)
        if n < low or (high is not None and n > high):
            want = f"{low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise InputError(dataset.source, "modalities",
                             f"model '{model}' takes {want} modalit{'y' if want == '1' else 'ies'}, the data "
                             f"were read with {n}: {dataset.modalities}",
                             "choose the modalities with --modalities on the CLI (modalities= in Python), "
                             "or another model (`pyro-livi models` lists them)")
        if self.donors == "required" and dataset.donor_index is None:
            raise InputError(dataset.source, "donor_key",
                             f"model '{model}' has donor factors and needs the donor of every cell",
                             "name the .obs column with the donor ids: --donor-key on the CLI, "
                             "donor_key= in Python")
        if self.donors == "required" and len(dataset.donor_index) < 2:
            warnings.warn(f"{dataset.source}: model '{model}' separates donors from each other, but the data "
                          f"hold one donor ({dataset.donor_index.ids[0]}): its donor factors (D, V) have "
                          "nothing to learn; give cells of several donors, or fit a donor-free model such as "
                          "scvi (`pyro-livi models` lists them)", UserWarning, stacklevel=4)
        continuous = set(dataset.spec.continuous_modalities)
        for m in dataset.modalities:
            layer = dataset.spec.modalities[m]
            where = ".X" if layer is None else f"layer '{layer}'"
            if self.inputs == "counts" and m in continuous:
                raise InputError(dataset.source, f"modalities['{m}']",
                                 f"model '{model}' models raw counts, but modality '{m}' ({where}) was "
                                 "declared continuous",
                                 f"give the layer with raw counts (--modalities {m}:counts on the CLI, "
                                 f"modalities={{'{m}': 'counts'}} in Python) and do not list '{m}' in "
                                 "--continuous-modalities / continuous_modalities")
            if self.inputs == "continuous" and m not in continuous:
                raise InputError(dataset.source, f"modalities['{m}']",
                                 f"model '{model}' reads continuous values, but modality '{m}' ({where}) "
                                 "was read as raw counts",
                                 f"preprocess the data (`pyro-livi preprocess`) and declare it continuous: "
                                 f"--continuous-modalities {m} on the CLI, continuous_modalities=['{m}'] "
                                 "in Python")
        if not self.missing_modalities:
            from . import MODELS

            takers = [name for name, cls in MODELS.items() if cls.data_needs.missing_modalities]
            for m in dataset.modalities:
                absent = int((~np.asarray(dataset.present[m])).sum())
                if absent:
                    raise InputError(dataset.source, f"modalities['{m}']",
                                     f"{absent} of {dataset.n_cells} cells lack modality '{m}', and model "
                                     f"'{model}' cannot tell a missing modality from zero values",
                                     "keep only the cells measured in every modality, or fit a model that "
                                     f"takes partially measured cells: {', '.join(takers)}")


@dataclass(frozen=True)
class Option:
    """A model-specific setting: a keyword of ``from_dataset`` (Python) and a CLI flag of
    ``pyro-livi fit --model NAME`` alike.

    default : the value used when it is not given (equal to the keyword's default).
    help : one line, with units.
    type : element type on the CLI (default: the type of ``default``; lists give their element).
    nargs : ``"+"`` for lists.
    choices : allowed values.
    schedule : a setting of the model's training schedule (:meth:`ZooModel.default_stages`),
        not of the model itself.
    flags : extra CLI spellings kept for compatibility.
    at_least, above : lower bound of a number (``at_least``: the value itself allowed;
        ``above``: only larger values), e.g. ``at_least=1`` for a size, ``at_least=0`` for a
        penalty weight, ``above=0`` for a learning rate. Every number option declares one.
    at_most, below : upper bound (inclusive / exclusive), e.g. ``below=1`` for a dropout rate.
    nullable : None is accepted (the model then chooses, e.g. from a preset); always true when
        ``default`` is None.
    per_modality : in Python the value may also be a {modality: value} mapping, each value
        checked (e.g. one L1 weight per modality).

    :meth:`check` validates a value against this declaration: whole numbers (``type=int``) must
    be ints (not bools, floats or strings), numbers (``type=float``) ints or floats (finite, not
    bools or strings), switches (a bool ``default``) bools, lists (``nargs="+"``) one or more
    elements each checked, and ``choices`` membership. Strings without choices (file paths; in
    Python also tables) are passed on as given.
    """

    default: Any
    help: str
    type: Any = None
    nargs: str | None = None
    choices: tuple | None = None
    schedule: bool = False
    flags: tuple[str, ...] = ()
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    nullable: bool = False
    per_modality: bool = False

    @property
    def element_type(self):
        """The type of one value: ``type``, else the type of ``default`` (of its first element for
        lists); None when neither says."""
        if self.type is not None:
            return self.type
        default = self.default
        if self.nargs and isinstance(default, (list, tuple)) and default:
            default = default[0]
        return None if default is None else type(default)

    @property
    def is_switch(self) -> bool:
        """A true/false setting (a bool default): ``--flag`` / ``--no-flag`` on the CLI."""
        return isinstance(self.default, bool)

    @property
    def is_number(self) -> bool:
        """A whole number or a number (the options that must declare bounds)."""
        return not self.is_switch and self.element_type in (int, float)

    @property
    def has_bounds(self) -> bool:
        """Whether a lower bound is declared (``at_least`` or ``above``)."""
        return self.at_least is not None or self.above is not None

    def bounds_text(self) -> str:
        """The allowed range, e.g. ``">= 1"``, ``"> 0"``, ``"in [0, 1)"``; empty without bounds."""
        low = high = None  # (value, closed)
        if self.at_least is not None:
            low = (self.at_least, True)
        elif self.above is not None:
            low = (self.above, False)
        if self.at_most is not None:
            high = (self.at_most, True)
        elif self.below is not None:
            high = (self.below, False)
        if low and high:
            return f"in {'[' if low[1] else '('}{low[0]:g}, {high[0]:g}{']' if high[1] else ')'}"
        if low:
            return f"{'>=' if low[1] else '>'} {low[0]:g}"
        if high:
            return f"{'<=' if high[1] else '<'} {high[0]:g}"
        return ""

    def wanted(self) -> str:
        """What a value must be, in words, e.g. ``"a whole number >= 1"``."""
        kind = self.element_type
        if self.is_switch:
            what = "true or false (a bool)"
        elif self.choices:
            what = f"one of {list(self.choices)}"
        elif kind is int:
            what = "a whole number"
        elif kind is float:
            what = "a finite number"
        else:
            what = "a value"
        bounds = self.bounds_text()
        if bounds:
            what += f" {bounds}"
        if self.nargs:
            what = f"one or more values, each {what}"
        if self.nullable or self.default is None:
            what += ", or None (not set)"
        if self.per_modality:
            what += " (in Python also a {modality: value} mapping)"
        return what

    @staticmethod
    def flag(name: str) -> str:
        """The CLI flag of the option called ``name``."""
        return f"--{name.replace('_', '-')}"

    def check(self, name: str, value, source: str = "<arguments>"):
        """``value`` if it is allowed for option ``name``, normalised (numpy scalars to Python
        numbers, ints to floats for ``type=float``, a list option's scalar or tuple to a list);
        raises :class:`~pyro_livi.errors.InputError` naming the keyword, the CLI flag, what the
        value must be and the fix."""
        if self.per_modality and isinstance(value, Mapping):
            return {m: self._check_value(name, v, source) for m, v in value.items()}
        return self._check_value(name, value, source)

    def _check_value(self, name: str, value, source: str):
        if value is None:
            if self.nullable or self.default is None:
                return None
            self._refuse(name, value, source)
        if self.nargs:
            if isinstance(value, (Mapping, pd.Series)):  # by feature, e.g. {protein: counts} (Python only)
                for item in (value.values() if isinstance(value, Mapping) else value.to_numpy()):
                    self._check_one(name, item, value, source)
                return value
            if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
                items = [value]
            else:
                items = list(np.asarray(value, dtype=object).ravel()) if isinstance(value, np.ndarray) \
                    else list(value)
            if not items:
                self._refuse(name, value, source)
            return [self._check_one(name, item, value, source) for item in items]
        return self._check_one(name, value, value, source)

    def _check_one(self, name: str, item, value, source: str):
        kind = self.element_type
        if self.is_switch:
            if isinstance(item, (bool, np.bool_)):
                return bool(item)
            self._refuse(name, value, source)
        if self.choices is not None:
            if isinstance(item, str) and item in self.choices:
                return item
            self._refuse(name, value, source)
        if kind is int:
            if not is_whole(item):
                self._refuse(name, value, source)
            item = int(item)
        elif kind is float:
            if not is_real(item):
                self._refuse(name, value, source)
            item = float(item)
        else:
            return item
        if ((self.at_least is not None and item < self.at_least) or (self.above is not None and item <= self.above)
                or (self.at_most is not None and item > self.at_most)
                or (self.below is not None and item >= self.below)):
            self._refuse(name, value, source)
        return item

    def _refuse(self, name: str, value, source: str):
        shown = f"{value!r}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else f"{value!r} ({type(value).__name__})"
        flag = self.flag(name)
        if self.is_switch:
            example = f"{flag} or --no-{name.replace('_', '-')} on the CLI, {name}=True or {name}=False in Python"
        else:
            default = self.default
            cli = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            example = (f"e.g. {flag} {cli} on the CLI, {name}={default!r} in Python (the default)"
                       if default is not None else f"with {flag} on the CLI, {name}= in Python, or leave it "
                       "unset for the model's choice")
        raise InputError(source, name, f"{name} ({flag}) must be {self.wanted()}, got {shown}",
                         f"give {self.wanted()}, {example}")


class ZooModel(PyroModule):
    """Base class of the zoo's PyroModules.

    Subclasses define ``model(batch, observed=True)`` and ``guide(batch, observed=True)``,
    ``encode(batch) -> (loc, scale)`` (the posterior of the per-cell latent), a ``config`` dict
    (the constructor's keyword arguments, enough to rebuild the model), and declare beside them:

    - ``summary`` (one line) and ``reference`` (seed or paper);
    - ``data_needs`` (:class:`DataNeeds`);
    - ``options`` ({keyword: :class:`Option`}), the model-specific keywords of ``from_dataset``;
    - ``from_dataset(dataset, likelihoods=None, counts_sample=None, **options)``;
    - ``default_stages`` (one stage training everything unless overridden);
    - ``outputs`` (kinds of :data:`OUTPUT_KINDS`), ``latent_name`` (the per-cell latent's
      table name) and ``latent_site`` (its sample site, which names its columns);
    - ``param_groups`` (parameter-name prefix -> group name, used by training stages; empty:
      every parameter is in group ``"all"``) and ``components_all`` (optional parts a stage
      may switch on, e.g. the donor terms).

    The registry (:data:`pyro_livi.models.MODELS`) sets ``registry_name``. Every instance gets
    a unique Pyro name prefix, so two models in one process never share parameters through
    Pyro's global parameter store.

    Every subclass's ``from_dataset`` checks its inputs before building (wrapped once, when the
    class is defined; the model files do not call the checks themselves):
    :meth:`DataNeeds.check` on the dataset, :meth:`check_options` on the declared options, and
    the likelihoods (:func:`check_likelihoods`: known names, keyed by the data's modalities, and
    a support that fits each modality's values). ``default_stages`` checks the declared
    schedule options the same way. Each refusal is an :class:`~pyro_livi.errors.InputError`
    naming the keyword, the CLI flag and the fix.
    """

    registry_name: str = ""
    summary: str = ""
    reference: str = ""
    data_needs: DataNeeds = DataNeeds()
    options: dict[str, Option] = {}
    outputs: tuple[str, ...] = ("latent", "dispersions")
    latent_name: str = "latent"
    latent_site: str = "z"
    #: fraction of cells trained on by default; the rest are validation cells (scvi-tools: 0.9)
    default_train_size: float = 0.9
    modalities: tuple[str, ...] = ()
    param_groups: dict[str, str] = {}
    components_all: tuple[str, ...] = ()
    #: the model observes x > 0 under a binary likelihood (``bernoulli``), so that counts and
    #: continuous values fit it too; otherwise a binary likelihood needs 0/1 data
    binarises_data: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr, wrap in (("from_dataset", _checked_from_dataset), ("default_stages", _checked_default_stages)):
            func = getattr(cls, attr).__func__
            if not getattr(func, "_checks_inputs", False) and func is not _ABSTRACT_FROM_DATASET:
                setattr(cls, attr, classmethod(wrap(func)))

    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, **options) -> "ZooModel":
        """A model sized for ``dataset``; ``likelihoods`` ({modality: name}) chooses each
        observation site's likelihood, ``counts_sample`` ({modality: (n, G) counts}) serves
        data-based initialisations, ``options`` are the model's declared options.

        Raises InputError when the data do not give what the model needs
        (:attr:`data_needs`), an option is out of its declared range (:meth:`check_options`),
        or a likelihood is unknown, keyed by a modality the data lack, or does not fit the
        modality's values (:func:`check_likelihoods`)."""
        raise NotImplementedError

    @classmethod
    def check_options(cls, options: dict, *, schedule: bool | None = None) -> dict:
        """``options`` with every declared one checked by its :class:`Option` (and normalised);
        keywords the model does not declare are passed on unchecked. ``schedule=False`` refuses
        the declared schedule options (they belong to :meth:`default_stages`). Raises
        InputError naming the keyword, its CLI flag, the allowed values and the fix."""
        out = dict(options)
        for name, value in options.items():
            option = cls.options.get(name)
            if option is None:
                continue
            if schedule is False and option.schedule:
                raise InputError("<arguments>", name, f"{name} is a setting of the training schedule, not of "
                                 "the model",
                                 f"give it to pyro_livi.run.fit ({Option.flag(name)} of `pyro-livi fit`), or to "
                                 f"{cls.__name__}.default_stages")
            out[name] = option.check(name, value)
        return out

    # ----------------------------------------------------------------------- model / guide
    def model(self, batch: Batch, observed: bool = True):
        """The generative model of one minibatch (each model's docstring gives its equations).

        ``batch`` (:class:`~pyro_livi.data.batch.Batch`) holds B cells: ``x[m]`` (B, G_m)
        values of each modality m, ``size_factor[m]`` (B,) total counts, ``present[m]`` (B,)
        whether the cell was measured in m, ``donor`` (B,) donor codes, ``covariates``
        (B, n_covariates) category codes, ``index`` (B,) cell positions in the dataset.
        ``observed=True`` conditions every observation site ``obs_<m>`` on ``batch.x[m]``
        (training); ``observed=False`` draws them, as for posterior predictive checks:
        ``Predictive(model.model, guide=model.guide, num_samples=S)(batch, observed=False)``
        returns ``obs_<m>`` of shape (S, B, G_m), whereas with the default the "draws" are
        the observed values themselves.
        """
        raise NotImplementedError

    def guide(self, batch: Batch, observed: bool = True):
        """The variational distribution of every latent site of :meth:`model` for ``batch``
        (same arguments; ``observed`` is accepted for the signature and changes nothing)."""
        raise NotImplementedError

    @classmethod
    def default_stages(cls, *, epochs: int, patience: int | None = 20, **schedule_options) -> list[Stage]:
        """The training schedule: one stage training every parameter for up to ``epochs``
        epochs, stopped early after ``patience`` epochs without improvement (None: never)."""
        if schedule_options:
            raise TypeError(f"unexpected schedule options {sorted(schedule_options)}")
        stop = EarlyStopping(patience=patience) if patience else None
        return [Stage("train", epochs, train=("all",), early_stopping=stop)]

    def __init__(self, name: str | None = None):
        super().__init__(name=name or f"{type(self).__name__.lower()}_{next(_instance_counter)}")
        #: parts of the model that are switched on; all of them unless a training stage says otherwise
        self.components: set[str] = set(self.components_all)
        self.likelihoods = {}

    # -------------------------------------------------------------- observation sites
    def _init_likelihood_params(self, modality: str, n_features: int, n_latent: int, counts_sample=None):
        """Create the per-feature parameters and cell heads the modality's likelihood needs."""
        lik = self.likelihoods[modality]
        for pname, init in lik.init_feature_params(n_features, counts_sample).items():
            setattr(self, f"lik_{modality}_{pname}", PyroParam(torch.as_tensor(init, dtype=torch.float32)))
        for head in lik.cell_heads:
            setattr(self, f"head_{modality}_{head}_weight", PyroParam(torch.zeros(n_latent, n_features)))
            setattr(self, f"head_{modality}_{head}_bias", PyroParam(torch.zeros(n_features)))

    def likelihood_params(self, modality: str, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature parameters (G,) and cell heads (B, G) of a modality's likelihood."""
        lik = self.likelihoods[modality]
        params = {p: getattr(self, f"lik_{modality}_{p}") for p in lik.feature_params}
        for head in lik.cell_heads:
            weight = getattr(self, f"head_{modality}_{head}_weight")
            params[head] = s @ weight + getattr(self, f"head_{modality}_{head}_bias")
        return params

    def _observe(self, modality: str, mean: torch.Tensor, s: torch.Tensor, batch: Batch, observed: bool):
        """The observation site ``obs_<modality>``; cells absent from the modality are masked out."""
        lik = self.likelihoods[modality]
        fn = lik(mean, **self.likelihood_params(modality, s)).to_event(1).mask(batch.present[modality])
        return pyro.sample(f"obs_{modality}", fn, obs=batch.x[modality] if observed else None)

    def dispersions(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-feature likelihood parameters of each modality, constrained (e.g. theta = exp(log_theta))."""
        out = {}
        for modality, lik in self.likelihoods.items():
            out[modality] = {}
            for p in lik.feature_params:
                value = getattr(self, f"lik_{modality}_{p}").detach()
                key, value = (p[4:], value.exp()) if p.startswith("log_") else (p, value)
                out[modality][key] = value
        return out

    # ----------------------------------------------------------------- parameter groups
    def group_of(self, param_name: str) -> str:
        """Group of a parameter given its ``named_parameters`` name (``"all"`` for models
        without parameter groups)."""
        if not self.param_groups:
            return "all"
        for prefix, group in self.param_groups.items():
            if param_name.startswith(prefix):
                return group
        raise KeyError(f"{type(self).__name__}: parameter {param_name!r} belongs to no group")

    def parameters_by_group(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """{group: {parameter name: parameter}} over every parameter of the module."""
        groups: dict[str, dict[str, torch.nn.Parameter]] = {}
        for pname, param in self.named_parameters():
            groups.setdefault(self.group_of(pname), {})[pname] = param
        return groups

    def pyro_param_name(self, param_name: str) -> str:
        """Name under which a parameter appears at Pyro param sites."""
        return f"{self._pyro_name}.{param_name.removesuffix('_unconstrained')}"


# ----------------------------------------------------------------------------------------------
# The checks every from_dataset / default_stages runs (ZooModel.__init_subclass__ wraps them)
# ----------------------------------------------------------------------------------------------

_ABSTRACT_FROM_DATASET = ZooModel.from_dataset.__func__
#: True while a checked from_dataset runs: one model's from_dataset calling another's checks once
_BUILDING = contextvars.ContextVar("pyro_livi_building_model", default=False)


def _checked_from_dataset(func):
    """``func`` (a model's ``from_dataset``) after the data, option and likelihood checks."""

    @functools.wraps(func)
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, **options):
        if _BUILDING.get():
            return func(cls, dataset, likelihoods=likelihoods, counts_sample=counts_sample, **options)
        cls.data_needs.check(dataset, cls.registry_name or cls.__name__)
        options = cls.check_options(options, schedule=False)
        likelihoods = check_likelihoods(dataset, likelihoods, binarises=cls.binarises_data)
        token = _BUILDING.set(True)
        try:
            model = func(cls, dataset, likelihoods=likelihoods, counts_sample=counts_sample, **options)
        finally:
            _BUILDING.reset(token)
        chosen = {m: lik for m, lik in getattr(model, "likelihoods", {}).items()
                  if m in dataset.modalities and m not in (likelihoods or {})}
        check_likelihoods(dataset, chosen, binarises=model.binarises_data)  # the model's defaults
        return model

    from_dataset._checks_inputs = True
    return from_dataset


def _checked_default_stages(func):
    """``func`` (a model's ``default_stages``) after checking the declared schedule options."""

    @functools.wraps(func)
    def default_stages(cls, *args, **schedule_options):
        return func(cls, *args, **cls.check_options(schedule_options))

    default_stages._checks_inputs = True
    return default_stages


def _likelihood_fix(dataset, modality: str, name: str) -> str:
    """How to choose likelihood ``name`` for ``modality``, on the CLI and in Python."""
    flag = "--likelihood" if modality == dataset.modalities[0] else "--protein-likelihood"
    return f"{flag} {name} on the CLI, likelihoods={{'{modality}': '{name}'}} in Python"


def check_likelihoods(dataset, likelihoods, *, binarises: bool = False) -> dict | None:
    """``likelihoods`` ({modality: registered name or :class:`Likelihood`}; one name: every
    modality) as a dict, after checking that each key is a modality of ``dataset``, each name is
    registered and each likelihood's :attr:`~pyro_livi.likelihoods.Likelihood.support` fits the
    modality's values:

    - ``counts`` (nb, zinb, nb_mixture, poisson): the modality holds raw counts (not declared
      continuous);
    - ``binary`` (bernoulli): every stored value is 0 or 1 (read from the stored matrix in
      chunks, sparse blocks kept sparse), unless ``binarises`` (the model observes x > 0);
    - ``real`` (normal): any values.

    Raises InputError naming the modality, the likelihood, the CLI flag (``--likelihood`` for the
    first modality, ``--protein-likelihood`` for the others) or ``likelihoods=``, and the fix."""
    if likelihoods is None:
        return None
    modalities = list(dataset.modalities)
    if isinstance(likelihoods, (str, Likelihood)):
        likelihoods = {m: likelihoods for m in modalities}
    if not isinstance(likelihoods, Mapping):
        raise InputError("<arguments>", "likelihoods", f"expected {{modality: likelihood name}}, got "
                         f"{type(likelihoods).__name__}",
                         f"give a dict, e.g. likelihoods={{'{modalities[0]}': 'nb'}}")
    unknown = [m for m in likelihoods if m not in modalities]
    if unknown:
        raise InputError(dataset.source, "likelihoods",
                         f"likelihoods are given for {unknown}, which the data were not read with; the "
                         f"data's modalities are {modalities}",
                         f"key likelihoods by the data's modalities, e.g. likelihoods={{'{modalities[0]}': 'nb'}} "
                         "in Python (on the CLI --likelihood sets the first modality's, --protein-likelihood "
                         "every other one's), or read the modality too (--modalities / modalities=)")
    out = {}
    for m, name in likelihoods.items():
        try:
            lik = get_likelihood(name)
        except (ValueError, TypeError):
            raise InputError("<arguments>", f"likelihoods['{m}']", f"unknown likelihood {name!r} for modality '{m}'",
                             f"choose one of {sorted(LIKELIHOODS)}, e.g. {_likelihood_fix(dataset, m, 'nb')}") from None
        _check_support(dataset, m, lik, binarises)
        out[m] = name
    return out


def _check_support(dataset, modality: str, lik: Likelihood, binarises: bool) -> None:
    support = getattr(lik, "support", "counts")
    continuous = modality in set(dataset.spec.continuous_modalities)
    field = f"likelihoods['{modality}']"
    if support == "counts" and continuous:
        raise InputError(dataset.source, field,
                         f"likelihood '{lik.name}' of modality '{modality}' models non-negative whole-number "
                         f"counts, but '{modality}' was read as continuous values (--continuous-modalities / "
                         "continuous_modalities=)",
                         f"choose a likelihood of real values ({_likelihood_fix(dataset, modality, 'normal')}), "
                         f"or read the raw counts of '{modality}' (e.g. --modalities {modality}:counts) and "
                         "leave it out of --continuous-modalities / continuous_modalities")
    if support == "binary" and not binarises:
        bad = dataset.first_non_binary(modality)
        if bad is not None:
            feature, value = bad
            alternative = "normal" if continuous else "poisson"
            raise InputError(dataset.source, field,
                             f"likelihood '{lik.name}' of modality '{modality}' models 0/1 values, but "
                             f"'{modality}' holds other values, e.g. {value:g} for feature '{feature}'",
                             "binarise the data before reading them (e.g. adata.X = (adata.X > 0)"
                             ".astype('float32')), or choose a likelihood of "
                             f"{'real values' if continuous else 'counts'} "
                             f"({_likelihood_fix(dataset, modality, alternative)})")
