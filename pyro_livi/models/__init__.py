"""The zoo's models, by name."""

from .dmlivi import DMLIVI
from .livi import LIVI
from .multislivi import MultiSLIVI

MODELS = {"livi": LIVI, "multislivi": MultiSLIVI, "dmlivi": DMLIVI}


def model_class(name: str):
    """The model class registered under ``name``."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}") from None


__all__ = ["DMLIVI", "LIVI", "MODELS", "MultiSLIVI", "model_class"]
