"""Saving and loading fitted models with what is needed to apply them to data again."""

from __future__ import annotations

from pathlib import Path

import torch

from .data.donor_index import DonorIndex
from .models import MODELS

MODEL_FILE = "model.pt"


def save_model(model, path: str | Path, *, donor_index: DonorIndex, covariate_categories: dict,
               feature_names: dict, spec: dict | None = None) -> Path:
    """Write the model (class, constructor config, parameters) with its data metadata.

    ``path`` is a file, or a directory that receives ``model.pt``. The donor index and
    covariate categories are re-applied when the model meets data again.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / MODEL_FILE
    name = next(k for k, cls in MODELS.items() if cls is type(model))
    torch.save({
        "model": name,
        "config": model.config,
        "state": model.state_dict(),
        "donor_index": donor_index.to_dict(),
        "covariate_categories": {k: list(v) for k, v in covariate_categories.items()},
        "feature_names": {m: list(map(str, v)) for m, v in feature_names.items()},
        "spec": spec,
    }, path)
    return path


def load_model(path: str | Path):
    """Read what :func:`save_model` wrote; returns ``(model, metadata)``.

    ``metadata`` holds ``donor_index`` (a :class:`DonorIndex`), ``covariate_categories``,
    ``feature_names`` and ``spec``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no saved model here; fit one with `pyro-livi fit` first")
    saved = torch.load(path, weights_only=False, map_location="cpu")
    model = MODELS[saved["model"]](**saved["config"])
    model.load_state_dict(saved["state"])
    meta = {
        "model": saved["model"],
        "donor_index": DonorIndex.from_dict(saved["donor_index"]),
        "covariate_categories": saved["covariate_categories"],
        "feature_names": saved["feature_names"],
        "spec": saved["spec"],
    }
    return model, meta
