"""Saving and loading fitted models with what is needed to apply them to data again."""

from __future__ import annotations

from pathlib import Path

import torch

from .data.donor_index import DonorIndex
from .errors import InputError
from .models import MODELS

MODEL_FILE = "model.pt"
#: format of the saved file; 1 (pyro_livi 0.1) had no "format" entry and always a donor index
FORMAT = 2


def save_model(model, path: str | Path, *, donor_index: DonorIndex | None = None,
               covariate_categories: dict | None = None, feature_names: dict, spec: dict | None = None) -> Path:
    """Write the model (its registered name, constructor config, parameters) with its data
    metadata.

    ``path`` is a file, or a directory that receives ``model.pt``. The donor index (None for
    data without donors) and covariate categories are re-applied when the model meets data
    again. Raises ValueError for a model that is not registered in :data:`pyro_livi.models.MODELS`.
    """
    name = type(model).registry_name
    if MODELS.get(name) is not type(model):
        raise ValueError(f"{type(model).__name__} is not a registered model; register it in "
                         "pyro_livi.models.MODELS to save it")
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / MODEL_FILE
    torch.save({
        "format": FORMAT,
        "model": name,
        "config": model.config,
        "state": model.state_dict(),
        "donor_index": None if donor_index is None else donor_index.to_dict(),
        "covariate_categories": {k: list(v) for k, v in (covariate_categories or {}).items()},
        "feature_names": {m: list(map(str, v)) for m, v in feature_names.items()},
        "spec": spec,
    }, path)
    return path


def load_model(path: str | Path):
    """Read what :func:`save_model` wrote (this format or pyro_livi 0.1's); returns
    ``(model, metadata)``.

    ``metadata`` holds ``model`` (the registered name), ``donor_index`` (a
    :class:`DonorIndex`, or None), ``covariate_categories``, ``feature_names`` and ``spec``.
    Raises InputError for a missing file, a newer format or an unknown model name.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise InputError(path, "<file>", "no saved model here", "fit one with `pyro-livi fit` first")
    saved = torch.load(path, weights_only=False, map_location="cpu")
    version = saved.get("format", 1)
    if version > FORMAT:
        raise InputError(path, "format", f"saved by a newer pyro_livi (format {version}; this version "
                         f"reads up to {FORMAT})", "upgrade pyro_livi to load it")
    if saved["model"] not in MODELS:
        raise InputError(path, "model", f"unknown model {saved['model']!r}; this version has {sorted(MODELS)}",
                         "load it with the pyro_livi version that saved it")
    model = MODELS[saved["model"]](**saved["config"])
    model.load_state_dict(saved["state"])
    donors = saved["donor_index"]
    meta = {
        "model": saved["model"],
        "donor_index": None if donors is None else DonorIndex.from_dict(donors),
        "covariate_categories": saved["covariate_categories"],
        "feature_names": saved["feature_names"],
        "spec": saved["spec"],
    }
    return model, meta
