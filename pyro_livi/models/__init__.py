"""The zoo's models, by name."""

from .livi import LIVI

MODELS = {"livi": LIVI}


def model_class(name: str):
    """The model class registered under ``name``."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}") from None


__all__ = ["LIVI", "MODELS", "model_class"]
