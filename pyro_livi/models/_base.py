"""What every model of the zoo shares: the contract it declares (data needs, options,
training schedule, output tables), its own parameter namespace, parameter groups, active
components, and observation sites built from the likelihood registry."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro.nn import PyroModule, PyroParam

from ..data.batch import Batch
from ..errors import InputError
from ..infer.stages import EarlyStopping, Stage

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
    """

    default: Any
    help: str
    type: Any = None
    nargs: str | None = None
    choices: tuple | None = None
    schedule: bool = False
    flags: tuple[str, ...] = ()


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

    @classmethod
    def from_dataset(cls, dataset, *, likelihoods=None, counts_sample=None, **options) -> "ZooModel":
        """A model sized for ``dataset``; ``likelihoods`` ({modality: name}) chooses each
        observation site's likelihood, ``counts_sample`` ({modality: (n, G) counts}) serves
        data-based initialisations, ``options`` are the model's declared options."""
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
