"""Progress bars that work in terminals and notebooks alike: tqdm's notebook widget where
ipywidgets is installed (``tqdm.auto``), the text bar otherwise, without tqdm's warning."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
