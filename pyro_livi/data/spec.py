"""The dataset spec: which parts of an AnnData/MuData hold each modality (raw counts or
continuous values), donors, covariates, labels.

The spec is plain data (a dict or a JSON file) validated against
``data_schemas/dataset_spec.schema.json``; every problem is an
:class:`~pyro_livi.errors.InputError` naming the field and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jsonschema

from pyro_livi.errors import InputError

SCHEMA_NAME = "dataset_spec.schema.json"


@lru_cache(maxsize=1)
def dataset_spec_schema() -> dict:
    """The JSON Schema of a dataset spec (``data_schemas/dataset_spec.schema.json``)."""
    text = (resources.files("pyro_livi") / "data_schemas" / SCHEMA_NAME).read_text()
    return json.loads(text)


def _schema_error_to_input_error(error: jsonschema.ValidationError, source: str) -> InputError:
    """Turn one jsonschema error into an InputError that names the offending field."""
    schema = dataset_spec_schema()
    allowed = sorted(schema["properties"])
    path = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        missing = [p for p in error.validator_value if p not in error.instance]
        name = missing[0] if missing else error.validator_value[0]
        desc = schema["properties"].get(name, {}).get("description", "")
        return InputError(source, ".".join(path + [name]), "required field is missing",
                          f"add '{name}': {desc}")
    if error.validator == "additionalProperties" and not path:
        extra = sorted(set(error.instance) - set(schema["properties"]))
        return InputError(source, extra[0] if extra else "<spec>",
                          f"unknown field(s) {extra}",
                          f"remove or rename them; the allowed fields are {allowed}")
    if path == ["modalities"] and error.validator in ("pattern", "minLength"):
        # A modality name (a key of 'modalities') failed propertyNames.
        return InputError(source, ".".join(path) or "<spec>", error.message,
                          "use non-empty modality names without ':' or '/' (they name the "
                          "model's observation sites and MuData's obs columns)")
    field_name = ".".join(path) if path else "<spec>"
    top = path[0] if path else None
    desc = schema["properties"].get(top, {}).get("description") if top else schema["description"]
    return InputError(source, field_name, error.message, f"give {desc}")


@dataclass
class DatasetSpec:
    """What to read from an AnnData (``.h5ad``) or MuData (``.h5mu``).

    Attributes
    ----------
    modalities : dict[str, str | None]
        Modality name -> layer holding its values (``None`` = ``.X``): raw counts, unless
        the modality is listed in ``continuous_modalities``. For an AnnData the single
        modality is conventionally ``"rna"``. The first modality is the reference to whose
        cells every other modality is aligned.
    donor_key : str | None
        ``.obs`` column with the donor id of each cell; ``None`` for data without donors
        (only models with donor factors need one).
    covariate_keys : list[str]
        Categorical covariates in ``.obs`` (per-feature offsets in the models: one per category,
        as scvi-tools' ``categorical_covariate_keys``). Reading refuses a numeric column holding
        a non-whole value or more than 50 distinct values (a measurement: bin it first, e.g.
        ``pd.cut``) and a column with a value per cell (an identifier).
    label_keys : list[str]
        ``.obs`` columns kept for evaluation (cell type, ...).
    optional_modalities : list[str]
        Modalities in which some cells may be absent (MuData only), e.g. ``["prot"]``.
    continuous_modalities : list[str]
        Modalities holding continuous values (log-normalised, CLR, TF-IDF) instead of raw
        counts: checked to be finite, not to be integers; their size factors are 1.
    """

    modalities: dict[str, str | None]
    donor_key: str | None = None
    covariate_keys: list[str] = field(default_factory=list)
    label_keys: list[str] = field(default_factory=list)
    optional_modalities: list[str] = field(default_factory=list)
    continuous_modalities: list[str] = field(default_factory=list)

    def __post_init__(self):
        # Validate direct construction as strictly as from_dict (on the raw attributes).
        self._validate({
            "modalities": self.modalities,
            "donor_key": self.donor_key,
            "covariate_keys": self.covariate_keys,
            "label_keys": self.label_keys,
            "optional_modalities": self.optional_modalities,
            "continuous_modalities": self.continuous_modalities,
        }, "<spec>")

    @staticmethod
    def _validate(d, source: str) -> None:
        if not isinstance(d, dict):
            raise InputError(source, "<spec>", f"expected a JSON object, got {type(d).__name__}",
                             "give a dict with at least 'modalities'")
        validator = jsonschema.Draft202012Validator(dataset_spec_schema())
        best = jsonschema.exceptions.best_match(validator.iter_errors(d))
        if best is not None:
            raise _schema_error_to_input_error(best, source)
        modalities = list(d["modalities"])
        for key in ("optional_modalities", "continuous_modalities"):
            for name in d.get(key, []):
                if name not in modalities:
                    raise InputError(source, key, f"'{name}' is not one of the modalities {modalities}",
                                     "list only names that are keys of 'modalities'")
        if d.get("optional_modalities") and modalities[0] in d["optional_modalities"]:
            raise InputError(source, "optional_modalities",
                             f"the first modality '{modalities[0]}' is the reference every "
                             "other modality is aligned to, so it cannot be optional",
                             "put a modality measured in every cell first in 'modalities'")

    @classmethod
    def from_dict(cls, d: dict, source: str = "<spec>") -> "DatasetSpec":
        """Validate ``d`` against the schema and build the spec.

        Raises :class:`InputError` naming the field and the fix on the first problem.
        """
        cls._validate(d, source)
        return cls(
            modalities=dict(d["modalities"]),
            donor_key=d.get("donor_key"),
            covariate_keys=list(d.get("covariate_keys", [])),
            label_keys=list(d.get("label_keys", [])),
            optional_modalities=list(d.get("optional_modalities", [])),
            continuous_modalities=list(d.get("continuous_modalities", [])),
        )

    @classmethod
    def from_json(cls, path) -> "DatasetSpec":
        """Read and validate a spec from a JSON file."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "<file>", "file not found",
                             "give the path of an existing JSON dataset spec")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(path, "<file>", f"not valid JSON ({err})",
                             "fix the JSON syntax at the reported line and column") from err
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """Plain-data form (JSON-serialisable); ``from_dict(to_dict())`` round-trips."""
        return {
            "modalities": dict(self.modalities),
            "donor_key": self.donor_key,
            "covariate_keys": list(self.covariate_keys),
            "label_keys": list(self.label_keys),
            "optional_modalities": list(self.optional_modalities),
            "continuous_modalities": list(self.continuous_modalities),
        }
