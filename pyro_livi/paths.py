"""Where the shared real datasets live (never inside the package)."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    """``$PYRO_LIVI_DATA`` when set, else ``../shared/data`` beside the repository."""
    env = os.environ.get("PYRO_LIVI_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"
