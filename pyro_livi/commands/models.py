"""``pyro-livi models``: the registered models, one line each."""

from __future__ import annotations

import re


def register(subparsers) -> None:
    from ._help import DefaultsHelpFormatter

    p = subparsers.add_parser("models", help="list the models of the zoo",
                              formatter_class=DefaultsHelpFormatter,
                              description="List every registered model: what it is, the paper or design it follows, "
                              "and what data it needs. `pyro-livi fit --model NAME --help` shows its options.")
    p.set_defaults(func=run)


def public_reference(reference: str) -> str:
    """A model's reference without the project's internal design-document names
    ("seed 001 (LIVI, eq. 2-4); PMBio/LIVI" -> "LIVI, eq. 2-4; PMBio/LIVI")."""
    parts = []
    for part in (p.strip() for p in reference.split(";")):
        match = re.match(r"^seeds? \d+\s*(?:\((.*)\))?(.*)$", part)
        if match is None:
            parts.append(part)
        elif match.group(1) and not match.group(2).strip() \
                and not match.group(1).startswith("section"):
            parts.append(match.group(1).strip())
    return "; ".join(p for p in parts if p)


def run(args) -> int:
    from ..models import MODELS

    width = max(map(len, MODELS))
    for name, cls in MODELS.items():
        reference = public_reference(cls.reference)
        print(f"{name:<{width}}  {cls.summary} [{reference + '; ' if reference else ''}"
              f"needs {cls.data_needs.describe()}]")
    return 0
