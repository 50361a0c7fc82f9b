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


NORMS = ("batch", "layer", "none")


class FCLayers(PyroModule):
    """Blocks ``Linear -> norm -> ReLU -> Dropout``, one per width in ``hidden``, with the
    one-hot codes of categorical covariates concatenated to the input of every block (as
    scvi-tools' ``FCLayers`` with ``inject_covariates``).

    norm : ``"batch"`` (BatchNorm1d, momentum 0.01, eps 1e-3, as scvi-tools), ``"layer"`` or
        ``"none"``. Input ``x`` (B, n_in) and ``covariates`` (B, n_cov) float one-hot (or None);
        output (B, hidden[-1]) (``x`` itself when ``hidden`` is empty).
    """

    def __init__(self, n_in: int, hidden: Sequence[int], n_cov: int = 0, norm: str = "batch",
                 dropout: float = 0.1):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        blocks = []
        for width in hidden:
            layers: list[nn.Module] = [PyroModule[nn.Linear](n_in + n_cov, width)]
            if norm == "batch":
                layers.append(PyroModule[nn.BatchNorm1d](width, momentum=0.01, eps=1e-3))
            elif norm == "layer":
                layers.append(PyroModule[nn.LayerNorm](width, elementwise_affine=False))
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            blocks.append(PyroModule[nn.Sequential](*layers))
            n_in = width
        self.blocks = PyroModule[nn.ModuleList](blocks)
        self.n_cov = n_cov

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(torch.cat([x, covariates], dim=-1) if self.n_cov else x)
        return x


def one_hot_covariates(codes: torch.Tensor, n_categories: Sequence[int]) -> torch.Tensor | None:
    """One-hot codes of every categorical covariate side by side, (B, sum(n_categories)) float;
    None without covariates. ``codes``: (B, n_covariates) integer category codes."""
    if not n_categories:
        return None
    return torch.cat([nn.functional.one_hot(codes[:, k], n).float() for k, n in enumerate(n_categories)], dim=-1)
