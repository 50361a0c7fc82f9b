"""Neural building blocks shared by the models: MLP encoders and the product of experts."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from .likelihoods import nonzeros


def mlp(n_in: int, hidden: Sequence[int]) -> PyroModule:
    """Blocks ``Linear -> ReLU -> LayerNorm`` for each width in ``hidden`` (DESIGN section 3)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [PyroModule[nn.Linear](n_in, width), nn.ReLU(), PyroModule[nn.LayerNorm](width)]
        n_in = width
    return PyroModule[nn.Sequential](*layers)


#: Largest share of non-zero inputs for which :class:`GaussianEncoder` (``sparse_input=True``)
#: computes its first layer from the non-zero entries only
SPARSE_INPUT_MAX_DENSITY = 0.2


class _SparseRowsLinear(torch.autograd.Function):
    """``y = X W^T + b`` for X (B, n_in) given by its non-zero entries (row, col, value, in
    row-major order): the forward pass gathers the weight columns of each cell's non-zero
    inputs (``embedding_bag``), the weight gradient is X^T dY through a sparse matrix; both cost
    nnz x n_out instead of B x n_in x n_out. No gradient for X."""

    @staticmethod
    def forward(ctx, row, col, values, n_rows, weight, bias):
        counts = torch.bincount(row, minlength=n_rows)
        offsets = counts.cumsum(0) - counts
        out = F.embedding_bag(col, weight.t().contiguous(), offsets, mode="sum", per_sample_weights=values)
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(row, col, values)
        ctx.sizes = (n_rows, weight.shape[1])
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        row, col, values = ctx.saved_tensors
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[4]:
            x_t = torch.sparse_coo_tensor(torch.stack([col, row]), values, (ctx.sizes[1], ctx.sizes[0]),
                                          check_invariants=False)
            grad_weight = torch.sparse.mm(x_t, grad).t()
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = grad.sum(0)
        return None, None, None, None, grad_weight, grad_bias


class GaussianEncoder(PyroModule):
    """Amortised diagonal-Gaussian posterior over a latent from counts.

    Input: counts ``x`` of shape (B, n_in). By default ``log1p(x)`` is fed to the network
    (``input_transform="raw"`` feeds counts as they are). Output: ``(loc, scale)``, each
    (B, n_latent), with ``scale = exp(log_scale) + 1e-4``.

    ``sparse_input=True``: when at most :data:`SPARSE_INPUT_MAX_DENSITY` of a minibatch's
    inputs are non-zero (single-cell counts usually), the first layer reads only the non-zero
    entries (:class:`_SparseRowsLinear`; the same values up to float rounding, both input
    transforms map 0 to 0); denser minibatches, inputs that require a gradient and encoders
    without hidden layers take the dense path.
    """

    def __init__(self, n_in: int, n_latent: int, hidden: Sequence[int] = (128,),
                 input_transform: str = "log1p", sparse_input: bool = False):
        super().__init__()
        if input_transform not in ("log1p", "raw"):
            raise ValueError(f"input_transform must be 'log1p' or 'raw', got {input_transform!r}")
        self.input_transform = input_transform
        self.sparse_input = sparse_input
        self.body = mlp(n_in, hidden)
        width = hidden[-1] if len(hidden) else n_in
        self.last = PyroModule[nn.Linear](width, width)
        self.loc_head = PyroModule[nn.Linear](width, n_latent)
        self.log_scale_head = PyroModule[nn.Linear](width, n_latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._sparse_first_layer(x) if self.sparse_input else None
        if h is None:
            h = self.body(torch.log1p(x) if self.input_transform == "log1p" else x)
        else:
            for layer in list(self.body)[1:]:
                h = layer(h)
        h = self.last(h)
        return self.loc_head(h), self.log_scale_head(h).exp() + 1e-4

    def _sparse_first_layer(self, x: torch.Tensor) -> torch.Tensor | None:
        """The first hidden layer's Linear output from the non-zero inputs, or None (dense path)."""
        if len(self.body) == 0 or x.dim() != 2 or x.requires_grad or not x.numel():
            return None
        nz = nonzeros(x)
        if nz.index.numel() > SPARSE_INPUT_MAX_DENSITY * x.numel():
            return None
        values = torch.log1p(nz.values) if self.input_transform == "log1p" else nz.values
        first = self.body[0]
        return _SparseRowsLinear.apply(nz.row, nz.col, values, x.shape[0], first.weight, first.bias)


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
