"""The zoo's models, by name: the one registry that the trainer, the CLI, evaluation and saving
read. Adding a model is its file and one entry here."""

from ._base import DataNeeds, Option, ZooModel
from ._livi_family import livi_stages
from .cmcvae import CMCVAE
from .dmlivi import DMLIVI
from .dualvae import DualVAE
from .livi import LIVI
from .mofa import MOFA
from .multigrate import Multigrate
from .multislivi import MultiSLIVI
from .scvi import SCVI
from .sequential import GPG, PGP
from .totalvi import TOTALVI

MODELS: dict[str, type[ZooModel]] = {
    "livi": LIVI,
    "multislivi": MultiSLIVI,
    "dmlivi": DMLIVI,
    "scvi": SCVI,
    "totalvi": TOTALVI,
    "multigrate": Multigrate,
    "mofa": MOFA,
    "cmcvae": CMCVAE,
    "gpg": GPG,
    "pgp": PGP,
    "dualvae": DualVAE,
}
for _name, _cls in MODELS.items():
    _cls.registry_name = _name


def model_class(name: str) -> type[ZooModel]:
    """The model class registered under ``name``."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {sorted(MODELS)}") from None


__all__ = ["CMCVAE", "DataNeeds", "DMLIVI", "DualVAE", "GPG", "PGP", "LIVI", "MODELS", "MOFA", "Multigrate",
           "MultiSLIVI", "Option", "SCVI", "TOTALVI", "ZooModel", "livi_stages", "model_class"]
