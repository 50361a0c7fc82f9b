"""Neural building blocks shared by the models: MLP encoders and the product of experts."""

from __future__ import annotations

from typing import Sequence

import torch
from pyro.nn import PyroModule
from torch import nn


def mlp(n_in: int, hidden: Sequence[int]) -> PyroModule:
    """Blocks ``Linear -> ReLU -> LayerNorm`` for each width in ``hidden`` (DESIGN section 3)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [PyroModule[nn.Linear](n_in, width), nn.ReLU(), PyroModule[nn.LayerNorm](width)]
        n_in = width
    return PyroModule[nn.Sequential](*layers)


class GaussianEncoder(PyroModule):
    """Amortised diagonal-Gaussian posterior over a latent from counts.

    Input: counts ``x`` of shape (B, n_in). By default ``log1p(x)`` is fed to the network
    (``input_transform="raw"`` feeds counts as they are). Output: ``(loc, scale)``, each
    (B, n_latent), with ``scale = exp(log_scale) + 1e-4``.
    """

    def __init__(self, n_in: int, n_latent: int, hidden: Sequence[int] = (128,),
                 input_transform: str = "log1p"):
        super().__init__()
        if input_transform not in ("log1p", "raw"):
            raise ValueError(f"input_transform must be 'log1p' or 'raw', got {input_transform!r}")
        self.input_transform = input_transform
        self.body = mlp(n_in, hidden)
        width = hidden[-1] if len(hidden) else n_in
        self.last = PyroModule[nn.Linear](width, width)
        self.loc_head = PyroModule[nn.Linear](width, n_latent)
        self.log_scale_head = PyroModule[nn.Linear](width, n_latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.log1p(x) if self.input_transform == "log1p" else x
        h = self.last(self.body(h))
        return self.loc_head(h), self.log_scale_head(h).exp() + 1e-4
