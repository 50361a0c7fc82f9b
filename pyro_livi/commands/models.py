"""``pyro-livi models``: the registered models, one line each."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the models of the zoo",
                              description="List every registered model: what it is, its seed or paper, "
                              "and what data it needs. `pyro-livi fit --model NAME --help` shows its options.")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import MODELS

    width = max(map(len, MODELS))
    for name, cls in MODELS.items():
        print(f"{name:<{width}}  {cls.summary} [{cls.reference}; needs {cls.data_needs.describe()}]")
    return 0
